"""The comparison on the digits end to end, cut to a few steps and three methods (the real run is `bash launch.sh
compare`): CT (the budget), sCD (a TrigFlow model from the teacher whose equal-wall-clock model is a checkpoint of
its run), ECT (retrained for the budget) and TCM's stage 2 from CT's run."""

import json

import torch

from cm.checkpoints import checkpoint_config
from cm.schedule import progressive_num_scales
from test_scripts import run_here


def test_compare_quick_writes_tables_and_grids(tmp_path):
    # `python scripts/compare_digits.py ...` in this process (run_here: one thread, as with OMP_NUM_THREADS=1),
    # twice: a process start-up saved each time
    argv = ["--quick", "True", "--log_dir", str(tmp_path), "--methods", "CT,sCD,ECT,TCM (CT)"]
    result = run_here("compare_digits", argv)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["round"], r["model"]): r for r in results["rows"]}
    for model in ("CT", "sCD (+ EDM teacher)", "ECT (+ EDM teacher)"):
        row = rows[("equal steps", model)]
        assert row["steps"] == 4 and row["train_seconds"] > 0
        assert set(row["onestep"]) == set(row["twostep"]) == {"fid", "precision", "recall", "class_accuracy"}
        assert ("equal wall-clock", model) in rows
    assert rows[("reference", "real digits, half vs half")]["onestep"]["class_accuracy"] > 0.95
    settings = results["settings"]
    assert settings["budget_seconds"] == rows[("equal steps", "CT")]["train_seconds"]
    # equal wall-clock: the budget less the teacher's seconds, at each method's price per step (ECT: CT's), sCD's
    # rounded down to its checkpoints (every 2 steps in --quick)
    left = settings["budget_seconds"] - settings["teacher_seconds"]
    ct_price = settings["budget_seconds"] / 4
    scd_price = rows[("equal steps", "sCD (+ EDM teacher)")]["train_seconds"] / 4
    assert rows[("equal wall-clock", "ECT (+ EDM teacher)")]["steps"] == max(0, min(int(left / ct_price), 4))
    k = max(0, min(int(left / scd_price), 4))
    assert rows[("equal wall-clock", "sCD (+ EDM teacher)")]["steps"] == k - k % 2
    # TCM's stage 2 from CT's checkpoint at step 2 (5/7 of 4, rounded down to its checkpoints): both stages counted
    tcm = rows[("equal steps", "TCM (CT): 2 + 2 steps")]
    stage2 = json.loads((tmp_path / "tcm_ct_2+2steps" / "timing.json").read_text())["seconds"]
    assert tcm["steps"] == 4 and tcm["train_seconds"] == rows[("equal steps", "CT")]["train_seconds"] / 2 + stage2
    assert any(r["round"] == "equal wall-clock" and r["model"].startswith("TCM (CT)") for r in results["rows"])
    config = checkpoint_config(torch.load(tmp_path / "tcm_ct_2+2steps" / "model000002.pt", weights_only=True))
    ct_config = checkpoint_config(torch.load(tmp_path / "ct_4steps" / "model000002.pt", weights_only=True))
    assert config["training_mode"] == "truncated_consistency_training" and config["lr"] == ct_config["lr"] / 2
    assert (config["scale_mode"], config["start_scales"]) == ("fixed", progressive_num_scales(2, 4, 2, 20))
    table = (tmp_path / "results.md").read_text()
    assert "| equal steps | sCD (+ EDM teacher) | 4 |" in table and "equal wall-clock" in table
    for name in ("grid_onestep.png", "grid_twostep.png", "scm_curves.png",
                 "samples/scd_4steps_ema_0.99_000004_twostep/samples_grid.png"):
        assert (tmp_path / name).exists(), name
    # run again: every stage is reused, nothing retrained
    again = run_here("compare_digits", argv)
    assert again.returncode == 0 and "training..." not in again.stdout
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == results["rows"]
