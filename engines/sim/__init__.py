"""The sim engine: the engine contract in virtual time (DESIGN.md §4, "sim").

`profiles` names the hardware and models, `cost_model` turns a call (a prefill, a decode step, a
KV transfer) into seconds on them, and `calibration` fits the cost model's free constants from
the per-call timings a real engine records (`torch_timings` takes those timings for its CLI, and
is the only module here that imports torch). The engine that advances virtual time with these
lives beside them.
"""
