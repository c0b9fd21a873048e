"""evaluations/: the metrics against closed forms and brute force, the reference-statistics cache, the
npz reader, the three feature networks (Inception with random weights), the weight-file errors, the CLI."""

import json
import os
import subprocess
import sys
import urllib.error
import warnings

import numpy as np
import pytest
import torch
from scipy import special

from cm.image_datasets import load_digits_arrays
from evaluations import evaluator as ev
from evaluations import feature_extractors as fx
from evaluations.evaluator import (
    Evaluator,
    FIDStatistics,
    ManifoldEstimator,
    NpzImageReader,
    evaluate,
    inception_score,
    stats_cache_path,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits():
    return load_digits_arrays(16)


def save_npz(path, *arrays):
    np.savez(path, *arrays)
    return str(path)


def run_cli(*args, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, os.path.join(ROOT, "evaluations", "evaluator.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def printed_metrics(stdout):
    metrics = {}
    for line in stdout.splitlines():
        name, sep, value = line.partition(": ")
        if sep and name in ("Inception Score", "FID", "sFID", "Precision", "Recall", "Class accuracy"):
            metrics[name] = None if value == "n/a" else float(value)
    return metrics


# ----- Frechet distance -----


def test_frechet_distance_of_diagonal_and_commuting_covariances_matches_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    # for commuting S1, S2: tr((S1 S2)^(1/2)) = sum sqrt(a_i b_i)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    fid = FIDStatistics(mu1, np.diag(a)).frechet_distance(FIDStatistics(mu2, np.diag(b)))
    assert fid == pytest.approx(expected, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # a shared eigenbasis
    fid = FIDStatistics(mu1, q @ np.diag(a) @ q.T).frechet_distance(FIDStatistics(mu2, q @ np.diag(b) @ q.T))
    assert fid == pytest.approx(expected, rel=1e-8)
    # one dimension, scalars accepted as published (atleast_1d / atleast_2d)
    assert FIDStatistics(1.0, 4.0).frechet_distance(FIDStatistics(3.0, 9.0)) == pytest.approx(4 + 4 + 9 - 2 * 6)


def test_frechet_distance_of_sample_statistics_with_themselves_is_zero():
    x = np.random.default_rng(1).normal(size=(500, 20)) @ np.random.default_rng(2).normal(size=(20, 20))
    stats = Evaluator("random", device="cpu").compute_statistics(x)
    np.testing.assert_allclose(stats.sigma, np.cov(x.T))
    assert abs(stats.frechet_distance(stats)) < 1e-8


def test_frechet_distance_retries_a_non_finite_root_with_eps_on_the_diagonals(monkeypatch):
    real_sqrtm, calls = ev.linalg.sqrtm, []

    def first_call_fails(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(ev.linalg, "sqrtm", first_call_fails)
    a, b, eps = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.25, 2.0]), 1e-2
    with pytest.warns(UserWarning, match="singular product"):
        fid = FIDStatistics(np.zeros(3), np.diag(a)).frechet_distance(FIDStatistics(np.ones(3), np.diag(b)), eps=eps)
    assert len(calls) == 2
    assert fid == pytest.approx(3 + np.sum(a + b - 2 * np.sqrt((a + eps) * (b + eps))), rel=1e-10)


def test_frechet_distance_rejects_a_large_imaginary_root_and_mismatched_dimensions():
    # sqrt(diag(1, -4)) = diag(1, 2i): not a product of covariances
    with pytest.raises(ValueError, match="Imaginary component 2"):
        FIDStatistics(np.zeros(2), np.eye(2)).frechet_distance(FIDStatistics(np.zeros(2), np.diag([1.0, -4.0])))
    with pytest.raises(ValueError, match="different dimensions"):
        FIDStatistics(np.zeros(2), np.eye(2)).frechet_distance(FIDStatistics(np.zeros(3), np.eye(3)))


# ----- Inception Score -----


def test_inception_score_of_uniform_and_of_confident_predictions():
    assert inception_score(np.zeros((300, 1008))) == pytest.approx(1.0, abs=1e-12)
    for k in (1, 3, 10):
        logits = 60.0 * np.eye(1008)[np.arange(20 * k) % k]  # one-hot up to e^-60, spread evenly over k classes
        assert inception_score(logits) == pytest.approx(k, rel=1e-9)
    # extreme logits: p underflows to 0, which counts 0 (p log p), not NaN
    assert inception_score(1e4 * np.eye(5)[np.arange(50) % 5]) == pytest.approx(5, rel=1e-12)


def test_inception_score_averages_splits_of_5000():
    labels = np.concatenate([np.arange(5000) % 2, np.arange(5000) % 4, np.arange(2000) % 8])
    logits = 60.0 * np.eye(8)[labels]
    assert inception_score(logits) == pytest.approx((2 + 4 + 8) / 3, rel=1e-9)
    # one split: for one-hot predictions KL(p(y|x) || p(y)) = -log p(label), so IS = exp(entropy of p(y))
    freq = np.bincount(labels) / len(labels)
    assert inception_score(logits, split_size=12000) == pytest.approx(np.exp(-np.sum(freq * np.log(freq))), rel=1e-9)


def test_inception_score_matches_scipy_kl_divergence():
    logits = np.random.default_rng(3).normal(scale=3, size=(400, 12))
    p = special.softmax(logits, axis=1)
    expected = np.exp(np.mean(np.sum(special.rel_entr(p, p.mean(axis=0)), axis=1)))
    assert inception_score(logits) == pytest.approx(expected, rel=1e-10)


# ----- precision and recall -----


def brute_force_radii(features, k):
    dist = np.sum((features[:, None].astype(np.float64) - features[None]) ** 2, axis=-1)
    return np.sort(dist, axis=1)[:, k]  # index 0 is the point itself


def brute_force_precision_recall(ref, sample, k=3):
    dist = np.sum((sample[:, None].astype(np.float64) - ref[None]) ** 2, axis=-1)  # [samples, refs]
    precision = np.mean(np.any(dist <= brute_force_radii(ref, k)[None, :], axis=1))
    recall = np.mean(np.any(dist <= brute_force_radii(sample, k)[:, None], axis=0))
    return precision, recall


def test_precision_recall_of_identical_and_of_far_apart_sets():
    x = np.random.default_rng(4).normal(size=(50, 16)).astype(np.float32)
    evaluator = Evaluator("random", device="cpu")
    assert evaluator.compute_prec_recall(x, x.copy()) == (1.0, 1.0)
    assert evaluator.compute_prec_recall(x, x + 1000) == (0.0, 0.0)


@pytest.mark.parametrize("blocks", [(10000, 10000), (7, 5), (1, 64)])
def test_precision_recall_and_radii_match_float64_brute_force(blocks):
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(41, 8)).astype(np.float32)
    sample = (rng.normal(size=(29, 8)) * 1.3 + 0.4).astype(np.float32)
    estimator = ManifoldEstimator(row_batch_size=blocks[0], col_batch_size=blocks[1], nhood_sizes=(1, 3, 5))
    radii_ref, radii_sample = estimator.manifold_radii(ref), estimator.manifold_radii(sample)
    for column, k in enumerate((1, 3, 5)):
        np.testing.assert_allclose(radii_ref[:, column], brute_force_radii(ref, k), rtol=1e-5, atol=1e-5)
    precision, recall = estimator.evaluate_pr(ref, radii_ref, sample, radii_sample)
    for column, k in enumerate((1, 3, 5)):
        assert (precision[column], recall[column]) == brute_force_precision_recall(ref, sample, k)
    assert 0 < precision[1] < 1 and 0 < recall[1] < 1  # a case where the answer is not trivial


def test_manifold_evaluate_and_radius_clamping_match_brute_force():
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(33, 5)).astype(np.float32)
    queries = rng.normal(size=(21, 5)).astype(np.float32) * 1.5
    estimator = ManifoldEstimator(row_batch_size=4, col_batch_size=6, eps=1e-5)
    radii = estimator.manifold_radii(ref)
    result = estimator.evaluate(ref, radii, queries)
    dist = np.sum((queries[:, None].astype(np.float64) - ref[None]) ** 2, axis=-1)
    inside = np.any(dist <= brute_force_radii(ref, 3)[None], axis=1)
    np.testing.assert_array_equal(result["batch_predictions"][:, 0], inside)
    assert result["fraction"] == pytest.approx(inside.mean())
    np.testing.assert_array_equal(result["nearest_indices"], dist.argmin(axis=1))
    realism = np.max(brute_force_radii(ref, 3)[None] / (dist + 1e-5), axis=1)
    np.testing.assert_allclose(result["max_realism_score"], realism, rtol=1e-4)

    clamped = ManifoldEstimator(row_batch_size=5, col_batch_size=7, clamp_to_percentile=50).manifold_radii(ref)
    expected = brute_force_radii(ref, 3)
    expected[expected > np.percentile(expected, 50)] = 0
    np.testing.assert_allclose(clamped[:, 0], expected, rtol=1e-5)


def test_float16_distances_fall_back_to_float32_on_overflow():
    rng = np.random.default_rng(14)
    ref, sample = rng.normal(size=(60, 32)).astype(np.float32), rng.normal(size=(50, 32)).astype(np.float32) + 0.3
    fp16, fp32 = ManifoldEstimator(use_fp16=True), ManifoldEstimator()
    np.testing.assert_allclose(fp16.manifold_radii(ref), fp32.manifold_radii(ref), rtol=3e-3)
    assert fp16.distance_block.pairwise_distances(ref, sample).dtype == torch.float32
    far = np.full((4, 3), 300.0, np.float32)  # |u|^2 = 270,000 overflows float16 (max 65,504)
    far[:, 0] = np.arange(4)
    dist = fp16.distance_block.pairwise_distances(far, far).numpy()
    np.testing.assert_allclose(dist, (np.arange(4)[:, None] - np.arange(4)[None]) ** 2.0)


def test_precision_recall_need_more_than_k_points():
    with pytest.raises(ValueError, match="more than 3 images"):
        ManifoldEstimator().manifold_radii(np.zeros((3, 4), dtype=np.float32))


# ----- reading .npz batches -----


def test_npz_reader_streams_arr_0_in_batches(tmp_path):
    images = np.random.default_rng(7).integers(0, 256, size=(11, 5, 7, 3), dtype=np.uint8)
    layouts = {"plain": (np.savez, images), "compressed": (np.savez_compressed, images)}
    layouts["fortran"] = (np.savez, np.asfortranarray(images))  # not streamable: read whole
    for name, (saver, array) in layouts.items():
        path = tmp_path / f"{name}.npz"
        saver(path, array, np.arange(11))
        with NpzImageReader(str(path)) as reader:
            batches = list(reader.read_batches(4))
        assert [len(b) for b in batches] == [4, 4, 3]
        np.testing.assert_array_equal(np.concatenate(batches), images)


def test_npz_reader_rejects_wrong_contents_with_the_file_name(tmp_path):
    bad = save_npz(tmp_path / "float.npz", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"float\.npz: arr_0 is float32 \(2, 4, 4, 3\); expected"):
        NpzImageReader(bad)
    gray = save_npz(tmp_path / "gray.npz", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="arr_0 is uint8"):
        NpzImageReader(gray)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="has no arr_0 \\(it holds mu\\)"):
        NpzImageReader(str(tmp_path / "stats.npz"))
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        NpzImageReader(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "objects.npz", np.array([np.zeros((4, 4, 3), np.uint8), "x"], dtype=object))
    with pytest.raises(ValueError, match=r"objects\.npz: arr_0 holds pickled Python objects, which are never loaded"):
        NpzImageReader(str(tmp_path / "objects.npz"))


