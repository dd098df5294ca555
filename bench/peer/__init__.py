"""`make bench-peer`: vLLM's CPU build and AlignedServe side by side on this machine, same model
(the engine directory's weights), same prompts, same client (`vllm bench serve`).

- `setup_vllm.sh`: vLLM's CPU build in its own venv under .cache/ (cached).
- `prompts.py`: real text cut to exact token lengths, fixed by a seed.
- `servers.py`: each server started and stopped by its PID on free loopback ports.
- `machine.py`: load averages and the CPU time other processes took during a run.
- `results.py`: `vllm bench serve`'s result JSON read, the two servers paired, the table.
- `floor.py`: transformers' static-batch `generate` on the same prompts, the floor.
- `__main__.py`: the run (`python -m bench.peer --help`).
"""
