"""Performance benchmark: training and sampling throughput, FLOPs, FLOP/s against the matmul ceiling.

In one run on one machine it measures (medians over repeats, after warm-up), prints a table and writes JSON:
- the matrix-multiply ceiling of each dtype (square matmuls; on GPUs fp32 also with TF32, which convolutions use);
- the forward FLOPs per image (torch.utils.flop_counter, fused attention included) of each configuration;
- CT and CD training steps (images/s, counted FLOPs per step, achieved FLOP/s and its fraction of the
  ceiling of the step's dtype, peak memory) at the demo and the ImageNet-64 configuration, float32 and
  bf16 (and fp16 on GPUs), with and without the fast-path switches (channels_last, torch.compile);
- one-step and two-step sampling at the ImageNet-64 configuration, here and through diffusers'
  ConsistencyModelPipeline running the same U-Net at the same batch (when diffusers is installed);
- the fast paths that have no switch, each against what it replaces: fused against unfused (math)
  attention, one fused EMA update against one per average, inference mode against no_grad for the
  target network, and the data loader's images/s (to compare with a training step's);
- on GPUs, whether a training step runs without host-device synchronisation;
- the performance targets (fast paths against the default path, sampling against training) as ratios
  of rows measured side by side in this run.

  python scripts/benchmark.py                      # CPU, full (about 6-7 minutes on 2 quiet cores)
  python scripts/benchmark.py --quick              # smoke test at tiny size (CI, under a minute)
  python scripts/benchmark.py --device cuda        # one GPU (scripts/benchmark_gpu.sh: an H100 in < 8 minutes)
  python scripts/benchmark.py --only 'sample/'     # the rows whose name contains the text

On the CPU each row runs in a forked process, so its peak memory (resident set above the benchmark's own
baseline) is its own; on GPUs rows run in this process and peak memory is torch.cuda.max_memory_allocated.
LPIPS uses VGG-16 with random weights (the same cost as the real ones, no download).
"""

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import tempfile
import time
import traceback

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


from cm import dist_util
from cm.atomic import atomic_write_text
from cm.config import load_preset
from cm.ema import EMASet, update_ema, update_emas
from cm.fast_paths import apply_fast_paths
from cm.image_datasets import load_data
from cm.precision import detect_hardware
from cm.random_util import get_generator
from cm.samplers import karras_sample
from cm.methods import method_class
from cm.script_util import cm_train_defaults, create_model_and_diffusion, model_and_diffusion_defaults
from cm.train_util import LoopSettings, Precision, TrainLoop

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TINY_FLAGS = dict(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
    num_head_channels=16, class_cond=True, num_classes=10, resblock_updown=True, use_scale_shift_norm=True,
    weight_schedule="uniform",
)
# published CD schedule (cd_*_imagenet64): N = 40, target EMA 0.95; CT's comes from the config's preset
CD_SCHEDULE = dict(target_ema_mode="fixed", start_ema=0.95, scale_mode="fixed", start_scales=40, end_scales=40)
TWO_STEP = dict(ts=(0, 106, 200), steps=201)  # the published ImageNet-64 CT two-step sampling
# benchmark mode -> training method; sCT's, sCD's and MeanFlow's step is one JVP (forward mode, or finite differences)
# plus CT's forward and backward pass (sCD's also a teacher evaluation), its cost against a CT step is the JVP's
TRAINING_MODES = {"ct": "consistency_training", "cd": "consistency_distillation",
                  "sct": "continuous_consistency_training", "sct_fd": "continuous_consistency_training",
                  "scd": "continuous_consistency_distillation", "meanflow": "meanflow"}
TEACHER_MODES = ("cd", "scd")  # given a teacher of the student's architecture
TWO_TIME_MODES = ("meanflow",)  # its network conditioned on (t, t - r): --time_inputs 2


# ---- configurations ---------------------------------------------------------------------------------------


def config_flags(name, network="adm"):
    """(model flags, training flags) of a benchmark configuration: a preset's, or the tests' tiny U-Net; the network
    `network` (cm.networks) built from those of the flags that are its own."""
    model = dict(model_and_diffusion_defaults(), network=network)
    if name == "tiny":
        model.update(TINY_FLAGS)
        return model, dict(loss_norm="l2", ema_rate="0.9,0.99", target_ema_mode="fixed", start_ema=0.9,
                           scale_mode="fixed", start_scales=10, end_scales=10, total_training_steps=1000)
    flags = load_preset({"demo": "demo_ct", "imagenet64": "ct_imagenet64"}[name])["flags"]
    model.update({k: v for k, v in flags.items() if k in model})
    model.update(use_fp16=False, use_bf16=False)  # the precision is the benchmark's choice
    train = {k: flags[k] for k in ("loss_norm", "ema_rate", "target_ema_mode", "start_ema", "scale_mode",
                                   "start_scales", "end_scales", "total_training_steps")}
    return model, train


