"""A run folder is one run's: its lock, what resuming may overwrite, the progress log after a resume
(the SIGKILL cases are in tests/test_training.py)."""

import os
import shlex
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from cm.run_folder import LOCK_NAME, remove_stale_temporaries

from test_scripts import TINY_FLAGS, load_script
from test_training import TRAIN, run_in_process, train

CT = "--training_mode consistency_training --start_scales 4 --end_scales 8 --loss_norm l2"


def cm_train(log_dir, monkeypatch, capsys, extra=""):
    argv = [*shlex.split(TRAIN + " " + CT + " --total_training_steps 2 --save_interval 2 " + extra), "--log_dir", str(log_dir)]
    return run_in_process("cm_train", argv, monkeypatch, capsys)


def refused_while_held(folder, run):
    """run(folder) while a live process holds `folder`'s lock: refused in one line naming it, nothing written."""
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / LOCK_NAME).write_text(f"{socket.gethostname()} {holder.pid}")
        result = run(folder)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"in use by process {holder.pid}" in result.stderr and "--log_dir" in result.stderr
        assert sorted(os.listdir(folder)) == [LOCK_NAME]  # nothing written: no config.json, no log
    finally:
        holder.kill()
        holder.wait()


def test_a_folder_in_use_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    refused_while_held(folder, lambda f: cm_train(f, monkeypatch, capsys))
    # the holder is gone (as a SIGKILL leaves it): the next run takes the folder over
    train("cm_train", TRAIN + " " + CT + " --total_training_steps 2 --save_interval 2", folder)
    assert (folder / "model000002.pt").exists() and not (folder / LOCK_NAME).exists()  # released at exit


