"""Inception Score, FID, sFID, precision and recall of a sample batch against a reference batch, with the
published evaluator's definitions (openai/consistency_models evaluations/evaluator.py, itself guided-diffusion's),
in PyTorch, on a GPU or the CPU:

    python evaluations/evaluator.py REF.npz SAMPLE.npz [SAMPLE2.npz ...] [--features inception|digits|random|dinov2]
        [--inception_path PATH] [--dinov2_path PATH] [--batch_size N] [--device cpu|cuda] [--repeats K] [--json PATH]

Both files hold `arr_0`, uint8 images (N, H, W, 3) of any size (read in batches, never whole). With
--features inception (the default) the features are those of the TF Inception-v3 graph of 2015-12-05 (see
feature_extractors.py): FID, precision and recall on pool_3, sFID on the first 7 channels of mixed_6/conv,
the Inception Score on its softmax, in splits of 5,000. The reference batch's precomputed `mu`, `sigma`, `mu_s`,
`sigma_s` are used when present (the published reference batches have them). An EDM2 reference pickle
(REF.pkl, NVlabs/edm2's dataset-refs: FID and FD-DINOv2 statistics only, read without running pickled code)
gives the FID (--features inception) or FD_DINOv2 (--features dinov2); precision and recall need reference
images, so are n/a. The reference activations and
statistics are cached beside the reference file (REF.stats_<features>.npz), keyed on its size and
modification time and on the feature network's weights.

With --features digits and a sample batch with `arr_1` labels, the classifier's accuracy on them is printed too.
With --features dinov2 the FID line is FD_DINOv2 (the Frechet distance in DINOv2 ViT-L/14's 1024-d class-token
features; weights dinov2_vitl14_pretrain.pth from the torch hub cache, --dinov2_path, or a download), and precision
and recall are computed in that space too.

Repeated evaluations (EDM2 reports the minimum over repeated draws): several sample files (e.g. image_sample.py
--seeds 0,1,2), or one cut into --repeats K equal batches, are each evaluated; the table gives each metric's mean,
standard deviation (ddof 1) and minimum, and --json PATH writes them with every run's metrics.
"""

import argparse
import json
import os
import warnings
import zipfile
from typing import Iterable, Optional, Tuple

import numpy as np
import torch
from scipy import linalg
from tqdm.auto import tqdm


from cm.atomic import atomic_write, atomic_write_text
from evaluations.feature_extractors import FEATURES, create_feature_extractor

CACHE_FORMAT = 1
NPZ_IMAGES = "uint8 images (N, H, W, 3) in arr_0, as scripts/image_sample.py writes them"


# ----- the statistics and metrics -----


class FIDStatistics:
    """Mean and covariance of a set of activations."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        self.mu = mu
        self.sigma = sigma

    def frechet_distance(self, other, eps=1e-6):
        """The Frechet distance of the two Gaussians (Heusel et al. 2017, as TTUR computes it):
        |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). A non-finite square root of a nearly singular
        product is retried with eps added to both diagonals (with a warning); an imaginary part
        larger than 1e-3 on the diagonal of the root is an error, a smaller one is dropped."""
        mu1, sigma1 = np.atleast_1d(self.mu), np.atleast_2d(self.sigma)
        mu2, sigma2 = np.atleast_1d(other.mu), np.atleast_2d(other.sigma)
        if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
            raise ValueError(
                f"the statistics have different dimensions: mean {mu1.shape} vs {mu2.shape}, "
                f"covariance {sigma1.shape} vs {sigma2.shape} (computed with different feature networks?)"
            )
        diff = mu1 - mu2
        covmean = _sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
            covmean = covmean.real
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(matrix):
    """scipy's matrix square root, without its warning about a (nearly) singular input: the published code
    silenced it too (disp=False), and handles a non-finite or complex result itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(matrix)


