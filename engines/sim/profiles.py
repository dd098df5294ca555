"""Named hardware and model profiles: the datasheet and config.json numbers the cost model uses.

Every number names its source. Hardware numbers are datasheet *peaks*; what a kernel reaches of
them is the cost model's business (`CostConstants`), not the profile's. Where a datasheet quotes
a peak no dense kernel can reach (tensor-core FLOP/s "with sparsity"), the dense figure is taken.
Link bandwidths are per direction (PCIe and NVLink are full duplex; datasheets quote both
directions added). Byte sizes are decimal (1 GB = 1e9 B), as the datasheets print them.

Look a profile up by name with `hardware_profile("H100-SXM")` or `model_profile("OPT-13B")`;
`PROFILES` holds them all. Which decode attention kernels a GPU runs and how each deals its work
to the SMs (with the constants measured on it) is `engines.sim.dispatch.kernel_for(hardware, name)`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

GB = 10**9
TB = 10**12


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """One accelerator and the links around it (one GPU of a node)."""

    name: str
    hbm_bandwidth: float
    """Device memory bandwidth, bytes/s (datasheet peak)."""
    dense_flops: float
    """Dense matmul FLOP/s in the model's dtype: bf16 tensor cores for the GPU profiles."""
    sm_count: int
    """Streaming multiprocessors: how many attention work units run at once (a CPU: its threads)."""
    hbm_bytes: int
    """Device memory capacity."""
    pcie_bandwidth: float
    """Host<->device link, bytes/s one way."""
    pcie_latency: float
    """Fixed seconds per host<->device copy call."""
    nvlink_bandwidth: float
    """Device<->device link, bytes/s one way."""
    nvlink_latency: float
    """Fixed seconds per device<->device copy call."""
    host_memory_bytes: int
    """Host DRAM of the whole node, shared by its GPUs (where the host KV pool lives)."""
    source: str = ""
    """Where the numbers come from, for the reports."""

    def __post_init__(self) -> None:
        for f in ("hbm_bandwidth", "dense_flops", "sm_count", "hbm_bytes", "pcie_bandwidth",
                  "nvlink_bandwidth", "host_memory_bytes"):
            if not getattr(self, f) > 0:
                raise ValueError(f"HardwareProfile {self.name!r}: {f} must be > 0, got {getattr(self, f)}")
        for f in ("pcie_latency", "nvlink_latency"):
            if not getattr(self, f) >= 0:
                raise ValueError(f"HardwareProfile {self.name!r}: {f} must be >= 0, got {getattr(self, f)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> HardwareProfile:
        return cls(**d)


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """The shape of a decoder-only transformer, as far as time and memory go."""

    name: str
    layers: int
    hidden: int
    heads: int
    """Query heads."""
    kv_heads: int
    """Key/value heads: = heads for multi-head attention (OPT), fewer for GQA (Llama 3)."""
    head_dim: int
    intermediate: int
    """MLP width (OPT `ffn_dim`, Llama `intermediate_size`)."""
    vocab: int
    params: int
    """All parameters of the checkpoint."""
    max_seq_len: int
    """Longest context the model was trained for (config.json `max_position_embeddings`)."""
    bytes_per_param: int = 2
    """Bytes per weight and per KV element (bf16 = 2): weights and KV share the dtype."""
    source: str = ""

    def __post_init__(self) -> None:
        for f in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "params",
                  "max_seq_len", "bytes_per_param"):
            if not getattr(self, f) > 0:
                raise ValueError(f"ModelProfile {self.name!r}: {f} must be > 0, got {getattr(self, f)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"ModelProfile {self.name!r}: heads ({self.heads}) must be a multiple of "
                             f"kv_heads ({self.kv_heads})")

    @property
    def weight_bytes(self) -> int:
        """Bytes a forward pass reads once for the weights."""
        return self.params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers: 2 * layers * kv_heads * head_dim * bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_param

    @property
    def flops_per_token(self) -> int:
        """Matmul FLOPs of one token through the linear layers: 2 (multiply + add) per parameter.
        This counts lookups (input and position embeddings) as if they were matmuls, and prefill
        applies the LM head to every prompt token where it needs only the last. For the profiles
        here that overcounts a decode token by 0.05% (OPT-30B) to 6.5% (Llama-3-8B) and a prefill
        token by 1.3% to 13%; the fitted efficiency absorbs it."""
        return 2 * self.params

    @property
    def attention_flops_per_token_pair(self) -> int:
        """FLOPs of one (query, key) pair over all layers: QK^T and PV are each 2 * head_dim per
        query head."""
        return 4 * self.layers * self.heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelProfile:
        return cls(**d)

    @classmethod
    def from_hf_config(cls, name: str, config: Mapping, params: int, bytes_per_param: int,
                       source: str = "") -> ModelProfile:
        """From a Hugging Face config.json (Llama/Qwen2/Mistral or OPT key names)."""
        heads = config["num_attention_heads"]
        return cls(
            name=name, layers=config["num_hidden_layers"], hidden=config["hidden_size"], heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate=config.get("intermediate_size") or config["ffn_dim"], vocab=config["vocab_size"],
            params=params, max_seq_len=config["max_position_embeddings"], bytes_per_param=bytes_per_param,
            source=source,
        )


