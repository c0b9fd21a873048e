"""The CT / iCT / ECT comparison on the digits end to end, cut to a few steps (the real run is `bash launch.sh compare`)."""

import json
import os
import subprocess
import sys

from test_scripts import ROOT


def test_compare_quick_writes_tables_and_grids(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "scripts/compare_digits.py", "--quick", "True", "--log_dir", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["round"], r["model"]): r for r in results["rows"]}
    for model in ("CT", "iCT", "ECT (+ EDM teacher)"):
        row = rows[("equal steps", model)]
        assert row["steps"] == 4 and row["train_seconds"] > 0
        assert set(row["onestep"]) == set(row["twostep"]) == {"fid", "precision", "recall", "class_accuracy"}
        assert ("equal wall-clock", model) in rows
    assert rows[("reference", "real digits, half vs half")]["onestep"]["class_accuracy"] > 0.95
    assert results["settings"]["budget_seconds"] == rows[("equal steps", "CT")]["train_seconds"]
    table = (tmp_path / "results.md").read_text()
    assert "| equal steps | iCT | 4 |" in table and "equal wall-clock" in table
    for name in ("grid_onestep.png", "grid_twostep.png", "samples/ect_4steps_onestep/samples_grid.png"):
        assert (tmp_path / name).exists(), name
    # run again: every stage is reused, nothing retrained
    again = subprocess.run([sys.executable, "scripts/compare_digits.py", "--quick", "True", "--log_dir", str(tmp_path)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "training..." not in again.stdout
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == results["rows"]
