"""Zero-shot image editing with a consistency model (CM paper, Section 6 and Algorithm 4).

--task inpainting | colorization | superres edits the first --num_images images of --data_dir (an
image folder, a .npz with arr_0 uint8 NHWC, or "digits"), center-cropped to --image_size as the
training data are. Each edit is multistep consistency sampling at the grid indices --ts of a
--steps-point Karras grid, the known part of the image (pixels outside --mask, the luminance, the
means of --patch_size patches) put back after every step. --task interpolation ignores --data_dir:
each of --num_images rows walks the spherical path between two seeded noises in --interp_points
steps (CM paper, Figure 6).

Writes, in the run folder, edit_<task>.png (per image: input, degraded input, result; for
interpolation one row per noise pair) and edit_<task>.npz: arr_0 results, arr_1 degraded inputs,
arr_2 inputs (uint8 NHWC), arr_3 labels when class-conditional; for interpolation arr_0 the
num_images x interp_points images row by row, arr_1 their labels when class-conditional.
Any flag may also come from a --config preset made for image_edit.py or image_sample.py (configs/NAME.json), as in
the other scripts. Noise comes from per-sample generators: the results do not depend on
--batch_size or the number of processes. Without --model_path the model is randomly initialised
(a smoke test of the pipeline, not real edits).

--ts default: the published code gives none for editing (its launch.sh only has two-step sampling
indices, e.g. 0,17,39 for the CD LSUN Bedroom model its paper edits with). Algorithm 4 re-imposes the
known part once per step, so editing takes 4 steps at evenly spaced grid indices (0,10,20,29,39 for
--steps 40), ending at the last index so no noise is left; interpolation takes one step (0,steps-1),
as in the paper's interpolation figure.
"""

import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from cm import dist_util, logger
from cm.config import given_flags, parse_args_with_config
from cm.editing import (
    BUILTIN_MASKS,
    builtin_mask,
    interpolation,
    iterative_colorization,
    iterative_inpainting,
    iterative_superres,
    load_mask,
)
from cm.image_datasets import UnreadableImage, collate, open_dataset
from cm.image_io import save_grid, save_npz, to_uint8_nhwc
from cm.random_util import get_generator
from cm.run_folder import lock_run_folder, release_run_folder
from cm.methods import parameterization
from cm.parameterizations import check_grid_indices, parse_int_list
from cm.sample_util import (
    in_global_order,
    load_sampling_model,
    read_sampling_weights,
    round_sizes,
    sampling_argparser,
)
from cm.cli import run_cli

TASKS = ("inpainting", "colorization", "superres", "interpolation")
EDIT_STEPS = 4  # model evaluations of the default editing --ts
GRID_MAX = 64  # images (or interpolation rows) shown in the PNG grid


def default_ts(task, steps):
    """Grid indices used when --ts is empty (see the module docstring)."""
    if task == "interpolation":
        return (0, steps - 1)
    return tuple(sorted({round(k * (steps - 1) / EDIT_STEPS) for k in range(EDIT_STEPS + 1)}))


