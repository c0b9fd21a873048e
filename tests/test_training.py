"""Training end to end at tiny size: EDM, CD, CT; checkpoints, resume after SIGKILL, processes, precision, errors."""

import csv
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from cm.image_datasets import load_digits_arrays
from cm.script_util import create_model_and_diffusion
from cm.checkpoints import checkpoint_config
from cm.run_folder import LOCK_NAME
from cm.train_util import Precision

from conftest import tiny_config
from test_scripts import ROOT, TINY_FLAGS, load_script, run

TRAIN = TINY_FLAGS + " --data_dir digits --global_batch_size 16 --lr 2e-4 --ema_rate 0.9,0.99 --progress False"
CT = "--training_mode consistency_training --target_ema_mode fixed --start_ema 0.9 --scale_mode fixed --start_scales 10 --loss_norm l2 --weight_schedule uniform"


def train(script, flags, log_dir):
    load_script(script).main(shlex.split(flags) + ["--log_dir", str(log_dir)])


def progress_rows(log_dir):
    with open(os.path.join(log_dir, "progress.csv")) as f:
        return list(csv.DictReader(f))


def losses(log_dir):
    with open(os.path.join(log_dir, "progress.csv")) as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]


def state(log_dir, step, names=("model", "ema_0.9_", "target_model")):
    return {n: torch.load(os.path.join(log_dir, f"{n}{step:06d}.pt"), weights_only=True) for n in names}


def assert_same(a, b, atol=0.0):
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=0, atol=atol, msg=f"{name} {key}")


def fixed_batch_loss(model_state, target_state, teacher_state=None, num_scales=10):
    """The CT (or, with a teacher, CD) l2 loss on 128 digits with fixed noise and grid indices:
    a deterministic measure of training progress, unlike the noisy per-step losses."""

    def net(state, distillation=True):
        model = create_model_and_diffusion(**tiny_config(), distillation=distillation, loss_norm="l2")
        model[0].load_state_dict(state)
        return model[0].eval(), model[1]

    model, diffusion = net(model_state)
    diffusion.weight_schedule = "uniform"
    teacher, teacher_diffusion = net(teacher_state, distillation=False) if teacher_state else (None, None)
    images, labels = load_digits_arrays()
    x = torch.from_numpy(images[:128]).permute(0, 3, 1, 2).float() / 127.5 - 1
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen)
    indices = torch.randint(0, num_scales - 1, (128,), generator=gen)
    with torch.no_grad():
        return diffusion.consistency_losses(
            model, x, num_scales, model_kwargs={"y": torch.from_numpy(labels[:128])}, target_model=net(target_state)[0],
            teacher_model=teacher, teacher_diffusion=teacher_diffusion, noise=noise, indices=indices,
        )["loss"].mean().item()


def initial_state(seed=0):
    """The weights a run with --seed `seed` starts from (the scripts seed before building the model)."""
    torch.manual_seed(seed)
    return create_model_and_diffusion(**tiny_config())[0].state_dict()


def test_edm_run_lowers_the_loss_and_writes_its_checkpoint(edm_teacher):
    curve = losses(edm_teacher)
    assert len(curve) == 30 and sum(curve[-10:]) < sum(curve[:10])
    for name in ("model000030.pt", "ema_0.9_000030.pt", "ema_0.99_000030.pt", "opt000030.pt", "train_state000030.pt", "config.json"):
        assert (edm_teacher / name).exists(), name


def test_cd_run_from_the_teacher_lowers_the_loss(edm_teacher, tmp_path):
    flags = (TRAIN + " --training_mode consistency_distillation --target_ema_mode fixed --start_ema 0.9 "
             "--scale_mode fixed --start_scales 10 --loss_norm l2 --weight_schedule uniform --total_training_steps 30 "
             f"--log_interval 1 --save_interval 30 --teacher_model_path {edm_teacher / 'model000030.pt'}")
    train("cm_train", flags.replace("--lr 2e-4", "--lr 1e-3"), tmp_path)
    assert len(losses(tmp_path)) == 30
    teacher = torch.load(edm_teacher / "model000030.pt", weights_only=True)
    end = state(tmp_path, 30)
    before = fixed_batch_loss(teacher, teacher, teacher)  # the student starts as the teacher
    after = fixed_batch_loss(end["model"], end["target_model"], teacher)
    assert after < 0.95 * before, (before, after)
    names = ["model", "ema_0.9_", "ema_0.99_", "opt", "train_state", "target_model"]
    assert all((tmp_path / f"{n}000030.pt").exists() for n in names)
    model = torch.load(tmp_path / "model000030.pt", weights_only=True)
    assert "cm_config" in model._metadata  # the resolved config travels inside the checkpoint
    assert checkpoint_config(model)["training_mode"] == "consistency_distillation"


