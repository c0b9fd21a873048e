"""The demo pipeline end to end, with training cut to a few steps (the real run is `bash launch.sh demo`)."""

import json
import os
import subprocess
import sys

from test_scripts import ROOT


def test_demo_quick_writes_results_grids_and_loss_curve(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "scripts/demo.py", "--quick", "True", "--log_dir", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FID" in result.stdout and "class acc." in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"onestep", "twostep", "real digits (half vs half)"}
    assert results["real digits (half vs half)"]["class_accuracy"] > 0.95  # real digits are recognised
    assert 0 <= results["onestep"]["class_accuracy"] <= 1
    for name in ("samples_onestep/samples_grid.png", "samples_twostep/samples_grid.png", "loss_curve.png", "results.txt"):
        assert (tmp_path / name).exists(), name
