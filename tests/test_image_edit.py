"""End to end: scripts/image_edit.py at tiny size, every task, and the edit invariants on its saved arrays.

All runs are made once (one module fixture), each as `python scripts/...` would make it but in this process
(run_here: on one thread, as a subprocess with OMP_NUM_THREADS=1; the same arrays), since a run takes a fraction of
a second and a process start-up seconds; each test then checks one run's outputs.
"""

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from cm.checkpoints import atomic_save
from cm.image_datasets import load_digits_arrays
from cm.script_util import create_model_and_diffusion

from conftest import randomize, tiny_config
from test_scripts import TINY_FLAGS as TINY_SCRIPT_FLAGS, run_here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = TINY_SCRIPT_FLAGS.split()
EDIT_FLAGS = ["--ts", "0,5,9", "--steps", "10"]
LUMA = np.array([0.2989, 0.5870, 0.1140])
BOX_KNOWN = np.ones((16, 16), dtype=bool)
BOX_KNOWN[4:12, 4:12] = False  # the built-in "box" mask of a 16x16 image hides the central 8x8 square


def mid_range_images(n):
    """Coloured digits with every value in 48..208, so an edit seldom saturates at 0 or 255 (the
    invariants hold before the uint8 clamp, so they are checked on unclipped pixels)."""
    base = load_digits_arrays(16)[0][:n, ..., 0].astype(np.float64)
    return np.stack([48 + base * 0.6, 200 - base * 0.6, 64 + base * 0.4], axis=-1).round().astype(np.uint8)