def test_resuming_never_overwrites_checkpoints_of_another_history(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train("cm_train", TRAIN + " " + CT + " --total_training_steps 4 --save_interval 2", run)
    before = {f: os.path.getmtime(run / f) for f in os.listdir(run) if f.endswith(".pt")}
    for given, message in ((run / "ema_0.9_000004.pt", "starts a new run at step 0"), (run / "model000002.pt", "is at step 2")):
        result = cm_train(run, monkeypatch, capsys, f"--resume_checkpoint {given}")
        assert result.returncode == 1 and message in result.stderr and "model000004.pt" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert {f: os.path.getmtime(run / f) for f in os.listdir(run) if f.endswith(".pt")} == before
    # an EMA file is a fine starting point for a new run in a new folder
    train("cm_train", TRAIN + " " + CT + f" --total_training_steps 2 --save_interval 2 --resume_checkpoint {run / 'ema_0.9_000004.pt'}",
          tmp_path / "finetune")
    assert (tmp_path / "finetune" / "model000002.pt").exists()


def test_a_global_batch_the_processes_cannot_share_evenly_is_refused():
    from cm.run_setup import per_process_batch

    flags = SimpleNamespace(batch_size=-1, global_batch_size=9)
    with pytest.raises(ValueError, match="--global_batch_size 9 cannot be shared evenly by 2 process"):
        per_process_batch(flags, world=2)  # (not rounded down to 8)
    assert per_process_batch(flags, world=3) == 3


def test_temporaries_of_other_processes_are_removed(tmp_path):
    for name in ("model000015.tmp999.pt", "config.tmp12.json", f"ema.tmp{os.getpid()}.pt", "model000015.pt"):
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temporaries(str(tmp_path)) == ["config.tmp12.json", "model000015.tmp999.pt"]
    assert sorted(os.listdir(tmp_path)) == [f"ema.tmp{os.getpid()}.pt", "model000015.pt"]


@pytest.mark.parametrize("extra, message", [
    ("--ema_rate 1.5", "--ema_rate must be comma-separated rates in [0, 1)"),
    ("--ema_rate abc", "--ema_rate must be comma-separated rates in [0, 1)"),
    ("--start_ema 1.5 --target_ema_mode fixed", "--start_ema must be in [0, 1)"),
    ("--sigma_min 5 --sigma_max 1", "--sigma_min must be positive and below --sigma_max"),
    ("--scale_mode progressive --target_ema_mode adaptive --start_scales 40 --end_scales 2", "--start_scales <= --end_scales"),
    ("--total_training_steps 0", "--total_training_steps must be at least 1"),
    ("--image_size 17", "--image_size 17 cannot be halved 1 times"),
    # (each flag's range is declared beside it: the method's, the network's, the loop's)
    ("--training_mode continuous_consistency_training --jvp_eps 0", "--jvp_eps must be positive, got 0.0"),
    ("--training_mode improved_consistency_training --p_std nan", "--p_std must be positive, got nan"),
    ("--p_std nan", "--p_std must be a finite number, got nan"),  # (CT draws no lognormal levels)
    ("--dropout 1.5", "--dropout must be in [0, 1), got 1.5"),
    ("--training_mode truncated_consistency_training --tcm_stage1 x.pt --tcm_boundary_share 1", "--tcm_boundary_share "
     "must be in [0, 1), got 1.0"),
    ("--lr 0", "--lr must be positive, got 0.0"),
    ("--huber_c inf", "--huber_c must be a finite number, got inf"),
    ("--attention_resolutions 3", "--attention_resolutions 3: a 16x16 network with 2 levels (--channel_mult) has the "
     "resolutions 16,8"),
    ("--training_mode continuous_consistency_training --precision fp16", "fp16 is refused"),  # (known once resolved)
    ("--training_mode meanflow --meanflow_norm_c 0", "--meanflow_norm_c must be positive, got 0.0"),
    ("--training_mode meanflow --meanflow_cfg_t_min 0.8 --meanflow_cfg_t_max 0.2", "must satisfy 0 <= t_min <= t_max <= 1"),
    ("--training_mode meanflow --time_inputs 1", "pass --time_inputs 2"),
])
def test_nonsense_training_flags_are_refused_before_the_folder_is_touched(extra, message, tmp_path, monkeypatch, capsys):
    result = cm_train(tmp_path / "run", monkeypatch, capsys, extra)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, message", [
    ("--sampler multistep --steps 40 --ts 0,30,20,39", "--ts must be two or more increasing grid indices in 0..39"),
    ("--sampler multistep --steps 40 --ts 0,3,3", "--ts must be two or more increasing"),
    ("--sampler multistep --steps 40 --ts 0,40", "--ts must be two or more increasing"),
    ("--training_mode nonsense --sampler onestep", "unknown --training_mode nonsense"),
    ("--sampler onestep --attention_resolutions 16,3", "--attention_resolutions 3: a 16x16 network"),
])
def test_nonsense_sampling_flags_get_one_line(extra, message, tmp_path, monkeypatch, capsys):
    argv = [*shlex.split(TINY_FLAGS + " --training_mode consistency_training " + extra), "--log_dir", str(tmp_path)]
    result = run_in_process("image_sample", argv, monkeypatch, capsys)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_resumed_sampling_checks_the_models_contents_and_nan_weights_are_refused(tmp_path, monkeypatch, capsys):
    import torch

    from cm.script_util import create_model_and_diffusion

    from conftest import randomize, tiny_config

    sample = load_script("image_sample")
    model, _ = create_model_and_diffusion(**tiny_config())
    path = tmp_path / "model.pt"
    torch.save(randomize(model).state_dict(), path)
    argv = [*shlex.split(TINY_FLAGS + " --training_mode consistency_training --sampler onestep --num_samples 4 "
                         "--batch_size 2"), "--model_path", str(path), "--log_dir", str(tmp_path / "s")]
    monkeypatch.setattr(sample, "finish_shards", lambda shard_dir: None)  # as if killed after its last round
    sample.main(argv)
    torch.save(randomize(model, seed=1).state_dict(), path)  # another model under the same path
    result = run_in_process("image_sample", argv, monkeypatch, capsys)
    assert result.returncode == 1 and "model_sha256 differ" in result.stderr, result.stderr
    broken = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(broken, path)
    result = run_in_process("image_sample", argv[:-1] + [str(tmp_path / "nan")], monkeypatch, capsys)
    assert result.returncode == 1 and "non-finite samples" in result.stderr and "Traceback" not in result.stderr
    assert not list((tmp_path / "nan").glob("*.npz"))


