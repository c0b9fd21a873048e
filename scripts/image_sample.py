"""Draw a batch of samples from a model and save them as samples_NxHxWx3.npz (arr_0 uint8 NHWC,
arr_1 labels when class-conditional), plus a PNG grid of the first 64.

Takes every flag of the published script. Without --model_path the model is randomly initialised
(a smoke test of the pipeline, not real samples). A killed run, started again with the same flags
and --log_dir, continues from its last finished round; the result equals an uninterrupted run's.
"""

import argparse
import os

from cm import dist_util, logger
from cm.config import parse_args_with_config
from cm.image_io import save_grid, save_npz
from cm.sample_util import (
    SAMPLE_SETTINGS,
    check_sampling_args,
    finish_shards,
    generate_samples,
    load_sampling_model,
    sample_kwargs,
)
from cm.script_util import add_dict_to_argparser, model_and_diffusion_defaults, run_cli

def main(argv=None):
    args = parse_args_with_config(create_argparser(), argv, "image_sample.py")
    ts, class_labels = check_sampling_args(args)
    dist_util.setup_dist(device=args.device or None)
    logger.configure(args.log_dir or None)
    model, diffusion = load_sampling_model(args)

    shard_dir = os.path.join(logger.get_dir(), "samples_partial")
    images, labels = generate_samples(
        diffusion, model, num_samples=args.num_samples, batch_size=args.batch_size, image_size=args.image_size,
        sampler=args.sampler, steps=args.steps, ts=ts, generator=args.generator, seed=args.seed,
        class_cond=args.class_cond, num_classes=args.num_classes, class_labels=class_labels, shard_dir=shard_dir,
        settings={k: str(getattr(args, k)) for k in SAMPLE_SETTINGS}, **sample_kwargs(args),
    )
    if dist_util.get_rank() == 0:
        path = os.path.join(logger.get_dir(), f"samples_{'x'.join(str(s) for s in images.shape)}.npz")
        save_npz(path, *([images] + ([labels] if args.class_cond else [])))
        # with fixed labels, one column per label
        save_grid(images[:64], os.path.join(logger.get_dir(), "samples_grid.png"), nrow=len(class_labels) or None)
        finish_shards(shard_dir)
        logger.log(f"saved {path} and samples_grid.png")
    dist_util.barrier()


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
    run_cli(main)
