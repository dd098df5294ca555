"""Benchmark workloads: one `Workload` noun, made from traces, the paper's mixes or published statistics.

- workload.py   the noun: `Workload` of `WorkloadRequest` (prompt length, output length, arrival),
                `stats()`, `describe()`; prompt token ids made lazily from the seed
- azure.py      replay of the Azure LLM traces 2023 (own timestamps, rescaled, first n or a sample)
- window.py     fitting trace lengths into a small engine's max_seq_len (real engines on a CPU)
- arrivals.py   all-at-once, Poisson and gamma schedules as `vllm bench serve`, trace rescaling
- synthetic.py  the paper's short/long mixes (70-95% short)
- published.py  ShareGPT-like and LongBench-like lengths from the papers' published figures
- registry.py   `make_workload(name, n, seed, **kw)` for experiment matrices
"""
from bench.workloads.arrivals import ARRIVALS, arrival_offsets, rescale_offsets, schedule
from bench.workloads.azure import (
    CODE_TRACE, CONV_TRACE, TRACES, TraceRow, azure_workload, choose_rows, draw_workload, load_trace,
)
from bench.workloads.published import (
    LONGBENCH_TASKS, SHAREGPT_INPUT, SHAREGPT_OUTPUT, LogNormalLength, LongBenchTask, longbench_workload,
    sharegpt_workload,
)
from bench.workloads.registry import PAPER_SYNTHETIC, WORKLOAD_NAMES, make_workload
from bench.workloads.synthetic import synthetic_mix
from bench.workloads.window import WindowFit, context_scale, default_output_reserve, fit_lengths
from bench.workloads.workload import (
    BOS_ID, TOKEN_RANGE, BenchRequest, Workload, WorkloadRequest, length_stats,
)

__all__ = [
    "ARRIVALS", "BOS_ID", "CODE_TRACE", "CONV_TRACE", "LONGBENCH_TASKS", "PAPER_SYNTHETIC", "SHAREGPT_INPUT",
    "SHAREGPT_OUTPUT", "TOKEN_RANGE", "TRACES", "WORKLOAD_NAMES", "BenchRequest", "LogNormalLength",
    "LongBenchTask", "TraceRow", "WindowFit", "Workload", "WorkloadRequest", "arrival_offsets", "azure_workload",
    "choose_rows", "context_scale", "default_output_reserve", "draw_workload", "fit_lengths", "length_stats",
    "load_trace", "longbench_workload", "make_workload", "rescale_offsets", "schedule", "sharegpt_workload",
    "synthetic_mix",
]
