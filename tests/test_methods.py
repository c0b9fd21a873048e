"""The training-method registry, and a method defined outside the library training through the loop."""

import json
import math
import shlex

import numpy as np
import pytest
import torch

from cm import methods
from cm.checkpoints import Saved, checkpoint_config
from cm.methods import MethodContext, TrainingMethod
from cm.nn import mean_flat
from cm.parameterizations import DENOISER, TRIGFLOW

from test_scripts import load_script
from test_training import TRAIN

PUBLISHED_CM_MODES = ["consistency_distillation", "consistency_training", "progdist"]


def test_every_published_mode_has_its_method():
    for name in PUBLISHED_CM_MODES + ["edm", "improved_consistency_training", "easy_consistency_tuning"]:
        assert methods.method_class(name).name == name
    with pytest.raises(ValueError, match="unknown --training_mode bogus; choose one of edm, consistency_distillation"):
        methods.method_class("bogus")


def test_scalings_follow_the_published_rule():
    # the published sampling scripts: consistency scalings for every mode named "...consistency..." (sCM's TrigFlow aside)
    for name in [n for n in methods.METHODS if methods.parameterization(n) is not TRIGFLOW]:
        assert methods.parameterization(name).boundary_condition == ("consistency" in name), name
    assert {n for n in methods.METHODS if methods.parameterization(n) is TRIGFLOW} == {
        "continuous_consistency_training", "continuous_consistency_distillation",
        "truncated_continuous_consistency_training", "truncated_continuous_consistency_distillation"}  # (TCM's stage 2)
    # in training, ECT keeps EDM's scalings (it starts from an EDM model) and so does progdist
    trained = {name for name, cls in methods.METHODS.items() if cls.boundary_condition}
    assert trained == {"consistency_distillation", "consistency_training", "improved_consistency_training",
                       "truncated_consistency_distillation", "truncated_consistency_training",
                       "truncated_improved_consistency_training"}  # (TCM's stage 2 trains as the method it wraps)


class ShiftedDenoising(TrainingMethod):
    """A toy: EDM's denoising loss at one noise level that moves each step, weighted by a learned e^-w + w (a
    trainable of its own, as sCM's adaptive weight), with a state, a log key and a checkpoint file of its own."""

    name = "toy_shifted_denoising"
    boundary_condition = False
    parameterization = DENOISER
    flags = dict(toy_sigma0=(0.5, "the toy's first noise level"))  # its own flag, declared once, here
    flag_defaults = dict(loss_norm="l2")

    def __init__(self, args, diffusion):
        super().__init__(args, diffusion)
        self.sigma = args.toy_sigma0
        self.calls = 0
        self.log_weight = None

    def build_networks(self, model, build_teacher=None):
        super().build_networks(model, build_teacher)
        self.log_weight = torch.nn.Linear(1, 1).to(next(model.parameters()).device)

    def trainables(self):
        return {"toy_weight": self.log_weight}

    def draw(self, rand, batch, step):
        return {"noise": rand.randn(*batch.shape[1:])}

    def losses(self, model, micro, cond, rows, step):
        sigmas = torch.full((micro.shape[0],), self.sigma, device=micro.device)
        _, denoised = self.diffusion.denoise(model, micro + rows["noise"] * self.sigma, sigmas, **cond)
        mse = mean_flat((denoised - micro) ** 2)
        w = self.log_weight(torch.ones(micro.shape[0], 1, device=micro.device))[:, 0]
        return {"loss": torch.exp(-w) * mse + w}

    def setup(self, ctx, resumed):
        assert type(ctx) is MethodContext  # the method is handed the run's context, never the loop

    def after_step(self, ctx):
        assert type(ctx) is MethodContext and ctx.precision == "fp32" and ctx.world_size == 1
        self.calls += 1
        self.sigma *= 1.1

    def log_values(self, step):
        return {"toy_sigma": self.sigma}

    def saved(self, ctx):
        assert type(ctx) is MethodContext
        return {"toy": Saved(state=lambda: {"sigma": torch.tensor(self.sigma), "weight": self.log_weight.state_dict()},
                             load=lambda path: self.log_weight.load_state_dict(torch.load(path, weights_only=True)["weight"]))}

    def state(self):
        return {"toy_sigma": self.sigma}

    def load_state(self, state):
        self.sigma = state["toy_sigma"]


