"""What Dynamo's KV router sees of the workers' caches: `python -m serving.cluster.kv_probe '[token ids]'`.

Run with a cluster's environment (`Cluster.environment()`): asks Dynamo's own KV index (a
`KvRouter` over the workers' endpoint, which reads their KV events and, when it starts, each
worker's own index) how many blocks of the prompt each worker holds on its device; prints
`{"worker id": blocks}` as JSON. It routes nothing.
"""
from __future__ import annotations

import asyncio
import json
import sys

from dynamo.llm import KvRouter, KvRouterConfig
from dynamo.runtime import DistributedRuntime

from serving.cluster.length_router import POOL_NAMESPACE
from serving.cluster.routing import device_overlap
from serving.cluster.worker import COMPONENT


async def overlap(token_ids: list[int], namespace: str, block_size: int) -> dict[str, int]:
    runtime = DistributedRuntime(asyncio.get_running_loop(), "file", "tcp")
    endpoint = runtime.endpoint(f"{namespace}.{COMPONENT}.generate")
    await (await endpoint.client()).wait_for_instances()
    router = KvRouter(endpoint, block_size, KvRouterConfig(router_track_active_blocks=False))
    await asyncio.sleep(1.0)  # the index fills from the workers' own indexes as it starts
    scores = await router.get_overlap_scores(token_ids)
    return {str(w): blocks for w, blocks in device_overlap(scores).items()}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    token_ids = json.loads(args[0])
    namespace = args[1] if len(args) > 1 else POOL_NAMESPACE
    block_size = int(args[2]) if len(args) > 2 else 16
    print(json.dumps(asyncio.run(overlap(token_ids, namespace, block_size))))


if __name__ == "__main__":
    main()