def inception_score(logits, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))) within each split of `split_size` consecutive samples, averaged over
    the splits (Salimans et al. 2016; improved-gan's code, as published). From the logits, in float64:
    p log p is 0 where p underflows, instead of the NaN of 0 * log 0."""
    log_p = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).cpu().numpy()
    scores = []
    for i in range(0, len(log_p), split_size):
        part = log_p[i : i + split_size]
        log_marginal = np.log(np.mean(np.exp(part), axis=0, keepdims=True))
        kl = np.mean(np.sum(np.exp(part) * (part - log_marginal), axis=1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


class DistanceBlock:
    """Pairwise squared Euclidean distances between two batches of feature vectors, as published:
    max(|u|^2 - 2 u.v + |v|^2, 0). In float32; with use_fp16 first in float16, falling back to float32
    where that overflows, as the published TF graph does (a speed path for GPUs)."""

    def __init__(self, device=None, use_fp16=False):
        self.device = torch.device(device or "cpu")
        self.use_fp16 = use_fp16

    def _tensor(self, x):
        return torch.as_tensor(np.asarray(x), device=self.device)

    def pairwise_distances(self, U, V):
        """[N1, D] x [N2, D] -> [N1, N2] float32 tensor on the block's device."""
        U, V = self._tensor(U), self._tensor(V)
        if self.use_fp16:
            dist = _squared_distances(U.half(), V.half())
            if torch.isfinite(dist).all():
                return dist.float()
        return _squared_distances(U.float(), V.float())

    def less_thans(self, batch_1, radii_1, batch_2, radii_2):
        """(for each row of batch_1 and each radius column k: is it within radii_2[:, k] of some row of
        batch_2; the same for batch_2 against radii_1), as boolean arrays [N1, K2] and [N2, K1]."""
        dist = self.pairwise_distances(batch_1, batch_2)[..., None]
        batch_1_in = (dist <= self._tensor(radii_2)[None]).any(dim=1)
        batch_2_in = (dist <= self._tensor(radii_1)[:, None]).any(dim=0)
        return batch_1_in.cpu().numpy(), batch_2_in.cpu().numpy()


def _squared_distances(U, V):
    norm_u = U.square().sum(dim=1, keepdim=True)
    norm_v = V.square().sum(dim=1, keepdim=True).T
    return (norm_u - 2 * U @ V.T + norm_v).clamp_min(0)


class ManifoldEstimator:
    """k-nearest-neighbour manifolds of feature vectors (Kynkaanniemi et al. 2019, improved precision and
    recall), as published: a point's radius is its squared distance to its k-th nearest other point of the
    same set; distances are computed in blocks of at most row_batch_size x col_batch_size.

    :param clamp_to_percentile: radii above this percentile are set to 0 (None: keep all, as published).
    :param eps: guards the division of the realism score.
    """

    def __init__(
        self,
        row_batch_size=10000,
        col_batch_size=10000,
        nhood_sizes=(3,),
        clamp_to_percentile=None,
        eps=1e-5,
        device=None,
        use_fp16=False,
    ):
        self.distance_block = DistanceBlock(device, use_fp16)
        self.row_batch_size = row_batch_size
        self.col_batch_size = col_batch_size
        self.nhood_sizes = tuple(nhood_sizes)
        self.num_nhoods = len(self.nhood_sizes)
        self.clamp_to_percentile = clamp_to_percentile
        self.eps = eps

    def manifold_radii(self, features: np.ndarray) -> np.ndarray:
        """[N, K] float32: for each point, the squared distance to its k-th nearest neighbour (itself
        excluded, as the 0th), for each k of nhood_sizes. Each row block keeps only the k+1 smallest
        distances seen so far across the column blocks."""
        num_images, kmax = len(features), max(self.nhood_sizes)
        if num_images <= kmax:
            raise ValueError(f"precision and recall need more than {kmax} images per batch, got {num_images}")
        radii = np.zeros([num_images, self.num_nhoods], dtype=np.float32)
        for begin1 in range(0, num_images, self.row_batch_size):
            rows = features[begin1 : begin1 + self.row_batch_size]
            nearest = None
            for begin2 in range(0, num_images, self.col_batch_size):
                dist = self.distance_block.pairwise_distances(rows, features[begin2 : begin2 + self.col_batch_size])
                if nearest is not None:
                    dist = torch.cat([nearest, dist], dim=1)
                nearest = dist.topk(min(kmax + 1, dist.shape[1]), dim=1, largest=False, sorted=True).values
            radii[begin1 : begin1 + len(rows)] = nearest[:, list(self.nhood_sizes)].cpu().numpy()
        if self.clamp_to_percentile is not None:
            max_distances = np.percentile(radii, self.clamp_to_percentile, axis=0)
            radii[radii > max_distances] = 0
        return radii

    def evaluate(self, features: np.ndarray, radii: np.ndarray, eval_features: np.ndarray):
        """Which of eval_features lie on the manifold of (features, radii): "fraction" (their mean),
        "batch_predictions" [N, K], "max_realism_score" (max over reference points of radius_0 /
        (distance + eps)) and "nearest_indices" (nearest reference point)."""
        num_eval = len(eval_features)
        predictions = np.zeros([num_eval, self.num_nhoods], dtype=np.int32)
        realism = np.zeros([num_eval], dtype=np.float32)
        nearest = np.zeros([num_eval], dtype=np.int32)
        radii_t = torch.as_tensor(radii, device=self.distance_block.device)
        for begin1 in range(0, num_eval, self.row_batch_size):
            end1 = min(begin1 + self.row_batch_size, num_eval)
            rows = eval_features[begin1:end1]
            inside = torch.zeros([end1 - begin1, self.num_nhoods], dtype=torch.bool, device=radii_t.device)
            best_realism = torch.full([end1 - begin1], -float("inf"), device=radii_t.device)
            best_dist = torch.full([end1 - begin1], float("inf"), device=radii_t.device)
            best_index = torch.zeros([end1 - begin1], dtype=torch.long, device=radii_t.device)
            for begin2 in range(0, len(features), self.col_batch_size):
                cols = slice(begin2, begin2 + self.col_batch_size)
                dist = self.distance_block.pairwise_distances(rows, features[cols])
                inside |= (dist[..., None] <= radii_t[cols][None]).any(dim=1)
                best_realism = torch.maximum(best_realism, (radii_t[cols, 0] / (dist + self.eps)).amax(dim=1))
                block_dist, block_index = dist.min(dim=1)
                closer = block_dist < best_dist
                best_dist = torch.where(closer, block_dist, best_dist)
                best_index = torch.where(closer, block_index + begin2, best_index)
            predictions[begin1:end1] = inside.cpu().numpy()
            realism[begin1:end1] = best_realism.cpu().numpy()
            nearest[begin1:end1] = best_index.cpu().numpy()
        return {
            "fraction": float(np.mean(predictions)),
            "batch_predictions": predictions,
            "max_realism_score": realism,
            "nearest_indices": nearest,
        }

    def evaluate_pr(
        self, features_1: np.ndarray, radii_1: np.ndarray, features_2: np.ndarray, radii_2: np.ndarray
    ) -> Tuple[np.ndarray, np.ndarray]:
        """(precision, recall) of set 2 against reference set 1, one value per radius column: precision =
        the fraction of set 2 inside some ball of set 1, recall = the fraction of set 1 inside some ball of set 2."""
        features_1_status = np.zeros([len(features_1), radii_2.shape[1]], dtype=bool)
        features_2_status = np.zeros([len(features_2), radii_1.shape[1]], dtype=bool)
        for begin_1 in range(0, len(features_1), self.row_batch_size):
            end_1 = begin_1 + self.row_batch_size
            for begin_2 in range(0, len(features_2), self.col_batch_size):
                end_2 = begin_2 + self.col_batch_size
                batch_1_in, batch_2_in = self.distance_block.less_thans(
                    features_1[begin_1:end_1], radii_1[begin_1:end_1], features_2[begin_2:end_2], radii_2[begin_2:end_2]
                )
                features_1_status[begin_1:end_1] |= batch_1_in
                features_2_status[begin_2:end_2] |= batch_2_in
        return (
            np.mean(features_2_status.astype(np.float64), axis=0),
            np.mean(features_1_status.astype(np.float64), axis=0),
        )


# ----- reading .npz batches -----


class NpzImageReader:
    """`arr_0` of an .npz file, checked to be uint8 (N, H, W, 3) and read in batches straight from the
    zip member (a 50,000-image 256x256 batch is 9.8 GB). Use as a context manager."""

    def __init__(self, path, name="arr_0"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path} (expected an .npz with {NPZ_IMAGES})")
        self.path, self.name = path, name
        try:
            self._zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile as err:
            raise ValueError(f"{path} is not an .npz file ({err}); expected {NPZ_IMAGES}") from None
        members = [n[: -len(".npy")] for n in self._zip.namelist() if n.endswith(".npy")]
        if name not in members:
            self._zip.close()
            held = ", ".join(members) or "nothing"
            raise ValueError(f"{path} has no {name} (it holds {held}); expected {NPZ_IMAGES}")
        self._file = self._zip.open(f"{name}.npy")
        self._array = None
        header_readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        version = np.lib.format.read_magic(self._file)
        streamable = version in header_readers
        if streamable:
            self.shape, fortran_order, self.dtype = header_readers[version](self._file)
            streamable = not fortran_order and not self.dtype.hasobject
        if not streamable:  # an unusual layout: read it whole
            self._array = read_npz_arrays(path, [name], expected=NPZ_IMAGES)[name]
            self.shape, self.dtype = self._array.shape, self._array.dtype
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] != 3 or self.shape[0] == 0:
            self.close()
            raise ValueError(f"{path}: {name} is {self.dtype} {tuple(self.shape)}; expected {NPZ_IMAGES}")
        self._next = 0

    def __len__(self):
        return self.shape[0]

    def read_batches(self, batch_size):
        """Yields the images in order, batch_size at a time (the last batch may be smaller)."""
        image_bytes = int(np.prod(self.shape[1:]))
        while self._next < self.shape[0]:
            count = min(batch_size, self.shape[0] - self._next)
            if self._array is not None:
                batch = self._array[self._next : self._next + count]
            else:
                data = self._file.read(count * image_bytes)
                if len(data) != count * image_bytes:
                    raise ValueError(f"{self.path}: {self.name} ends early (a truncated file)")
                batch = np.frombuffer(bytearray(data), dtype=np.uint8).reshape(count, *self.shape[1:])
            self._next += count
            yield batch

    def close(self):
        if self._file is not None:
            self._file.close()
        self._zip.close()
        self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_npz_arrays(path, names, expected=None):
    """{name: array} of those of `names` that the .npz at `path` holds; pickled (object) arrays are refused
    in one line naming the file and the array, never loaded."""
    arrays = {}
    with np.load(path, allow_pickle=False) as npz:
        for name in names:
            if name in npz.files:
                try:
                    arrays[name] = npz[name]
                except ValueError:  # numpy's "Object arrays cannot be loaded when allow_pickle=False"
                    raise ValueError(f"{path}: {name} holds pickled Python objects, which are never loaded"
                                     + (f"; expected {expected}" if expected else "")) from None
    return arrays


