"""End to end: the sampling script, its flags, its outputs; published names importable; checkpoint errors."""

import importlib.util
import io
import os
import runpy
import shlex
import shutil
import subprocess
import sys
import traceback
import warnings
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cm.checkpoints import atomic_save, load_model_weights
from cm.script_util import create_model_and_diffusion

from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float32 pinned: the exactness tests test the same arithmetic on every CPU (tests/test_precision.py tests auto)
TINY_FLAGS = (
    "--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 8 "
    "--num_head_channels 16 --class_cond True --num_classes 10 --resblock_updown True --precision fp32"
)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(cmd, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


def show_on_stderr(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_here(name, argv):
    """`python scripts/NAME.py ARGV` run in this process (the script run as __main__, sys.argv and sys.path as
    python sets them) as run() runs it in a new one: on one thread (run()'s OMP_NUM_THREADS=1: the same float
    sums), from the repository root. Returns (returncode, stdout, stderr) as run() does: warnings and an uncaught
    exception's traceback on stderr, the latter with exit status 1, as in a process of its own. This process's
    random state, thread count, working directory, sys.argv and sys.path are restored afterwards. Saves a process
    start-up (seconds with torch) per run."""
    script = os.path.join(ROOT, "scripts", f"{name}.py")
    out, err = io.StringIO(), io.StringIO()
    threads, cwd, path, argv0 = torch.get_num_threads(), os.getcwd(), list(sys.path), sys.argv
    torch.set_num_threads(1)
    os.chdir(ROOT)
    sys.path.insert(0, os.path.dirname(script))  # as python does for a script: its siblings importable
    sys.argv = [os.path.relpath(script, ROOT), *argv]
    try:
        with torch.random.fork_rng(devices=[]), redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            warnings.showwarning = show_on_stderr  # (not recorded as this test's warnings: the script's stderr)
            try:
                runpy.run_path(script, run_name="__main__")
                code = 0
            except SystemExit as exit_info:  # as the interpreter turns it into an exit status
                code = exit_info.code
                if code is None:
                    code = 0
                elif not isinstance(code, int):
                    print(code, file=sys.stderr)
                    code = 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        torch.set_num_threads(threads)
        os.chdir(cwd)
        sys.path[:], sys.argv = path, argv0
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_published_names_import():
    code = (
        "from cm.karras_diffusion import karras_sample, KarrasDenoiser, get_sigmas_karras, "
        "iterative_colorization, iterative_superres, iterative_inpainting, stochastic_iterative_sampler; "
        "from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults, "
        "cm_train_defaults, create_model, create_ema_and_scales_fn, add_dict_to_argparser, args_to_dict; "
        "from cm.random_util import get_generator"
    )
    assert run([sys.executable, "-c", code]).returncode == 0


def test_published_sampling_command_lines_parse():
    parser = load_script("image_sample").create_argparser()
    line = (
        "--batch_size 256 --training_mode consistency_training --sampler multistep --ts 0,106,200 --steps 201 "
        "--model_path /path/to/ct_imagenet64.pt --attention_resolutions 32,16,8 --class_cond True "
        "--use_scale_shift_norm True --dropout 0.0 --image_size 64 --num_channels 192 --num_head_channels 64 "
        "--num_res_blocks 3 --num_samples 500 --resblock_updown True --use_fp16 True --weight_schedule uniform"
    )
    args = parser.parse_args(shlex.split(line))
    assert args.class_cond is True and args.use_fp16 is True and args.steps == 201 and args.ts == "0,106,200"
    edm = "--training_mode edm --generator determ-indiv --batch_size 8 --sigma_max 80 --sigma_min 0.002 --s_churn 0"
    assert parser.parse_args(shlex.split(edm)).generator == "determ-indiv"


def test_loss_norm_reaches_the_denoiser():
    _, diffusion = create_model_and_diffusion(**tiny_config(), loss_norm="l2")
    assert diffusion.loss_norm == "l2"


def _sample(tmp_path, name, extra, launcher=()):
    out = tmp_path / name
    argv = [*TINY_FLAGS.split(), "--training_mode", "consistency_training", "--sampler", "multistep", "--ts", "0,3,5",
            "--steps", "6", "--num_samples", "7", "--log_dir", str(out), *extra]
    # one process: in this one, as python would run it (run_here); several: the launcher's processes
    result = run([*launcher, sys.executable, "scripts/image_sample.py", *argv]) if launcher else run_here("image_sample", argv)
    assert result.returncode == 0, result.stderr[-2000:]
    return np.load(out / "samples_7x16x16x3.npz"), out


def test_image_sample_writes_npz_and_grid(tmp_path):
    data, out = _sample(tmp_path, "a", ["--batch_size", "3"])
    assert data["arr_0"].shape == (7, 16, 16, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].shape == (7,) and data["arr_1"].max() < 10
    assert (out / "samples_grid.png").exists()
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_seeds_write_one_batch_per_seed_each_the_batch_of_that_seed(tmp_path):
    sample = load_script("image_sample")
    flags = [*TINY_FLAGS.split(), "--training_mode", "consistency_training", "--sampler", "onestep", "--num_samples", "5",
             "--batch_size", "4", "--generator", "determ"]
    sample.main(flags + ["--seed", "1", "--log_dir", str(tmp_path / "plain")])
    sample.main(flags + ["--seeds", "1,2", "--log_dir", str(tmp_path / "seeds")])
    plain = np.load(tmp_path / "plain" / "samples_5x16x16x3.npz")
    batches = [np.load(tmp_path / "seeds" / f"seed_{s}" / "samples_5x16x16x3.npz") for s in (1, 2)]
    assert np.array_equal(batches[0]["arr_0"], plain["arr_0"]) and np.array_equal(batches[0]["arr_1"], plain["arr_1"])
    assert not np.array_equal(batches[0]["arr_0"], batches[1]["arr_0"])


def test_image_sample_fixed_labels(tmp_path):
    data, _ = _sample(tmp_path, "b", ["--batch_size", "4", "--class_labels", "3,5"])
    assert data["arr_1"].tolist() == [3, 5, 3, 5, 3, 5, 3]


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec not installed")
def assert_same_samples(a, b):
    """What the README promises across batch sizes and process counts: the same labels and random numbers
    (cm.random_util; tests/test_random_util.py), so the same images up to float rounding: the network's
    kernels round differently at another batch size, which can move a value across a 1/255 step."""
    assert np.array_equal(a["arr_1"], b["arr_1"])
    diff = np.abs(a["arr_0"].astype(np.int16) - b["arr_0"].astype(np.int16))
    assert diff.max() <= 1 and np.mean(diff > 0) <= 1e-3, (diff.max(), np.mean(diff > 0))


def test_two_processes_give_the_single_process_batch(tmp_path):
    one, _ = _sample(tmp_path, "one", ["--batch_size", "5"])
    two, _ = _sample(tmp_path, "two", ["--batch_size", "2"], launcher=("mpiexec", "-n", "2"))
    assert_same_samples(one, two)


def test_bad_flags_give_one_clear_line(tmp_path):
    result = run([sys.executable, "scripts/image_sample.py", *TINY_FLAGS.split(), "--training_mode", "consistency_training",
                  "--sampler", "multistep", "--log_dir", str(tmp_path)])
    assert result.returncode != 0 and "--ts" in result.stderr and "Traceback" not in result.stderr


def test_mismatched_and_truncated_checkpoints(tmp_path):
    small, _ = create_model_and_diffusion(**tiny_config())
    other, _ = create_model_and_diffusion(**tiny_config(num_channels=64, class_cond=False))
    path = str(tmp_path / "model.pt")
    atomic_save(other.state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit.*missing: label_emb.weight.*shape: time_embed.0.weight"):
        load_model_weights(small, path)
    with open(path, "rb") as f:
        head = f.read(1000)
    with open(path, "wb") as f:
        f.write(head)
    with pytest.raises(ValueError, match="truncated"):
        load_model_weights(small, path)
    atomic_save(small.state_dict(), path)
    load_model_weights(other := create_model_and_diffusion(**tiny_config())[0], path)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), small.state_dict().values()))