def test_a_set_smaller_than_the_feature_dimension_is_warned_of(tmp_path, digits):
    images, labels = digits
    evaluator = Evaluator("random", device="cpu", progress=False, cache=False)  # 256 dimensions
    big, small = save_npz(tmp_path / "big.npz", images[:300]), save_npz(tmp_path / "small.npz", images[300:500])
    with pytest.warns(UserWarning, match="the sample set has 200 images, not more than the 256 feature dimensions"):
        evaluator.evaluate(big, small)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluator.evaluate(big, big)


# ----- statistics: cache and precomputed -----


def test_reference_statistics_are_cached_reused_and_invalidated(tmp_path, digits, monkeypatch):
    images, labels = digits
    ref = save_npz(tmp_path / "ref.npz", images[:120], labels[:120])
    evaluator = Evaluator("digits", device="cpu", progress=False, batch_size=50)
    calls = []
    real_features = evaluator.extractor.features
    monkeypatch.setattr(evaluator.extractor, "features", lambda batch: calls.append(len(batch)) or real_features(batch))

    (pool, spatial), (stats, stats_spatial) = evaluator.read_reference(ref)
    assert sum(calls) == 120 and os.path.isfile(stats_cache_path(ref, "digits"))
    assert stats_cache_path(ref, "digits") == str(tmp_path / "ref.stats_digits.npz")
    expected_pool = torch.stack([real_features(images[i : i + 1])[0][0] for i in (0, 57, 119)]).numpy()
    np.testing.assert_allclose(pool[[0, 57, 119]], expected_pool, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.mu, pool.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(pool.T), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats_spatial.sigma, np.cov(spatial.T), rtol=1e-6, atol=1e-9)

    calls.clear()
    (pool2, spatial2), (stats2, stats_spatial2) = evaluator.read_reference(ref)
    assert calls == []  # reused
    np.testing.assert_array_equal(pool2, pool)
    np.testing.assert_array_equal(stats2.sigma, stats.sigma)
    np.testing.assert_array_equal(stats_spatial2.mu, stats_spatial.mu)

    save_npz(ref, images[200:320], labels[200:320])  # same size, new contents and modification time
    os.utime(ref, ns=(os.stat(ref).st_atime_ns, os.stat(ref).st_mtime_ns + 10**9))
    (_, _), (stats3, _) = evaluator.read_reference(ref)
    assert sum(calls) == 120 and not np.allclose(stats3.mu, stats.mu)
    calls.clear()
    save_npz(ref, images[200:300], labels[200:300])  # another size
    evaluator.read_reference(ref)
    assert sum(calls) == 100

    # other weights do not reuse the cache of these
    other = Evaluator("digits", device="cpu", progress=False, pretrained=False)
    other_calls, other_features = [], other.extractor.features
    monkeypatch.setattr(other.extractor, "features", lambda b: other_calls.append(len(b)) or other_features(b))
    other.read_reference(ref)
    assert sum(other_calls) == 100
    # and the cache can be turned off
    calls.clear()
    evaluator.cache = False
    evaluator.read_reference(ref)
    assert sum(calls) == 100


