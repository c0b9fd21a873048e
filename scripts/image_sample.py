"""Draw a batch of samples from a model and save them as samples_NxHxWx3.npz (arr_0 uint8 NHWC,
arr_1 labels when class-conditional), plus a PNG grid of the first 64.

Takes every flag of the published script. Without --model_path the model is randomly initialised
(a smoke test of the pipeline, not real samples).
"""

import argparse
import math
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from cm import dist_util, logger
from cm.checkpoints import load_model_weights
from cm.image_io import save_grid, save_npz, to_uint8_nhwc
from cm.karras_diffusion import karras_sample
from cm.random_util import get_generator
from cm.script_util import add_dict_to_argparser, args_to_dict, create_model_and_diffusion, model_and_diffusion_defaults


def parse_int_list(text, flag):
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"error: --{flag} must be comma-separated integers, got {text!r}")


def main():
    args = create_argparser().parse_args()
    dist_util.setup_dist(device=args.device or None)
    logger.configure(args.log_dir or None)
    device = dist_util.dev()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()

    ts = parse_int_list(args.ts, "ts") if args.sampler == "multistep" else None
    if args.sampler == "multistep" and len(ts) < 2:
        raise SystemExit("error: --sampler multistep needs --ts, e.g. --ts 0,22,39 with --steps 40")
    class_labels = parse_int_list(args.class_labels, "class_labels") if args.class_labels else ()
    if class_labels and not args.class_cond:
        raise SystemExit("error: --class_labels needs a class-conditional model (--class_cond True)")
    if any(not 0 <= c < args.num_classes for c in class_labels):
        raise SystemExit(f"error: --class_labels must lie in 0..{args.num_classes - 1}")

    # every consistency model uses the boundary-condition scalings; EDM models do not
    distillation = "consistency" in args.training_mode
    model, diffusion = create_model_and_diffusion(
        **args_to_dict(args, model_and_diffusion_defaults().keys()), distillation=distillation
    )
    if args.model_path:
        logger.log(f"loading {args.model_path}")
        load_model_weights(model, args.model_path)
    else:
        logger.log("no --model_path: sampling from a randomly initialised model (pipeline smoke test)")
    model.to(device)
    if args.use_fp16:
        model.convert_to_fp16()
    elif args.use_bf16:
        model.convert_to_bf16()
    model.eval()

    generator = get_generator(args.generator, args.num_samples, args.seed)
    shape_hw = (3, args.image_size, args.image_size)
    images, labels = [], []
    done = 0
    bar = tqdm(total=args.num_samples, desc="sampling", unit="img", disable=rank != 0)
    start = time.time()
    while done < args.num_samples:
        # the last round takes only what is left, so no sample index is drawn twice
        per_rank = min(args.batch_size, math.ceil((args.num_samples - done) / world))
        generator.set_done_samples(done)
        model_kwargs = {}
        if args.class_cond:
            if class_labels:
                idx = torch.arange(done + rank, done + world * per_rank, world)
                classes = torch.tensor(class_labels)[idx % len(class_labels)].to(device)
            else:
                classes = generator.randint(0, args.num_classes, (per_rank,), device=device)
            model_kwargs["y"] = classes
        sample = karras_sample(
            diffusion,
            model,
            (per_rank, *shape_hw),
            steps=args.steps,
            model_kwargs=model_kwargs,
            device=device,
            clip_denoised=args.clip_denoised,
            sampler=args.sampler,
            sigma_min=args.sigma_min,
            sigma_max=args.sigma_max,
            s_churn=args.s_churn,
            s_tmin=args.s_tmin,
            s_tmax=args.s_tmax,
            s_noise=args.s_noise,
            generator=generator,
            ts=ts,
        )
        # row j of rank r is global sample done + r + j * world: interleave the ranks back into order
        images.append(_in_global_order(dist_util.all_gather(torch.from_numpy(to_uint8_nhwc(sample)).to(device))))
        if args.class_cond:
            labels.append(_in_global_order(dist_util.all_gather(model_kwargs["y"])))
        done += per_rank * world
        bar.update(min(per_rank * world, args.num_samples - bar.n))
        bar.set_postfix(img_per_s=f"{bar.n / (time.time() - start):.2f}")
    bar.close()

    if rank == 0:
        arr = np.concatenate(images)[: args.num_samples]
        out = [arr] + ([np.concatenate(labels)[: args.num_samples]] if args.class_cond else [])
        path = os.path.join(logger.get_dir(), f"samples_{'x'.join(str(s) for s in arr.shape)}.npz")
        save_npz(path, *out)
        save_grid(arr[:64], os.path.join(logger.get_dir(), "samples_grid.png"))
        logger.log(f"saved {path} and samples_grid.png")
    dist_util.barrier()


def _in_global_order(gathered):
    """[world x batch x ...] rank-major gathers -> batch-major rows (global sample order), numpy."""
    stacked = torch.stack([g.cpu() for g in gathered])
    return stacked.transpose(0, 1).reshape(-1, *stacked.shape[2:]).numpy()


def create_argparser():
    defaults = dict(
        training_mode="edm",  # edm, or a consistency mode (boundary-condition scalings)
        generator="determ",  # dummy | determ | determ-indiv
        clip_denoised=True,  # clamp each denoised estimate to [-1, 1]
        num_samples=10000,  # samples to draw in all
        batch_size=16,  # samples per process per round
        sampler="heun",  # heun | euler | dpm | ancestral | onestep | multistep | progdist
        s_churn=0.0,
        s_tmin=0.0,
        s_tmax=float("inf"),
        s_noise=1.0,
        steps=40,  # sampler steps (multistep: points of the Karras grid that --ts indexes)
        model_path="",  # checkpoint; empty: a randomly initialised model
        seed=42,
        ts="",  # multistep grid indices, e.g. 0,22,39
        class_labels="",  # fixed labels, cycled over the samples; empty: uniform over num_classes
        device="",  # cpu | cuda | cuda:N; empty: this rank's GPU if any, else the CPU
        log_dir="",  # output folder; empty: $OPENAI_LOGDIR, else runs/<time>
    )
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    main()
