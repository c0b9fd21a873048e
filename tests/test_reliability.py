"""A run folder is one run's: its lock, what resuming may overwrite, the progress log after a resume
(the SIGKILL cases are in tests/test_training.py)."""

import os
import shlex
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from cm.run_folder import LOCK_NAME, remove_stale_temporaries

from test_scripts import TINY_FLAGS, load_script
from test_training import TRAIN, run_in_process, train

CT = "--training_mode consistency_training --start_scales 4 --end_scales 8 --loss_norm l2"


def cm_train(log_dir, monkeypatch, capsys, extra=""):
    argv = [*shlex.split(TRAIN + " " + CT + " --total_training_steps 2 --save_interval 2 " + extra), "--log_dir", str(log_dir)]
    return run_in_process("cm_train", argv, monkeypatch, capsys)


def test_a_folder_in_use_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / LOCK_NAME).write_text(f"{socket.gethostname()} {holder.pid}")
        result = cm_train(folder, monkeypatch, capsys)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"in use by process {holder.pid}" in result.stderr and "--log_dir" in result.stderr
        assert sorted(os.listdir(folder)) == [LOCK_NAME]  # nothing written: no config.json, no log
    finally:
        holder.kill()
        holder.wait()
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
    (run / "model000002.pt").write_bytes(b"")
    argv = [*shlex.split(TINY_FLAGS + " --training_mode consistency_training --sampler onestep --num_samples 2"),
            "--model_path", str(run), "--log_dir", str(tmp_path / "s")]
    result = run_in_process("image_sample", argv, monkeypatch, capsys)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "is a folder but not a diffusers pipeline" in result.stderr and "pass a .pt model file (this one holds model000002.pt" in result.stderr
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