def test_a_diverging_update_is_never_saved(tmp_path, monkeypatch, capsys):
    """lr 10: some step's loss is finite but its update breaks the weights; that checkpoint must not exist."""
    import torch

    from cm.script_util import create_model_and_diffusion

    from conftest import tiny_config

    run = tmp_path / "run"
    result = cm_train(run, monkeypatch, capsys, "--lr 10 --total_training_steps 40 --save_interval 1")
    assert result.returncode == 1 and "inf/NaN" in result.stderr and "Traceback" not in result.stderr, result.stderr
    model, _ = create_model_and_diffusion(**tiny_config())
    x, y = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(4)
    saved = sorted(run.glob("model*.pt"))
    assert saved
    for path in saved:
        model.load_state_dict(torch.load(path, weights_only=True))
        with torch.no_grad():
            assert torch.isfinite(model(x, torch.full((4,), 0.5), y=y)).all(), path.name


def test_a_truncated_newest_checkpoint_is_passed_over(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train("cm_train", TRAIN + " " + CT + " --total_training_steps 4 --save_interval 2", run)
    for name in ("opt000004.pt", "model000004.pt"):
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: len(data) // 2])
        train("cm_train", TRAIN + " " + CT + " --total_training_steps 3 --save_interval 3", run)
        log = (run / "log.txt").read_text()
        assert f"passing over checkpoint 000004: {run / name} is truncated" in log and "resuming from " + str(run / "model000002.pt") in log
        (run / "model000003.pt").unlink()
        (run / name).write_bytes(data)
    (run / "model000004.pt").write_bytes(data[: len(data) // 2])
    result = cm_train(tmp_path / "other", monkeypatch, capsys, f"--resume_checkpoint {run / 'model000004.pt'}")
    assert result.returncode == 1 and "cannot read checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_a_pickled_program_is_refused_without_advising_to_run_it(tmp_path, monkeypatch, capsys):
    import torch

    path = tmp_path / "model000000.pt"
    torch.save({"weights": SimpleNamespace(x=1)}, path)
    result = cm_train(tmp_path / "run", monkeypatch, capsys, f"--resume_checkpoint {path}")
    assert result.returncode == 1 and "pickled objects" in result.stderr, result.stderr
    assert "weights_only=False" not in result.stderr and "Traceback" not in result.stderr


def test_every_weight_reader_refuses_a_pickled_program_in_the_same_line(tmp_path, monkeypatch, capsys):
    import torch

    from cm.lpips import load_vgg16_features
    from evaluations.feature_extractors import load_dinov2, load_inception_state_dict

    path = tmp_path / "phema_0.1_000002.pt"
    torch.save({"weights": SimpleNamespace(x=1)}, path)
    result = run_in_process("reconstruct_ema", ["--run_dir", str(tmp_path), "--std", "0.1"], monkeypatch, capsys)
    messages = [result.stderr]
    for read in (lambda: load_vgg16_features(None, str(path)), lambda: load_inception_state_dict(str(path)),
                 lambda: load_dinov2(str(path))):
        with pytest.raises(ValueError) as err:
            read()
        messages.append(str(err.value))
    for message in messages:
        assert f"{path} holds pickled objects" in message and "weights_only=False" not in message, message


def test_a_resume_with_other_run_defining_flags_is_refused_and_other_changes_are_logged(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train("cm_train", TRAIN + " " + CT + " --total_training_steps 2 --save_interval 2", run)
    config = (run / "config.json").read_text()
    for extra, message in (("--seed 1", "--seed 0 -> 1"), ("--global_batch_size 8", "--global_batch_size 16 -> 8"),
                           ("--num_channels 64", "--num_channels 32 -> 64")):
        result = cm_train(run, monkeypatch, capsys, extra)
        assert result.returncode == 1 and message in result.stderr and "--allow_config_change" in result.stderr, result.stderr
        assert (run / "config.json").read_text() == config and not (run / "model000004.pt").exists()
    train("cm_train", TRAIN + " " + CT + " --total_training_steps 4 --save_interval 2 --lr 1e-4 --seed 1 "
          "--allow_config_change True", run)
    log = (run / "log.txt").read_text()
    assert "config change on resume: --lr 0.0002 -> 0.0001" in log and "config change on resume: --seed 0 -> 1" in log
    assert (run / "model000004.pt").exists()


SCT = "--training_mode continuous_consistency_training"


@pytest.mark.parametrize("first, then, new", [
    (CT, CT + " --ema_rate 0.9,0.99,0.999", "ema_0.999_"),
    (SCT + " --scm_weighting prior", SCT + " --scm_weighting adaptive", "scm_weight"),
], ids=["ema_rate", "scm_weighting"])
def test_a_resume_with_other_averages_or_weighting_continues_the_run(first, then, new, tmp_path):
    import torch

    run, small = tmp_path / "run", f"{TRAIN} --global_batch_size 4 --save_interval 1"
    train("cm_train", f"{small} {first} --total_training_steps 1", run)
    before = {f.name: f.read_bytes() for f in run.glob("*.pt")}
    train("cm_train", f"{small} {then} --total_training_steps 2", run)
    assert {name: (run / name).read_bytes() for name in before} == before  # the first run's files (a removed std's too)
    log = (run / "log.txt").read_text()
    assert f"resuming from {run / 'model000001.pt'}" in log and (run / f"{new}000002.pt").exists()
    assert any(f"{new}000001.pt" in line and "starts" in line for line in log.splitlines()), log
    assert torch.load(run / "train_state000002.pt", weights_only=True)["step"] == 2


def test_a_resume_without_the_adaptive_weight_leaves_its_optimizer_state_unused(tmp_path):
    import torch

    run, small = tmp_path / "run", f"{TRAIN} --global_batch_size 4 --save_interval 1"
    train("cm_train", f"{small} {SCT} --scm_weighting adaptive --total_training_steps 1", run)
    assert len(torch.load(run / "opt000001.pt", weights_only=True)["param_groups"]) == 2  # the head's, second
    train("cm_train", f"{small} {SCT} --scm_weighting prior --total_training_steps 2", run)
    assert "opt000001.pt has optimizer state for trainables this run does not train" in (run / "log.txt").read_text()
    opt = torch.load(run / "opt000002.pt", weights_only=True)
    assert len(opt["param_groups"]) == 1 and len(opt["state"]) == len(opt["param_groups"][0]["params"])
    assert not (run / "scm_weight000002.pt").exists()


def test_a_resume_with_an_added_phema_std_is_refused_and_a_removed_one_is_kept(tmp_path, monkeypatch, capsys):
    run, small = tmp_path / "run", f"{TRAIN} --global_batch_size 4 --save_interval 1"
    train("cm_train", f"{small} {CT} --phema_std 0.05,0.1 --total_training_steps 1", run)
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.name != "run.lock"}
    argv = [*shlex.split(f"{small} {CT} --phema_std 0.05,0.2 --total_training_steps 2"), "--log_dir", str(run)]
    result = run_in_process("cm_train", argv, monkeypatch, capsys)
    assert result.returncode == 1 and "--phema_std 0.2 is new to the run" in result.stderr and "Traceback" not in result.stderr
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.name != "run.lock"} == before  # nothing written
    train("cm_train", f"{small} {CT} --phema_std 0.05 --total_training_steps 2", run)
    assert (run / "phema_0.05_000002.pt").exists() and (run / "phema_0.1_000001.pt").read_bytes() == before["phema_0.1_000001.pt"]


def test_an_unwritable_folder_and_a_failed_save_get_one_line(tmp_path, monkeypatch, capsys):
    from cm import checkpoints

    (tmp_path / "file").write_text("x")
    result = cm_train(tmp_path / "file" / "run", monkeypatch, capsys)
    assert result.returncode == 1 and "cannot write to the run folder" in result.stderr and "Traceback" not in result.stderr

    real_save = checkpoints.atomic_save

    def disk_full_at_step_4(obj, path):
        if path.endswith("opt000004.pt"):
            raise OSError(28, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(checkpoints, "atomic_save", disk_full_at_step_4)
    run = tmp_path / "run"
    result = cm_train(run, monkeypatch, capsys, "--total_training_steps 4 --save_interval 2")
    assert result.returncode == 1 and "No space left on device" in result.stderr and "opt000004.pt" in result.stderr
    assert "resumes from its last complete checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert (run / "model000002.pt").exists() and not (run / "model000004.pt").exists()


def test_folders_given_as_model_files_are_named_plainly(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    argv = [*shlex.split(TINY_FLAGS + " --training_mode consistency_training --sampler onestep --num_samples 2"),
            "--model_path", str(run), "--log_dir", str(tmp_path / "s")]
    result = run_in_process("image_sample", argv, monkeypatch, capsys)
    assert result.returncode == 1 and f"{run} is a folder with no checkpoints (modelNNNNNN.pt" in result.stderr, result.stderr
    for name in ("model000002.pt", "model000010.pt", "opt000010.pt", "target_model000010.pt", "ema_0.9_000010.pt",
                 "ema_0.99_000010.pt", "ema_0.9_000002.pt"):
        (run / name).write_bytes(b"")
    result = run_in_process("image_sample", argv, monkeypatch, capsys)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "diffusers" not in result.stderr, result.stderr
    assert (f"{run} is a run folder, not a model file; pass its newest model file {run / 'model000010.pt'} or an EMA "
            f"({run / 'ema_0.99_000010.pt'}, {run / 'ema_0.9_000010.pt'})") in result.stderr
    assert not (tmp_path / "s").exists()
    for path in ("./nowhere/ct64", str(tmp_path / "nowhere")):
        result = run_in_process("convert_from_diffusers", ["--diffusers_path", path, "--output", str(tmp_path / "c.pt")],
                                monkeypatch, capsys)
        assert result.returncode == 1 and f"--diffusers_path {path}: no such folder" in result.stderr, result.stderr


def test_cm_traceback_shows_the_traceback(monkeypatch, capsys):
    from cm.cli import run_cli

    def denied():
        raise PermissionError(13, "Permission denied", "/root/run")

    with pytest.raises(SystemExit):
        run_cli(denied)
    assert capsys.readouterr().err == "error: [Errno 13] Permission denied: '/root/run' (set CM_TRACEBACK=1 for the traceback)\n"
    monkeypatch.setenv("CM_TRACEBACK", "1")
    with pytest.raises(PermissionError):
        run_cli(denied)


SAMPLE = TINY_FLAGS + " --num_samples 2 --batch_size 2 --steps 4"


def sample_run(extra, log_dir, monkeypatch, capsys):
    argv = [*shlex.split(SAMPLE + " " + extra), "--log_dir", str(log_dir)]
    return run_in_process("image_sample", argv, monkeypatch, capsys)


def test_a_checkpoint_is_sampled_and_distilled_only_as_the_kind_it_was_trained_as(tmp_path, edm_teacher, monkeypatch, capsys):
    import torch

    from cm.checkpoints import with_config
    from cm.script_util import create_model_and_diffusion

    from conftest import randomize, tiny_config

    model, _ = create_model_and_diffusion(**tiny_config())
    sct = tmp_path / "sct.pt"
    config = {"training_mode": "continuous_consistency_training", "time_input": "identity", "double_norm": True,
              "data_dir": "digits"}
    torch.save(with_config(randomize(model).state_dict(), config), sct)
    edm = edm_teacher / "model000030.pt"  # scripts/edm_train.py's: its config names no --training_mode
    refused = [
        (f"--model_path {sct} --training_mode consistency_training --sampler onestep",
         f"{sct} was trained as --training_mode continuous_consistency_training, an sCM TrigFlow model",
         "pass --training_mode continuous_consistency_training or leave them out (got --training_mode consistency_training)"),
        (f"--model_path {sct} --time_input edm --double_norm False", "continuous_consistency_training",
         "pass --double_norm True --time_input identity or leave them out (got --double_norm False --time_input edm)"),
        (f"--model_path {edm} --training_mode consistency_training --sampler onestep",
         f"{edm} was trained as --training_mode edm, an EDM-style denoiser", "pass --training_mode edm --sampler heun"),
        (f"--model_path {edm} --training_mode edm --sampler multistep --ts 0,3", "denoiser", "pass --sampler heun"),
    ]
    for i, (extra, trained, fix) in enumerate(refused):
        result = sample_run(extra, tmp_path / f"s{i}", monkeypatch, capsys)
        assert result.returncode == 1 and trained in result.stderr and fix in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / f"s{i}").exists()
    # the file says what it is: no method flags needed, and the same samples as with all of them spelled out
    for i, extra in enumerate((f"--model_path {sct}",
                               f"--model_path {sct} --training_mode continuous_consistency_training --time_input identity "
                               "--double_norm True --sampler onestep",
                               f"--model_path {edm} --training_mode edm --sampler heun")):
        load_script("image_sample").main([*shlex.split(SAMPLE + " " + extra), "--log_dir", str(tmp_path / f"ok{i}")])
    first, spelled = (np.load(tmp_path / f"ok{i}" / "samples_2x16x16x3.npz")["arr_0"] for i in (0, 1))
    assert np.array_equal(first, spelled) and (tmp_path / "ok2" / "samples_2x16x16x3.npz").exists()
    # an sCT model is no sCD teacher (nor a CD one): the teacher must be a denoiser
    argv = [*shlex.split(TRAIN + " --training_mode continuous_consistency_distillation --double_norm True "
                         f"--total_training_steps 1 --teacher_model_path {sct}"), "--log_dir", str(tmp_path / "scd")]
    result = run_in_process("cm_train", argv, monkeypatch, capsys)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"--teacher_model_path {sct} was trained as --training_mode continuous_consistency_training" in result.stderr
    assert "a teacher is a denoiser" in result.stderr and not (tmp_path / "scd" / "model000001.pt").exists()


def test_refused_sampling_seeds_leave_no_folder(tmp_path, monkeypatch, capsys):
    for seeds, message in (("1,1", "--seeds repeats a seed"), ("1,x", "--seeds must be comma-separated integers")):
        result = sample_run(f"--seeds {seeds}", tmp_path / "s", monkeypatch, capsys)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "s").exists()


def test_sampling_onto_a_full_disk_stops_in_one_line_and_a_rerun_finishes(tmp_path, monkeypatch, capsys):
    import errno

    import numpy as np

    real_savez, calls = np.savez, []

    def disk_full_at_the_final_batch(file, *arrays):
        calls.append(file)
        if len(calls) == 3:  # after the two rounds' shards
            raise OSError(errno.ENOSPC, "No space left on device")
        real_savez(file, *arrays)

    monkeypatch.setattr(np, "savez", disk_full_at_the_final_batch)
    out = tmp_path / "s"
    result = sample_run("--batch_size 1", out, monkeypatch, capsys)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"could not write {out} (No space left on device); make room and run the same command again" in result.stderr
    assert sorted(os.listdir(out / "samples_partial")) == ["settings.json", "shard_000000000_000000001.npz",
                                                          "shard_000000001_000000001.npz"]
    assert not list(out.glob("*.npz")) and not list(out.rglob("*.tmp*"))  # nothing half-written
    monkeypatch.setattr(np, "savez", real_savez)
    load_script("image_sample").main([*shlex.split(SAMPLE + " --batch_size 1"), "--log_dir", str(out)])
    assert (out / "samples_2x16x16x3.npz").exists() and not (out / "samples_partial").exists()


def test_a_sampling_folder_in_use_is_refused(tmp_path, monkeypatch, capsys):
    refused_while_held(tmp_path / "s", lambda f: sample_run("", f, monkeypatch, capsys))


def test_an_editing_folder_in_use_is_refused_and_given_back(tmp_path, monkeypatch, capsys):
    argv = [*shlex.split(TINY_FLAGS), "--task", "colorization", "--data_dir", "digits", "--num_images", "2",
            "--training_mode", "consistency_training", "--steps", "10", "--ts", "0,9", "--log_dir"]
    refused_while_held(tmp_path / "e", lambda f: run_in_process("image_edit", [*argv, str(f)], monkeypatch, capsys))
    load_script("image_edit").main([*argv, str(tmp_path / "f")])
    assert (tmp_path / "f" / "edit_colorization.npz").exists() and not (tmp_path / "f" / LOCK_NAME).exists()