def check_args(args):
    """Every flag error, before anything is built or written; returns (ts, class_labels)."""
    if args.task not in TASKS:
        raise ValueError(f"unknown --task {args.task!r}; choose one of {', '.join(TASKS)}")
    if args.num_images < 1:
        raise ValueError(f"--num_images must be at least 1, got {args.num_images}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.steps < 2:
        raise ValueError(f"--steps must be at least 2, got {args.steps}")
    ts = parse_int_list(args.ts, "ts") if args.ts else default_ts(args.task, args.steps)
    check_grid_indices(ts, args.steps)
    if args.task == "superres" and (args.patch_size < 1 or args.image_size % args.patch_size):
        raise ValueError(
            f"--patch_size {args.patch_size} does not divide --image_size {args.image_size}; "
            "choose a divisor, e.g. 4 or 8"
        )
    if args.task == "interpolation" and args.interp_points < 2:
        raise ValueError(f"--interp_points must be at least 2, got {args.interp_points}")
    if args.task != "interpolation" and not args.data_dir:
        raise ValueError(f"--task {args.task} needs --data_dir: an image folder, a .npz file, or 'digits'")
    class_labels = parse_int_list(args.class_labels, "class_labels") if args.class_labels else ()
    if class_labels and not args.class_cond:
        raise ValueError("--class_labels needs a class-conditional model (--class_cond True)")
    if any(not 0 <= c < args.num_classes for c in class_labels):
        raise ValueError(f"--class_labels must lie in 0..{args.num_classes - 1}")
    return ts, class_labels


def read_mask(spec, image_size):
    """A built-in mask name or a mask image file (white = keep)."""
    if spec in BUILTIN_MASKS:
        return builtin_mask(spec, image_size)
    if not os.path.isfile(spec):
        raise FileNotFoundError(
            f"--mask {spec!r} is neither a built-in mask ({', '.join(BUILTIN_MASKS)}) nor a mask image file"
        )
    return load_mask(spec, image_size)


def read_images(data_dir, image_size, num_images, want_labels):
    """The first num_images images of data_dir, center-cropped to image_size as the training data are
    (uint8 NHWC), and their labels (None when the data have none or none are wanted)."""
    dataset = None
    if want_labels:
        try:
            dataset = open_dataset(data_dir, image_size, class_cond=True, random_flip=False)
        except ValueError:
            pass  # no labels in the data (a data error proper is raised again just below)
    if dataset is None:
        dataset = open_dataset(data_dir, image_size, class_cond=False, random_flip=False)
    if len(dataset) == 0:
        raise ValueError(f"no images in {data_dir}; point --data_dir at a folder or .npz that holds some")
    items = [dataset[(i, 0)] for i in range(min(num_images, len(dataset)))]
    for image, _ in items:
        if isinstance(image, UnreadableImage):
            raise ValueError(image.message)
    images = np.stack([image for image, _ in items])
    labels = None if items[0][1] is None else np.array([label for _, label in items], dtype=np.int64)
    return images, labels


def main(argv=None):
    parser = create_argparser()
    args = parse_args_with_config(parser, argv, "image_edit.py", also=("image_sample.py",))
    dist_util.setup_dist(device=args.device or None)
    state = read_sampling_weights(args, given_flags(parser, argv))  # (its stored config fills the flags not given)
    if getattr(args, "latent_vae", ""):
        raise ValueError(f"{args.model_path} is a latent model (--latent_vae {args.latent_vae}); the editing tasks work in "
                         "pixel space: edit with a pixel model")
    ts, class_labels = check_args(args)
    # inputs before the run folder: bad data leave nothing behind
    mask = read_mask(args.mask, args.image_size) if args.task == "inpainting" else None
    inputs, labels = None, None
    if args.task != "interpolation":
        want_labels = args.class_cond and not class_labels
        inputs, labels = read_images(args.data_dir, args.image_size, args.num_images, want_labels)
        if labels is not None and labels.max() >= args.num_classes:
            raise ValueError(
                f"{args.data_dir} has label {labels.max()} but the model has {args.num_classes} classes; "
                "pass --class_labels or --num_classes"
            )
    num = args.num_images if inputs is None else len(inputs)

    device = dist_util.dev()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    folder = logger.run_dir(args.log_dir or None)
    lock_run_folder(folder)  # one editing run per folder: two would write the same files
    logger.configure(folder)
    if num < args.num_images:
        logger.log(f"warning: {args.data_dir} has {num} images; editing all of them, not {args.num_images}")
    if args.ts == "":
        logger.log(f"--ts {','.join(map(str, ts))} (default for --task {args.task}, --steps {args.steps})")
    if ts[-1] != args.steps - 1:
        logger.log(f"warning: --ts ends before the last grid index {args.steps - 1}; the results keep some noise")
    model, diffusion = load_sampling_model(args, state)
    diffusion = parameterization(args.training_mode).editing_denoiser(diffusion, args)  # in EDM's noise levels

    # labels: --class_labels (cycled), else the data's, else uniform draws over num_classes
    if class_labels:
        labels = np.asarray(class_labels, dtype=np.int64)[np.arange(num) % len(class_labels)]
    generator = get_generator(args.generator, num, args.seed)
    if args.task == "interpolation":
        # the noise of the multistep loop: per image of each row, independent of the rows' batching
        path_generator = get_generator(args.generator, num * args.interp_points, args.seed + 1, 0, 1)

    shape = (3, args.image_size, args.image_size)
    results, degraded_all, labels_all = [], [], []
    bar = tqdm(total=num, desc=args.task, unit="img" if inputs is not None else "row", disable=rank != 0)
    start = time.time()
    # rounds over all processes: row j of rank r is global image done + r + j * world
    for done, per_rank in round_sizes(num, args.batch_size, world):
        generator.set_done_samples(done)
        idx = torch.clamp(torch.arange(done + rank, done + world * per_rank, world), max=num - 1)
        if not args.class_cond:
            y = None
        elif labels is not None:
            y = torch.from_numpy(labels[idx.numpy()]).to(device)
        else:
            y = generator.randint(0, args.num_classes, (per_rank,), device=device)

        if args.task == "interpolation":
            z0 = generator.randn(per_rank, *shape, device=device)
            z1 = generator.randn(per_rank, *shape, device=device)
            out = interpolate_rows(args, model, diffusion, z0, z1, idx.tolist(), ts, y, path_generator)
            results.append(gather_rows(to_uint8(out), device))
        else:
            images, _ = collate([(inputs[i], None) for i in idx.tolist()])
            x = generator.randn(per_rank, *shape, device=device) * args.sigma_max
            out, degraded = edit(args, model, diffusion, images.to(device), x, ts, y, generator, mask)
            results.append(gather_rows(to_uint8(out), device))
            degraded_all.append(gather_rows(to_uint8(degraded), device))
        if y is not None:
            labels_all.append(gather_rows(y, device))
        bar.update(min(per_rank * world, num - bar.n))
        bar.set_postfix(per_s=f"{bar.n / (time.time() - start):.2f}")
    bar.close()

    if rank == 0:
        save_outputs(args, num, inputs, results, degraded_all, labels_all)
    dist_util.barrier()
    release_run_folder(folder)


def make_distiller(model, diffusion, model_kwargs, clip_denoised):
    """The consistency function f(x, sigma) the editing loops call, conditioned on model_kwargs."""

    def distiller(x_t, sigma):
        _, denoised = diffusion.denoise(model, x_t, sigma, **model_kwargs)
        return denoised.clamp(-1, 1) if clip_denoised else denoised

    return distiller


def edit(args, model, diffusion, images, x, ts, y, generator, mask):
    """(result, degraded input) of one batch (Algorithm 4)."""
    distiller = make_distiller(model, diffusion, {} if y is None else {"y": y}, args.clip_denoised)
    common = dict(
        ts=ts, t_min=args.sigma_min, t_max=args.sigma_max, rho=diffusion.rho, steps=args.steps, generator=generator
    )
    if args.task == "inpainting":
        return iterative_inpainting(distiller, images, x, mask=mask, **common)
    if args.task == "colorization":
        return iterative_colorization(distiller, images, x, **common)
    return iterative_superres(distiller, images, x, patch_size=args.patch_size, **common)


def interpolate_rows(args, model, diffusion, z0, z1, rows, ts, y, path_generator):
    """[rows, interp_points, C, H, W]: row j walks from noise z0[j] to z1[j] (label y[j])."""
    out = []
    for j, row in enumerate(rows):
        path_generator.set_done_samples(row * args.interp_points)
        kwargs = {} if y is None else {"y": y[j : j + 1].repeat(args.interp_points)}
        out.append(
            interpolation(
                make_distiller(model, diffusion, kwargs, args.clip_denoised),
                z0[j : j + 1],
                z1[j : j + 1],
                args.interp_points,
                ts=ts,
                t_min=args.sigma_min,
                t_max=args.sigma_max,
                rho=diffusion.rho,
                steps=args.steps,
                generator=path_generator,
            )
        )
    return torch.stack(out)


def to_uint8(images):
    """[-1, 1] images [..., C, H, W] -> uint8 [..., H, W, C] tensor (the published rounding)."""
    lead = images.shape[:-3]
    flat = torch.from_numpy(to_uint8_nhwc(images.reshape(-1, *images.shape[-3:])))
    return flat.reshape(*lead, *flat.shape[1:])


def gather_rows(tensor, device):
    """This rank's rows -> all ranks' rows in global order (numpy)."""
    return in_global_order(dist_util.all_gather(tensor.to(device)))


def save_outputs(args, num, inputs, results, degraded_all, labels_all):
    out_dir = logger.get_dir()
    name = f"edit_{args.task}"
    results = np.concatenate(results)[:num]
    labels = np.concatenate(labels_all)[:num] if labels_all else None
    if args.task == "interpolation":
        points = args.interp_points
        arrays = [results.reshape(-1, *results.shape[2:])]
        if labels is not None:
            arrays.append(np.repeat(labels, points))
        grid, nrow = results[:GRID_MAX].reshape(-1, *results.shape[2:]), points
    else:
        degraded = np.concatenate(degraded_all)[:num]
        arrays = [results, degraded, inputs] + ([labels] if labels is not None else [])
        # per image: input | degraded input | result
        grid, nrow = np.stack([inputs, degraded, results], axis=1)[:GRID_MAX].reshape(-1, *results.shape[1:]), 3
    save_npz(os.path.join(out_dir, f"{name}.npz"), *arrays)
    save_grid(grid, os.path.join(out_dir, f"{name}.png"), nrow=nrow)
    logger.log(f"saved {os.path.join(out_dir, name)}.npz and {name}.png")


def create_argparser():
    # the sampling scripts' flags (so their presets serve here too), then editing's own
    return sampling_argparser(
        __doc__,
        task="inpainting",  # inpainting | colorization | superres | interpolation
        data_dir="",  # image folder, .npz (arr_0 uint8 NHWC), or "digits"; not used by interpolation
        num_images=8,  # images to edit (interpolation: rows, one pair of noises each)
        mask="letter",  # inpainting: letter | box | half, or a mask image file (white = keep)
        patch_size=8,  # superres: side of the averaged patches (as published); must divide image_size
        interp_points=8,  # interpolation: images per row, endpoints included
        ts="",  # grid indices of the steps; empty: 4 evenly spaced (editing), 0,steps-1 (interpolation)
        training_mode="consistency_distillation",
        class_labels="",  # fixed labels, cycled; empty: the data's labels, else uniform over num_classes
    )


if __name__ == "__main__":
    run_cli(main)
