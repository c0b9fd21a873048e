"""Ternary search: finds the minimum of a unimodal FID curve, and the script runs and caches its points."""

import json

import numpy as np
import pytest

from cm.image_datasets import load_digits_arrays
from cm.image_io import save_npz

from test_scripts import TINY_FLAGS, load_script, run_here


@pytest.mark.parametrize("best", [1, 2, 5, 17, 37, 38])
def test_search_finds_the_minimum_of_a_unimodal_curve(best):
    search = load_script("ternary_search").ternary_search
    calls = []

    def fid_at(ts):
        calls.append(ts)
        return (ts[1] - best) ** 2 + 0.5

    assert search(fid_at, (0,), (39,)) == best
    assert all(ts[0] == 0 and ts[2] == 39 for ts in calls)
    assert len(set(calls)) < 20  # a search, not a sweep of all 38 candidates


def test_script_searches_and_reuses_its_cached_points(tmp_path):
    images, labels = load_digits_arrays()
    ref = tmp_path / "ref.npz"
    save_npz(str(ref), images[:200], labels[:200])
    argv = [*TINY_FLAGS.split(), "--training_mode", "consistency_training",
           "--begin", "0", "--end", "6", "--steps", "7", "--num_samples", "40", "--batch_size", "20",
           "--ref_batch", str(ref), "--features", "digits", "--log_dir", str(tmp_path / "run")]
    first = run_here("ternary_search", argv)  # (as python runs it, in this process)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "ternary_search_results:" in first.stdout
    points = json.loads((tmp_path / "run" / "ternary_search.json").read_text())["points"]
    assert set(points) <= {f"0,{p},6" for p in range(1, 6)} and len(points) >= 2
    saved = np.load(tmp_path / "run" / f"samples_ts_{next(iter(points)).replace(',', '_')}.npz")
    assert saved["arr_0"].shape == (40, 16, 16, 3)
    again = run_here("ternary_search", argv)
    assert again.returncode == 0 and "sampling" not in again.stderr  # every point came from the cache
    best = first.stdout.split("ternary_search_results:")[1].split()[0]
    assert again.stdout.split("ternary_search_results:")[1].split()[0] == best
