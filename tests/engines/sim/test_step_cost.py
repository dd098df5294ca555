"""The sim engine's step cost (engines/sim/step_cost.py): what a policy reads from
`describe().step_costs` is what the engine's decode then takes."""
from __future__ import annotations

import pytest

from engines.base import PrefillRequest
from engines.sim.cost_model import CostModel
from engines.sim.dispatch import DISPATCH_MODELS
from engines.sim.engine import SimEngine
from engines.sim.profiles import H100_SXM, OPT_13B
from engines.sim.step_cost import SimStepCost, representative_batch


@pytest.mark.parametrize("dispatch", DISPATCH_MODELS)
def test_step_cost_is_the_engines_decode_time(dispatch):
    engine = SimEngine(CostModel(H100_SXM, OPT_13B, dispatch=dispatch))
    prompts = [300, 1200, 40, 1900, 300]
    engine.prefill([PrefillRequest(f"r{i}", [5] * n) for i, n in enumerate(prompts)])
    cost = engine.describe().step_costs[0]
    order = ["r3", "r0", "r4", "r1", "r2"]
    predicted = cost.step_seconds([engine.kv_len(r) + 1 for r in order])
    t0 = engine.clock()
    result = engine.decode(order)
    assert result.timing.seconds == predicted
    assert engine.clock() - t0 == pytest.approx(predicted, rel=1e-12)
    assert cost.attention == engine.cost.dispatch.kernel and cost.dispatch == dispatch
    assert cost.order_matters == (dispatch == "waves")
    assert cost.step_seconds([]) == 0.0


def test_a_split_kv_engine_reports_the_split_kernel():
    engine = SimEngine(CostModel(H100_SXM, OPT_13B, dispatch="waves"), split_kv=True)
    cost = engine.describe().step_costs[0]
    assert (cost.dispatch, cost.order_matters) == ("split", False)
    assert cost.step_seconds([100, 9000]) == engine.cost.decode_seconds([100, 9000], split_kv=True)


def test_seconds_prices_a_representative_batch():
    cost = SimStepCost(CostModel(H100_SXM, OPT_13B, dispatch="waves"))
    assert representative_batch(4, 1000, 1300) == [1000, 100, 100, 100]
    assert representative_batch(4, 1000, 1302) == [1000, 101, 101, 100]
    assert representative_batch(1, 700, 700) == [700]
    assert cost.seconds(4, 1000, 1302) == cost.step_seconds([1000, 101, 101, 100])
    assert cost.seconds(0, 0, 0) == 0.0
    for bad in ((3, 100, 50), (3, 100, 400), (1, 100, 150)):
        with pytest.raises(ValueError, match="no batch of"):
            representative_batch(*bad)
    # Order matters under waves: OPT-13B's 40 heads of the long one at place 3 (units 120-159)
    # straddle two waves of 132 SMs; placed first they fill one.
    spread = [300] * 3 + [8000] + [300] * 57
    assert cost.step_seconds(sorted(spread, reverse=True)) < cost.step_seconds(spread)


@pytest.mark.parametrize("dispatch", DISPATCH_MODELS)
def test_chunk_seconds_is_what_a_chunk_adds_to_the_engines_mixed_step(dispatch):
    from engines.base import PrefillChunk

    engine = SimEngine(CostModel(H100_SXM, OPT_13B, dispatch=dispatch))
    engine.prefill([PrefillRequest("a", [5] * 9)])
    cost = engine.describe().step_costs[0]
    plain = cost.step_seconds([engine.kv_len("a") + 1])
    mixed = engine.mixed_step(["a"], [PrefillChunk(PrefillRequest("b", [5] * 600), 0, 512)]).timing.seconds
    assert cost.chunk_seconds(512) == pytest.approx(mixed - plain, rel=1e-9)
    # A 512-token chunk rides on OPT-13B's weight read on an H100: it adds less than a step.
    assert 0 < cost.chunk_seconds(512) < plain
    assert cost.chunk_seconds(0) == 0.0  # no chunk in the step
