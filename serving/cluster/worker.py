"""An AlignedServe engine as an NVIDIA Dynamo worker: `python -m serving.cluster.worker --engine-dir DIR`.

A `dynamo.common.backend.LLMEngine`: Dynamo's frontend tokenizes and sends token ids; `generate`
submits them to this worker's orchestrator (its policy, its KV tiers, its admin dashboard) and
streams the tokens back as the run loop produces them. A request the client drops is cancelled
in the orchestrator (`abort`), which frees its KV. The registration says what the engine is:
its context length, KV block size, device blocks and batch size. The worker publishes KV events
as requests fill and free blocks (`kv_events.py`) and a load snapshot (blocks in use) ten times
a second, which Dynamo's KV router reads.

Dynamo's Rust `Worker` owns the runtime, discovery, signals and shutdown; `cleanup` stops the
orchestrator.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any, AsyncGenerator

from dynamo.common.backend import EngineConfig, LLMEngine, LlmRegistration, WorkerConfig
from dynamo.common.backend.publisher import ComponentSnapshot, PushSource
from dynamo.common.backend.run import run
from dynamo.common.utils.token_ids import normalize_request_token_ids
from dynamo.llm.exceptions import InvalidArgument, Unknown

from engines.manifest import read_manifest
from orchestrator.config import ServeConfig
from orchestrator.core import FinishReason, RequestRejected, TokenEvent
from orchestrator.service import Orchestrator
from serving.cluster.kv_events import RequestBlocks
from serving.cluster.requests import BadRequest, submission, usage
from serving.engine_setup import open_engine

log = logging.getLogger("alignedserve.cluster.worker")
NAMESPACE = "alignedserve"
"""The Dynamo namespace the workers register in (the frontend discovers models there)."""
COMPONENT = "worker"
SNAPSHOT_INTERVAL_S = 0.1
"""How often the load snapshot (KV blocks in use) goes to Dynamo's router."""
_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.CANCELLED: "cancelled"}