def read_labels(npz_path, num_images):
    """The integer `arr_1` labels of a sample batch, or None if it has none."""
    labels = read_npz_arrays(npz_path, ["arr_1"], expected=f"{num_images} integer labels").get("arr_1")
    if labels is None:
        return None
    if labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{npz_path}: arr_1 is {labels.dtype} {labels.shape}; expected {num_images} integer labels")
    return labels.astype(np.int64)


# ----- the evaluator -----


class Evaluator:
    """Activations, statistics and metrics with one feature network (the published class, in PyTorch).

    :param features: "inception" (the published evaluator's), "digits" or "random" (see feature_extractors.py).
    :param batch_size: images per forward pass.
    :param device: "cpu", "cuda", "cuda:N" (default: a GPU if there is one).
    :param inception_path: the Inception weight file (default: the torch hub cache, else a download).
    :param pretrained: False: seeded random weights, no file read (tests).
    :param progress: show progress bars.
    :param cache: keep the reference batch's activations and statistics in REF.stats_<features>.npz.
    """

    def __init__(
        self,
        features="inception",
        batch_size=64,
        softmax_batch_size=512,
        device=None,
        inception_path=None,
        pretrained=True,
        progress=True,
        cache=True,
        dinov2_path=None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device} asks for a GPU, but PyTorch sees none here; use --device cpu")
        self.features = features
        self.batch_size = batch_size
        self.softmax_batch_size = softmax_batch_size
        self.progress = progress
        self.cache = cache
        self.extractor = create_feature_extractor(features, self.device, inception_path, pretrained, dinov2_path)
        self.manifold_estimator = ManifoldEstimator(device=self.device)

    def read_activations(self, npz_path: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """(pool, spatial) activations of the images in npz_path (spatial is None for features without one)."""
        with NpzImageReader(npz_path) as reader:
            batches = reader.read_batches(self.batch_size)
            total = -(-len(reader) // self.batch_size)
            return self.compute_activations(tqdm(batches, total=total, disable=not self.progress, unit="batch"))

    def compute_activations(self, batches: Iterable[np.ndarray]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """:param batches: uint8 NHWC arrays. :return: (pool [N, D], spatial [N, S] or None), float32."""
        pools, spatials = [], []
        for batch in batches:
            pool, spatial = self.extractor.features(batch)
            pools.append(pool.reshape(len(pool), -1).cpu().numpy())
            if spatial is not None:
                spatials.append(spatial.reshape(len(spatial), -1).cpu().numpy())
        return np.concatenate(pools), np.concatenate(spatials) if spatials else None

    def read_statistics(self, npz_path: str, activations) -> Tuple[FIDStatistics, Optional[FIDStatistics]]:
        """(pool, spatial) statistics: with the Inception features, a file's precomputed `mu`, `sigma` and
        `mu_s`, `sigma_s` when it has them (as the published reference batches do); else from `activations`.
        Other features ignore precomputed statistics, which are Inception's."""
        pool, spatial = activations
        stored = {}
        if self.features == "inception":
            stored = read_npz_arrays(npz_path, ("mu", "sigma", "mu_s", "sigma_s"))
            for key, array in stored.items():
                if not np.isfinite(array).all():
                    raise ValueError(f"{npz_path}: {key} holds {'nan' if np.isnan(array).any() else 'inf'} values; "
                                     "recompute the precomputed statistics, or remove mu, sigma, mu_s and sigma_s "
                                     "from the file to compute them from its images")
        stats = FIDStatistics(stored["mu"], stored["sigma"]) if "mu" in stored else self.compute_statistics(pool)
        if "mu_s" in stored:
            spatial_stats = FIDStatistics(stored["mu_s"], stored["sigma_s"])
        else:
            spatial_stats = None if spatial is None else self.compute_statistics(spatial)
        return stats, spatial_stats

    def compute_statistics(self, activations: np.ndarray) -> FIDStatistics:
        return FIDStatistics(np.mean(activations, axis=0), np.cov(activations, rowvar=False))

    def read_reference(self, npz_path: str):
        """(activations, statistics) of a reference batch, from its cache file when that is still valid
        (same reference size and modification time, same feature weights), else computed and cached; of an EDM2
        reference pickle (statistics only), ((None, None), statistics)."""
        if npz_path.endswith(".pkl"):
            return (None, None), (read_edm2_reference(npz_path, self.features), None)
        if not os.path.isfile(npz_path):
            raise FileNotFoundError(f"no such file: {npz_path} (expected an .npz with {NPZ_IMAGES})")
        cache_path = stats_cache_path(npz_path, self.features)
        key = self._cache_key(npz_path) if self.cache else None
        cached = load_cache(cache_path, key) if self.cache else None
        if cached is not None:
            return cached
        activations = self.read_activations(npz_path)
        statistics = self.read_statistics(npz_path, activations)
        if self.cache:
            save_cache(cache_path, key, activations, statistics)
        return activations, statistics

    def _cache_key(self, npz_path):
        st = os.stat(npz_path)
        return {
            "format": CACHE_FORMAT,
            "source_size": st.st_size,
            "source_mtime_ns": st.st_mtime_ns,
            "extractor": self.extractor.fingerprint,
        }

    def compute_inception_score(self, activations: np.ndarray, split_size: int = 5000) -> float:
        """The Inception Score of the classifier's softmax on these pool activations (published: split_size 5000)."""
        return inception_score(self.compute_logits(activations), split_size)

    def compute_logits(self, activations: np.ndarray) -> np.ndarray:
        logits = []
        for i in range(0, len(activations), self.softmax_batch_size):
            logits.append(self.extractor.logits(activations[i : i + self.softmax_batch_size]).cpu().numpy())
        return np.concatenate(logits)

    def compute_class_accuracy(self, activations: np.ndarray, labels: np.ndarray) -> float:
        """The fraction of samples the classifier assigns to their label (features whose classes are the labels')."""
        return float(np.mean(self.compute_logits(activations).argmax(axis=1) == labels))

    def compute_prec_recall(self, activations_ref: np.ndarray, activations_sample: np.ndarray) -> Tuple[float, float]:
        radii_1 = self.manifold_estimator.manifold_radii(activations_ref)
        radii_2 = self.manifold_estimator.manifold_radii(activations_sample)
        pr = self.manifold_estimator.evaluate_pr(activations_ref, radii_1, activations_sample, radii_2)
        return float(pr[0][0]), float(pr[1][0])

    def evaluate(self, ref_npz: str, sample_npz: str, log=None) -> dict:
        """The metrics of evaluate(); `log` (e.g. print) receives the published progress lines."""
        log = log or (lambda *args: None)
        log("computing reference batch activations...")
        reference = self.read_reference(ref_npz)
        log("computing sample batch activations...")
        sample_acts = self.read_activations(sample_npz)
        log("computing/reading sample batch statistics...")
        sample_stats = self.read_statistics(sample_npz, sample_acts)
        log("Computing evaluations...")
        return self.metrics(reference, sample_acts, sample_stats, read_labels(sample_npz, len(sample_acts[0])))

    def evaluate_images(self, reference, images: np.ndarray, labels=None) -> dict:
        """The metrics of a batch of uint8 NHWC images (and their labels, or None) held in memory, against a
        reference's (read_reference): those of evaluate() on an .npz of them."""
        batches = (images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size))
        acts = self.compute_activations(batches)
        stats = tuple(None if a is None else self.compute_statistics(a) for a in acts)
        return self.metrics(reference, acts, stats, labels)

    def evaluate_repeats(self, ref_npz: str, sample_npzs, repeats: int = 1, log=None) -> dict:
        """The metrics of each of several sample batches (EDM2 reports the minimum over repeated draws): the
        files in `sample_npzs`, or one file cut into `repeats` equal consecutive parts (a remainder dropped).
        Returns {"runs": [metrics, ...], "mean", "std" (sample standard deviation; None for one run), "min"}."""
        log = log or (lambda *args: None)
        if repeats > 1 and len(sample_npzs) > 1:
            raise ValueError("pass several sample files or --repeats K with one, not both")
        log("computing reference batch activations...")
        reference = self.read_reference(ref_npz)
        runs = []
        for npz in sample_npzs:
            pool, spatial = self.read_activations(npz)
            labels = read_labels(npz, len(pool))
            size = len(pool) // repeats
            if size < 2:
                raise ValueError(f"{npz}: {len(pool)} samples cannot make {repeats} batches of two or more")
            for k in range(repeats):
                part = slice(k * size, (k + 1) * size)
                acts = (pool[part], None if spatial is None else spatial[part])
                stats = (self.compute_statistics(acts[0]), None if spatial is None else self.compute_statistics(acts[1]))
                runs.append(self.metrics(reference, acts, stats, None if labels is None else labels[part]))
        return {"runs": runs, **repeat_summary(runs)}

    def metrics(self, reference, sample_acts, sample_stats, labels=None) -> dict:
        """The metrics of sample activations and statistics against a reference's (read_reference)."""
        (ref_pool, _), (ref_stats, ref_stats_spatial) = reference
        sample_stats, sample_stats_spatial = sample_stats
        has_spatial = sample_stats_spatial is not None and ref_stats_spatial is not None
        precision = recall = None  # (a reference of statistics only has no features to measure them against)
        if ref_pool is not None:
            warn_singular_covariance(len(ref_pool), len(sample_acts[0]), ref_pool.shape[1])
            precision, recall = self.compute_prec_recall(ref_pool, sample_acts[0])
        metrics = {
            "inception_score": (
                self.compute_inception_score(sample_acts[0]) if self.extractor.has_classifier else None
            ),
            "fid": sample_stats.frechet_distance(ref_stats),
            "sfid": sample_stats_spatial.frechet_distance(ref_stats_spatial) if has_spatial else None,
            "precision": precision,
            "recall": recall,
        }
        if self.extractor.predicts_labels and labels is not None:
            metrics["class_accuracy"] = self.compute_class_accuracy(sample_acts[0], labels)
        return metrics


EDM2_REFERENCE_KEYS = {"inception": "fid", "dinov2": "fd_dinov2"}  # NVlabs/edm2 calculate_metrics.py's names


def read_edm2_reference(path, features):
    """The FIDStatistics for `features` in an EDM2 reference pickle (NVlabs/edm2 calculate_metrics.py ref: a dict
    {"fid": {"mu", "sigma"}, "fd_dinov2": {...}}, e.g. dataset-refs/img512.pkl), read without running pickled code."""
    from cm.safe_pickle import safe_load

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path} (an EDM2 reference pickle, e.g. "
                                "https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl)")
    data = safe_load(path)
    key = EDM2_REFERENCE_KEYS.get(features)
    if not isinstance(data, dict) or key not in data:
        held = ", ".join(k for k, v in EDM2_REFERENCE_KEYS.items() if isinstance(data, dict) and v in data)
        raise ValueError(f"{path} holds no {key or features} statistics; it has those of --features {held or 'none'}")
    return FIDStatistics(np.asarray(data[key]["mu"], np.float64), np.asarray(data[key]["sigma"], np.float64))


def warn_singular_covariance(num_reference, num_samples, dim):
    """A warning where a set has no more images than the features have dimensions: its covariance is then
    singular, and the Fréchet distance, though still computed, is biased and unstable."""
    for what, n in (("reference", num_reference), ("sample", num_samples)):
        if n <= dim:
            warnings.warn(f"the {what} set has {n} images, not more than the {dim} feature dimensions: its covariance "
                          f"is singular, so the FID is biased and unstable; use more than {dim} images (the published "
                          "FID: 50,000 samples)", stacklevel=3)


def repeat_summary(runs):
    """{"mean", "std", "min"} of each metric over the runs (std: the sample standard deviation, ddof 1)."""
    summary = {"mean": {}, "std": {}, "min": {}}
    for key in runs[0]:
        values = [r[key] for r in runs]
        if any(v is None for v in values):
            summary["mean"][key] = summary["std"][key] = summary["min"][key] = None
            continue
        summary["mean"][key] = float(np.mean(values))
        summary["std"][key] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        summary["min"][key] = float(np.min(values))
    return summary


# ----- the reference-statistics cache -----


def stats_cache_path(ref_npz, features):
    """REF.stats_<features>.npz beside REF.npz."""
    root = ref_npz[: -len(".npz")] if ref_npz.endswith(".npz") else ref_npz
    return f"{root}.stats_{features}.npz"


def load_cache(path, key):
    """((pool, spatial), (stats, spatial stats)) from a cache file whose key matches, else None."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if {k: npz[k].item() for k in key} != key:
                return None
            spatial = npz["spatial"] if "spatial" in npz.files else None
            stats_spatial = FIDStatistics(npz["mu_s"], npz["sigma_s"]) if "mu_s" in npz.files else None
            return (npz["pool"], spatial), (FIDStatistics(npz["mu"], npz["sigma"]), stats_spatial)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):  # missing, unreadable or of an older layout
        return None


def save_cache(path, key, activations, statistics):
    """Write the cache atomically; a folder that cannot be written only costs the recomputation next time."""
    (pool, spatial), (stats, stats_spatial) = activations, statistics
    arrays = dict(key, pool=pool, mu=stats.mu, sigma=stats.sigma)
    if spatial is not None:
        arrays["spatial"] = spatial
    if stats_spatial is not None:
        arrays.update(mu_s=stats_spatial.mu, sigma_s=stats_spatial.sigma)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    try:
        atomic_write(path, write)
    except OSError as err:
        warnings.warn(f"cannot cache the reference statistics in {path}: {err}")


# ----- the plain function and the command line -----


def evaluate(ref_npz, sample_npz, features="inception", **options):
    """{"inception_score", "fid", "sfid", "precision", "recall"} of sample_npz against ref_npz (None where
    the features have no classifier or no spatial activations), plus "class_accuracy" when the features'
    classes are the labels' and the sample batch has `arr_1` labels. `options` go to Evaluator."""
    return Evaluator(features, **options).evaluate(ref_npz, sample_npz)


def format_metric(value):
    return "n/a" if value is None else value


def repeats_table(result):
    """mean, std and min of each metric over the runs, then each run's value."""
    runs = result["runs"]
    cell = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    head = f"{'metric':16s} {'mean':>10s} {'std':>10s} {'min':>10s}  "
    lines = [head + " ".join(f"{f'run {k}':>10s}" for k in range(len(runs)))]
    for key in runs[0]:
        lines.append(f"{key:16s} {cell(result['mean'][key]):>10s} {cell(result['std'][key]):>10s} "
                     f"{cell(result['min'][key]):>10s}  " + " ".join(f"{cell(r[key]):>10s}" for r in runs))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref_batch", help="path to reference batch npz file")
    parser.add_argument("sample_batch", nargs="+", help="path to sample batch npz file (several: repeated draws)")
    parser.add_argument("--features", default="inception", choices=FEATURES, help="the feature network")
    parser.add_argument("--inception_path", default=None, help="the Inception weight file (default: torch hub cache)")
    parser.add_argument("--dinov2_path", default=None, help="the DINOv2 ViT-L/14 weight file (default: torch hub cache)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: a GPU if there is one)")
    parser.add_argument("--no_cache", action="store_true", help="do not read or write REF.stats_<features>.npz")
    parser.add_argument("--repeats", type=int, default=1, help="cut the sample batch into K equal batches, each evaluated")
    parser.add_argument("--json", default="", help="also write the metrics (and mean, std, min over repeats) here")
    args = parser.parse_args()
    warnings.formatwarning = lambda message, *rest, **kw: f"warning: {message}\n"  # one line, without the source line
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    evaluator = Evaluator(
        args.features,
        batch_size=args.batch_size,
        device=args.device,
        inception_path=args.inception_path,
        dinov2_path=args.dinov2_path,
        cache=not args.no_cache,
    )
    if len(args.sample_batch) > 1 or args.repeats > 1:
        result = evaluator.evaluate_repeats(args.ref_batch, args.sample_batch, args.repeats, log=print)
        print(repeats_table(result))
        if args.json:
            atomic_write_text(args.json, json.dumps(result, indent=2))
        return
    metrics = evaluator.evaluate(args.ref_batch, args.sample_batch[0], log=print)
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=2))
    print("Inception Score:", format_metric(metrics["inception_score"]))
    print("FID:", metrics["fid"])
    print("sFID:", format_metric(metrics["sfid"]))
    print("Precision:", metrics["precision"])
    print("Recall:", metrics["recall"])
    if "class_accuracy" in metrics:
        print("Class accuracy:", metrics["class_accuracy"])


if __name__ == "__main__":
    from cm.cli import run_cli

    run_cli(main)