def build_model(model_flags, device, distillation=True, loss_norm="l2"):
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**model_flags, distillation=distillation, loss_norm=loss_norm)
    if loss_norm == "lpips":
        from cm.lpips import LPIPS

        diffusion.lpips_loss = LPIPS(pretrained=False)  # random VGG-16 weights: the same cost, no download
    return model.to(device), diffusion


def labels(model_flags, batch, device):
    if not model_flags["class_cond"]:
        return {}
    return {"y": torch.randint(0, model_flags["num_classes"], (batch,), device=device)}


# ---- measuring --------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup, repeats, inner=1):
    """Seconds per call of fn(): `repeats` timings of `inner` calls each, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / inner)
    return times


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    # model FLOPs: the gradients of attention's two matrix products, twice its forward, as the unfused
    # path counts them; flop_counter's own formula adds the fused kernels' recomputation of the scores
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


aten = torch.ops.aten
# flop_counter does not know the CPU flash kernel SDPA runs here
ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
    aten._scaled_dot_product_flash_attention_backward: _attention_backward_flops,
    aten._scaled_dot_product_efficient_attention_backward: _attention_backward_flops,
    aten._scaled_dot_product_cudnn_attention_backward: _attention_backward_flops,
}


def count_flops(fn):
    """Model FLOPs of the matrix multiplications, convolutions and attention that fn() runs (forward
    and, if it runs one, backward; no recomputation), as torch.utils.flop_counter counts them
    (2 per multiply-add)."""
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def forward_flops_per_image(model, model_flags, device, batch=1):
    """FLOPs of one forward pass of `model` per image of its configuration."""
    size = model_flags["image_size"]
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.inference_mode():
        return count_flops(lambda: model(x, torch.ones(batch, device=device), **labels(model_flags, batch, device))) / batch


def eager(compiled):
    """Inside, compiled modules run eagerly (for the FLOP counter)."""
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()


# ---- the rows ---------------------------------------------------------------------------------------------


def row_ceiling(ctx, dtype, tf32=False):
    n = ctx.matmul_n
    a = torch.randn(n, n, device=ctx.device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=ctx.device, dtype=DTYPES[dtype])
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        times = timed(lambda: torch.mm(a, b), ctx.device, 2, ctx.repeats(5), inner=ctx.inner)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    # a ceiling: the best of the repeats (the others lost time to something else)
    return dict(dtype="tf32" if tf32 else dtype, n=n, flops_per_s=2 * n**3 / min(times), times=times)


def row_forward_flops(ctx, config):
    model_flags, _ = config_flags(config, ctx.network)
    model, _ = build_model(model_flags, ctx.device)
    return dict(config=config, flops_per_image=forward_flops_per_image(model.eval(), model_flags, ctx.device),
                parameters=sum(p.numel() for p in model.parameters()))


def row_train(ctx, config, mode, precision, batch, channels_last=False, compile=False):
    model_flags, train = config_flags(config, ctx.network)
    if mode == "cd":
        train = dict(train, **CD_SCHEDULE)
    if mode in TWO_TIME_MODES:
        model_flags = dict(model_flags, time_inputs=2)
    model, diffusion = build_model(model_flags, ctx.device, loss_norm=train["loss_norm"])
    flags = argparse.Namespace(**dict(
        cm_train_defaults(), **{k: v for k, v in train.items() if k in cm_train_defaults()}, teacher_model_path="given",
        teacher_solver="heun", use_fp16=precision == "fp16", use_checkpoint=False, lr=1e-4,
        training_mode=TRAINING_MODES[mode], time_input="edm" if mode == "scd" else "identity",
        jvp="finite_diff" if mode == "sct_fd" else "forward", time_inputs=model_flags.get("time_inputs", 1),
    ))
    method = method_class(flags.training_mode)(flags, diffusion)
    # the teacher of CD: a network of the same architecture (as scripts/cm_train.py builds it)
    method.build_networks(model, (lambda: build_model(model_flags, ctx.device, distillation=False))
                          if mode in TEACHER_MODES else None)
    if compile:
        torch._dynamo.reset()
    loop = TrainLoop(method=method, model=model.train(), data=None, settings=LoopSettings(
        batch_size=batch, lr=1e-4, ema_rate=train["ema_rate"], total_training_steps=train["total_training_steps"],
        log_interval=10**9, save_interval=0, precision=precision, progress=False, channels_last=channels_last,
        compile=compile))
    size = model_flags["image_size"]
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(ctx.device)
    cond = labels(model_flags, batch, ctx.device)
    with eager(compile):
        flops = count_flops(lambda: loop.run_step(x, cond))  # also the first warm-up step
    for state in loop.opt.state.values():
        state["step"].fill_(100.0)  # RAdam's rectified update from here on (its first 5 steps are cheaper)
    first = None
    if compile:  # the step that compiles
        first = time.perf_counter()
        loop.run_step(x, cond)
        sync(ctx.device)
        first = time.perf_counter() - first
    # on CPUs the counted step was warm-up enough (and an ImageNet-64 step costs seconds)
    warmup = ctx.warmup(1) if ctx.device.type == "cuda" or compile else 0
    times = timed(lambda: loop.run_step(x, cond), ctx.device, warmup, ctx.repeats(3), inner=ctx.inner)
    step = statistics.median(times)
    row = dict(config=config, mode=mode, precision=precision, batch=batch, images_per_s=batch / step, step_s=step,
               times=times, flops_per_step=flops, flops_per_s=flops / step, first_call_s=first,
               flops_dtype=ctx.flops_dtype(precision))
    if ctx.device.type == "cuda":
        row["host_sync_free"] = sync_free(lambda: loop.run_step(x, cond), ctx.device)
    return row


def sync_free(fn, device):
    """True when fn() runs without a host-device synchronisation (CUDA's sync debug mode), else the error."""
    sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError as err:
        return str(err).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)
        sync(device)