@pytest.fixture
def toy_registered():
    methods.register(ShiftedDenoising)
    yield
    del methods.METHODS[ShiftedDenoising.name]


def test_a_method_registered_from_outside_trains_through_the_unchanged_loop(toy_registered, tmp_path):
    main = load_script("cm_train").main
    usage = load_script("cm_train").create_argparser().format_help()  # its flag, with its help, under its mode
    group = usage[usage.index("--training_mode toy_shifted_denoising:"):].split("\n\n")[0]
    assert "--toy_sigma0" in group and "the toy's first noise level" in group, usage
    flags = TRAIN + " --training_mode toy_shifted_denoising --log_interval 1 --save_interval 2"
    main(shlex.split(flags + f" --total_training_steps 2 --log_dir {tmp_path}"))
    assert torch.load(tmp_path / "toy000002.pt", weights_only=True)["sigma"].item() == pytest.approx(0.5 * 1.1**2)
    assert not (tmp_path / "target_model000002.pt").exists()  # the loop makes no network the method does not ask for
    main(shlex.split(flags + f" --total_training_steps 3 --log_dir {tmp_path}"))  # resumes, state included
    state = torch.load(tmp_path / "train_state000003.pt", weights_only=True)
    assert state["toy_sigma"] == pytest.approx(0.5 * 1.1**3) and state["step"] == 3
    # its trainable learns in the loop's optimizer (a second group, at the model's learning rate) and resumes exactly
    groups = torch.load(tmp_path / "opt000003.pt", weights_only=True)["param_groups"]
    assert len(groups) == 2 and groups[1]["lr"] == groups[0]["lr"] and len(groups[1]["params"]) == 2
    main(shlex.split(flags + f" --total_training_steps 3 --log_dir {tmp_path / 'straight'}"))
    for name in ("model000003.pt", "toy000003.pt"):
        resumed, straight = (torch.load(d / name, weights_only=True) for d in (tmp_path, tmp_path / "straight"))
        torch.testing.assert_close(resumed, straight, rtol=0, atol=0, msg=name)
    assert torch.load(tmp_path / "toy000003.pt", weights_only=True)["weight"]["bias"].abs().item() > 0
    header, *rows = (tmp_path / "progress.csv").read_text().splitlines()
    column = header.split(",").index("toy_sigma")
    assert float(rows[-1].split(",")[column]) == pytest.approx(0.5 * 1.1**3)
    assert json.loads((tmp_path / "config.json").read_text())["loss_norm"] == "l2"  # its flag default
    first, last = (torch.load(tmp_path / f"model00000{k}.pt", weights_only=True) for k in (2, 3))
    assert any(not torch.equal(first[k], last[k]) for k in first)


def test_the_method_example_of_the_docs_trains_and_samples(tmp_path):
    from test_networks import docs_example

    example = docs_example("# cm/methods/my_method.py", package="cm.methods")  # the file docs/library.md shows
    methods.register(example.MyMethod)  # its registry line
    try:
        train = TRAIN + " --training_mode my_method --my_p_std 0.8 --total_training_steps 2 --save_interval 2"
        load_script("cm_train").main(shlex.split(train + f" --log_dir {tmp_path / 'run'}"))
        assert checkpoint_config(torch.load(tmp_path / "run" / "model000002.pt", weights_only=True))["my_p_std"] == 0.8
        sample = (f"--model_path {tmp_path / 'run' / 'model000002.pt'} --steps 2 --num_samples 2 --batch_size 2 "
                  f"--precision fp32 --log_dir {tmp_path / 'samples'}")
        load_script("image_sample").main(shlex.split(sample))  # as the denoiser it declares: heun, by itself
        assert np.load(tmp_path / "samples" / "samples_2x16x16x3.npz")["arr_0"].shape == (2, 16, 16, 3)
        with pytest.raises(ValueError, match="--sampler heun"):  # the checkpoint says what it is
            load_script("image_sample").main(shlex.split(sample + " --sampler onestep"))
    finally:
        del methods.METHODS[example.MyMethod.name]


