"""The Dynamo worker's engine side, driven as Dynamo's Rust Worker drives it (start, generate with
a real `dynamo._core.Context`, abort, cleanup), on the demo engine, without a runtime."""
from __future__ import annotations

import asyncio

import pytest
from dynamo._core import Context
from dynamo.llm.exceptions import InvalidArgument, Unknown

from serving.cluster.worker import AlignedServeEngine


async def _started(engine_dir, *argv):
    worker, config = await AlignedServeEngine.from_args(["--engine-dir", str(engine_dir), *argv])
    registration = await worker.start(worker_id=7)
    return worker, config, registration


async def _collect(worker, request, context, stop_after=None):
    chunks = []
    async for chunk in worker.generate(request, context):
        chunks.append(chunk)
        if stop_after is not None and len(chunks) == stop_after:
            await worker.abort(context)
    return chunks


def test_registration_is_the_engines(demo_engine_dir):
    async def run():
        worker, config, reg = await _started(demo_engine_dir, "--model-name", "demo-x")
        try:
            assert (config.namespace, config.component, config.discovery_backend) == ("alignedserve", "worker", "file")
            assert config.served_model_name == "demo-x" and reg.served_model_name == "demo-x"
            device = worker.orch.info.decode_device
            assert reg.llm.context_length == worker.orch.config.max_seq_len == 256
            assert reg.llm.kv_cache_block_size == worker.orch.info.block_size
            assert reg.llm.total_kv_blocks == worker.orch.ledger.capacity(device) > 0
            assert reg.llm.max_num_seqs == worker.orch.config.max_batch_size
        finally:
            await worker.cleanup()
            await worker.cleanup()  # a second cleanup is a no-op, as Dynamo's conformance kit asks
    asyncio.run(run())


def test_tokens_stream_to_max_tokens_with_usage(demo_engine_dir):
    async def run():
        worker, _, _ = await _started(demo_engine_dir)
        try:
            request = {"token_ids": [1, 5, 9, 13], "stop_conditions": {"max_tokens": 6, "ignore_eos": True},
                       "sampling_options": {"temperature": 0}}
            chunks = await _collect(worker, request, Context())
            again = await _collect(worker, request, Context())
        finally:
            await worker.cleanup()
        tokens = [t for c in chunks for t in c["token_ids"]]
        assert len(tokens) == 6 and [t for c in again for t in c["token_ids"]] == tokens  # greedy: the same
        assert [c.get("finish_reason") for c in chunks][-1] == "length"
        assert all("finish_reason" not in c for c in chunks[:-1])
        assert chunks[-1]["completion_usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    asyncio.run(run())


def test_abort_cancels_in_the_orchestrator_and_frees_the_kv(demo_engine_dir):
    async def run():
        worker, _, _ = await _started(demo_engine_dir)
        try:
            request = {"token_ids": [1, 2, 3], "stop_conditions": {"max_tokens": 200, "ignore_eos": True}}
            chunks = await _collect(worker, request, Context(), stop_after=2)
            for _ in range(100):
                snap = worker.orch.snapshot()
                if not snap.live and all(t.used == 0 and t.reserved == 0 for t in snap.kv.values()):
                    break
                await asyncio.sleep(0.05)
            assert not snap.live and all(t.used == 0 and t.reserved == 0 for t in snap.kv.values())
            assert snap.totals["finished"].get("cancelled") == 1
        finally:
            await worker.cleanup()
        assert chunks[-1]["finish_reason"] == "cancelled"
        assert sum(len(c["token_ids"]) for c in chunks) < 200
    asyncio.run(run())


def test_refusals_name_the_field_and_engine_errors_end_the_stream(demo_engine_dir, monkeypatch):
    monkeypatch.setenv("ALIGNED_FAULT_INJECTION", "1")

    async def run():
        worker, _, _ = await _started(demo_engine_dir)
        try:
            with pytest.raises(InvalidArgument, match="max_tokens"):
                await _collect(worker, {"token_ids": [1, 2], "stop_conditions": {"max_tokens": 10_000}}, Context())
            with pytest.raises(InvalidArgument, match="n: 3 choices"):
                await _collect(worker, {"token_ids": [1, 2], "sampling_options": {"n": 3}}, Context())
            worker.orch.faults.arm("decode_error")
            with pytest.raises(Unknown, match="injected"):
                await _collect(worker, {"token_ids": [1, 2], "stop_conditions": {"max_tokens": 8}}, Context())
            # and it keeps serving
            ok = await _collect(worker, {"token_ids": [1, 2], "stop_conditions": {"max_tokens": 3, "ignore_eos": True}},
                                Context())
            assert ok[-1]["finish_reason"] == "length"
        finally:
            await worker.cleanup()
    asyncio.run(run())
