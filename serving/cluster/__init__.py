"""AlignedServe as NVIDIA Dynamo workers (issue 19): several engines behind Dynamo's
OpenAI-compatible frontend and router.

- `worker.py`: the orchestrator and its engine as a `dynamo.common.backend.LLMEngine`
  (tokens in, tokens out; cancel; KV events; load snapshots). `python -m serving.cluster.worker`.
- `requests.py`: Dynamo's preprocessed request -> the orchestrator's submit arguments.
- `kv_events.py`: the blocks a request's KV fills, as Dynamo's stored / removed events.
- `routing.py`: length-aware worker choice (expected KV length), blended with Dynamo's KV-overlap
  and load terms; pure, shared by the router and the simulated cluster benchmark.
- `length_router.py`: the router component that applies it between the frontend and the workers.
- `launch.py`: `make serve-cluster`: the frontend, N workers (and the router) on loopback.

Only these modules import `dynamo` (the `cluster` extra); the rest of the project never does.
"""