# ---- hardware -----------------------------------------------------------------------------------
# Datasheets:
#   H100: "NVIDIA H100 Tensor Core GPU" datasheet, H100 SXM column,
#         https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
#   H200: "NVIDIA H200 Tensor Core GPU" datasheet, H200 SXM column, https://www.nvidia.com/en-us/data-center/h200/
#   A100: "NVIDIA A100 Tensor Core GPU" datasheet, A100 80GB SXM column,
#         https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
#   SM counts are not on the datasheets: "NVIDIA H100 Tensor Core GPU Architecture" whitepaper
#   (H100 SXM5: 132 SMs; the H200 is the same GH100 configuration) and "NVIDIA A100 Tensor Core GPU
#   Architecture" whitepaper (A100: 108 SMs).
# BF16: the datasheets print the sparse figure (1,979 TFLOPS H100/H200, 624 A100) with a footnote
#   "with sparsity"; dense is half of it (989.4 and 312 TFLOPS, the whitepapers' dense figures),
#   and a dense model's matmuls only ever run dense.
# NVLink: 900 GB/s (H100, H200) and 600 GB/s (A100) are both directions of all links added; one
#   way is half. PCIe: "Gen5 128 GB/s" and "Gen4 64 GB/s" are x16 both directions; one way is half.
# Copy latency: a cudaMemcpyAsync call costs ~5-7 us before bytes move (measured in Wu et al.,
#   "DualPath", arXiv 2602.21548, §5.2); we take 6 us for every copy call, PCIe or NVLink alike,
#   because that launch cost dwarfs the wire latency of either link (sub-microsecond).
# Host memory: the AlignedServe paper's 8xH100 testbed had 800 GB of DRAM (DESIGN.md §1), which is
#   what the H100 profile reproduces; DGX H200 and DGX A100 (640 GB) ship 2 TB (their datasheets).
COPY_LATENCY = 6e-6

H100_SXM = HardwareProfile(
    name="H100-SXM", hbm_bandwidth=3.35 * TB, dense_flops=989.4 * TB, sm_count=132, hbm_bytes=80 * GB,
    pcie_bandwidth=64 * GB, pcie_latency=COPY_LATENCY, nvlink_bandwidth=450 * GB, nvlink_latency=COPY_LATENCY,
    host_memory_bytes=800 * GB,
    source="NVIDIA H100 datasheet (SXM) + H100 architecture whitepaper; host memory: the paper's testbed",
)
H200 = HardwareProfile(
    name="H200", hbm_bandwidth=4.8 * TB, dense_flops=989.4 * TB, sm_count=132, hbm_bytes=141 * GB,
    pcie_bandwidth=64 * GB, pcie_latency=COPY_LATENCY, nvlink_bandwidth=450 * GB, nvlink_latency=COPY_LATENCY,
    host_memory_bytes=2000 * GB,
    source="NVIDIA H200 datasheet (SXM) + H100 architecture whitepaper (SMs); host memory: DGX H200 datasheet",
)
A100_80GB = HardwareProfile(
    name="A100-80GB", hbm_bandwidth=2.039 * TB, dense_flops=312 * TB, sm_count=108, hbm_bytes=80 * GB,
    pcie_bandwidth=32 * GB, pcie_latency=COPY_LATENCY, nvlink_bandwidth=300 * GB, nvlink_latency=COPY_LATENCY,
    host_memory_bytes=2000 * GB,
    source="NVIDIA A100 datasheet (80GB SXM) + A100 architecture whitepaper (SMs); host memory: DGX A100 datasheet",
)

