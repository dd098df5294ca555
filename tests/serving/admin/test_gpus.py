"""GpuProbe against stand-ins for NVML: a host without the driver, and a GPU whose counters are
read, converted to bytes and rates, and left null where the GPU does not support them."""
from __future__ import annotations

from types import SimpleNamespace

import pynvml

from serving.admin.gpus import GpuProbe


class FakeNvml:
    """The pynvml functions GpuProbe calls, for one H200-like GPU without power readings."""

    NVML_PCIE_UTIL_TX_BYTES = pynvml.NVML_PCIE_UTIL_TX_BYTES
    NVML_PCIE_UTIL_RX_BYTES = pynvml.NVML_PCIE_UTIL_RX_BYTES
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX = pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX

    def __init__(self):
        self.nvlink_kib = 1000
        self.shutdown = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("gpu", i)

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=30 << 30, total=141 << 30, free=111 << 30)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetPcieThroughput(self, h, counter):
        return {self.NVML_PCIE_UTIL_TX_BYTES: 2000, self.NVML_PCIE_UTIL_RX_BYTES: 500}[counter]  # KB/s

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 54

    def nvmlDeviceGetPowerUsage(self, h):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetFieldValues(self, h, ids):
        assert ids == [self.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX]
        return [SimpleNamespace(nvmlReturn=0, value=SimpleNamespace(ullVal=self.nvlink_kib))]


class NoDriver:
    def nvmlInit(self):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)


def test_no_driver_is_a_state_not_an_error():
    probe = GpuProbe(nvml=NoDriver())
    for _ in range(2):  # and stays so
        assert probe.read() == {"available": False, "gpus": [],
                                "reason": "no NVIDIA driver: NVML could not be loaded (NVML Shared Library Not Found)"}


def test_gpu_figures_in_bytes_and_rates():
    nvml, now = FakeNvml(), [100.0]
    probe = GpuProbe(nvml=nvml, clock=lambda: now[0])
    first = probe.read()
    assert first["available"] is True and first["reason"] is None
    (gpu,) = first["gpus"]
    assert gpu == {"index": 0, "name": "NVIDIA H200", "utilization_pct": 87, "memory_used_bytes": 30 << 30,
                   "memory_total_bytes": 141 << 30, "pcie_tx_bytes_s": 2000 * 1024, "pcie_rx_bytes_s": 500 * 1024,
                   "nvlink_tx_bytes_s": None,  # a cumulative counter: no rate from one reading
                   "temperature_c": 54, "power_w": None}  # not supported: null, the rest still there
    now[0] += 2.0
    nvml.nvlink_kib += 4096
    assert probe.read()["gpus"][0]["nvlink_tx_bytes_s"] == 4096 * 1024 / 2.0
    probe.close()
    assert nvml.shutdown
