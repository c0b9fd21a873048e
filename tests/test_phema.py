"""Power-function EMA (EDM2): the profile functions against their closed forms, the tracked average against the
profile's exact weights, and post-hoc reconstruction from snapshots on a toy run with known parameters."""

import errno
import json
import math
import os
import shlex
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch

from cm.phema import exp_to_std, power_beta, profile_dot, solve_weights, std_to_exp

from test_scripts import TINY_FLAGS, load_script
from test_training import TRAIN, run_in_process, train

CT = "--training_mode consistency_training --start_scales 4 --end_scales 8 --loss_norm l2"


def test_exponent_and_sigma_rel_are_inverse_and_match_edm2s_values():
    for std in (0.01, 0.05, 0.1, 0.2, 0.28):
        gamma = std_to_exp(std)
        assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(std, rel=1e-12)
        assert exp_to_std(gamma) == pytest.approx(std, rel=1e-12)
    assert std_to_exp(0.05) == pytest.approx(16.97, abs=0.01) and std_to_exp(0.10) == pytest.approx(6.94, abs=0.01)
    with pytest.raises(ValueError, match="sigma_rel"):
        std_to_exp(0.3)


def track(thetas, gamma, batch=1):
    """The loop's recursion: avg <- beta avg + (1 - beta) theta_s, beta = power_beta at s * batch images."""
    avg = np.zeros_like(thetas[0])
    for s, theta in enumerate(thetas, start=1):
        beta = power_beta(gamma, s * batch, batch)
        avg = beta * avg + (1 - beta) * theta
    return avg


def test_the_tracked_average_gives_each_step_the_profiles_mass_over_it():
    rng = np.random.default_rng(0)
    T, gamma = 300, std_to_exp(0.1)
    thetas = rng.normal(size=(T, 5))
    s = np.arange(1, T + 1)
    mass = (s / T) ** (gamma + 1) - ((s - 1) / T) ** (gamma + 1)  # the integral of (g+1) tau^g / T^(g+1) over step s
    np.testing.assert_allclose(track(thetas, gamma, batch=8), mass @ thetas, rtol=1e-10, atol=1e-12)
    assert power_beta(gamma, 8, 8) == 0.0  # the first step's weights start the average


@pytest.mark.parametrize("t_a, t_b", [(600.0, 1000.0), (1000.0, 600.0), (800.0, 800.0)])
def test_profile_inner_products_against_quadrature(t_a, t_b):
    g_a, g_b = std_to_exp(0.1), std_to_exp(0.05)
    tau = np.linspace(0, min(t_a, t_b), 200_001)  # the product is 0 beyond the shorter profile
    p_a = (g_a + 1) * (tau / t_a) ** g_a / t_a
    p_b = (g_b + 1) * (tau / t_b) ** g_b / t_b
    assert profile_dot(t_a, g_a, t_b, g_b) == pytest.approx(np.trapezoid(p_a * p_b, tau), rel=1e-5)


def toy_run(T=2000, every=50, stds=(0.05, 0.1)):
    """Known parameters theta_s (a drifting, oscillating 3-vector) and snapshots of two tracked profiles."""
    s = np.arange(1, T + 1)
    thetas = np.stack([np.sin(s / 150), np.cos(s / 85) * (s / T), (s / T) ** 2], axis=1)
    times, snap_std, snaps = [], [], []
    for std in stds:
        gamma, avg = std_to_exp(std), np.zeros(3)
        for k, theta in enumerate(thetas, start=1):
            beta = power_beta(gamma, k, 1)
            avg = beta * avg + (1 - beta) * theta
            if k % every == 0:
                times.append(k), snap_std.append(std), snaps.append(avg.copy())
    return thetas, np.array(times, dtype=float), snap_std, np.stack(snaps)


