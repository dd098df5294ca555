"""The engine a served process runs, built from its ServeConfig: the same for the Triton model
(`model_repo/aligned_llm/1/model.py`) and a Dynamo worker (`serving/cluster/worker.py`)."""
from __future__ import annotations

import logging
from pathlib import Path

from engines.base import Engine
from engines.faults import FaultInjectingEngine
from engines.loader import load_engine
from orchestrator.config import ServeConfig

log = logging.getLogger("alignedserve.engine")


def open_engine(engine_dir: Path, config: ServeConfig) -> Engine:
    """`engine_dir`'s engine with the config's device, dtype, KV blocks and helper devices, wrapped
    for fault injection when `config.fault_injection` is on (soak and fault tests arm faults
    through the admin API). Raises what the loader raises (a missing or corrupt engine, a bad
    setting), with its message."""
    engine = load_engine(engine_dir, device=config.device, dtype=config.dtype or None,
                         kv_blocks=config.kv_blocks or None, helper_devices=config.helpers)
    if config.fault_injection:
        log.warning("fault injection is on: POST /api/faults (admin token) makes engine calls fail")
        engine = FaultInjectingEngine(engine, hang_s=2 * config.transfer_timeout_s)
    return engine
