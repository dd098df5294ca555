"""The policy registry: every policy declares what config validation, the runtime switch and the
dashboard read; `make_policy` refuses what an engine cannot run; and the example policy of
docs/ARCHITECTURE.md, added with one registry entry, runs end to end."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from engines.base import HOST, Capabilities, DeviceInfo, EngineInfo, ModelInfo
from engines.sim.cost_model import CostModel
from engines.sim.engine import SimEngine
from engines.sim.profiles import H100_SXM, OPT_13B
from orchestrator.config import ConfigError, ServeConfig
from orchestrator.core import PolicySwitchRefused
from orchestrator.policies import PARTS, POLICIES, REGISTRY, Policy, make_policy, unavailable
from orchestrator.service import Orchestrator
from orchestrator.stream import TokenStream

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md"


def info(host_blocks: int = 100, helpers: int = 0, chunk: bool = True, peer: bool = True) -> EngineInfo:
    devices = tuple(DeviceInfo(f"cuda:{i}", "cuda", 100) for i in range(1 + helpers))
    caps = Capabilities(can_offload=host_blocks > 0, can_peer_copy=peer and helpers > 0, can_chunk_prefill=chunk)
    return EngineInfo("test", ModelInfo("LlamaForCausalLM", 100, 512, 2, 2, 8, "float32", 1), devices, 16, 1024,
                      host_blocks, caps)


def test_every_policy_declares_what_the_registry_reads():
    assert POLICIES[0] == "adaptive" == ServeConfig().policy and set(POLICIES) == set(REGISTRY)
    for name, cls in REGISTRY.items():
        assert issubclass(cls, Policy) and cls.name == name and cls.summary
        assert cls.parts and cls.parts <= set(PARTS), name
        assert cls.fallback is None or cls.fallback in REGISTRY
        assert ServeConfig(policy=name).policy == name
    with pytest.raises(ConfigError, match="policy: 'random' is not one of " + ", ".join(POLICIES)):
        ServeConfig(policy="random")


@pytest.mark.parametrize("name, engine, words", [
    ("fcfs-offload", info(host_blocks=0), "needs a host KV pool"),
    ("disagg-fcfs", info(), "has only the decode device"),
    ("disagg-fcfs", info(helpers=1, peer=False), "can_peer_copy=False"),
    ("chunked-prefill", info(chunk=False), "can_chunk_prefill=False"),
])
def test_an_engine_that_lacks_what_a_policy_needs_is_refused_by_name(name, engine, words):
    assert words in unavailable(name, engine)
    with pytest.raises(ValueError, match=words):
        make_policy(name, engine, ServeConfig(policy=name))


def test_aligned_without_a_host_pool_runs_as_its_fallback(caplog):
    assert unavailable("aligned", info(host_blocks=0)) is None
    policy = make_policy("aligned", info(host_blocks=0), ServeConfig())
    assert policy.name == "fcfs" and "no host KV pool" in caplog.text


def example_policy() -> type[Policy]:
    """The policy class in docs/ARCHITECTURE.md's "Adding a policy", executed as written."""
    section = ARCHITECTURE.read_text().split("## Adding a policy", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(ARCHITECTURE), "exec"), namespace)  # the project's own docs, not client input
    return namespace["ShortestFirstPolicy"]


def test_the_documented_example_policy_serves_once_registered(monkeypatch):
    cls = example_policy()
    with pytest.raises(ConfigError):
        ServeConfig(policy=cls.name)
    monkeypatch.setitem(REGISTRY, cls.name, cls)  # the one registry entry
    engine = SimEngine(CostModel(H100_SXM, OPT_13B), host_kv_bytes=1e9, max_seq_len=4096)
    orch = Orchestrator(engine, ServeConfig(policy="fcfs", max_batch_size=1), clock=engine.clock)
    streams = {n: TokenStream() for n in (900, 300, 30)}  # arrival order
    for n, s in streams.items():
        orch.submit([5] * n, max_tokens=4, on_event=s)
    orch.step()  # fcfs admits the first arrival: the 900-token prompt
    assert orch.switch_policy(cls.name) == cls.name and orch.config.policy == cls.name
    while orch.step():
        pass
    assert all(len(s.result(timeout=1)) == 4 for s in streams.values())
    assert [r.prompt_len for r in orch.recently_finished()] == [900, 30, 300]  # 30 overtook the earlier 300
    assert engine.kv_blocks_used("cuda:0") == 0 and engine.kv_blocks_used(HOST) == 0 and orch.ledger.holders == 0
    with pytest.raises(PolicySwitchRefused, match="only the decode device"):
        orch.switch_policy("disagg-fcfs")  # a policy this one-device engine cannot run is still refused
