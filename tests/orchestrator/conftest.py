"""The orchestrator tests' fault switch: a real engine whose next call can be made to fail."""
from __future__ import annotations

import pytest

from engines.base import EngineError
from engines.torch.engine import TorchEngine
from tests.engines.torch_probe import fail_next_copy


class FaultSwitch:
    """Wraps a real engine; when armed, its next prefill, decode or move fails (a move either
    refused at start, or a copy that fails mid-transfer)."""

    def __init__(self, engine):
        self._engine = engine
        self.armed: str | None = None
        self.armed_src: str | None = None
        """With "move" or "copy": only a move out of this tier trips the fault (None: any)."""

    def arm(self, fault: str, src: str | None = None) -> None:
        self.armed, self.armed_src = fault, src

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def prefill(self, requests, device=None):
        if self.armed == "prefill":
            self.armed = None
            raise EngineError("injected prefill failure")
        return self._engine.prefill(requests, device)

    def decode(self, request_ids):
        if self.armed == "decode":
            self.armed = None
            raise EngineError("injected decode failure")
        return self._engine.decode(request_ids)

    def start_prefill(self, requests, device):
        if self.armed == "prefill":
            self.armed = None
            raise EngineError("injected prefill failure")
        return self._engine.start_prefill(requests, device)

    def mixed_step(self, request_ids, chunks):
        if self.armed in ("decode", "prefill"):
            self.armed = None
            raise EngineError("injected mixed step failure")
        return self._engine.mixed_step(request_ids, chunks)

    def move(self, request_ids, src, dst):
        if self.armed_src is not None and src != self.armed_src:
            return self._engine.move(request_ids, src, dst)
        if self.armed == "move":
            self.armed = None
            raise EngineError("injected move refusal")
        if self.armed == "copy" and not isinstance(self._engine, TorchEngine):
            self.armed = None
            self._engine.inject_copy_fault("error")  # the sim engine fails the copy when it lands
        elif self.armed == "copy":
            # The real engine starts the move, but its copy fails: the engine must give back the
            # destination blocks and keep the KV where it was.
            self.armed = None
            fail_next_copy(self._engine)
        return self._engine.move(request_ids, src, dst)


@pytest.fixture(scope="session")
def fault_switch():
    """The FaultSwitch class: wrap a real engine with it, then arm a fault."""
    return FaultSwitch