def test_progdist_saves_at_a_stage_boundary_with_the_student_as_the_new_teacher(edm_teacher, tmp_path):
    # N halves after step 2 (4 -> 2), where the checkpoint is saved: its check before saving runs the last step's draw
    # (indices of the 4-step grid) with that step's settings, and the teacher saved is the student of that moment
    train("cm_train", TRAIN + f" --training_mode progdist --teacher_model_path {edm_teacher / 'model000030.pt'} "
          "--loss_norm l2 --scale_mode progdist --start_scales 4 --distill_steps_per_iter 2 --total_training_steps 2 "
          "--save_interval 2", tmp_path)
    saved = state(tmp_path, 2, names=("model", "teacher_model"))
    assert_same({"model": saved["teacher_model"]}, {"model": saved["model"]})
    assert not torch.equal(saved["model"]["out.2.weight"], torch.load(edm_teacher / "model000030.pt", weights_only=True)["out.2.weight"])


def test_ct_run_lowers_the_loss(tmp_path):
    flags = TRAIN.replace("--lr 2e-4", "--lr 1e-3") + " " + CT + " --total_training_steps 30 --log_interval 10 --save_interval 30"
    train("cm_train", flags, tmp_path)
    start, end = initial_state(), state(tmp_path, 30)
    before = fixed_batch_loss(start, start)
    after = fixed_batch_loss(end["model"], end["target_model"])
    assert after < 0.95 * before, (before, after)


def _script_cmd(log_dir, steps, extra=""):
    return [sys.executable, "scripts/cm_train.py", *shlex.split(TRAIN + " " + CT + " --log_interval 5 --save_interval 5 "
            + f"--total_training_steps {steps} --dropout 0.1 " + extra), "--log_dir", str(log_dir)]


PHEMA = "--phema_std 0.05,0.1 --phema_snapshot_interval 48"  # snapshots every 3 steps of 16 images