class AlignedServeEngine(LLMEngine):
    """One orchestrator and its engine, served to Dynamo."""

    def __init__(self, engine_dir: Path, config: ServeConfig, model_name: str):
        self.engine_dir = engine_dir
        self.config = config
        self.model_name = model_name
        self.orch: Orchestrator | None = None
        self.admin = None
        self._live: dict[str, str] = {}  # Dynamo context id -> orchestrator request id
        self._publisher = None
        self._snapshots = None
        self._stop = threading.Event()
        self._snapshot_thread: threading.Thread | None = None
        self._eos: frozenset[int] = frozenset()

    @classmethod
    async def from_args(cls, argv: list[str] | None = None) -> tuple["AlignedServeEngine", WorkerConfig]:
        args = parser().parse_args(argv)
        engine_dir = Path(args.engine_dir).resolve()
        overrides: dict[str, Any] = {"engine_dir": str(engine_dir), "policy": args.policy}
        if args.admin_port:
            overrides.update(admin_port=args.admin_port, admin_host=args.admin_host)
        config = ServeConfig.load(file=args.config, **overrides)
        name = args.model_name or engine_dir.name
        worker = WorkerConfig(namespace=args.namespace, component=args.component, endpoint="generate",
                              model_name=str(engine_dir), served_model_name=name,
                              discovery_backend=args.discovery_backend, request_plane="tcp",
                              event_plane=args.event_plane)
        return cls(engine_dir, config, name), worker

    async def start(self, worker_id: int) -> EngineConfig:
        manifest = read_manifest(self.engine_dir)
        cfg = self.config
        engine = await asyncio.to_thread(open_engine, self.engine_dir, cfg)
        self.orch = Orchestrator(engine, cfg).start()
        self._eos = frozenset(self.orch.info.model.eos_token_ids)
        if cfg.admin_port:  # this worker's dashboard, on its own port
            from serving.admin import AdminServer
            self.admin = AdminServer(self.orch, host=cfg.admin_host, port=cfg.admin_port,
                                     token=cfg.admin_token or None).start()
        device = self.orch.info.decode_device
        log.info("AlignedServe worker %s ready: %s, policy %s, %d KV blocks on %s%s", worker_id, self.engine_dir,
                 cfg.policy, self.orch.ledger.capacity(device), device,
                 f", dashboard {self.admin.url}" if self.admin else "")
        return EngineConfig(
            model=str(self.engine_dir), served_model_name=self.model_name,
            llm=LlmRegistration(context_length=self.orch.config.max_seq_len,
                                kv_cache_block_size=manifest.kv_block_size,
                                total_kv_blocks=self.orch.ledger.capacity(device),
                                max_num_seqs=cfg.max_batch_size,
                                max_num_batched_tokens=cfg.max_prefill_tokens),
            runtime_data={"alignedserve_policy": cfg.policy,
                          "alignedserve_dashboard": self.admin.url if self.admin else ""})

    async def generate(self, request: dict, context) -> AsyncGenerator[dict, None]:
        orch = self.orch
        normalize_request_token_ids(request)  # a packed int32 buffer where the frontend sends one
        try:
            sub = submission(request, self._eos)
        except BadRequest as e:
            raise InvalidArgument(str(e)) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def on_event(event: TokenEvent) -> None:  # the run loop's thread: hand over, never block
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop closed: nobody listens any more
                pass

        try:
            req = orch.submit(sub.prompt_ids, sub.max_tokens, sub.sampling, None, sub.stop_sequences, on_event,
                              ignore_eos=sub.ignore_eos)
        except RequestRejected as e:
            raise InvalidArgument(str(e)) from None
        self._live[context.id()] = req.id
        blocks = RequestBlocks(req.id, sub.prompt_ids, self.orch.info.block_size, self._publisher)
        done, ended = 0, False
        try:
            while True:
                event = await events.get()
                done += len(event.token_ids)
                blocks.advance(event.token_ids)
                ended = event.final
                if event.finish_reason is FinishReason.ERROR:
                    raise Unknown(f"generation failed: {event.error}")
                chunk: dict[str, Any] = {"token_ids": list(event.token_ids), "index": 0}
                if event.final:
                    chunk["finish_reason"] = _FINISH[event.finish_reason]
                    chunk["completion_usage"] = usage(len(sub.prompt_ids), done)
                    yield chunk
                    return
                yield chunk
        finally:
            self._live.pop(context.id(), None)
            blocks.release()
            if not ended:  # the stream was dropped mid-way (abort may not have come): free its KV
                orch.cancel(req.id)

    async def abort(self, context) -> None:
        request_id = self._live.get(context.id())
        if request_id is not None and self.orch is not None:
            self.orch.cancel(request_id)

    async def kv_event_sources(self) -> list:
        return [PushSource(on_ready=self._attach_kv_publisher, dp_rank=0)]

    def _attach_kv_publisher(self, publisher) -> None:
        self._publisher = publisher

    def component_metrics_dp_ranks(self) -> list[int]:
        return [0]

    def attach_snapshot_publisher(self, publisher) -> None:
        self._snapshots = publisher
        self._snapshot_thread = threading.Thread(target=self._publish_load, name="alignedserve-load", daemon=True)
        self._snapshot_thread.start()

    def _publish_load(self) -> None:
        """Blocks in use on the decode device, for the router's load term."""
        while not self._stop.wait(SNAPSHOT_INTERVAL_S):
            if self.orch is None:
                continue
            tier = self.orch.snapshot().kv[self.orch.info.decode_device]
            self._snapshots.publish(0, ComponentSnapshot(
                kv_used_blocks=tier.reserved, kv_total_blocks=tier.capacity,
                gpu_cache_usage=tier.reserved / max(tier.capacity, 1), dp_rank=0))

    async def cleanup(self) -> None:
        self._stop.set()
        if self._snapshot_thread is not None:
            self._snapshot_thread.join(timeout=1.0)
            self._snapshot_thread = None
        if self.admin is not None:
            self.admin.stop()
            self.admin = None
        if self.orch is not None:
            orch, self.orch = self.orch, None
            await asyncio.to_thread(orch.stop)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.cluster.worker",
                                description="An AlignedServe engine as an NVIDIA Dynamo worker.")
    p.add_argument("--engine-dir", required=True, help="an engine built by `make build-engine`")
    p.add_argument("--model-name", default="", help="the name clients ask for (default: the engine directory's)")
    p.add_argument("--policy", default=os.environ.get("ALIGNED_POLICY", "adaptive"), help="the decode policy")
    p.add_argument("--config", default=os.environ.get("ALIGNED_CONFIG"), help="a ServeConfig file (TOML or JSON)")
    p.add_argument("--admin-port", type=int, default=0, help="this worker's dashboard port (0: none)")
    p.add_argument("--admin-host", default="127.0.0.1")
    p.add_argument("--namespace", default=NAMESPACE)
    p.add_argument("--component", default=COMPONENT)
    p.add_argument("--discovery-backend", default=os.environ.get("DYN_DISCOVERY_BACKEND", "file"),
                   choices=["file", "etcd", "kubernetes", "mem"],
                   help="file: one host, no etcd (the default); etcd or kubernetes: several hosts")
    p.add_argument("--event-plane", default=os.environ.get("DYN_EVENT_PLANE"), choices=["zmq", "nats"])
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run(AlignedServeEngine, argv)


if __name__ == "__main__":
    main()