def row_sample(ctx, config, impl, steps_name, precision, batch, channels_last=False, compile=False, sdpa="fused"):
    model_flags, _ = config_flags(config, ctx.network)
    model, diffusion = build_model(model_flags, ctx.device)
    model.eval()
    size = model_flags["image_size"]
    y = labels(model_flags, batch, ctx.device)
    nfe = 1 if steps_name == "onestep" else len(TWO_STEP["ts"]) - 1
    if impl == "cm":
        if precision != "fp32":
            {"fp16": model.convert_to_fp16, "bf16": model.convert_to_bf16}[precision]()  # as image_sample.py
        if compile:
            torch._dynamo.reset()
        apply_fast_paths([model], channels_last=channels_last, compile=compile)
        kw = dict(sampler="onestep", steps=40) if steps_name == "onestep" else dict(sampler="multistep", **TWO_STEP)

        def fn():
            return karras_sample(diffusion, model, (batch, 3, size, size), model_kwargs=y, device=ctx.device,
                                 generator=get_generator("dummy"), **kw)
    else:
        from cm.diffusers_convert import diffusers_timesteps, pipeline_from_model

        pipe = pipeline_from_model(model, model_flags, TWO_STEP["steps"] if steps_name == "twostep" else 40)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(ctx.device, DTYPES[precision])
        if channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        if compile:
            torch._dynamo.reset()
            pipe.unet.compile()
        kw = dict(num_inference_steps=1) if steps_name == "onestep" else dict(
            timesteps=diffusers_timesteps(TWO_STEP["ts"], TWO_STEP["steps"]))
        gen = torch.Generator(ctx.device).manual_seed(0)

        def fn():
            return pipe(batch_size=batch, class_labels=y.get("y"), generator=gen, output_type="pt", **kw).images

    context = sdpa_kernel(SDPBackend.MATH) if sdpa == "math" else contextlib.nullcontext()
    with context:
        first = time.perf_counter()
        fn()
        sync(ctx.device)
        first = time.perf_counter() - first
        times = timed(fn, ctx.device, ctx.warmup(0), ctx.repeats(5 if nfe == 1 else 3), inner=1)
    per_batch = statistics.median(times)
    flops = ctx.forward_flops(config) * nfe * batch
    return dict(config=config, impl=impl, sampler=steps_name, nfe=nfe, precision=precision, batch=batch,
                images_per_s=batch / per_batch, batch_s=per_batch, times=times, first_call_s=first,
                flops_per_batch=flops, flops_per_s=flops / per_batch, flops_dtype=ctx.flops_dtype(precision))