# ---- models -------------------------------------------------------------------------------------
# Shapes: each model's config.json on Hugging Face (facebook/opt-2.7b, -6.7b, -13b, -30b;
#   meta-llama/Meta-Llama-3-8B, -70B), which match Table 1 of the OPT paper (Zhang et al. 2022)
#   and the Llama 3 model card. OPT is multi-head (kv_heads = heads), vocab 50272, learned positions
#   (2048 + 2 rows), tied LM head, biases everywhere; Llama 3 is GQA with 8 KV heads, vocab 128256,
#   untied LM head, no biases.
# params: the sum of the checkpoint's tensor sizes computed from those shapes
#   (OPT: V*d + 2050*d + L*(4d^2 + 2*d*ffn + ffn + 9d) + 2d;
#    Llama: 2*V*d + L*(2*d*h*hd + 2*d*kv*hd + 3*d*ffn + 2d) + d),
#   which reproduces the parameter counts Hugging Face reports (e.g. 12,853,473,280 for OPT-13B).
# bytes_per_param = 2: the paper serves in fp16/bf16.
_OPT = "config.json of facebook/{} on Hugging Face; params computed from its shapes"
_LLAMA = "config.json of meta-llama/Meta-{} on Hugging Face; params computed from its shapes"

OPT_2_7B = ModelProfile("OPT-2.7B", layers=32, hidden=2560, heads=32, kv_heads=32, head_dim=80, intermediate=10240,
                        vocab=50272, params=2_651_596_800, max_seq_len=2048, source=_OPT.format("opt-2.7b"))
OPT_6_7B = ModelProfile("OPT-6.7B", layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=16384,
                        vocab=50272, params=6_658_473_984, max_seq_len=2048, source=_OPT.format("opt-6.7b"))
OPT_13B = ModelProfile("OPT-13B", layers=40, hidden=5120, heads=40, kv_heads=40, head_dim=128, intermediate=20480,
                       vocab=50272, params=12_853_473_280, max_seq_len=2048, source=_OPT.format("opt-13b"))
OPT_30B = ModelProfile("OPT-30B", layers=48, hidden=7168, heads=56, kv_heads=56, head_dim=128, intermediate=28672,
                       vocab=50272, params=29_974_540_288, max_seq_len=2048, source=_OPT.format("opt-30b"))
LLAMA_3_8B = ModelProfile("Llama-3-8B", layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128,
                          intermediate=14336, vocab=128256, params=8_030_261_248, max_seq_len=8192,
                          source=_LLAMA.format("Llama-3-8B"))
LLAMA_3_70B = ModelProfile("Llama-3-70B", layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128,
                           intermediate=28672, vocab=128256, params=70_553_706_496, max_seq_len=8192,
                           source=_LLAMA.format("Llama-3-70B"))

PROFILES: dict[str, HardwareProfile | ModelProfile] = {
    p.name: p for p in (H100_SXM, H200, A100_80GB, OPT_2_7B, OPT_6_7B, OPT_13B, OPT_30B, LLAMA_3_8B, LLAMA_3_70B)
}
"""Every named profile by name (hardware and models share the namespace; names are distinct)."""


def _lookup(name: str, kind: type) -> HardwareProfile | ModelProfile:
    known = {n: p for n, p in PROFILES.items() if isinstance(p, kind)}
    by_fold = {n.casefold(): p for n, p in known.items()}
    if name.casefold() in by_fold:
        return by_fold[name.casefold()]
    what = "hardware" if kind is HardwareProfile else "model"
    raise KeyError(f"unknown {what} profile {name!r}; known {what} profiles: {', '.join(known)}")


def hardware_profile(name: str) -> HardwareProfile:
    """The named hardware profile (case-insensitive); KeyError lists the known names."""
    return _lookup(name, HardwareProfile)


def model_profile(name: str) -> ModelProfile:
    """The named model profile (case-insensitive); KeyError lists the known names."""
    return _lookup(name, ModelProfile)
