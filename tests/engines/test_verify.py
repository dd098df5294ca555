"""`make verify-engine`: the same greedy tokens through park/resume and the hand-off, no block left."""
from __future__ import annotations

from engines.loader import load_engine
from engines.verify import main, verify


def test_the_torch_demo_engine_passes_every_check(demo_engine_dir, capsys):
    # "cpu:1" names a second CPU pool with its own model replica (the helper of the hand-off)
    rc = main([str(demo_engine_dir), "--device", "cpu", "--helper-device", "cpu:1", "--tokens", "9"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in ("uninterrupted", "park-resume", "hand-off", "no-leak"):
        assert f"PASS  {name}" in out, out


def test_a_helper_the_engine_lacks_fails_that_check(demo_engine_dir):
    engine = load_engine(demo_engine_dir, device="cpu")
    try:
        checks = {c.name: c for c in verify(engine, [1, 5, 9, 13], 4, helper="cpu:1")}
    finally:
        engine.close()
    assert checks["hand-off"].outcome == "FAIL" and "not a helper device" in checks["hand-off"].detail
    assert checks["park-resume"].outcome == "PASS" and checks["no-leak"].outcome == "PASS"


def test_missing_engine_dir_is_one_error_line(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_make_verify_engine_passes_the_engine_and_the_helper():
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run(["make", "-n", "verify-engine", "ENGINE=/e", "HELPER=cuda:1", "VENV=.venv"], cwd=repo,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 'engines.verify "/e" --helper-device cuda:1' in r.stdout