def test_precomputed_statistics_of_a_reference_batch_are_read_with_inception_features(tmp_path, inception):
    stored = dict(mu=np.arange(4.0), sigma=np.eye(4) * 2, mu_s=np.ones(3), sigma_s=np.eye(3) * 5)
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, np.zeros((2, 8, 8, 3), np.uint8), **stored)
    activations = (np.random.default_rng(8).normal(size=(10, 4)), np.random.default_rng(9).normal(size=(10, 3)))
    stats, stats_spatial = inception.read_statistics(str(path), activations)
    for stat, key in ((stats, ""), (stats_spatial, "_s")):
        np.testing.assert_array_equal(stat.mu, stored["mu" + key])
        np.testing.assert_array_equal(stat.sigma, stored["sigma" + key])
    # without them (or with other features, whose statistics they are not) they come from the activations
    np.savez(path, np.zeros((2, 8, 8, 3), np.uint8), mu=stored["mu"], sigma=stored["sigma"])
    _, stats_spatial = inception.read_statistics(str(path), activations)
    np.testing.assert_allclose(stats_spatial.sigma, np.cov(activations[1].T))
    np.savez(path, np.zeros((2, 8, 8, 3), np.uint8), **stored)
    stats, _ = Evaluator("random", device="cpu").read_statistics(str(path), activations)
    np.testing.assert_allclose(stats.mu, activations[0].mean(axis=0))