def test_edm_trains_through_cm_train_and_refuses_a_teacher(tmp_path):
    main = load_script("cm_train").main
    flags = TRAIN + " --training_mode edm --schedule_sampler lognormal --weight_schedule karras --total_training_steps 2"
    with pytest.raises(ValueError, match="takes no --teacher_model_path"):
        main(shlex.split(flags + f" --teacher_model_path {tmp_path / 'x.pt'} --log_dir {tmp_path / 'a'}"))
    main(shlex.split(flags + f" --save_interval 2 --log_dir {tmp_path / 'b'}"))
    assert (tmp_path / "b" / "model000002.pt").exists() and not (tmp_path / "b" / "target_model000002.pt").exists()


def one_step_of(method, model, ctx, batch, cond, step):
    """What the loop does with a method in one step, written out: its draw, loss and backward; an SGD step of the
    model and the method's trainables; the method's averages; after_step. Returns the mean loss before the step."""
    from cm.ema import update_emas
    from cm.train_util import StepRandom

    rows = method.draw(StepRandom(0, step, 0, 1, batch.shape[0], batch.device), batch, step)
    torch.manual_seed(step)  # the dropout masks (a resumed loop restores the global random state)
    loss = method.losses(model, batch, cond, rows, step)["loss"].mean()
    trained = list(model.parameters()) + [p for m in method.trainables().values() for p in m.parameters()]
    for p in trained:
        p.grad = None
    loss.backward()
    with torch.no_grad():
        for p in trained:
            if p.grad is not None:
                p -= 1e-2 * p.grad
    update_emas(list(method.averages(step)), list(model.parameters()))
    method.after_step(ctx)
    return loss.item()


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_method_saves_what_it_needs_to_resume(name, tmp_path):
    """The contract of a method, in process, without the loop: draw, loss, backward, a step; its declared files
    saved; a fresh method restored from them (as the loop resumes) gives the same loss at the next step."""
    from cm.checkpoints import CheckpointIO
    from cm.config import parse_args_with_config
    from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    from conftest import randomize

    cls = methods.method_class(name)
    argv = shlex.split(TRAIN + f" --training_mode {name} --loss_norm l2 --start_ema 0.5 --start_scales 4 --end_scales 4 "
                       "--tangent_warmup_steps 2 --distill_steps_per_iter 100 --huber_c 0.01 --tcm_boundary_share 0.5"
                       + (" --teacher_model_path built_below" if cls.needs_teacher else "")
                       + (f" --tcm_stage1 {tmp_path / 'stage1.pt'}" if name.startswith("truncated_") else ""))
    args = parse_args_with_config(load_script("cm_train").create_argparser(), argv, "cm_train.py",
                                  mode_defaults=methods.mode_flag_defaults())
    kwargs = {k: getattr(args, k) for k in model_and_diffusion_defaults()}

    def build(seed, distillation=cls.boundary_condition):
        torch.manual_seed(seed)
        model, diffusion = create_model_and_diffusion(**kwargs, distillation=distillation, loss_norm="l2")
        return randomize(model, seed=seed).train(), diffusion

    def started(model, diffusion):
        method = cls(args, diffusion)
        method.build_networks(model, (lambda: build(7, distillation=False)) if cls.needs_teacher else None)
        return method

    def context(model, step):
        params = list(model.parameters())
        return methods.MethodContext(step=step, device=torch.device("cpu"), world_size=1, precision="fp32", fast_paths={},
                                     config={}, model=model, master_params=params,
                                     state_dict_of=lambda ps, m=None: {k: v.clone() for k, v in (m or model).state_dict().items()},
                                     restart_optimization=lambda: None)

    gen = torch.Generator().manual_seed(0)
    batch, cond = torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1, {"y": torch.tensor([0, 3, 5, 9])}
    torch.save(build(9)[0].state_dict(), tmp_path / "stage1.pt")  # (TCM's stage 2 starts from it)
    model, diffusion = build(1)
    method = started(model, diffusion)
    method.setup(context(model, 0), False)
    first = one_step_of(method, model, context(model, 0), batch, cond, 0)
    assert math.isfinite(first)
    saved = method.saved(context(model, 1))
    for file_name, file in saved.items():
        torch.save(file.state(), tmp_path / f"{file_name}000001.pt")
    torch.save(model.state_dict(), tmp_path / "model000001.pt")
    expected = one_step_of(method, model, context(model, 1), batch, cond, 1)

    # as the loop resumes: networks built (other weights everywhere), the model file read, the method's files restored
    fresh_model, fresh_diffusion = build(2)
    fresh = started(fresh_model, fresh_diffusion)
    fresh_model.load_state_dict(torch.load(tmp_path / "model000001.pt", weights_only=True))
    CheckpointIO(str(tmp_path)).restore(str(tmp_path / "model000001.pt"), 1, fresh.saved(context(fresh_model, 1)))
    fresh.setup(context(fresh_model, 1), True)
    assert one_step_of(fresh, fresh_model, context(fresh_model, 1), batch, cond, 1) == expected


