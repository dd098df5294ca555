"""The sim engine: the engine contract in virtual time (DESIGN.md §4, "sim").

`profiles` names the hardware and models, `cost_model` turns a call (a prefill, a decode step, a
KV transfer) into seconds on them, `dispatch` says how each named decode attention kernel deals
its work to the SMs (with constants fitted on a GPU probe where one was measured), `step_cost` is
the decode-step cost the sim engine reports to policies, and `calibration` fits the cost model's
free constants from the per-call timings a real engine records (numpy only: the command that
takes those timings from the torch engine is `python -m bench.calibrate`, and nothing here
imports torch). The engine that advances virtual time with these lives beside them.
"""