def test_non_finite_precomputed_statistics_and_pickled_labels_are_refused_naming_file_and_array(tmp_path, inception):
    good = dict(mu=np.zeros(4), sigma=np.eye(4), mu_s=np.zeros(3), sigma_s=np.eye(3))
    activations = (np.zeros((10, 4)), np.zeros((10, 3)))
    for key, bad in (("sigma", np.nan), ("mu_s", np.inf)):
        path = tmp_path / f"ref_{key}.npz"
        arrays = dict(good)
        arrays[key] = arrays[key].copy()
        arrays[key].flat[1] = bad
        np.savez(path, np.zeros((2, 8, 8, 3), np.uint8), **arrays)
        with pytest.raises(ValueError, match=rf"ref_{key}\.npz: {key} holds {bad} values"):
            inception.read_statistics(str(path), activations)
    labels = tmp_path / "labels.npz"
    np.savez(labels, np.zeros((2, 8, 8, 3), np.uint8), np.array([1, "x"], dtype=object))
    with pytest.raises(ValueError, match=r"labels\.npz: arr_1 holds pickled Python objects, which are never loaded"):
        ev.read_labels(str(labels), 2)


# ----- the feature networks -----


@pytest.fixture(scope="module")
def inception():
    return Evaluator("inception", pretrained=False, device="cpu", progress=False)


