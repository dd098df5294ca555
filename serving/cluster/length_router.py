"""The length-aware router between Dynamo's frontend and the AlignedServe workers:
`python -m serving.cluster.length_router --engine-dir DIR`.

Dynamo's frontend routes in its own modes (`round-robin`, `kv`, ...) and has no hook for a new
cost, so this is a Dynamo component of its own, as Dynamo's global router is: it registers the
model in the namespace the frontend serves (`alignedserve`), the workers register theirs in
another (`alignedserve-pool`, which the frontend does not watch), and each request the frontend
sends here is forwarded to the worker `routing.Router` chooses (`Client.direct`, with the
request's context, so a client that goes away cancels it on the worker). The KV-overlap term
comes from Dynamo's own KV index of the workers' KV events (`KvRouter.get_overlap_scores`, only
asked, never routing); the load and length terms from
the requests this router has in flight (it is the only way in, so its count is exact).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from dynamo.common.utils.token_ids import token_ids_to_list
from dynamo.llm import (KvRouter, KvRouterConfig, ModelInput, ModelRuntimeConfig, ModelType, WorkerType,
                        register_model)
from dynamo.llm.exceptions import InvalidArgument
from dynamo.runtime import DistributedRuntime, dynamo_worker

from engines.manifest import read_manifest
from serving.cluster.routing import Router, Weights, device_overlap, expected_len
from serving.cluster.worker import COMPONENT, NAMESPACE

log = logging.getLogger("alignedserve.cluster.router")
POOL_NAMESPACE = "alignedserve-pool"
"""Where the workers register when this router fronts them."""


class LengthRouter:
    """Chooses a worker per request (`routing.Router`) and streams its answer back."""

    def __init__(self, client, indexer, router: Router, context_length: int):
        self.client = client
        self.indexer = indexer
        self.router = router
        self.context_length = context_length

    async def overlap(self, token_ids: list[int]) -> dict[int, int]:
        """Worker id -> prompt blocks it holds on its device (Dynamo's index of the workers' KV events)."""
        if self.indexer is None:
            return {}
        return device_overlap(await self.indexer.get_overlap_scores(token_ids))

    async def generate(self, request: dict, context):
        token_ids = token_ids_to_list(request.get("token_ids")) or []
        request = {**request, "token_ids": token_ids}
        stop = request.get("stop_conditions") or {}
        max_tokens = stop.get("max_tokens")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
            raise InvalidArgument(f"max_tokens: expected an integer, got {max_tokens!r}")
        expected = expected_len(len(token_ids), max_tokens, self.context_length)
        workers = self.client.instance_ids()
        if not workers:
            workers = await self.client.wait_for_instances()
        key = context.id()
        worker = self.router.choose(workers, key, len(token_ids), expected, await self.overlap(token_ids))
        log.debug("request %s (prompt %d, expected KV %d) -> worker %x", key, len(token_ids), expected, worker)
        try:
            stream = await self.client.direct(request, worker, context=context)
            async for item in stream:
                data = item.data() if hasattr(item, "data") else item
                if isinstance(data, dict):
                    self.router.grow(key, len(data.get("token_ids") or ()))
                yield data
        finally:
            self.router.finish(key)


async def serve(runtime: DistributedRuntime, args: argparse.Namespace) -> None:
    engine_dir = Path(args.engine_dir).resolve()
    manifest = read_manifest(engine_dir)
    name = args.model_name or engine_dir.name
    pool = runtime.endpoint(f"{args.pool_namespace}.{COMPONENT}.generate")
    client = await pool.client()
    indexer = KvRouter(pool, manifest.kv_block_size, KvRouterConfig(router_track_active_blocks=False))
    router = Router(block_size=manifest.kv_block_size, mode=args.mode,
                    weights=Weights(overlap=args.overlap_weight, length=args.length_weight))
    handler = LengthRouter(client, indexer, router, manifest.max_seq_len)
    endpoint = runtime.endpoint(f"{args.namespace}.router.generate")
    limits = ModelRuntimeConfig()  # the engine's context, not config.json's max_position_embeddings
    limits.context_length = manifest.max_seq_len
    await register_model(ModelInput.Tokens, ModelType.Chat | ModelType.Completions, endpoint, str(engine_dir), name,
                         worker_type=WorkerType.Aggregated, kv_cache_block_size=manifest.kv_block_size,
                         runtime_config=limits)
    log.info("length router for %s: %s mode, weights overlap %.2f length %.2f, workers in %s",
             name, args.mode, args.overlap_weight, args.length_weight, args.pool_namespace)
    await endpoint.serve_endpoint(handler.generate, graceful_shutdown=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.cluster.length_router",
                                description="Length-aware routing between Dynamo's frontend and AlignedServe workers.")
    p.add_argument("--engine-dir", required=True, help="the workers' engine (its tokenizer, block size, context)")
    p.add_argument("--model-name", default="")
    p.add_argument("--namespace", default=NAMESPACE, help="where the frontend finds the model")
    p.add_argument("--pool-namespace", default=POOL_NAMESPACE, help="where the workers register")
    p.add_argument("--mode", default="length", choices=["length", "kv", "round-robin"],
                   help="length: this router's cost; kv: Dynamo's KV cost computed here; round-robin")
    p.add_argument("--length-weight", type=float, default=Weights.length,
                   help="blocks of padding per block of load: 1 for kernels that do not split long KV, 0 for split-KV kernels (= Dynamo's kv cost)")
    p.add_argument("--overlap-weight", type=float, default=Weights.overlap,
                   help="Dynamo's kv-overlap-score-weight: prefill blocks against decode blocks")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("DYN_DISCOVERY_BACKEND", "file")

    @dynamo_worker()
    async def run(runtime: DistributedRuntime) -> None:
        await serve(runtime, args)

    import uvloop
    uvloop.run(run())


if __name__ == "__main__":
    main()
