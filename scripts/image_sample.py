"""Draw a batch of samples from a model and save them as samples_NxHxWx3.npz (arr_0 uint8 NHWC,
arr_1 labels when class-conditional), plus a PNG grid of the first 64.

Takes every flag of the published script. Without --model_path the model is randomly initialised
(a smoke test of the pipeline, not real samples). A killed run, started again with the same flags
and --log_dir, continues from its last finished round; the result equals an uninterrupted run's.
"""

import os

from cm import dist_util, logger
from cm.checkpoints import file_sha256
from cm.config import given_flags, parse_args_with_config
from cm.image_io import save_grid, save_npz
from cm.methods import parameterization
from cm.run_folder import lock_run_folder, release_run_folder
from cm.sample_util import (
    RERUN,
    SAMPLE_SETTINGS,
    check_sampling_args,
    finish_shards,
    generate_samples,
    latent_decoding,
    load_sampling_model,
    read_sampling_weights,
    sample_kwargs,
    sampling_argparser,
    sampling_seeds,
)
from cm.cli import run_cli


def main(argv=None):
    parser = create_argparser()
    args = parse_args_with_config(parser, argv, "image_sample.py")
    seeds = sampling_seeds(args)
    dist_util.setup_dist(device=args.device or None)
    # the model file's stored config fills the flags not given; then every check, before the output folder is touched
    state = read_sampling_weights(args, given_flags(parser, argv))
    steps, class_labels = check_sampling_args(args)
    folder = logger.run_dir(args.log_dir or None)
    lock_run_folder(folder)  # one sampling run per folder: two would write the same shards
    logger.configure(folder)
    model, diffusion = load_sampling_model(args, state)
    latent = latent_decoding(args)
    # partial rounds are kept for the model's contents, not its path (a replaced file starts over)
    model_hash = file_sha256(args.model_path) if args.model_path and dist_util.get_rank() == 0 else ""

    for seed in seeds or [args.seed]:
        out_dir = os.path.join(logger.get_dir(), f"seed_{seed}") if seeds else logger.get_dir()
        shard_dir = os.path.join(out_dir, "samples_partial")
        settings = {k: str(getattr(args, k)) for k in SAMPLE_SETTINGS} | {"seed": str(seed), "model_sha256": model_hash}
        images, labels = generate_samples(
            diffusion, model, kind=parameterization(args.training_mode), num_samples=args.num_samples,
            batch_size=args.batch_size, image_size=args.image_size,
            sampler=args.sampler, steps=args.steps, ts=steps["ts"], generator=args.generator, seed=seed,
            class_cond=args.class_cond, num_classes=args.num_classes, class_labels=class_labels, shard_dir=shard_dir,
            settings=settings, t_mid=steps["t_mid"], **sample_kwargs(args), **latent,
        )

        def save():
            path = os.path.join(out_dir, f"samples_{'x'.join(str(s) for s in images.shape)}.npz")
            save_npz(path, *([images] + ([labels] if args.class_cond else [])))
            # with fixed labels, one column per label
            save_grid(images[:64], os.path.join(out_dir, "samples_grid.png"), nrow=len(class_labels) or None)
            finish_shards(shard_dir)
            logger.log(f"saved {path} and samples_grid.png")

        dist_util.write_on_rank0([(out_dir, save)], RERUN)
    release_run_folder(folder)


def create_argparser():
    return sampling_argparser(__doc__)


if __name__ == "__main__":
    run_cli(main)
