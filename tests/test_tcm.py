"""Truncated consistency models (TCM's stage 2): the time mixture against the truncated Student-t it draws from, the
two-stage network, the boundary loss against a direct computation (a target-reading method and sCT), and a stage-2 run
from a stage-1 run that lowers its loss, resumes exactly, samples one and two steps, and takes the same steps on two
processes as on one."""

import math
import shlex
import shutil

import numpy as np
import pytest
import torch

from cm import methods
from cm.checkpoints import checkpoint_config
from cm.config import parse_args_with_config
from cm.losses import distance, step_weightings
from cm.methods.tcm import LevelSwitch
from cm.nn import append_dims, mean_flat
from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from cm.train_util import StepRandom

from conftest import randomize
from test_scripts import load_script, run_here
from test_training import LAUNCHERS, TRAIN, assert_same, run, state


def method_of(mode, tmp_path, extra=""):
    """The stage-2 method of `mode` from the training flags, its stage-1 file a randomised tiny network (seed 9); the
    student (randomised, seed 1) built as cm_train builds it."""
    argv = shlex.split(TRAIN + f" --training_mode truncated_{mode} --dropout 0 --loss_norm l2 --tcm_stage1 "
                       f"{tmp_path / 'stage1.pt'} {extra}")
    args = parse_args_with_config(load_script("cm_train").create_argparser(), argv, "cm_train.py",
                                  mode_defaults=methods.mode_flag_defaults())
    cls = methods.method_class(args.training_mode)
    kwargs = {k: getattr(args, k) for k in model_and_diffusion_defaults()}

    def build(seed):
        torch.manual_seed(seed)
        model, diffusion = create_model_and_diffusion(**kwargs, distillation=cls.boundary_condition, loss_norm="l2")
        return randomize(model, seed=seed).train(), diffusion

    torch.save(build(9)[0].state_dict(), tmp_path / "stage1.pt")
    model, diffusion = build(1)
    method = cls(args, diffusion)
    method.build_networks(model)
    params = list(model.parameters())
    method.setup(methods.MethodContext(step=0, device=torch.device("cpu"), world_size=1, precision="fp32", fast_paths={},
                                       config={}, model=model, master_params=params, state_dict_of=None,
                                       restart_optimization=None), False)
    return method, model, diffusion, args