def row_param_update(ctx, config):
    """The batch-independent part of a float32/bf16 training step: the gradient norm, the RAdam step
    (rectified) and the fused update of the EMAs and the target, over all the model's parameters."""
    model_flags, train = config_flags(config, ctx.network)
    model, _ = build_model(model_flags, ctx.device)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(ctx.device)
    precision = Precision(model, "fp32")
    opt = torch.optim.RAdam(precision.master_params, lr=1e-4)
    emas = EMASet([float(r) for r in str(train["ema_rate"]).split(",")], precision.master_params)
    target = [p.detach().clone() for p in precision.master_params]

    def fn():
        precision.grad_norm()
        opt.step()
        emas.update(precision.master_params, also=[(target, train["start_ema"])])

    fn()
    for state in opt.state.values():
        state["step"].fill_(100.0)
    times = timed(fn, ctx.device, 0, ctx.repeats(3), inner=ctx.inner)
    return dict(config=config, parameters=sum(p.numel() for p in model.parameters()), update_s=statistics.median(times),
                times=times)


def row_ema(ctx, config, fused):
    """The EMA updates of one training step (the config's EMA rates and the target network) over the
    model's parameters: one fused update (cm.ema.update_emas) or one update per average (before #7)."""
    model_flags, train = config_flags(config, ctx.network)
    model, _ = build_model(model_flags, ctx.device)
    source = [p.detach() for p in model.parameters()]
    rates = [float(r) for r in str(train["ema_rate"]).split(",")] + [train["start_ema"]]
    averages = [([p.clone() for p in source], rate) for rate in rates]

    def fn():
        if fused:
            update_emas(averages, source)
        else:
            for params, rate in averages:
                update_ema(params, source, rate)

    times = timed(fn, ctx.device, ctx.warmup(2), ctx.repeats(10), inner=ctx.inner)
    return dict(config=config, averages=len(rates), tensors=len(source) * len(rates), update_s=statistics.median(times),
                times=times)


def row_target_forward(ctx, config, batch, grad_mode):
    """The target network's forward pass of a CT step (dropout state as in training) under no_grad or
    inference_mode (cm/losses.py uses inference_mode)."""
    model_flags, _ = config_flags(config, ctx.network)
    model, diffusion = build_model(model_flags, ctx.device)
    model.train().requires_grad_(False)
    size = model_flags["image_size"]
    x = torch.randn(batch, 3, size, size, device=ctx.device)
    sigmas = torch.full((batch,), 1.0, device=ctx.device)
    y = labels(model_flags, batch, ctx.device)
    context = torch.inference_mode if grad_mode == "inference_mode" else torch.no_grad

    def fn():
        with context():
            diffusion.denoise(model, x, sigmas, **y)

    times = timed(fn, ctx.device, ctx.warmup(2), ctx.repeats(10), inner=ctx.inner)
    return dict(config=config, grad_mode=grad_mode, batch=batch, images_per_s=batch / statistics.median(times),
                times=times)


def row_data(ctx, source, batch):
    """Images/s of the training data stream (cm.image_datasets.load_data) from memory: the embedded
    digits (16x16) or an ImageNet-64-sized .npz batch."""
    with tempfile.TemporaryDirectory() as tmp:
        if source == "digits":
            data_dir, size = "digits", 16
        else:
            size = 64
            data_dir = os.path.join(tmp, "images64.npz")
            rng = np.random.default_rng(0)
            np.savez(data_dir, rng.integers(0, 256, (1024, 64, 64, 3), dtype=np.uint8), rng.integers(0, 1000, 1024))
        data = load_data(data_dir=data_dir, batch_size=batch, image_size=size, class_cond=True, rank=0, world_size=1)
        times = timed(lambda: next(data), torch.device("cpu"), ctx.warmup(2), ctx.repeats(10), inner=ctx.inner)
    return dict(source=source, batch=batch, images_per_s=batch / statistics.median(times), times=times)


ROW_FUNCTIONS = dict(ceiling=row_ceiling, flops=row_forward_flops, train=row_train, sample=row_sample,
                     param_update=row_param_update, ema=row_ema, target_forward=row_target_forward, data=row_data)