def grid_size(rows, cols, side=16, pad=2):
    side *= -(-64 // side)  # save_grid enlarges images under 64 pixels by a whole factor
    return cols * (side + pad) + pad, rows * (side + pad) + pad  # PIL's (width, height)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image_edit")
    model, _ = create_model_and_diffusion(**tiny_config(), distillation=True)
    ckpt = str(tmp / "model.pt")
    atomic_save(randomize(model).state_dict(), ckpt)  # random non-zero weights: real, differing outputs

    np.savez(tmp / "data.npz", mid_range_images(6))
    folder = tmp / "pngs"
    folder.mkdir()
    for i, img in enumerate(mid_range_images(5)):  # 32x32 files, center-cropped/resized to 16 by the script
        Image.fromarray(img).resize((32, 32), Image.NEAREST).save(folder / f"img{i}.png")
    mask = np.full((32, 32), 255, dtype=np.uint8)
    mask[:, :16] = 0  # left half to fill in
    Image.fromarray(mask).save(tmp / "mask.png")

    model_flags = TINY_FLAGS + ["--model_path", ckpt]
    jobs = {  # run name: flags
        "inpainting": ["--task", "inpainting", "--data_dir", "digits", "--mask", "box", *EDIT_FLAGS],
        "inpainting_b3": ["--task", "inpainting", "--data_dir", "digits", "--mask", "box", "--batch_size", "3",
                          *EDIT_FLAGS],
        "colorization": ["--task", "colorization", "--data_dir", str(tmp / "data.npz"), "--num_images", "4",
                         *EDIT_FLAGS],
        "superres": ["--task", "superres", "--data_dir", str(folder), "--patch_size", "4", *EDIT_FLAGS],
        "interpolation": ["--task", "interpolation", "--num_images", "3", "--interp_points", "5",
                          "--batch_size", "2", "--class_labels", "3", "--steps", "10"],
    }
    commands = {  # run name: (script, its command line)
        name: ("image_edit", [*model_flags, *flags, "--log_dir", str(tmp / name)]) for name, flags in jobs.items()
    }
    # no checkpoint: the smoke-test model, with a mask image file
    commands["mask_file"] = ("image_edit", [*TINY_FLAGS, "--task", "inpainting", "--data_dir", "digits",
                                            "--num_images", "3", "--mask", str(tmp / "mask.png"), *EDIT_FLAGS,
                                            "--log_dir", str(tmp / "mask_file")])
    # one-step samples of the same seeded noises, from the sampling script
    commands["onestep"] = ("image_sample", [*model_flags, "--training_mode", "consistency_distillation",
                                            "--sampler", "onestep", "--num_samples", "3", "--batch_size", "3",
                                            "--class_labels", "3", "--log_dir", str(tmp / "onestep")])
    results = {}
    for name, (script, argv) in commands.items():
        result = run_here(script, argv)
        results[name] = (result.returncode, result.stdout, result.stderr, tmp / name)
    return results


def load_script():
    spec = importlib.util.spec_from_file_location("image_edit", os.path.join(ROOT, "scripts", "image_edit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finished(runs, name):
    code, out, err, folder = runs[name]
    assert code == 0, err[-2000:]
    assert not [f for f in os.listdir(folder) if ".tmp" in f]
    return folder, out


def load(runs, name, task):
    folder, _ = finished(runs, name)
    data = np.load(folder / f"edit_{task}.npz")
    return [data[k] for k in data.files], Image.open(folder / f"edit_{task}.png")


def test_inpainting_keeps_the_known_pixels(runs):
    (result, degraded, inputs, labels), grid = load(runs, "inpainting", "inpainting")
    digits, digit_labels = load_digits_arrays(16)
    assert result.shape == degraded.shape == inputs.shape == (8, 16, 16, 3) and result.dtype == np.uint8
    assert np.array_equal(inputs, digits[:8]) and np.array_equal(labels, digit_labels[:8])  # the data's labels
    assert grid.size == grid_size(8, 3)
    diff = np.abs(result.astype(int) - inputs.astype(int))
    assert diff[:, BOX_KNOWN].max() <= 1  # kept up to the uint8 rounding
    assert diff[:, ~BOX_KNOWN].mean() > 5  # the hole is filled by the model, not copied
    assert (degraded[:, ~BOX_KNOWN] == 0).all()
    assert np.abs(degraded.astype(int) - inputs.astype(int))[:, BOX_KNOWN].max() <= 1


def test_results_do_not_depend_on_the_batch_size(runs):
    a, _ = load(runs, "inpainting", "inpainting")
    b, _ = load(runs, "inpainting_b3", "inpainting")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_colorization_keeps_the_luminance_npz_data(runs):
    (result, gray, inputs, labels), grid = load(runs, "colorization", "colorization")
    assert result.shape == (4, 16, 16, 3) and np.array_equal(inputs, mid_range_images(4))
    assert labels.shape == (4,) and ((0 <= labels) & (labels < 10)).all()  # no labels in the npz: drawn
    assert grid.size == grid_size(4, 3)
    unclipped = ((result > 0) & (result < 255)).all(-1)
    assert unclipped.mean() > 0.5
    lum_diff = np.abs(result @ LUMA - inputs @ LUMA)
    assert lum_diff[unclipped].max() < 1.5
    assert np.abs(np.diff(result.astype(int), axis=-1)).mean() > 5  # not gray: colours were added


def patch_means(images, p=4):
    n, h, w, c = images.shape
    return images.astype(np.float64).reshape(n, h // p, p, w // p, p, c).mean(axis=(2, 4))


def test_superres_keeps_the_patch_means_png_folder(runs):
    (result, low, inputs, labels), grid = load(runs, "superres", "superres")
    assert result.shape == (5, 16, 16, 3)  # the folder has 5 of the 8 images asked for
    assert np.array_equal(inputs, mid_range_images(5))  # 32x32 files center-cropped/resized to 16x16
    assert grid.size == grid_size(5, 3)
    up = np.repeat(np.repeat(patch_means(low), 4, axis=1), 4, axis=2)
    assert np.abs(low - up).max() <= 1  # the low-resolution input: constant patches
    saturated = ((result == 0) | (result == 255)).reshape(5, 4, 4, 4, 4, 3).any(axis=(2, 4))
    assert (~saturated).mean() > 0.5
    assert np.abs(patch_means(result) - patch_means(inputs))[~saturated].max() < 1.0
    assert np.abs(result.astype(int) - np.repeat(np.repeat(patch_means(result), 4, 1), 4, 2)).mean() > 2  # detail


def test_interpolation_rows_and_one_step_endpoints(runs):
    (images, labels), grid = load(runs, "interpolation", "interpolation")
    assert images.shape == (15, 16, 16, 3) and grid.size == grid_size(3, 5)
    assert labels.tolist() == [3] * 15
    rows = images.reshape(3, 5, 16, 16, 3).astype(int)
    assert np.abs(rows[:, 0] - rows[:, -1]).mean() > 1  # the two endpoints differ (beyond rounding)
    # the first column is the one-step sample of each row's first noise: image_sample.py's onestep samples
    finished(runs, "onestep")
    onestep = np.load(runs["onestep"][3] / "samples_3x16x16x3.npz")["arr_0"].astype(int)
    assert np.abs(rows[:, 0] - onestep).max() <= 1


def test_mask_image_file_and_untrained_model(runs):
    folder, out = finished(runs, "mask_file")
    assert "no --model_path" in out
    data = np.load(folder / "edit_inpainting.npz")
    result, inputs = data["arr_0"].astype(int), data["arr_2"].astype(int)
    assert result.shape == (3, 16, 16, 3)
    assert np.abs(result - inputs)[:, :, 8:].max() <= 1  # white (right) half kept
    assert (data["arr_1"][:, :, :8] == 0).all()  # black (left) half to fill in


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--task", "deblur"], "deblur"),
        (["--task", "superres", "--patch_size", "5"], "--patch_size 5"),
        (["--task", "inpainting", "--mask", "{tmp}/bad_mask.png"], "bad_mask.png"),
        (["--task", "inpainting", "--mask", "circle"], "letter, box, half"),
        (["--task", "colorization", "--data_dir", "{tmp}/empty"], "no images"),
        (["--task", "colorization", "--ts", "0,5,10", "--steps", "10"], "0..9"),
        (["--task", "colorization", "--class_labels", "12"], "0..9"),
        (["--config", "ct_imagenet64"], "not scripts/image_edit.py"),
    ],
)
def test_bad_input_gives_one_line(tmp_path, monkeypatch, capsys, flags, words):
    """What `python scripts/image_edit.py ...` runs (run_cli(main)), in this process: one line on stderr,
    exit status 1, no traceback, no run folder."""
    (tmp_path / "bad_mask.png").write_bytes(b"not a png")
    (tmp_path / "empty").mkdir()
    script = load_script()
    argv = [*TINY_FLAGS, "--data_dir", "digits", *[f.format(tmp=tmp_path) for f in flags]]
    argv += ["--log_dir", str(tmp_path / "run")]
    monkeypatch.delenv("CM_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        script.run_cli(lambda: script.main(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 1 and len(lines) == 1 and words in lines[0], err
    assert not (tmp_path / "run").exists()
