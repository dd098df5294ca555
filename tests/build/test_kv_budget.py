"""Default KV pools: sized to the model and the machine, whichever is smaller, and saying why."""
from __future__ import annotations

from build_scripts.kv_budget import (BATCH_SEQUENCES, CPU_MEMORY_FRACTION, CPU_SEQUENCES, GPU_MEMORY_FRACTION,
                                     HOST_KV_FACTOR, HOST_MEMORY_FRACTION, available_ram, default_budget)

GIB = 2**30
SMOLLM2_F32 = 2 * 30 * 3 * 64 * 4  # bytes of KV per token: K and V, 30 layers, 3 KV heads of 64, float32


def test_a_cpu_gets_a_few_longest_requests_when_memory_allows():
    b = default_budget(SMOLLM2_F32, 4096, 540_000_000, ram=20 * GIB)
    assert b.device_bytes == CPU_SEQUENCES * 4096 * SMOLLM2_F32  # 0.35 GiB, not gigabytes
    assert b.host_bytes == HOST_KV_FACTOR * b.device_bytes
    assert b.reason == f"device pool: {CPU_SEQUENCES} requests of 4096 tokens on a CPU; host pool: 2x the device pool"


def test_a_small_machine_bounds_both_pools_by_its_available_ram():
    b = default_budget(SMOLLM2_F32, 4096, 540_000_000, ram=2 * GIB)
    assert b.device_bytes == int(CPU_MEMORY_FRACTION * 2 * GIB) < CPU_SEQUENCES * 4096 * SMOLLM2_F32
    assert b.host_bytes == min(HOST_KV_FACTOR * b.device_bytes, int(HOST_MEMORY_FRACTION * 2 * GIB))
    assert "10% of the 2.0 GiB of RAM available" in b.reason


def test_a_gpu_takes_its_free_memory_less_the_weights_up_to_two_full_batches():
    llama8b_bf16 = 2 * 32 * 8 * 128 * 2
    b = default_budget(llama8b_bf16, 8192, 16 * GIB, gpu_free=78 * GIB, ram=200 * GIB)
    assert b.device_bytes == int(GPU_MEMORY_FRACTION * 78 * GIB) - 16 * GIB
    assert b.host_bytes == int(HOST_MEMORY_FRACTION * 200 * GIB) < HOST_KV_FACTOR * b.device_bytes
    small = default_budget(llama8b_bf16, 256, 16 * GIB, gpu_free=78 * GIB, ram=200 * GIB)
    assert small.device_bytes == BATCH_SEQUENCES * 256 * llama8b_bf16  # never more than a running + staged batch


def test_weights_that_fill_the_gpu_leave_no_pool():
    assert default_budget(1024, 1024, 80 * GIB, gpu_free=78 * GIB, ram=GIB).device_bytes == 0


def test_available_ram_reads_the_machine():
    assert 0 < available_ram() < 2**50