def test_image_sample_same_batch_for_batch_sizes_1_4_7(tmp_path):
    results = [_sample(tmp_path, f"b{b}", ["--batch_size", str(b)])[0] for b in (1, 4, 7)]
    for other in results[1:]:
        assert_same_samples(other, results[0])


class Crash(Exception):
    pass


def test_interrupted_sampling_resumes_to_the_same_batch(tmp_path, tiny_model_and_diffusion):
    from cm.parameterizations import CONSISTENCY
    from cm.sample_util import generate_samples

    model, diffusion = tiny_model_and_diffusion
    common = dict(kind=CONSISTENCY, num_samples=11, image_size=16, sampler="multistep", steps=6, ts=(0, 3, 5), class_cond=True,
                  num_classes=10, settings={"run": "a"}, progress=False)
    whole, whole_labels = generate_samples(diffusion, model, batch_size=3, shard_dir=str(tmp_path / "w"), **common)
    calls = []

    def crash_in_third_round(info):
        calls.append(info["i"])
        if len(calls) == 2 * 2 + 1:  # two rounds of two multistep evaluations each, then one more
            raise Crash

    shards = tmp_path / "k"
    with pytest.raises(Crash):
        generate_samples(diffusion, model, batch_size=3, shard_dir=str(shards), callback=crash_in_third_round, **common)
    assert sorted(os.listdir(shards)) == ["settings.json", "shard_000000000_000000003.npz", "shard_000000003_000000003.npz"]
    # resume with another batch size: the remaining samples do not depend on it
    images, labels = generate_samples(diffusion, model, batch_size=5, shard_dir=str(shards), **common)
    assert np.array_equal(images, whole) and np.array_equal(labels, whole_labels)
    with pytest.raises(ValueError, match="other settings"):
        generate_samples(diffusion, model, batch_size=3, shard_dir=str(shards), **dict(common, settings={"run": "b"}))
