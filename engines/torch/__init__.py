"""The built-in torch engine: a Llama-family decoder on paged KV caches (DESIGN.md §4).

model_config (the config.json fields every architecture reads alike; no torch import),
models/ (the shared decoder layers, one file per architecture, and the registry that reads
config.json through them), safetensors_io (header reading, and why a file is corrupt), weights
(the one check of a checkpoint's weights, which make build-engine runs too, and loading), rope,
kv_cache (block allocator, block tables, the device caches and the host pool), kv_transfer
(asynchronous block copies between any two pools), kv_tiers (the pools by tier name and the moves
under way), forward_batch (one forward's inputs), sampler, engine (`TorchEngine`).
"""
