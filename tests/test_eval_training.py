"""Evaluation during training (evaluations/during_training.py), the log backends (cm/log_backends.py) and
scripts/plot_runs.py, on tiny digits runs: the metric columns against the evaluator run by hand on the same samples,
the run unchanged by evaluating, a run killed while evaluating, TensorBoard's and W&B's files."""

import argparse
import csv
import importlib.util
import os
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from cm import log_backends, logger
from cm.plots import EVAL_COLUMN
from evaluations import evaluator
from evaluations.during_training import evaluated_labels, training_evaluation
from evaluations.evaluator import evaluate

from test_scripts import load_script, run_here
from test_training import run_in_process

HAVE_WANDB = importlib.util.find_spec("wandb") is not None
# 6 steps of 16 digits with the demo's recipe; a checkpoint every 2 steps, a log line every 3
RUN = ("--config demo_train --global_batch_size 16 --total_training_steps 6 --lr_anneal_steps 6 --save_interval 2 "
       "--log_interval 3 --precision fp32 --progress False")
# every 2 steps: 24 samples (rounds of the per-process batch, 16, then 8), one and two steps (the demo's level 8.6)
EVAL = "--eval_interval 2 --eval_samples 24 --eval_features digits --eval_ref digits --eval_t_mid 8.6"
BACKENDS = "--log_backends csv,tensorboard" + (",wandb" if HAVE_WANDB else "")


def train(log_dir, flags):
    load_script("cm_train").main(shlex.split(f"{RUN} {flags}") + ["--log_dir", str(log_dir)])


def rows(log_dir):
    with open(os.path.join(log_dir, "progress.csv"), newline="") as f:
        return list(csv.DictReader(f))


