"""The demo pipeline end to end, with training cut to a few steps (the real run is `bash launch.sh demo`)."""

import json

import pytest

from evaluations.pixel_noise import high_frequency_ratio
from test_scripts import run_here


def test_demo_quick_writes_results_grids_and_curves(tmp_path):
    result = run_here("demo", ["--quick", "True", "--log_dir", str(tmp_path)])  # (as python runs it, one thread)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FID" in result.stdout and "class acc." in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"onestep", "twostep", "real digits (half vs half)"}
    real = results["real digits (half vs half)"]
    assert real["class_accuracy"] > 0.95  # real digits are recognised
    assert 0.9 < real["hf_ratio"] < 1.1  # and are as smooth as each other
    # the noise measure is that of the written batches
    one = tmp_path / "samples_onestep" / "samples_1000x16x16x3.npz"
    assert results["onestep"]["hf_ratio"] == pytest.approx(high_frequency_ratio(str(tmp_path / "digits_ref.npz"), str(one)))
    for target in ("one-step class accuracy", "one-step FID", "one-step HF energy", "two-step FID below one-step"):
        assert f": {target}" in result.stdout, target
    config = json.loads((tmp_path / "train" / "config.json").read_text())
    assert config["precision"] in ("fp32", "bf16") and config["precision_reason"].startswith("auto:")
    for name in ("samples_onestep/samples_grid.png", "samples_twostep/samples_grid.png", "curves.png", "results.txt"):
        assert (tmp_path / name).exists(), name
    assert "fid_2step_ema0.99" in (tmp_path / "train" / "progress.csv").read_text()  # (evaluated at steps 2 and 4)
