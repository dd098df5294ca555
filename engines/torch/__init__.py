"""The built-in torch engine: a Llama-family decoder on paged KV caches (DESIGN.md §4).

- engine: `TorchEngine`, the contract's calls (prefill, decode, mixed_step, move, free).
- placement: device names -> KV tiers, and a model replica and KV cache on each.
- chunked_prefill: a mixed step's chunk checks, sampling state, commit and undo.
- sequence: `SequenceState`, what the engine remembers about a request between calls.
- model_config: `ModelConfig` and the config.json fields every architecture reads alike (no torch).
- models/: the architectures. layers (the shared decoder: RMSNorm, paged attention, SwiGLU MLP,
  CausalLM), base (`Architecture`), llama, mistral, qwen2, and the registry in its __init__
  (`config_from_dir`, `expected_tensor_shapes`). A new architecture is one file there.
- weights: the one check of a checkpoint's weights (which make build-engine runs too), and loading.
- safetensors_io: header reading, and why a file is corrupt.
- forward_batch (one forward's tokens laid out as rows) and attention (the attention paths:
  varlen, whose cost follows the real tokens, and padded, the fallback); rope, sampler.
- kv_cache (block allocator, block tables, the device caches and the host pool), kv_transfer
  (asynchronous block copies between any two pools), kv_tiers (the pools by tier name and the
  moves under way).

Test-only views (logits, KV contents, copy faults) live in tests/engines/torch_probe.py.
"""