def student_t_cdf(x, df):
    """The Student-t CDF by integrating its density (Simpson's rule on a substitution that tames the tails), not by
    scipy: the independent computation the draws are checked against."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    u = np.linspace(0, math.atan(abs(x)), 200001)  # x = tan(u)
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(np.tan(u) ** 2 / df)) / np.cos(u) ** 2
    h = u[1] - u[0]
    integral = h / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum())
    return 0.5 + math.copysign(integral, x)


@pytest.mark.parametrize("df", [0.01, 2.0])
def test_the_time_mixture_follows_the_truncated_student_t_and_the_boundary_share(df, tmp_path):
    method, _, diffusion, args = method_of("easy_consistency_tuning", tmp_path, f"--tcm_log_t_df {df} --tcm_transition 1.0")
    n = 40000
    rows = method.draw(StepRandom(0, 3, 0, 1, n, torch.device("cpu")), torch.zeros(n, 3, 1, 1), 3)
    boundary = rows["boundary"]
    assert abs(boundary.float().mean().item() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    assert torch.all(rows["t"][boundary] == 1.0) and torch.all(rows["r"][boundary] < 1.0)
    levels = rows["t"][~boundary].double()
    assert levels.min() >= 1.0 and levels.max() <= diffusion.sigma_max
    mean, std = args.tcm_log_t_mean, args.tcm_log_t_std

    def cdf(s):
        return student_t_cdf((math.log(s) - mean) / std, df)

    low, high = cdf(1.0), cdf(diffusion.sigma_max)
    for s in (1.05, 1.3, 2.0, 5.0, 20.0, 60.0):
        expected = (cdf(s) - low) / (high - low)
        assert abs((levels <= s).double().mean().item() - expected) < 0.01, (s, expected)


def test_a_grid_method_puts_the_boundary_on_the_pair_across_the_transition(tmp_path):
    from cm.schedule import index_to_sigma

    method, _, diffusion, _ = method_of("consistency_training", tmp_path, "--scale_mode fixed --start_scales 40")
    rows = method.draw(StepRandom(0, 0, 0, 1, 2000, torch.device("cpu")), torch.zeros(2000, 3, 1, 1), 0)
    d = diffusion
    online, target = (index_to_sigma(rows["indices"].double() + k, 40, d.sigma_min, d.sigma_max, d.rho) for k in (0, 1))
    assert torch.all(online >= 1.0)  # trained on the truncated range only
    assert torch.all(target[rows["boundary"]] < 1.0) and torch.all(target[~rows["boundary"]] < online[~rows["boundary"]])


def test_the_two_stage_network_routes_each_row_by_its_noise_level():
    lower, upper = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    def net(module):
        return lambda x, timesteps: module(x) + 0 * timesteps[:, None]

    switch = LevelSwitch(net(lower), net(upper), transition=1.0, c_noise="published")
    x = torch.randn(4, 2)
    sigma = torch.tensor([0.5, 1.0, 3.0, 0.99])
    from cm.denoiser import network_time

    out = switch(x, network_time(sigma, "published"))
    below = sigma < 1.0
    torch.testing.assert_close(out[below], lower(x)[below])
    torch.testing.assert_close(out[~below], upper(x)[~below])
    out.sum().backward()
    assert lower.weight.grad is None and upper.weight.grad is not None


def test_the_boundary_loss_of_a_target_reading_method_against_a_direct_computation(tmp_path):
    """ECT's stage 2: each row's loss is ECT's distance between the network at t and the target at r(t), the target
    from the stage-1 network where r < t' and from the target network (here the student itself) elsewhere; weighted
    1 / (1 - share), or w_b / share on the boundary rows."""
    method, model, diffusion, args = method_of("easy_consistency_tuning", tmp_path, "--tcm_transition 2.0 --tcm_boundary_share 0.5")
    gen = torch.Generator().manual_seed(4)
    x, cond = torch.rand(8, 3, 16, 16, generator=gen) * 2 - 1, {"y": torch.arange(8)}
    rows = method.draw(StepRandom(5, 0, 0, 1, 8, x.device), x, 0)
    assert rows["boundary"].any() and not rows["boundary"].all()
    loss = method.losses(model, x, cond, rows, 0)["loss"]

    t, r, z = rows["t"], rows["r"], rows["noise"]
    with torch.no_grad():
        online = diffusion.denoise(model, x + append_dims(t, 4) * z, t, **cond)[1]
        from_student = diffusion.denoise(model, x + append_dims(r, 4) * z, r, **cond)[1]
        from_stage1 = diffusion.denoise(method.stage1, x + append_dims(r, 4) * z, r, **cond)[1]
    target = torch.where(append_dims(r < 2.0, 4), from_stage1, from_student)
    assert (r < 2.0).any() and (r >= 2.0).any()
    per_row = distance(online, target, diffusion.loss_norm, None, diffusion.huber_c) * step_weightings(diffusion, t, r)
    weights = torch.where(rows["boundary"], args.tcm_boundary_weight / 0.5, 1 / 0.5)
    torch.testing.assert_close(loss.detach(), weights * per_row, rtol=1e-5, atol=1e-7)


def test_the_boundary_loss_of_sct_is_the_distance_to_the_stage1_estimate(tmp_path):
    method, model, diffusion, args = method_of("continuous_consistency_training", tmp_path,
                                               "--tcm_boundary_share 0.5 --scm_weighting prior --tangent_warmup_steps 0")
    gen = torch.Generator().manual_seed(4)
    x, cond = torch.rand(8, 3, 16, 16, generator=gen) * 2 - 1, {"y": torch.arange(8)}
    rows = method.draw(StepRandom(5, 0, 0, 1, 8, x.device), x, 0)
    boundary = rows["boundary"]
    assert boundary.any() and not boundary.all()
    loss = method.losses(model, x, cond, rows, 0)["loss"].detach()
    inner = {k: v for k, v in rows.items() if k != "boundary"}
    sct = methods.method_class("continuous_consistency_training")(args, diffusion)
    sct.build_networks(model)
    plain = sct.losses(model, x, cond, inner, 0)["loss"].detach()
    torch.testing.assert_close(loss[~boundary], plain[~boundary] / 0.5)
    with torch.no_grad():
        estimates = [sct.denoised(net, x, inner, cond) for net in (model, method.stage1)]
    torch.testing.assert_close(loss[boundary], (args.tcm_boundary_weight / 0.5 * mean_flat((estimates[0] - estimates[1]) ** 2))[boundary])


STAGE1 = TRAIN + " --training_mode consistency_training --dropout 0 --scale_mode fixed --start_scales 18 --loss_norm l2"


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stage1")
    load_script("cm_train").main(shlex.split(STAGE1 + f" --total_training_steps 4 --save_interval 4 --log_dir {folder}"))
    return folder / "model000004.pt"


def stage2_flags(stage1):
    return (TRAIN.replace("--lr 2e-4", "--lr 1e-3") + " --training_mode truncated_consistency_training --dropout 0 "
            f"--scale_mode fixed --start_scales 18 --loss_norm l2 --tcm_stage1 {stage1} --save_interval 5")


def test_a_stage2_run_lowers_its_loss_resumes_exactly_and_samples_one_and_two_steps(stage1_run, tmp_path):
    main = load_script("cm_train").main
    flags = stage2_flags(stage1_run)
    main(shlex.split(flags + f" --total_training_steps 5 --log_dir {tmp_path / 'run'}"))
    main(shlex.split(flags + f" --total_training_steps 10 --log_dir {tmp_path / 'run'}"))  # resumes from step 5
    main(shlex.split(flags + f" --total_training_steps 10 --log_dir {tmp_path / 'straight'}"))
    assert_same(state(tmp_path / "run", 10), state(tmp_path / "straight", 10))
    assert checkpoint_config(torch.load(tmp_path / "run" / "model000010.pt", weights_only=True))["tcm_transition"] == 1.0
    before, after = (fixed_batch_loss(stage2_flags(stage1_run), torch.load(path, weights_only=True))
                     for path in (stage1_run, tmp_path / "run" / "model000010.pt"))
    assert after < 0.97 * before, (before, after)  # (measured: 0.1303 -> 0.1227 after 10 steps)
    for sampler, extra in (("onestep", ""), ("multistep", "--t_mid 1.0")):  # no method flags: the file says what it is
        load_script("image_sample").main(shlex.split(
            f"--precision fp32 --sampler {sampler} {extra} --num_samples 4 --batch_size 4 "
            f"--model_path {tmp_path / 'run' / 'model000010.pt'} --log_dir {tmp_path / sampler}"))
    one, two = (np.load(tmp_path / s / "samples_4x16x16x3.npz")["arr_0"] for s in ("onestep", "multistep"))
    assert one.std() > 0 and not np.array_equal(one, two)


def fixed_batch_loss(flags, model_state):
    """The stage-2 loss of `model_state` on 64 digits at fixed draws (the target network: the same weights)."""
    from cm.image_datasets import load_digits_arrays

    args = parse_args_with_config(load_script("cm_train").create_argparser(), shlex.split(flags), "cm_train.py",
                                  mode_defaults=methods.mode_flag_defaults())
    model, diffusion = create_model_and_diffusion(**{k: getattr(args, k) for k in model_and_diffusion_defaults()},
                                                  distillation=True, loss_norm="l2")
    method = methods.method_class(args.training_mode)(args, diffusion)
    method.build_networks(model)
    for net in (model, method.target_model):
        net.load_state_dict(model_state)
    images, labels = load_digits_arrays()
    x = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
    rows = method.draw(StepRandom(1, 0, 0, 1, 64, x.device), x, 0)
    with torch.no_grad():
        return method.losses(model, x, {"y": torch.from_numpy(labels[:64])}, rows, 0)["loss"].mean().item()


def test_a_stage1_file_of_another_method_is_one_clear_error(stage1_run, tmp_path):
    flags = stage2_flags(stage1_run).replace("truncated_consistency_training", "truncated_easy_consistency_tuning")
    with pytest.raises(ValueError, match="trained as --training_mode consistency_training"):
        load_script("cm_train").main(shlex.split(flags + f" --total_training_steps 1 --log_dir {tmp_path / 'x'}"))
    with pytest.raises(ValueError, match="needs --tcm_stage1"):
        load_script("cm_train").main(shlex.split(flags.replace(f"--tcm_stage1 {stage1_run}", "")
                                                 + f" --total_training_steps 1 --log_dir {tmp_path / 'y'}"))


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec not installed")
def test_stage2_of_sct_takes_the_same_steps_on_two_processes_as_on_one(tmp_path):
    """sCT's stage 2 runs the network twice before one backward (its loss and the boundary's estimate): DDP on two
    processes must average the same gradients one process computes."""
    main = load_script("cm_train").main
    main(shlex.split(TRAIN + " --training_mode continuous_consistency_training --dropout 0 --total_training_steps 2 "
                     f"--save_interval 2 --log_dir {tmp_path / 'stage1'}"))
    flags = (TRAIN + " --training_mode truncated_continuous_consistency_training --dropout 0 --tcm_boundary_share 0.5 "
             f"--tcm_stage1 {tmp_path / 'stage1' / 'model000002.pt'} --total_training_steps 3 --save_interval 3")
    one = run_here("cm_train", [*shlex.split(flags), "--log_dir", str(tmp_path / "one")])  # (one thread, as two processes)
    two = run([*LAUNCHERS["mpiexec"], "scripts/cm_train.py", *shlex.split(flags + " --batch_size 8"),
               "--log_dir", str(tmp_path / "two")])
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    names = ("model", "ema_0.9_", "scm_weight")
    assert_same(state(tmp_path / "one", 3, names), state(tmp_path / "two", 3, names), atol=1e-6)