def test_inception_features_with_random_weights(inception):
    """pool_3 is the average of Mixed_7c, the spatial features are the first 7 channels of Mixed_6d's 1x1
    branch (TF's mixed_6/conv, 17x17) in HWC order, the logits the bias-free 1008-way layer."""
    net = inception.extractor.net
    seen = {}
    hooks = [
        net.Mixed_6d.register_forward_hook(lambda m, i, out: seen.update(mixed_6=out.clone())),
        net.Mixed_7c.register_forward_hook(lambda m, i, out: seen.update(mixed_10=out.clone())),
    ]
    images = np.random.default_rng(10).integers(0, 256, size=(2, 12, 20, 3), dtype=np.uint8)
    try:
        pool, spatial = inception.compute_activations([images])
    finally:
        for hook in hooks:
            hook.remove()
    assert pool.shape == (2, 2048) and spatial.shape == (2, 7 * 17 * 17)
    assert np.isfinite(pool).all() and pool.std() > 0 and spatial.std() > 0
    # the block's output starts with its 1x1 branch (torch.cat([branch1x1, ...]))
    assert seen["mixed_6"].shape == (2, 768, 17, 17)
    np.testing.assert_allclose(spatial[1], seen["mixed_6"][1, :7].permute(1, 2, 0).reshape(-1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(pool, seen["mixed_10"].mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    logits = inception.compute_logits(pool)
    assert logits.shape == (2, 1008)
    np.testing.assert_allclose(logits, pool @ net.fc.weight.numpy().T, rtol=1e-4, atol=1e-5)
    assert inception.compute_inception_score(pool) == pytest.approx(inception_score(logits))


def test_inception_resize_is_tensorflow_1s_bilinear():
    """The graph's ResizeBilinear (align_corners=False, TF1): source = destination * in/out, no half-pixel
    offset, clamped at the last pixel; torch-fidelity's resize, which the extractor runs, does that."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = np.random.default_rng(11).uniform(0, 255, size=(3, 5)).astype(np.float32)
    out_h, out_w = 7, 12
    ys, xs = np.arange(out_h) * (3 / out_h), np.arange(out_w) * (5 / out_w)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, 2), np.minimum(x0 + 1, 4)
    top = x[y0][:, x0] + (x[y0][:, x1] - x[y0][:, x0]) * (xs - x0)
    bottom = x[y1][:, x0] + (x[y1][:, x1] - x[y1][:, x0]) * (xs - x0)
    expected = top + (bottom - top) * (ys - y0)[:, None]
    out = interpolate_bilinear_2d_like_tensorflow1x(
        torch.from_numpy(x)[None, None], size=(out_h, out_w), align_corners=False
    )
    np.testing.assert_allclose(out[0, 0].numpy(), expected, rtol=1e-5)


def test_digits_features_and_classifier(digits):
    images, labels = digits
    evaluator = Evaluator("digits", device="cpu", progress=False)
    pool, spatial = evaluator.compute_activations([images[:300]])
    assert pool.shape == (300, 128) and spatial.shape == (300, 7 * 8 * 8)
    # the head on the pool features is the classifier itself
    net = evaluator.extractor.net
    with torch.no_grad():
        logits = net(fx.digits_input(images[:300], "cpu")).numpy()
    np.testing.assert_allclose(evaluator.compute_logits(pool), logits, rtol=1e-4, atol=1e-4)
    assert evaluator.compute_inception_score(pool) == pytest.approx(inception_score(logits), rel=1e-5)
    # the held-out accuracy of the shipped weights is 0.986; these 300 are mostly training images
    assert evaluator.compute_class_accuracy(pool, labels[:300]) > 0.95
    # other sizes are resized to 16x16: 2x upsampled digits are still recognised
    big = images[:300].repeat(2, axis=1).repeat(2, axis=2)
    big_pool, _ = evaluator.compute_activations([big])
    assert evaluator.compute_class_accuracy(big_pool, labels[:300]) > 0.9


def test_random_projection_features_are_fixed_and_have_no_classifier():
    images = np.random.default_rng(12).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    a, spatial = fx.create_feature_extractor("random").features(images)
    b, _ = fx.create_feature_extractor("random").features(images)
    assert a.shape == (3, 256) and spatial is None
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # at 32x32 it is a plain projection of the pixels in [-1, 1]
    generator = torch.Generator().manual_seed(0)
    projection = torch.randn(3072, 256, generator=generator) / 3072**0.5
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().flatten(1) / 127.5 - 1
    torch.testing.assert_close(a, x @ projection)
    with pytest.raises(ValueError, match="no classifier"):
        Evaluator("random", device="cpu").compute_inception_score(a.numpy())
    with pytest.raises(ValueError, match="unknown features 'vgg'"):
        fx.create_feature_extractor("vgg")


# ----- the Inception weight file -----


def test_missing_inception_weights_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    tried = []

    def offline(url, dst, hash_prefix=None, progress=True):
        tried.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as err:
        Evaluator("inception", device="cpu")
    message = str(err.value)
    cache_dir = os.path.join(str(tmp_path / "torch"), "hub", "checkpoints")
    assert fx.INCEPTION_FILE in message and cache_dir in message and fx.INCEPTION_URLS[0] in message
    assert "--inception_path" in message and "\n" not in message
    assert tried == list(fx.INCEPTION_URLS)
    with pytest.raises(FileNotFoundError, match="not found at /nowhere/w.pth"):
        fx.inception_weights_path("/nowhere/w.pth")


def test_inception_weights_come_from_the_hub_cache_or_a_checked_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache_dir = tmp_path / "torch" / "hub" / "checkpoints"
    downloads = []

    def download(url, dst, hash_prefix=None, progress=True):
        downloads.append((url, dst, hash_prefix))
        open(dst, "wb").close()

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    path = fx.inception_weights_path()
    assert downloads == [(fx.INCEPTION_URLS[0], str(cache_dir / fx.INCEPTION_FILE), "6726825d")]
    assert path == str(cache_dir / fx.INCEPTION_FILE)
    os.remove(path)
    (cache_dir / "pt_inception-2015-12-05-6726825d.pth").touch()  # pytorch-fid's copy of the same weights
    assert fx.inception_weights_path() == str(cache_dir / "pt_inception-2015-12-05-6726825d.pth")
    assert len(downloads) == 1


def test_inception_weights_of_another_network_are_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="do not fit torch-fidelity's Inception-v3.*missing: Conv2d_1a_3x3"):
        fx.InceptionV3Features(str(path))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read Inception weights"):
        fx.InceptionV3Features(str(path))


# ----- end to end -----


def test_cli_with_digits_features_on_a_set_against_itself(tmp_path, digits):
    images, labels = digits
    ref = save_npz(tmp_path / "ref.npz", images[:400], labels[:400])
    result = run_cli(ref, ref, "--features", "digits", "--batch_size", "128", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    metrics = printed_metrics(result.stdout)
    assert set(metrics) == {"Inception Score", "FID", "sFID", "Precision", "Recall", "Class accuracy"}
    assert abs(metrics["FID"]) < 1e-6 and abs(metrics["sFID"]) < 1e-6
    assert metrics["Precision"] == 1.0 and metrics["Recall"] == 1.0
    assert metrics["Class accuracy"] > 0.95
    assert 8 < metrics["Inception Score"] <= 10  # ten balanced classes, confidently told apart
    assert os.path.isfile(tmp_path / "ref.stats_digits.npz")


def test_evaluate_ranks_real_digits_above_noise_and_other_classes(tmp_path, digits):
    images, labels = digits
    ref = save_npz(tmp_path / "ref.npz", images[:500], labels[:500])
    real = save_npz(tmp_path / "real.npz", images[600:1100], labels[600:1100])
    ones = labels[600:] == 1
    only_ones = save_npz(tmp_path / "ones.npz", images[600:][ones], labels[600:][ones])
    noise = save_npz(tmp_path / "noise.npz", np.random.default_rng(13).integers(0, 256, (200, 16, 16, 3), np.uint8))
    options = dict(device="cpu", progress=False)
    good, mode_collapsed, bad = (evaluate(ref, path, "digits", **options) for path in (real, only_ones, noise))
    assert set(good) == {"inception_score", "fid", "sfid", "precision", "recall", "class_accuracy"}
    assert "class_accuracy" not in bad  # no labels
    assert good["fid"] < mode_collapsed["fid"] < bad["fid"] and good["sfid"] < bad["sfid"]
    assert good["class_accuracy"] > 0.95 and mode_collapsed["class_accuracy"] > 0.95
    assert mode_collapsed["inception_score"] < 1.5 < 8 < good["inception_score"]
    assert mode_collapsed["recall"] < 0.3 < 0.6 < good["recall"] and bad["precision"] == 0
    assert evaluate(ref, real, "random", **options)["fid"] < evaluate(ref, noise, "random", **options)["fid"]


def test_cli_with_random_features(tmp_path, digits):
    images, labels = digits
    ref = save_npz(tmp_path / "ref.npz", images[:300])
    sample = save_npz(tmp_path / "sample.npz", images[300:600], labels[300:600])
    result = run_cli(ref, sample, "--features", "random", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    metrics = printed_metrics(result.stdout)
    assert metrics["Inception Score"] is None and metrics["sFID"] is None and "Class accuracy" not in metrics
    assert 0 < metrics["FID"] < 50 and 0.3 < metrics["Precision"] <= 1 and 0.3 < metrics["Recall"] <= 1
    expected = evaluate(ref, sample, "random", device="cpu", progress=False, cache=False)
    assert metrics["FID"] == pytest.approx(expected["fid"], rel=1e-6)
    assert (metrics["Precision"], metrics["Recall"]) == (expected["precision"], expected["recall"])


def test_cli_errors_are_one_line(tmp_path):
    sample = save_npz(tmp_path / "sample.npz", np.zeros((4, 8, 8, 3), np.uint8))
    result = run_cli(sample, sample, "--inception_path", tmp_path / "missing.pth")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"Inception weights not found at {tmp_path / 'missing.pth'}" in result.stderr
    assert fx.INCEPTION_URLS[0] in result.stderr


def test_training_script_is_deterministic_and_holds_out_a_fifth():
    from evaluations.train_digits_classifier import split_indices, train

    train_idx, held_out = split_indices(1797, seed=0)
    assert len(held_out) == 359 and len(set(train_idx) | set(held_out)) == 1797
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script runs it
    try:
        (a, acc_a), (b, acc_b) = train(epochs=1, seed=0), train(epochs=1, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert acc_a == acc_b > 0.3
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key], rtol=0, atol=0)


def test_repeats_evaluate_each_batch_and_summarise_it(tmp_path, digits):
    images, labels = digits
    ref = save_npz(tmp_path / "ref.npz", images[:200], labels[:200])
    sample = save_npz(tmp_path / "sample.npz", images[200:350], labels[200:350])
    parts = [save_npz(tmp_path / f"part{k}.npz", images[200 + 50 * k: 250 + 50 * k], labels[200 + 50 * k: 250 + 50 * k])
             for k in range(3)]
    evaluator = Evaluator("digits", device="cpu", progress=False, cache=False)
    cut = evaluator.evaluate_repeats(ref, [sample], repeats=3)
    for run, part in zip(cut["runs"], parts):  # each batch as if it were its own file
        direct = evaluator.evaluate(ref, part)
        assert run.keys() == direct.keys() and all(run[k] == pytest.approx(direct[k], rel=1e-6) for k in run if run[k] is not None)
    fids = [r["fid"] for r in cut["runs"]]
    assert cut["mean"]["fid"] == pytest.approx(sum(fids) / 3)
    assert cut["std"]["fid"] == pytest.approx((sum((f - sum(fids) / 3) ** 2 for f in fids) / 2) ** 0.5)
    assert cut["min"]["fid"] == min(fids) and cut["min"]["class_accuracy"] == min(r["class_accuracy"] for r in cut["runs"])
    result = run_cli(ref, *parts, "--features", "digits", "--device", "cpu", "--json", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "r.json").read_text())
    assert [r["fid"] for r in written["runs"]] == pytest.approx(fids, rel=1e-6)
    assert written["min"]["fid"] == pytest.approx(min(fids), rel=1e-6)
    assert "mean" in result.stdout and "run 2" in result.stdout
    with pytest.raises(ValueError, match="not both"):
        evaluator.evaluate_repeats(ref, parts, repeats=2)


def test_an_edm2_reference_pickle_gives_the_fid_of_its_statistics(tmp_path, digits, monkeypatch):
    """EDM2's reference statistics (dataset-refs/*.pkl: {"fid": {"mu", "sigma"}, "fd_dinov2": {...}}), read without
    running pickled code: the FID against them equals the FID against the images they are the statistics of;
    precision and recall are n/a (no reference images); statistics of other features are refused in one line. (The
    random features stand in for Inception's under the "fid" key: the same arithmetic, 256 dimensions.)"""
    import pickle

    import evaluations.evaluator as evaluator_module

    monkeypatch.setitem(evaluator_module.EDM2_REFERENCE_KEYS, "random", "fid")
    evaluator = Evaluator("random", device="cpu", progress=False, cache=False)
    ref, sample = save_npz(tmp_path / "ref.npz", digits[0][:300]), save_npz(tmp_path / "sample.npz", digits[0][300:600])
    from_npz = evaluator.read_reference(ref)
    stats = from_npz[1][0]
    with open(tmp_path / "img.pkl", "wb") as f:
        pickle.dump({"fid": {"mu": stats.mu.astype(np.float32), "sigma": stats.sigma}, "fd_dinov2": {"mu": np.zeros(3)}}, f)
    acts = evaluator.read_activations(sample)
    sample_stats = (evaluator.compute_statistics(acts[0]), None)
    from_images = evaluator.metrics(from_npz, acts, sample_stats)
    from_pickle = evaluator.metrics(evaluator.read_reference(str(tmp_path / "img.pkl")), acts, sample_stats)
    assert from_pickle["fid"] == pytest.approx(from_images["fid"], rel=1e-4) and from_images["precision"] is not None
    assert from_pickle["precision"] is None and from_pickle["recall"] is None
    with open(tmp_path / "dino_only.pkl", "wb") as f:
        pickle.dump({"fd_dinov2": {"mu": np.zeros(3), "sigma": np.eye(3)}}, f)
    with pytest.raises(ValueError, match="holds no fid statistics; it has those of --features dinov2"):
        evaluator.read_reference(str(tmp_path / "dino_only.pkl"))