# ---- the plan ---------------------------------------------------------------------------------------------


def plan(args, device):
    """[(name, kind, kwargs)] of the rows to measure, cheap and essential first."""
    cuda = device.type == "cuda"
    half = ["fp16", "bf16"] if cuda else ["bf16"]
    compile_rows = args.compile == "yes" or (args.compile == "auto" and cuda)
    rows = [(f"ceiling/{d}", "ceiling", dict(dtype=d)) for d in ["fp32"] + half]
    if cuda:
        rows.append(("ceiling/tf32", "ceiling", dict(dtype="fp32", tf32=True)))
    if args.quick:
        configs = [("tiny", 4)]
        sample_config, sample_batch = "tiny", 4
    else:
        configs = [("demo", 64), ("imagenet64", 64 if cuda else 2)]
        sample_config, sample_batch = "imagenet64", 256 if cuda else 4
    for config, _ in configs:
        rows.append((f"flops/{config}", "flops", dict(config=config)))
    cl = cuda  # on GPUs the rows run channels_last (cuDNN's fast half-precision layout) and ablate it once
    for config, batch in configs:
        for mode in ("ct", "cd"):
            for precision in ["fp32"] + half:
                rows.append((f"train/{config}/{mode}/{precision}{'+cl' if cl else ''}", "train",
                             dict(config=config, mode=mode, precision=precision, batch=batch, channels_last=cl)))
        rows.append((f"train/{config}/ct/bf16{'' if cl else '+cl'}", "train",
                     dict(config=config, mode="ct", precision="bf16", batch=batch, channels_last=not cl)))
        # the JVP methods (no fp16: the JVP runs in float32); at ImageNet-64 size on a CPU, and in --quick, one float32
        # row of each
        full = cuda or (config != "imagenet64" and not args.quick)
        scm_precisions = ["fp32"] + [p for p in half if p != "fp16"] if full else ["fp32"]
        for mode in ("sct", "sct_fd", "scd", "meanflow"):
            for precision in scm_precisions:
                rows.append((f"train/{config}/{mode}/{precision}{'+cl' if cl else ''}", "train",
                             dict(config=config, mode=mode, precision=precision, batch=batch, channels_last=cl)))
    fast = half[0] if cuda else "bf16"  # the sampling precision of the "fast" rows
    for steps in ("onestep", "twostep"):
        for impl in ("cm", "diffusers"):
            for precision, channels_last in (("fp32", False), (fast, True)):
                rows.append((f"sample/{sample_config}/{impl}/{steps}/{precision}{'+cl' if channels_last else ''}",
                             "sample", dict(config=sample_config, impl=impl, steps_name=steps, precision=precision,
                                            batch=sample_batch, channels_last=channels_last)))
    rows.append((f"sample/{sample_config}/cm/onestep/fp32+math_attention", "sample",
                 dict(config=sample_config, impl="cm", steps_name="onestep", precision="fp32", batch=sample_batch,
                      sdpa="math")))
    rows.append((f"sample/{sample_config}/cm/onestep/{fast}", "sample",
                 dict(config=sample_config, impl="cm", steps_name="onestep", precision=fast, batch=sample_batch)))
    small = configs[0][0]
    ema_config = "imagenet64" if cuda and not args.quick else small
    big_config = configs[-1][0]
    rows.append((f"param_update/{big_config}", "param_update", dict(config=big_config)))
    for fused in (False, True):
        rows.append((f"ema/{ema_config}/{'fused' if fused else 'per_average'}", "ema", dict(config=ema_config, fused=fused)))
    for grad_mode in ("no_grad", "inference_mode"):
        rows.append((f"target_forward/{small}/{grad_mode}", "target_forward",
                     dict(config=small, batch=configs[0][1] if not cuda else 64, grad_mode=grad_mode)))
    rows.append(("data/digits", "data", dict(source="digits", batch=64)))
    if not args.quick:
        rows.append(("data/npz64", "data", dict(source="npz64", batch=64)))
    if compile_rows:
        big, big_batch = configs[-1] if cuda else configs[0]  # compiling ImageNet-64 training on a CPU: too long
        for precision in half:
            rows.append((f"train/{big}/ct/{precision}{'+cl' if cl else ''}+compile", "train",
                         dict(config=big, mode="ct", precision=precision, batch=big_batch, channels_last=cl, compile=True)))
        rows.append((f"sample/{sample_config}/cm/onestep/{fast}+cl+compile", "sample",
                     dict(config=sample_config, impl="cm", steps_name="onestep", precision=fast, batch=sample_batch,
                          channels_last=True, compile=True)))
    if args.only:
        wanted = [w for w in args.only.split(",") if w]
        rows = [r for r in rows if r[1] in ("ceiling", "flops") or any(w in r[0] for w in wanted)]
    return rows