def test_sigkill_then_resume_continues_exactly(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as run() uses: same threads, same float sums
    # the uninterrupted run and the run to be killed are independent: both at once, a core each
    with open(tmp_path / "whole.err", "w+") as whole_err:
        whole_proc = subprocess.Popen(_script_cmd(whole, 15, PHEMA), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                      stderr=whole_err)
        proc = subprocess.Popen(_script_cmd(killed, 15, PHEMA), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 120
            while not (killed / "model000010.pt").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            whole_proc.wait(timeout=300)  # (run()'s timeout)
        finally:
            for p in (whole_proc, proc):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        whole_err.seek(0)
        assert whole_proc.returncode == 0, whole_err.read()[-2000:]
    # a save cut short: the step-15 files written before the model file, and a temporary model file
    for name in ("ema_0.9_000015.pt", "opt000015.pt"):
        if (whole / name).exists() and not (killed / "model000015.pt").exists():
            shutil.copy(whole / name, killed / name)
    (killed / "model000015.tmp999.pt").write_bytes(b"half a checkpoint")
    result = run(_script_cmd(killed, 15, PHEMA))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from" in result.stdout
    assert_same(state(whole, 15), state(killed, 15))
    assert not (killed / "model000015.tmp999.pt").exists()  # the killed save's temporary file is removed
    lines = (killed / "progress.csv").read_text().splitlines()  # one header, each logged step once
    step = lines[0].split(",").index("step")
    assert [float(line.split(",")[step]) for line in lines[1:]] == [5, 10, 15]
    # the power-function EMAs' snapshots (every 3 steps) and checkpoint files (every 5), before and after the kill
    snapshots = sorted(f.name for f in whole.glob("phema_*.pt"))
    assert snapshots == sorted(f.name for f in killed.glob("phema_*.pt"))
    assert {f"phema_0.05_{k:06d}.pt" for k in (3, 5, 6, 9, 10, 12, 15)} <= set(snapshots)
    for name in snapshots:
        assert_same({name: torch.load(whole / name, weights_only=True)}, {name: torch.load(killed / name, weights_only=True)})
    opt_a = torch.load(whole / "opt000015.pt", weights_only=True)
    opt_b = torch.load(killed / "opt000015.pt", weights_only=True)
    for key, value in opt_a["state"].items():
        torch.testing.assert_close(opt_b["state"][key]["exp_avg"], value["exp_avg"], rtol=0, atol=0)
    assert torch.load(killed / "train_state000015.pt", weights_only=True)["step"] == 15


LAUNCHERS = {
    "mpiexec": ["mpiexec", "-n", "2", sys.executable],
    "torchrun": ["torchrun", "--standalone", "--nproc_per_node", "2"],
}


# 6 CT steps, and the evaluation during training at the last (its samples drawn by every process)
TWO_PROCESS_RUN = (TRAIN + " " + CT + " --total_training_steps 6 --log_interval 3 --save_interval 6 --eval_interval 6 "
                   "--eval_samples 12 --eval_features digits --eval_ref digits --eval_ema 0.99")


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """TWO_PROCESS_RUN on one process: what both launchers' two processes are compared with."""
    folder = tmp_path_factory.mktemp("one_process")
    result = run([sys.executable, "scripts/cm_train.py", *shlex.split(TWO_PROCESS_RUN), "--log_dir", str(folder)])
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_take_the_same_steps_as_one(tmp_path, launcher, one_process_run, monkeypatch, capsys):
    if shutil.which(launcher) is None:
        pytest.skip(f"{launcher} not installed")
    per_process = shlex.split(TWO_PROCESS_RUN + " --batch_size 8") + ["--log_dir", str(tmp_path / "two")]  # 2 x 8: 16
    two = run([*LAUNCHERS[launcher], "scripts/cm_train.py", *per_process])
    # (the processes' own lines come first, the launcher's report last)
    assert two.returncode == 0, two.stderr[:3000] + " ... " + two.stderr[-800:]
    assert_same(state(one_process_run, 6), state(tmp_path / "two", 6), atol=1e-6)
    assert losses(one_process_run) == pytest.approx(losses(tmp_path / "two"), rel=1e-5)
    # the same 12 samples (up to the rounding of other batch sizes: 16 and 8 per process)
    fid = [float(rows[-1]["fid_1step_ema0.99"]) for rows in map(progress_rows, (one_process_run, tmp_path / "two"))]
    assert fid[1] == pytest.approx(fid[0], rel=1e-3)
    # the same command on one process would go on at a global batch of 8: the stored global batch is compared
    files = {f: (tmp_path / "two" / f).read_bytes() for f in os.listdir(tmp_path / "two") if (tmp_path / "two" / f).is_file()}
    result = run_in_process("cm_train", per_process[:-2] + ["--total_training_steps", "8"] + per_process[-2:], monkeypatch,
                            capsys)
    assert result.returncode == 1 and "the global batch (processes x per-process batch) 16 -> 8" in result.stderr
    after = {f: (tmp_path / "two" / f).read_bytes() for f in os.listdir(tmp_path / "two")
             if f != LOCK_NAME and (tmp_path / "two" / f).is_file()}
    assert after == files  # (the lock is this process's, given back at its exit)


def test_processes_leave_their_group_and_exit_cleanly():
    """A gloo process group left to the interpreter's exit ends some processes with "terminate called without an
    active exception" (measured with torch 2.14: 7 of 10 five-process runs): setup_dist leaves it at exit."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed")
    program = ("import torch; from cm import dist_util; dist_util.setup_dist(device='cpu'); "
               "dist_util.all_gather(torch.ones(1))")  # and exit without leaving the group by hand
    command = ["torchrun", "--standalone", "--nproc_per_node", "5", "--no-python", sys.executable, "-c", program]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "terminate called" not in result.stderr, result.stderr[-2000:]


def test_microbatches_take_the_same_step_as_the_whole_batch(tmp_path):
    base = TRAIN + " " + CT + " --total_training_steps 3 --log_interval 3 --save_interval 3"
    train("cm_train", base, tmp_path / "whole")
    train("cm_train", base + " --microbatch 6", tmp_path / "micro")
    assert_same(state(tmp_path / "whole", 3), state(tmp_path / "micro", 3), atol=1e-6)


def test_bf16_and_fp16_runs(tmp_path):
    # two steps: bf16 is emulated (slow) on CPUs without AMX or AVX512-BF16
    flags = TRAIN + " " + CT + " --total_training_steps 2 --log_interval 1 --save_interval 2"
    train("cm_train", flags, tmp_path / "fp32")
    start = initial_state()
    update = {k: v - start[k] for k, v in state(tmp_path / "fp32", 2)["model"].items()}
    for flag in ("--use_bf16 True", "--use_fp16 True"):
        out = tmp_path / flag.split()[0][2:]
        train("cm_train", f"{flags} {flag}", out)
        assert all(torch.isfinite(v).all() for v in state(out, 2)["model"].values())
        assert all(v.dtype == torch.float32 for v in state(out, 2)["model"].values())
        # the same two steps as in float32, up to the rounding of the lower precision: the weights moved
        # the same way by about the same amount, from losses of about the same size
        moved = {k: v - start[k] for k, v in state(out, 2)["model"].items()}
        a, b = (torch.cat([d[k].flatten() for k in sorted(update)]) for d in (update, moved))
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.95, flag
        assert 0.9 < (b.norm() / a.norm()).item() < 1.1, flag
        assert losses(out) == pytest.approx(losses(tmp_path / "fp32"), rel=0.02), flag
    assert "lg_loss_scale" in (tmp_path / "use_fp16" / "progress.csv").read_text().splitlines()[0]


def test_fp16_skips_a_step_with_overflowing_gradients():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))
    model.convert_to_fp16 = lambda: model.half()
    precision = Precision(model, "fp16", initial_lg_loss_scale=4.0)  # (2^20 would overflow these fp16 grads)
    opt = torch.optim.SGD(precision.master_params, lr=0.1)
    before = [p.detach().clone() for p in precision.master_params]
    x = torch.ones(1, 3, 2, 2, dtype=torch.float16)
    precision.backward(model(x).float().sum() * float("inf"))
    took, _ = precision.optimize(opt)
    assert not took and precision.lg_loss_scale == 3.0
    assert all(torch.equal(a, b) for a, b in zip(before, precision.master_params))
    precision.zero_grad()
    precision.backward(model(x).float().sum())
    took, grad_norm = precision.optimize(opt)
    assert took and precision.lg_loss_scale == pytest.approx(3.001)
    # the unscaled gradient of sum(w x + b) over 4 pixels: 4 per weight and bias entry
    assert grad_norm.item() == pytest.approx((12 * 16) ** 0.5, rel=1e-3)
    torch.testing.assert_close(model[0].bias.float(), precision.master_params[1].half().float())


def test_a_methods_trainables_are_unscaled_clipped_and_skipped_with_the_model():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))
    model.convert_to_fp16 = lambda: model.half()
    gain = torch.nn.Parameter(torch.tensor(2.0))  # a float32 trainable beside the fp16 torso (sCM's w(t) head)
    precision = Precision(model, "fp16", initial_lg_loss_scale=4.0, extra_params=[gain])
    opt = torch.optim.SGD([{"params": precision.master_params}, {"params": precision.extra_params}], lr=0.1)
    x = torch.ones(1, 3, 2, 2, dtype=torch.float16)
    precision.backward(model(x).float().sum() * gain * float("inf"))
    assert precision.optimize(opt)[0] is False and gain.item() == 2.0  # an overflow anywhere skips the whole step
    precision.zero_grad()
    assert gain.grad is None
    out = model(x).float().sum()
    precision.backward(out * gain)
    expected = torch.cat([torch.full((12,), 4 * 2.0), torch.tensor([out.item()])])  # d/dw, d/db = 4 gain; d/dgain = out
    took, grad_norm = precision.optimize(opt, clip=1.0)  # clipped together: one norm over the model's and gain's
    assert took and grad_norm.item() == pytest.approx(expected.norm().item(), rel=1e-3)
    assert gain.item() == pytest.approx(2.0 - 0.1 * out.item() / expected.norm().item(), rel=1e-3)
    with pytest.raises(ValueError, match="float32"):
        Precision(torch.nn.Linear(1, 1), "fp32", extra_params=[torch.nn.Parameter(torch.ones(1, dtype=torch.float64))])


def test_float32_divergence_stops_naming_the_step(tmp_path):
    result = run([sys.executable, "scripts/cm_train.py", *shlex.split(TRAIN + " " + CT), "--lr", "1e12",
                  "--total_training_steps", "30", "--log_interval", "1", "--save_interval", "30", "--log_dir", str(tmp_path)])
    assert result.returncode == 1
    assert "inf/NaN at step" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("model*.pt"))


def run_in_process(script, argv, monkeypatch, capsys):
    """What `python scripts/SCRIPT.py ARGV` runs (run_cli(main)), in this process: (exit status, stderr)."""
    monkeypatch.delenv("CM_TRACEBACK", raising=False)
    module = load_script(script)
    with pytest.raises(SystemExit) as exit_info:
        module.run_cli(lambda: module.main(argv))
    return SimpleNamespace(returncode=exit_info.value.code, stderr=capsys.readouterr().err)


def test_clear_errors(tmp_path, edm_teacher, monkeypatch, capsys):
    cases = [
        ("--training_mode consistency_distillation", "--teacher_model_path"),
        ("--training_mode consistency_distillation --teacher_model_path " + str(tmp_path / "none.pt"), "not found"),
        (CT + " --data_dir " + str(tmp_path / "missing"), "missing"),
    ]
    for extra, message in cases:
        result = run_in_process("cm_train", [*shlex.split(TRAIN + " " + extra), "--log_dir", str(tmp_path / "x")], monkeypatch, capsys)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    wrong = run_in_process("cm_train", [*shlex.split(TRAIN.replace("--num_channels 32", "--num_channels 64")),
                           "--training_mode", "consistency_distillation", "--teacher_model_path",
                           str(edm_teacher / "model000030.pt"), "--log_dir", str(tmp_path / "y")], monkeypatch, capsys)
    assert wrong.returncode == 1 and "does not fit" in wrong.stderr and "shape" in wrong.stderr


PUBLISHED_TRAINING_LINES = [
    ("edm_train", "--attention_resolutions 32,16,8 --class_cond True --use_scale_shift_norm True --dropout 0.1 "
     "--ema_rate 0.999,0.9999,0.9999432189950708 --global_batch_size 4096 --image_size 64 --lr 0.0001 --num_channels 192 "
     "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True --schedule_sampler lognormal --use_fp16 True "
     "--weight_decay 0.0 --weight_schedule karras --data_dir /path/to/imagenet"),
    ("cm_train", "--training_mode consistency_distillation --target_ema_mode fixed --start_ema 0.95 --scale_mode fixed "
     "--start_scales 40 --total_training_steps 600000 --loss_norm lpips --lr_anneal_steps 0 --teacher_model_path "
     "/path/to/edm_imagenet64_ema.pt --attention_resolutions 32,16,8 --class_cond True --use_scale_shift_norm True "
     "--dropout 0.0 --teacher_dropout 0.1 --ema_rate 0.999,0.9999,0.9999432189950708 --global_batch_size 2048 "
     "--image_size 64 --lr 0.000008 --num_channels 192 --num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
     "--schedule_sampler uniform --use_fp16 True --weight_decay 0.0 --weight_schedule uniform --data_dir /path/to/data"),
    ("cm_train", "--training_mode consistency_training --sigma_max 80 --sigma_min 0.002 --target_ema_mode adaptive "
     "--start_ema 0.95 --scale_mode progressive --start_scales 2 --end_scales 150 --total_training_steps 1000000 "
     "--loss_norm lpips --lr_anneal_steps 0 --teacher_model_path /path/to/edm_bedroom256_ema.pt --attention_resolutions "
     "32,16,8 --class_cond False --use_scale_shift_norm False --dropout 0.0 --teacher_dropout 0.1 --ema_rate "
     "0.9999,0.99994,0.9999432189950708 --global_batch_size 256 --image_size 256 --lr 0.00005 --num_channels 256 "
     "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --schedule_sampler uniform --use_fp16 True "
     "--weight_decay 0.0 --weight_schedule uniform --data_dir /path/to/bedroom256"),
]


LINE_IDS = ["edm_imagenet64", "cd_lpips_imagenet64", "ct_bedroom256"]


@pytest.mark.parametrize("script,line", PUBLISHED_TRAINING_LINES, ids=LINE_IDS)
def test_published_training_lines_parse(script, line):
    args = load_script(script).create_argparser().parse_args(shlex.split(line))
    assert args.use_fp16 is True and args.data_dir.startswith("/path/to")


@pytest.fixture(scope="module")
def random_vgg(tmp_path_factory):
    """A VGG-16 checkpoint in torchvision's layout with random weights (the real one cannot be fetched offline)."""
    import torchvision

    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    features = torchvision.models.vgg16(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    return path


SHRUNK = ("--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 8 "
          "--num_head_channels 16 --num_classes 10 --global_batch_size 4 --data_dir digits --total_training_steps 2 "
          "--save_interval 2 --progress False")


@pytest.mark.parametrize("script,line", PUBLISHED_TRAINING_LINES[:2], ids=LINE_IDS[:2])
def test_published_imagenet_lines_train_when_shrunk(script, line, edm_teacher, random_vgg, tmp_path):
    # the published line, then the sizes shrunk (a later flag wins), fp16 and LPIPS included
    extra = f" --teacher_model_path {edm_teacher / 'model000030.pt'} --lpips_vgg_path {random_vgg}"
    train(script, line + " " + SHRUNK + (extra if script == "cm_train" else ""), tmp_path)
    saved = state(tmp_path, 2, names=("model",))["model"]
    assert all(torch.isfinite(v).all() for v in saved.values())