@pytest.mark.parametrize("name", ["consistency_training", "improved_consistency_training", "easy_consistency_tuning",
                                  "continuous_consistency_training"])
def test_level_rows_give_the_rows_a_draw_makes_at_its_online_level(name):
    """draw_noise and level_rows, the hooks a wrapper redraws the noise levels with: the rows a method's own draw makes
    are the rows of the online noise level they evaluate (CT's grid index back from its sigma, exactly)."""
    from cm.config import parse_args_with_config
    from cm.schedule import index_to_sigma, lognormal_sigmas
    from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults
    from cm.train_util import StepRandom

    argv = shlex.split(TRAIN + f" --training_mode {name} --start_scales 9 --end_scales 40 --total_training_steps 600"
                       + (" --teacher_model_path x" if methods.method_class(name).needs_teacher else ""))
    args = parse_args_with_config(load_script("cm_train").create_argparser(), argv, "cm_train.py",
                                  mode_defaults=methods.mode_flag_defaults())
    _, diffusion = create_model_and_diffusion(**{k: getattr(args, k) for k in model_and_diffusion_defaults()})
    method = methods.method_class(name)(args, diffusion)
    batch = torch.zeros(64, 3, 8, 8)
    for step in (0, 250, 599):
        rows = method.draw(StepRandom(3, step, 0, 1, 64, batch.device), batch, step)
        rand = StepRandom(3, step, 0, 1, 64, batch.device)
        assert torch.equal(method.draw_noise(rand, batch), rows["noise"])
        if "indices" in rows:
            num_scales = method.ema_scale_fn(step)[1]
            d = diffusion
            sigma = index_to_sigma(rows["indices"].double(), num_scales, d.sigma_min, d.sigma_max, d.rho)
            assert rows["indices"].unique().numel() > 1
        else:
            sigma = lognormal_sigmas(rand.randn(), args.p_mean, args.p_std)
        again = method.level_rows(sigma, step)
        assert again.keys() == rows.keys() - {"noise"}
        for key, value in again.items():
            assert torch.equal(value, rows[key]), key