class Context:
    """What every row needs: the device, repeat counts (fewer in --quick), results so far."""

    def __init__(self, args, device):
        self.device = device
        self.quick = args.quick
        self.network = args.network
        self.matmul_n = 512 if args.quick else (8192 if device.type == "cuda" else 2048)
        self.inner = 5 if device.type == "cuda" else 1
        self.results = {}

    def repeats(self, n):
        return 2 if self.quick else n

    def warmup(self, n):
        return min(n, 1) if self.quick else n

    def forward_flops(self, config):
        return self.results[f"flops/{config}"]["flops_per_image"]

    def flops_dtype(self, precision):
        """The matmul ceiling to compare a row of this precision with (fp32 on GPUs: TF32, which cuDNN's
        float32 convolutions use by default)."""
        if precision == "fp32" and self.device.type == "cuda" and torch.backends.cudnn.allow_tf32:
            return "tf32"
        return precision


def run_row(ctx, kind, kwargs):
    """Run one row here; returns its record (with "error" when it failed)."""
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    try:
        record = ROW_FUNCTIONS[kind](ctx, **kwargs)
    except Exception as err:  # a row that fails is recorded, and the others still run
        record = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]}
        if os.environ.get("CM_TRACEBACK"):
            traceback.print_exc()
    if ctx.device.type == "cuda":
        record["peak_mem_mb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**20
    return record


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_row_forked(ctx, kind, kwargs, threads):
    """Run one row in a forked child (its own memory: its peak resident set above its size at the fork).
    The child inherits the imports; this process must not have run a parallel region (GNU OpenMP's
    thread pool does not survive a fork) nor touched CUDA before."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        status = 0
        try:
            baseline = _rss_mb()
            torch.set_num_threads(threads)
            payload = json.dumps(dict(run_row(ctx, kind, kwargs), rss_at_start_mb=baseline), default=float)
        except BaseException as err:
            payload, status = json.dumps({"error": f"{type(err).__name__}: {err}"[:500]}), 1
        with os.fdopen(write_end, "w") as f:
            f.write(payload)
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        payload = f.read()
    _, status, usage = os.wait4(pid, 0)
    if not payload:
        return {"error": f"the row's process died (wait status {status})"}
    record = json.loads(payload)
    record["peak_mem_mb"] = max(usage.ru_maxrss / 1024 - record.pop("rss_at_start_mb"), 0.0)  # ru_maxrss: KiB
    return record


# ---- targets and the table --------------------------------------------------------------------------------


def _find(rows, name):
    row = rows.get(name)
    return row if row and "error" not in row else None


def targets(rows):
    """The performance targets as measured ratios (each with the rows it compares), for the demo and
    ImageNet-64 configurations (not the --quick one)."""
    out = []

    def add(name, value, threshold, compared):
        out.append(dict(target=name, value=value, threshold=threshold, met=value >= threshold, rows=compared))

    samples = {n: r for n, r in rows.items() if n.startswith("sample/") and "error" not in r}
    for config in ("imagenet64",):
        ours = [n for n, r in samples.items() if f"/{config}/cm/onestep/" in n and "math" not in n]
        theirs = f"sample/{config}/diffusers/onestep/fp32"
        if ours and theirs in samples:
            best = max(ours, key=lambda n: samples[n]["images_per_s"])
            add(f"one-step sampling ({config}): ours (best) / diffusers pipeline (fp32) images/s",
                samples[best]["images_per_s"] / samples[theirs]["images_per_s"], 1.5, [best, theirs])
            for n in ours:
                twin = n.replace("/cm/", "/diffusers/")
                if twin in samples:
                    add(f"one-step sampling ({config}), same settings: ours / diffusers images/s",
                        samples[n]["images_per_s"] / samples[twin]["images_per_s"], 1.0, [n, twin])
        fp32 = _find(rows, f"sample/{config}/cm/onestep/fp32")
        if fp32 and _find(rows, "ceiling/fp32"):
            add(f"float32 forward ({config}): achieved FLOP/s / float32 matmul ceiling",
                fp32["flops_per_s"] / rows["ceiling/fp32"]["flops_per_s"], 0.6,
                [f"sample/{config}/cm/onestep/fp32", "ceiling/fp32"])
    trains = {n: r for n, r in rows.items()
              if n.startswith("train/") and "/tiny/" not in n and "error" not in r and "compile" not in n}
    for name, row in trains.items():
        if row["precision"] != "fp32":
            continue
        prefix = name.rsplit("/", 1)[0]
        bf16 = [n for n in trains if n.startswith(prefix + "/bf16")]
        if bf16:
            best = max(bf16, key=lambda n: trains[n]["images_per_s"])
            add(f"bf16 training / float32 training images/s ({prefix[len('train/'):]})",
                trains[best]["images_per_s"] / row["images_per_s"], 2.0, [best, name])
            config = prefix.split("/")[1]
            update = _find(rows, f"param_update/{config}")
            if update and update["update_s"] < trains[best]["step_s"]:
                # what bf16 can speed up: the step less its batch-independent float32 parameter update
                add(f"  the same, each step less the parameter update ({update['update_s']:.3g} s)",
                    (row["step_s"] - update["update_s"]) / (trains[best]["step_s"] - update["update_s"]), 2.0,
                    [best, name, f"param_update/{config}"])
    return out


def step_costs(rows):
    """Each training method's step time against CT's at the same configuration and precision: a JVP method's
    ratio is the cost of its JVP (forward mode or finite differences) over CT's one target evaluation."""
    out = []
    for name, row in rows.items():
        parts = name.split("/")
        if len(parts) != 4 or parts[0] != "train" or parts[2] == "ct" or "error" in row or "step_s" not in row:
            continue
        ct = rows.get(f"train/{parts[1]}/ct/{parts[3]}")
        if ct and "step_s" in ct:
            out.append(dict(rows=[name, f"train/{parts[1]}/ct/{parts[3]}"], ratio=row["step_s"] / ct["step_s"]))
    return out


def fmt(value, digits=3):
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def table(result):
    rows, lines = result["rows"], []
    ceilings = {r["dtype"]: r["flops_per_s"] for n, r in rows.items() if n.startswith("ceiling/") and "error" not in r}
    info = result["machine"]
    lines.append(f"device: {info['device']}   cpu: {info.get('cpu')} ({info.get('cpu_capability', '?')}, "
                 f"bf16 {info.get('cpu_bf16', '?')})   threads {info['threads']}   torch {info['torch']}")
    lines.append("matmul ceilings: " + ", ".join(f"{d} {v / 1e12:.3g} TFLOP/s" for d, v in ceilings.items()))
    for name, row in rows.items():
        if name.startswith("flops/") and "error" not in row:
            lines.append(f"{name[6:]}: {row['parameters'] / 1e6:.1f} M parameters, "
                         f"{row['flops_per_image'] / 1e9:.3g} GFLOP per image forward")
    header = f"{'row':<52} {'img/s':>9} {'s/call':>8} {'1st s':>7} {'TFLOP/s':>8} {'of ceil':>7} {'peak MB':>8}"
    lines += ["", header, "-" * len(header)]
    for name, row in rows.items():
        if name.startswith(("ceiling/", "flops/")):
            continue
        if "error" in row:
            lines.append(f"{name:<52} error: {row['error']}")
            continue
        seconds = row.get("step_s", row.get("batch_s", row.get("update_s")))
        if seconds is None and "times" in row:
            seconds = statistics.median(row["times"])
        flops = row.get("flops_per_s")
        ceiling = ceilings.get(row.get("flops_dtype"))
        share = f"{100 * flops / ceiling:.0f}%" if flops and ceiling else "-"
        extra = f"   host sync free: {row['host_sync_free']}" if "host_sync_free" in row else ""
        lines.append(f"{name:<52} {fmt(row.get('images_per_s')):>9} {fmt(seconds):>8} {fmt(row.get('first_call_s')):>7} "
                     f"{fmt(flops / 1e12 if flops else None):>8} {share:>7} {fmt(row.get('peak_mem_mb')):>8}{extra}")
    if result["targets"]:
        lines += ["", "targets (ratios of rows above, measured side by side):"]
        for t in result["targets"]:
            lines.append(f"  [{'met ' if t['met'] else 'MISS'}] {t['target']}: {t['value']:.2f} (target >= {t['threshold']})")
    if result.get("step_costs"):
        lines += ["", "step time against CT's (same configuration and precision):"]
        for c in result["step_costs"]:
            lines.append(f"  {c['rows'][0]}: {c['ratio']:.2f} x {c['rows'][1]}")
    lines.append(f"\nelapsed {result['elapsed_s']:.0f} s")
    return "\n".join(lines)


def machine(device, threads):
    """Where the figures come from: the CPU model and its vector/matrix capability (PyTorch's own
    detection), whether it runs bf16 natively, the thread count, torch; the GPU's name on GPUs."""
    cpu = detect_hardware("cpu")
    info = dict(device=str(device), torch=torch.__version__, python=platform.python_version(), threads=threads,
                cpu=cpu.name, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                cpu_bf16=cpu.bf16_instructions() or "emulated (no AMX or AVX512-BF16)", cpu_count=os.cpu_count())
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    return info


def uses_bf16(kwargs):
    return kwargs.get("precision") == "bf16" or kwargs.get("dtype") == "bf16"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--quick", action="store_true", help="tiny configuration, two repeats (smoke test)")
    parser.add_argument("--network", default="adm", help="the network by name (cm.networks; adm: the published U-Net)")
    parser.add_argument("--out", default="benchmark.json", help="JSON written after every row")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--compile", default="auto", choices=("auto", "yes", "no"),
                        help="torch.compile rows (auto: on GPUs only; compiling the ImageNet-64 U-Net on a CPU takes minutes)")
    parser.add_argument("--only", default="", help="only the rows whose name contains one of these comma-separated texts")
    parser.add_argument("--budget_s", type=float, default=0, help="skip the rows left after this many seconds (0: none)")
    parser.add_argument("--print_table", default="", metavar="JSON", help="print the table of a written JSON and exit")
    args = parser.parse_args(argv)
    if args.print_table:
        with open(args.print_table) as f:
            print(table(json.load(f)))
        return

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no GPU is visible to PyTorch")
    dist_util.setup_dist(device=args.device)
    threads = args.threads or torch.get_num_threads()
    if device.type == "cuda":
        torch.set_num_threads(threads)
        torch._dynamo.config.recompile_limit = 64  # every compiled row recompiles the same forward
    ctx = Context(args, device)
    start = time.time()
    result = dict(machine=machine(device, threads), settings=vars(args), rows={}, targets=[], elapsed_s=0.0)
    # bf16 rows on a CPU that emulates bf16 take minutes and measure nothing useful
    emulated_bf16 = device.type == "cpu" and not detect_hardware("cpu").cpu_native_bf16
    for name, kind, kwargs in plan(args, device):
        if args.budget_s and time.time() - start > args.budget_s:
            record = {"error": f"skipped: the {args.budget_s:.0f} s budget was spent"}
        elif emulated_bf16 and uses_bf16(kwargs):
            record = {"error": "skipped: this CPU emulates bf16 (no AMX or AVX512-BF16)"}
        elif kind == "sample" and kwargs["impl"] == "diffusers" and not diffusers_available():
            record = {"error": "skipped: diffusers (and cm.diffusers_convert) not installed"}
        elif device.type == "cuda":
            record = run_row(ctx, kind, kwargs)
            gc.collect()
            torch.cuda.empty_cache()
        else:
            record = run_row_forked(ctx, kind, kwargs, threads)
        record["name"], record["kind"] = name, kind
        record["switches"] = {k: kwargs[k] for k in ("channels_last", "compile", "sdpa") if k in kwargs}
        result["rows"][name] = ctx.results[name] = record
        print(f"{name}: {summary(record)}", flush=True)
        result["elapsed_s"] = time.time() - start
        result["targets"] = targets(result["rows"])
        result["step_costs"] = step_costs(result["rows"])
        atomic_write_text(args.out, json.dumps(result, indent=1, default=float))
    print()
    print(table(result))
    print(f"\nwrote {args.out}")


def diffusers_available():
    import importlib.util

    return importlib.util.find_spec("diffusers") is not None and importlib.util.find_spec("cm.diffusers_convert") is not None


def summary(record):
    if "error" in record:
        return record["error"]
    keys = ("images_per_s", "flops_per_s", "flops_per_image", "update_s", "peak_mem_mb")
    return ", ".join(f"{k} {fmt(record[k])}" for k in keys if record.get(k) is not None)


if __name__ == "__main__":
    main()