def tensors(log_dir, step):
    """Every tensor of the checkpoint at `step` (the stored config aside: it names the evaluation flags), and the
    training state's random streams."""
    out = {}
    for path in sorted(log_dir.glob(f"*{step:06d}.pt")):
        saved = torch.load(path, weights_only=True)
        flat = saved.get("state", saved) if path.name.startswith("opt") else saved
        for key, value in flat.items():
            if isinstance(value, torch.Tensor):
                out[f"{path.name}:{key}"] = value
            elif isinstance(value, dict):  # the optimizer's per-parameter state
                out.update({f"{path.name}:{key}:{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run evaluated (with the log backends), one not, alike otherwise."""
    root = tmp_path_factory.mktemp("eval_runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        train(root / "evaluated", f"{EVAL} {BACKENDS}")
        train(root / "plain", "")
    return root


def test_metric_columns_at_the_evaluated_steps_equal_the_evaluator_by_hand(runs, tmp_path):
    table = rows(runs / "evaluated")
    assert [r["step"] for r in table] == ["2", "3", "4", "6"]  # the evaluations' own rows at 2 and 4, and the log's
    assert all(r["fid_1step_ema0.99"] == "" for r in table if r["step"] == "3")
    columns = [k for k in table[0] if EVAL_COLUMN.match(k)]
    assert {"fid_1step_ema0.99", "fid_2step_ema0.99", "precision_2step_ema0.99", "recall_1step_ema0.99",
            "class_accuracy_1step_ema0.99"} <= set(columns)
    ref = runs / "evaluated" / "eval" / "digits_ref.npz"
    sampling = {"1": ["--sampler", "onestep"], "2": ["--sampler", "multistep", "--t_mid", "8.6"]}
    for row in (table[0], table[2]):
        step = int(row["step"])
        for count, flags in sampling.items():
            out = tmp_path / f"{step}_{count}"
            result = run_here("image_sample", [
                "--config", "demo_sample_onestep", "--model_path", str(runs / "evaluated" / f"ema_0.99_{step:06d}.pt"),
                "--num_samples", "24", "--batch_size", "16", "--seed", "42", "--class_labels", "", "--precision", "fp32",
                *flags, "--log_dir", str(out)])
            assert result.returncode == 0, result.stderr
            metrics = evaluate(str(ref), str(out / "samples_24x16x16x3.npz"), features="digits", progress=False)
            for name, value in metrics.items():
                if value is not None:
                    assert float(row[f"{name}_{count}step_ema0.99"]) == pytest.approx(value, rel=1e-9, abs=1e-12), name
        assert (runs / "evaluated" / "eval" / f"1step_ema0.99_{step:06d}.png").exists()
    assert float(table[0]["eval_seconds"]) > 0


def test_evaluating_changes_nothing_of_the_run(runs):
    for step in (2, 4, 6):
        evaluated, plain = tensors(runs / "evaluated", step), tensors(runs / "plain", step)
        assert evaluated.keys() == plain.keys() and len(plain) > 20
        for key, value in plain.items():
            assert torch.equal(evaluated[key], value), key
    plain = {r["step"]: r["loss"] for r in rows(runs / "plain")}
    assert {r["step"]: r["loss"] for r in rows(runs / "evaluated") if r["loss"]} == plain


class Killed(BaseException):
    """What a SIGKILL leaves: nothing after it runs (no handler of Exception sees it)."""


def test_killed_while_evaluating_resumes_without_lost_or_repeated_rows(runs, tmp_path, monkeypatch):
    calls = []
    measure = evaluator.Evaluator.evaluate_images

    def dies_at_the_last_evaluation(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # (steps 2 and 4 measure one- and two-step samples: the third is step 4's first)
            raise Killed
        return measure(self, *args, **kwargs)

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(evaluator.Evaluator, "evaluate_images", dies_at_the_last_evaluation)
    with pytest.raises(Killed):
        train(tmp_path, f"{EVAL} {BACKENDS}")
    logger.close_backends()  # (what the killed process's exit closes)
    assert not (tmp_path / "model000004.pt").exists() and [r["step"] for r in rows(tmp_path)] == ["2", "3"]
    train(tmp_path, f"{EVAL} {BACKENDS}")  # resumes at step 2, evaluates step 4 again, then 6
    # (the loss and gradient norm are means since the last log line: over fewer steps after a resume)
    deterministic = [k for k in rows(runs / "evaluated")[0] if EVAL_COLUMN.match(k)] + ["step", "samples", "param_norm", "lr"]
    assert [{k: r[k] for k in deterministic} for r in rows(tmp_path)] == \
        [{k: r[k] for k in deterministic} for r in rows(runs / "evaluated")]
    final, whole = tensors(tmp_path, 6), tensors(runs / "evaluated", 6)
    assert final.keys() == whole.keys() and all(torch.equal(final[k], whole[k]) for k in whole)
    if HAVE_WANDB:  # the resumed run wrote into the same W&B run: its id, config.json's run_id
        run_id = __import__("json").loads((tmp_path / "config.json").read_text())["run_id"]
        assert {p.name.rsplit("-", 1)[-1] for p in (tmp_path / "wandb").glob("offline-run-*")} == {run_id}


def test_tensorboard_holds_the_scalars_the_grids_and_the_config(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs / "evaluated" / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    table = rows(runs / "evaluated")
    for key in ("loss", "fid_1step_ema0.99", "recall_2step_ema0.99"):
        logged = [(int(r["step"]), float(r[key])) for r in table if r[key]]
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(s, pytest.approx(v, rel=1e-6)) for s, v in logged]
    assert [e.step for e in events.Images("samples/2step_ema0.99")] == [2, 4, 6]
    assert "config/text_summary" in events.Tags()["tensors"]


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb not installed (pip install -e .[logging])")
def test_wandb_offline_run_folder(runs):
    run_id = __import__("json").loads((runs / "evaluated" / "config.json").read_text())["run_id"]
    folders = list((runs / "evaluated" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 1 and (folders[0] / f"run-{run_id}.wandb").stat().st_size > 0


def test_plot_runs_draws_both_runs(runs, tmp_path):
    out = tmp_path / "curves.png"
    result = run_here("plot_runs", [str(runs / "evaluated"), str(runs / "plain"), "--out", str(out)])
    assert result.returncode == 0, result.stderr
    columns = [k for k in rows(runs / "evaluated")[0] if EVAL_COLUMN.match(k)]
    # loss, grad_norm and lr of both runs, every metric of the evaluated one
    assert f"({2 * 3 + len(columns)} lines)" in result.stdout
    assert Image.open(out).size == (640, 40 + 200 * (3 + len(columns)))
    # the table: each metric's best (lowest FID, highest recall) and last value, where
    table = rows(runs / "evaluated")
    for key, pick in (("fid_1step_ema0.99", min), ("recall_2step_ema0.99", max)):
        logged = [(float(r[key]), int(r["samples"])) for r in table if r[key]]
        best = pick(logged, key=lambda pair: pair[0])
        line = next(line for line in result.stdout.splitlines() if f" {key} " in line).split()
        assert line[-4:] == [f"{best[0]:.4g}", f"{best[1]:g}", f"{logged[-1][0]:.4g}", f"{logged[-1][1]:g}"], line


def flags(**overrides):
    values = dict(eval_interval=10, eval_ref="digits", eval_features="digits", eval_features_path="", eval_samples=100,
                  eval_steps="", eval_t_mid="", eval_ema="", eval_batch_size=0, ema_rate="0.999,0.9999")
    parser = load_script("cm_train").create_argparser()
    return argparse.Namespace(**{**vars(parser.parse_args([])), **values, **overrides})


def test_each_kind_of_model_is_evaluated_with_its_own_sampler():
    from cm.methods import method_class

    def plans(mode, **kw):
        evaluation = training_evaluation(flags(training_mode=mode, **kw), method_class(mode))
        return {count: (ns.sampler, ns.steps if ns.sampler in ("heun", "progdist") else ns.t_mid)
                for count, ns in evaluation.sampling.items()}

    assert plans("consistency_training") == {1: ("onestep", ""), 2: ("multistep", "0.821")}
    assert plans("continuous_consistency_training") == {1: ("onestep", ""), 2: ("multistep", "1.1")}
    assert plans("meanflow", eval_steps="1,2,3", eval_t_mid="0.7,0.4") == {1: ("onestep", ""), 2: ("multistep", "0.7"),
                                                                          3: ("multistep", "0.7,0.4")}
    assert plans("edm") == {18: ("heun", 18)}
    assert plans("progdist", teacher_model_path="x.pt", eval_steps="4") == {4: ("progdist", 4)}
    assert evaluated_labels("", "0.999,0.9999") == ["ema0.999", "ema0.9999"]
    assert evaluated_labels("0.99990,model", "0.999,0.9999") == ["ema0.9999", "model"]
    assert training_evaluation(flags(eval_interval=0), method_class("edm")) is None


@pytest.mark.parametrize("mode, extra", [
    ("continuous_consistency_training", ""),  # TrigFlow: one step, then through t = 1.1
    ("meanflow", "--eval_steps 1,3 --eval_t_mid 0.7,0.3"),  # a flow map: jumps
    ("edm", "--eval_steps 3"),  # a denoiser: Heun
])
def test_each_kind_of_model_is_sampled_and_measured(mode, extra, tmp_path):
    """The evaluation's networks come from the training flags of each parameterization: built, sampled (its own
    sampler), measured, without the training loop (a random network stands in for the trained one)."""
    from cm.config import parse_args_with_config
    from cm.methods import method_class, mode_flag_defaults
    from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
    from conftest import randomize
    from test_scripts import TINY_FLAGS

    argv = shlex.split(f"{TINY_FLAGS} --training_mode {mode} --eval_interval 1 --eval_ref digits --eval_samples 6 "
                       f"--eval_features random --ema_rate 0.9 {extra}")
    args = parse_args_with_config(load_script("cm_train").create_argparser(), argv, "cm_train.py",
                                  mode_defaults=mode_flag_defaults())
    evaluation = training_evaluation(args, method_class(mode))
    logger.configure(str(tmp_path))
    evaluation.prepare(4)
    model, _ = create_model_and_diffusion(**{k: getattr(args, k) for k in model_and_diffusion_defaults()},
                                          distillation=method_class(mode).boundary_condition)
    state = randomize(model, std=0.02).state_dict()
    row = evaluation.run(1, {"ema0.9": lambda: state})
    counts = [int(c) for c in (args.eval_steps or "1,2").split(",")]
    assert {f"fid_{n}step_ema0.9" for n in counts} <= set(row) and all(np.isfinite(v) for v in row.values())
    assert row[f"fid_{counts[0]}step_ema0.9"] != row[f"fid_{counts[-1]}step_ema0.9"] or len(counts) == 1
    if mode == "edm":  # a network whose samples hold NaN: its distance is NaN, the run goes on
        broken = {k: v.fill_(float("nan")) if k.startswith("out.") else v for k, v in state.items()}
        row = evaluation.run(2, {"ema0.9": lambda: broken})
        assert np.isnan(row["fid_3step_ema0.9"]) and set(row) == {"fid_3step_ema0.9", "eval_seconds"}


@pytest.mark.parametrize("overrides, message", [
    (dict(eval_ref=""), "--eval_interval needs --eval_ref"),
    (dict(eval_ref="/no/such.npz"), "--eval_ref /no/such.npz: no such file"),
    (dict(eval_ema="0.5"), "--eval_ema 0.5 is not a rate of --ema_rate"),
    (dict(eval_steps="1,1"), "--eval_steps must be distinct positive"),
    (dict(eval_steps="3"), "--eval_steps 3 needs 2 intermediate times in --eval_t_mid"),
    (dict(eval_steps="2", eval_t_mid="90"), "--eval_steps 2: --eval_t_mid must be decreasing"),
    (dict(eval_features="clip"), "unknown --eval_features clip"),
    (dict(eval_samples=3), "--eval_samples must be at least 4"),
])
def test_evaluation_flags_are_checked_in_one_line(overrides, message):
    from cm.methods import method_class

    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        training_evaluation(flags(training_mode="consistency_training", **overrides), method_class("consistency_training"))


def test_a_missing_backend_package_is_one_line_before_the_run_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(log_backends.importlib.util, "find_spec", lambda name: None)
    result = run_in_process("cm_train", shlex.split(f"{RUN} --log_backends csv,tensorboard --log_dir {tmp_path / 'x'}"),
                            monkeypatch, capsys)
    assert result.returncode == 1 and "needs the tensorboard package: pip install tensorboard" in result.stderr
    assert not (tmp_path / "x" / "config.json").exists()
    with pytest.raises(ValueError, match="unknown --log_backends mlflow"):
        log_backends.parse_backends("csv,mlflow")


def test_curves_skip_the_values_an_evaluation_could_not_measure(tmp_path):
    from cm.plots import read_columns

    (tmp_path / "progress.csv").write_text("fid_1step_ema0.9,samples,step\n1.5,10,1\nnan,20,2\n,30,3\n2.5,40,4\n")
    x, y = read_columns(tmp_path / "progress.csv", ["fid_1step_ema0.9"])["fid_1step_ema0.9"]
    assert x.tolist() == [10, 40] and y.tolist() == [1.5, 2.5]
