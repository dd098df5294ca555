"""The torch engine reports its fitted decode-step costs (EngineInfo.step_costs) from the
profile in its directory: the fits of its device and dtype, the path it runs first."""
from __future__ import annotations

import json
import shutil

import pytest

from engines.base import StepCost
from engines.torch.engine import TorchEngine
from engines.torch.step_cost import PROFILE_NAME, read_step_costs, write_step_costs


def fit(path: str, padded_kv: float, kv: float) -> StepCost:
    return StepCost(path, fixed=0.05, per_seq=0.002, padded_kv=padded_kv, kv=kv, r2=0.99, points=40,
                    fitted_on="test machine")


@pytest.fixture
def engine_dir(model_dir, tmp_path):
    for f in model_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def test_the_engine_reports_the_fits_of_its_device_and_dtype_running_path_first(engine_dir):
    write_step_costs(engine_dir, "cpu", "float32", [fit("padded", 3e-7, 0.0), fit("varlen", 0.0, 2e-7)])
    write_step_costs(engine_dir, "cpu", "bfloat16", [fit("varlen", 0.0, 1e-7)])
    write_step_costs(engine_dir, "cuda", "float32", [fit("padded", 1e-9, 0.0)])

    info = TorchEngine(engine_dir, device="cpu", attention="varlen").describe()
    assert [c.attention for c in info.step_costs] == ["varlen", "padded"]
    varlen, padded = info.step_costs
    assert varlen == fit("varlen", 0.0, 2e-7) and not varlen.order_matters
    # 32 sequences, longest 1500, 17,120 tokens of KV: padded pays for 48,000.
    assert padded.seconds(32, 1500, 17_120) == pytest.approx(0.05 + 0.064 + 3e-7 * 48_000)
    assert varlen.seconds(32, 1500, 17_120) == pytest.approx(0.05 + 0.064 + 2e-7 * 17_120)

    padded_first = TorchEngine(engine_dir, device="cpu", attention="padded").describe().step_costs
    assert [c.attention for c in padded_first] == ["padded", "varlen"]
    bf16 = TorchEngine(engine_dir, device="cpu", dtype="bfloat16").describe().step_costs
    assert [(c.attention, c.kv) for c in bf16] == [("varlen", 1e-7)]


def test_a_new_fit_replaces_the_old_one_of_its_path_only(engine_dir):
    write_step_costs(engine_dir, "cpu", "float32", [fit("padded", 3e-7, 0.0), fit("varlen", 0.0, 2e-7)])
    write_step_costs(engine_dir, "cpu", "float32", [fit("varlen", 0.0, 5e-7)])
    costs = read_step_costs(engine_dir, "cpu", "float32", running="varlen")
    assert [(c.attention, c.kv) for c in costs] == [("varlen", 5e-7), ("padded", 0.0)]


def test_no_profile_means_no_costs_and_a_broken_one_warns(engine_dir):
    assert TorchEngine(engine_dir, device="cpu").describe().step_costs == ()
    (engine_dir / PROFILE_NAME).write_text(json.dumps({"format": 1, "fits": [{"attention": "varlen"}]}))
    with pytest.warns(UserWarning, match=r"step_cost\.json: unreadable step-cost profile .*bench\.step_cost_profile"):
        assert TorchEngine(engine_dir, device="cpu").describe().step_costs == ()