def test_reconstruction_returns_a_tracked_profile_and_fits_one_between():
    thetas, times, snap_std, snaps = toy_run()
    T = len(thetas)
    x, err = solve_weights(times, snap_std, T, 0.1)
    assert err < 1e-6
    np.testing.assert_allclose(x @ snaps, track(thetas, std_to_exp(0.1)), rtol=1e-9, atol=1e-9)
    # sigma_rel 0.07, between the two, and 0.15, beyond them, against the directly tracked average
    for std, bound in ((0.07, 1e-3), (0.15, 1e-2)):
        x, err = solve_weights(times, snap_std, T, std)
        truth = track(thetas, std_to_exp(std))
        measured = np.abs(x @ snaps - truth).max() / np.abs(truth).max()
        assert err < 0.05 and measured < bound, (std, err, measured)
    # a classic EMA of half-life 100 steps at T, against its own recursion (beta = 0.5^(1/100))
    x, err = solve_weights(times, snap_std, T, target_halflife=100)
    beta, avg = 0.5 ** (1 / 100), thetas[0].copy()
    for theta in thetas[1:]:
        avg = beta * avg + (1 - beta) * theta
    assert err < 0.05 and np.abs(x @ snaps - avg).max() < 1e-2 * np.abs(avg).max()


def test_reconstruct_script_returns_tracked_averages_writes_sampleable_files_and_refuses_in_one_line(
        tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    train("cm_train", TRAIN + " " + CT + " --total_training_steps 8 --save_interval 8 --log_interval 8 "
          "--phema_std 0.05,0.1 --phema_snapshot_interval 32", run_dir)  # a snapshot every 2 steps of 16 images
    assert len(list(run_dir.glob("phema_0.1_*.pt"))) == 4
    reconstruct = load_script("reconstruct_ema")
    reconstruct.main(["--run_dir", str(run_dir), "--std", "0.1,0.07", "--halflife_images", "40", "--max_error", "1"])
    tracked = torch.load(run_dir / "phema_0.1_000008.pt", weights_only=True)
    rebuilt = torch.load(run_dir / "posthoc" / "posthoc_0.1_000008.pt", weights_only=True)
    for key, value in tracked.items():
        torch.testing.assert_close(rebuilt[key], value, rtol=1e-5, atol=1e-6)
    sample = load_script("image_sample")
    sample.main(shlex.split(TINY_FLAGS) + ["--training_mode", "consistency_training", "--sampler", "onestep",
                                           "--model_path", str(run_dir / "posthoc" / "posthoc_0.07_000008.pt"),
                                           "--num_samples", "2", "--batch_size", "2", "--log_dir", str(tmp_path / "s")])
    assert list((tmp_path / "s").glob("samples_2x16x16x3.npz"))
    for argv, message in ((["--std", "0.25"], "cannot express sigma_rel 0.25"),
                          (["--std", "0.4"], "--std: a power-function EMA's sigma_rel must be in"),
                          (["--std", "0.1", "--step", "5"], "no snapshot at step 5")):
        result = run_in_process("reconstruct_ema", ["--run_dir", str(run_dir), *argv], monkeypatch, capsys)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    empty = run_in_process("reconstruct_ema", ["--run_dir", str(tmp_path), "--std", "0.1"], monkeypatch, capsys)
    assert empty.returncode == 1 and "--phema_std" in empty.stderr


def write_snapshots(folder, steps=(2, 4, 6), stds=(0.05, 0.1), run_id=None, shape=(3,), batch=8):
    """Toy phema_STD_NNNNNN.pt files as training writes them (the run id in their config unless None)."""
    from cm.checkpoints import with_config

    folder.mkdir(exist_ok=True)
    for step in steps:
        for std in stds:
            config = {"phema": {"std": std, "step": step, "images": step * batch, "batch": batch}}
            if run_id is not None:
                config["run_id"] = run_id
            state = with_config(OrderedDict(w=torch.full(shape, float(step))), config)
            torch.save(state, folder / f"phema_{std}_{step:06d}.pt")
    return folder


def test_each_run_keeps_one_id_across_resumes_and_snapshots_of_two_runs_are_not_averaged(tmp_path, monkeypatch, capsys):
    from cm.checkpoints import checkpoint_config

    flags = TRAIN + " " + CT + " --save_interval 2 --log_interval 2 --phema_snapshot_interval 16"
    a, b = tmp_path / "a", tmp_path / "b"
    train("cm_train", flags + " --total_training_steps 2 --phema_std 0.1", a)
    train("cm_train", flags + " --total_training_steps 4 --phema_std 0.1", a)  # resumed
    train("cm_train", flags + " --total_training_steps 2 --phema_std 0.05", b)
    ids = {}
    for run in (a, b):
        run_id = json.loads((run / "config.json").read_text())["run_id"]
        stored = {checkpoint_config(torch.load(p, weights_only=True))["run_id"] for p in run.glob("phema_*.pt")}
        assert stored == {run_id} and len(run_id) >= 8, (stored, run_id)
        ids[run] = run_id
    assert len(list(a.glob("phema_*.pt"))) == 4 and ids[a] != ids[b]
    for p in b.glob("phema_*.pt"):
        shutil.copy(p, a / p.name)
    result = run_in_process("reconstruct_ema", ["--run_dir", str(a), "--std", "0.07"], monkeypatch, capsys)
    assert result.returncode == 1 and ids[a] in result.stderr and ids[b] in result.stderr, result.stderr
    assert "phema_0.05_000001.pt" in result.stderr and "phema_0.1_000001.pt" in result.stderr
    assert "Traceback" not in result.stderr and not (a / "posthoc").exists()


def test_snapshots_without_a_run_id_are_accepted_alone_and_never_mixed_with_other_runs_or_networks(
        tmp_path, monkeypatch, capsys):
    old = write_snapshots(tmp_path / "old")
    load_script("reconstruct_ema").main(["--run_dir", str(old), "--std", "0.1"])
    assert torch.load(old / "posthoc" / "posthoc_0.1_000006.pt", weights_only=True)["w"].tolist() == [6.0] * 3
    cases = (
        (write_snapshots(tmp_path / "ids", run_id="0123abcd", steps=(8,)), ("0123abcd", "no run id", "phema_0.05_000008.pt")),
        (write_snapshots(tmp_path / "nets", shape=(4,), steps=(8,)), ("different networks", "w", "phema_0.05_000008.pt")),
    )
    for folder, words in cases:
        write_snapshots(folder)  # with the old ones
        result = run_in_process("reconstruct_ema", ["--run_dir", str(folder), "--std", "0.1"], monkeypatch, capsys)
        assert result.returncode == 1 and all(w in result.stderr for w in words), result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1 and not (folder / "posthoc").exists()


def test_reconstruct_refuses_non_finite_requests_skips_step_0_and_writes_nothing_on_a_full_disk(
        tmp_path, monkeypatch, capsys):
    run = write_snapshots(tmp_path / "run", steps=(0, 2, 4, 6))
    (tmp_path / "file").write_text("x")
    for argv, message in ((["--halflife_images", "nan"], "--halflife_images"), (["--halflife_images", "inf"], "--halflife_images"),
                          (["--halflife_images", "1e300"], "cannot express half-life 1e+300 images"),
                          (["--std", "0.1", "--max_error", "nan"], "--max_error"),
                          (["--std", "0.1", "--max_error", "inf"], "--max_error"),
                          (["--std", "0.1", "--out_dir", str(tmp_path / "file" / "out")], str(tmp_path / "file"))):
        result = run_in_process("reconstruct_ema", ["--run_dir", str(run), *argv], monkeypatch, capsys)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (run / "posthoc").exists()
    load_script("reconstruct_ema").main(["--run_dir", str(run), "--std", "0.1", "--halflife_images", "20", "--max_error", "1"])
    assert "skipped phema_0.1_000000.pt" in capsys.readouterr().out
    assert torch.load(run / "posthoc" / "posthoc_0.1_000006.pt", weights_only=True)["w"].tolist() == [6.0] * 3

    def disk_full(obj, path):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    out = tmp_path / "out"
    result = run_in_process("reconstruct_ema", ["--run_dir", str(run), "--std", "0.1", "--out_dir", str(out)], monkeypatch, capsys)
    assert result.returncode == 1 and "No space left on device" in result.stderr and "posthoc_0.1_000006.pt" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1 and os.listdir(out) == []
