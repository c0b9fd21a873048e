"""The post-hoc EMA sweep on the digits end to end, cut to a few steps and two values (the real run is
`bash launch.sh phema_sweep`)."""

import json

from test_scripts import run_here


def test_sweep_quick_writes_table_plot_and_the_fixed_ema_row(tmp_path):
    result = run_here("phema_sweep_digits", ["--quick", "True", "--log_dir", str(tmp_path)])  # (one thread)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["std"] for r in rows] == [0.05, 0.2, None]  # the two values, then the run's --ema_rate average
    assert rows[0]["fit_error"] < 1e-6 < rows[1]["fit_error"]  # 0.05 is tracked; 0.2 is reconstructed
    assert all(set(r["onestep"]) == {"fid", "precision", "recall", "class_accuracy"} for r in rows)
    assert (tmp_path / "phema_sweep.png").exists() and "post-hoc sigma_rel 0.2" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "train" / "posthoc" / "posthoc_0.2_000004.pt").exists()
