"""Training data: image folders, `.npz` sample batches, downsampled-ImageNet `.npz` files, the embedded digits set, and
folders of SD-VAE latents (scripts/encode_latents.py: float32 latents drawn per epoch from each image's stored Gaussian).

`load_data(...)` yields `(images, cond)` forever, as published: float32 NCHW images in [-1, 1] and
`cond = {"y": int64 labels}` with class_cond, else `{}`. Unlike the published loader (each process kept
a fixed slice of the files), every epoch is a seeded permutation of all N images cut into global batches
of world_size * batch_size, and process r takes rows [r*b, (r+1)*b) of each. The random crop and flip of
a sample are fixed by (seed, epoch, index) as well, so one process with batch 2b reads exactly what two
processes with batch b read together.
"""

import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from itertools import count

import blobfile as bf
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import dist_util
from .image_io import save_npz
from .latents import draw_latent

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")
DIGITS_NAME = "digits"
DIGITS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits.npz")
CHECK_PROGRESS_MIN_FILES = 20000  # image folders at least this large show a progress bar while their files are checked
NPZ_LAYOUTS = (
    "arr_0: uint8 images (N, H, W, 3) with optional arr_1: N integer labels (a sample batch), or "
    "data: uint8 (N, 3*S*S) channel-first with labels: N labels counted from 1 (downsampled ImageNet)"
)


def load_data(
    *,
    data_dir,
    batch_size,
    image_size,
    class_cond=False,
    deterministic=False,
    random_crop=False,
    random_flip=True,
    seed=0,
    rank=None,
    world_size=None,
    num_workers=None,
    num_classes=None,
):
    """An endless iterator of this process's `(images, cond)` batches of `batch_size`.

    :param data_dir: an image folder (local or any blobfile URL, searched recursively), a `.npz` file,
        a folder of downsampled-ImageNet `.npz` files, or "digits" (the embedded 8x8 digits, see data/README.md;
        write ./digits for a folder of that name).
    :param class_cond: also yield labels: image files named `CLASS_rest.ext`, or the labels in the npz.
    :param deterministic: no shuffling (every epoch in index order); crops and flips stay random.
    :param seed: epoch e shuffles and augments with a generator seeded `seed + e`.
    :param rank, world_size: this process's place (default: from dist_util).
    :param num_workers: DataLoader worker processes (default: 1 for image files, 0 for in-memory arrays).
    :param num_classes: with class_cond, the labels are checked to lie in 0..num_classes-1 when the data are opened.
    """
    if not data_dir:
        raise ValueError("no training data given: pass --data_dir an image folder, a .npz file, or 'digits'")
    rank = dist_util.get_rank() if rank is None else rank
    world_size = dist_util.get_world_size() if world_size is None else world_size
    dataset = open_dataset(data_dir, image_size, class_cond, random_crop, random_flip)
    if isinstance(dataset, ImageFileDataset):  # each process checks its share of the files
        progress = rank == 0 and len(dataset) >= CHECK_PROGRESS_MIN_FILES
        check_image_files(dataset.paths[rank::world_size], progress)
    if class_cond and num_classes is not None:
        check_labels(dataset.labels, num_classes, data_dir)
    sampler = GlobalBatchSampler(len(dataset), batch_size, rank, world_size, seed, shuffle=not deterministic)
    if num_workers is None:
        num_workers = 1 if isinstance(dataset, ImageFileDataset) else 0
    # one endless pass (the sampler never ends): workers start once and never restart, so
    # persistent_workers has nothing to add; batches come back in sampler order whatever the timing
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        # the loader draws its workers' base seed from this generator, not from torch's global one
        generator=torch.Generator().manual_seed(seed),
    )
    return BatchStream(loader, sampler)


class BatchStream:
    """The loader's batches (endless, as its sampler is); an unreadable image is raised here, in the main
    process, as its one-line error rather than wrapped in a worker's traceback. `skip(n)` before the
    first batch starts the stream n global batches in (a resumed training run), without reading them."""

    def __init__(self, loader, sampler):
        self.loader, self.sampler = loader, sampler
        self._iterator = None

    def skip(self, num_batches):
        if self._iterator is not None:
            raise RuntimeError("skip() must come before the first batch is read")
        self.sampler.start_batch = num_batches

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = iter(self.loader)
        batch = next(self._iterator)
        if isinstance(batch, UnreadableImage):
            raise ValueError(batch.message)
        return batch


def open_dataset(data_dir, image_size, class_cond=False, random_crop=False, random_flip=True):
    """The Dataset behind `data_dir` (see load_data); items are keyed by (index, sample_seed)."""
    augment = dict(image_size=image_size, random_crop=random_crop, random_flip=random_flip)
    if latent_dataset_info(data_dir) is not None:
        return LatentDataset(data_dir, class_cond)
    if data_dir == DIGITS_NAME:
        images, labels = load_digits_arrays(image_size)
        return ArrayDataset(images, labels if class_cond else None, **augment)
    if not bf.exists(data_dir):
        raise FileNotFoundError(f"data_dir not found: {data_dir} (pass --data_dir an existing folder or .npz file)")
    if not bf.isdir(data_dir):
        images, labels = load_npz(data_dir)
        return ArrayDataset(images, _require_labels(labels, data_dir) if class_cond else None, **augment)
    paths = list_image_files(data_dir)
    if paths:
        return ImageFileDataset(paths, labels_from_file_names(paths) if class_cond else None, **augment)
    npz_paths = list_npz_files(data_dir)
    if not npz_paths:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) or .npz files under {data_dir}; "
            "point --data_dir at the folder that holds them"
        )
    images, labels = concatenate_npz([load_npz(path) for path in npz_paths])
    return ArrayDataset(images, _require_labels(labels, data_dir) if class_cond else None, **augment)


# ----- SD-VAE latents (scripts/encode_latents.py) -----

LATENTS_KIND = "sd-vae-latents"
LATENTS_INFO = "dataset.json"


def latent_dataset_info(data_dir):
    """The description of a latent folder written by scripts/encode_latents.py (its dataset.json), or None for any
    other data: {"kind", "vae", "resolution", "channels", "size", "count", "shards": [[file, labels file, n], ...]}."""
    path = os.path.join(str(data_dir), LATENTS_INFO)
    if data_dir == DIGITS_NAME or not os.path.isfile(path):
        return None
    with open(path) as f:
        info = json.load(f)
    return info if isinstance(info, dict) and info.get("kind") == LATENTS_KIND else None


class LatentDataset(Dataset):
    """Item (index, sample_seed): a float32 [C x h x w] latent drawn from image `index`'s stored Gaussian with noise
    from sample_seed (a new draw each epoch, the same after resumption), scaled as EDM2 scales them; and its label."""

    def __init__(self, folder, class_cond):
        info = latent_dataset_info(folder)
        if info is None or info.get("count") != sum(n for _, _, n in info.get("shards", [])):
            raise ValueError(f"{folder} holds no complete latent dataset; finish it with scripts/encode_latents.py")
        self.arrays = [np.load(os.path.join(folder, name), mmap_mode="r") for name, _, _ in info["shards"]]
        self.labels = np.concatenate([np.load(os.path.join(folder, name)) for _, name, _ in info["shards"]])
        if not class_cond:
            self.labels = None
        elif (self.labels < 0).any():
            raise ValueError(f"{folder} was encoded without labels; pass --class_cond False")
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, key):
        index, sample_seed = key
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        mean_std = self.arrays[shard][index - self.starts[shard]]
        noise = np.random.default_rng(sample_seed).standard_normal((mean_std.shape[0] // 2, *mean_std.shape[1:]),
                                                                   dtype=np.float32)
        return draw_latent(mean_std, noise), None if self.labels is None else self.labels[index]


# ----- sources -----


def check_labels(labels, num_classes, source):
    """Labels in 0..num_classes-1, or one ValueError naming the range found and the fix."""
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{source} has labels {low}..{high} ({len(np.unique(labels))} classes), outside 0..{num_classes - 1} of "
            f"--num_classes {num_classes}; pass --num_classes {high + 1} if they are right"
            + (", or relabel them from 0" if low < 0 else "")
        )


def check_image_file(path):
    """None if the file reads as an image, else the one-line message naming it. Cheap when the file is
    plainly whole: a PNG whose chunks' CRCs check through IEND (verify(), no decoding), a JPEG that ends with
    its end-of-image marker; any other file is decoded as training reads it (so a valid file is never refused)."""
    try:
        with bf.BlobFile(path, "rb") as f:
            image = Image.open(f)
            if image.format == "PNG":
                image.verify()
                return None
            if image.format == "JPEG":
                f.seek(-2, os.SEEK_END)
                if f.read(2) == b"\xff\xd9":
                    return None
    except (OSError, SyntaxError, ValueError):
        pass
    image = read_image(path)
    return image.message if isinstance(image, UnreadableImage) else None


def check_image_files(paths, progress=False):
    """One ValueError naming the first of `paths` that check_image_file refuses; the files are read in threads."""
    with ThreadPoolExecutor() as pool, tqdm(total=len(paths), desc="checking images", unit="file",
                                            disable=not progress) as bar:
        chunk = 4096  # a bounded number of pending reads
        for start in range(0, len(paths), chunk):
            for message in pool.map(check_image_file, paths[start : start + chunk]):
                if message:
                    pool.shutdown(cancel_futures=True)
                    raise ValueError(message)
                bar.update()


def read_image(path):
    """The decoded PIL image at `path`, or an UnreadableImage naming it."""
    try:
        with bf.BlobFile(path, "rb") as f:
            image = Image.open(f)
            image.load()
    except (OSError, SyntaxError, ValueError) as err:
        return UnreadableImage(f"cannot read image {path} ({err}); delete or replace the file")
    return image


def list_image_files(data_dir):
    """Image files under data_dir, recursively, each folder in sorted order (as published)."""
    paths = []
    for entry in sorted(bf.listdir(data_dir)):
        path = bf.join(data_dir, entry)
        if "." in entry and entry.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
            paths.append(path)
        elif bf.isdir(path):
            paths.extend(list_image_files(path))
    return paths


def list_npz_files(data_dir):
    """The `.npz` files directly in data_dir, in natural order (batch_2 before batch_10)."""
    names = [name for name in bf.listdir(data_dir) if name.lower().endswith(".npz")]
    return [bf.join(data_dir, name) for name in sorted(names, key=_natural_key)]


def _natural_key(name):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def labels_from_file_names(paths):
    """Class = the file name before its first "_"; class names sorted and numbered 0..K-1 (as published)."""
    names = [bf.basename(path) for path in paths]
    unlabelled = [name for name in names if "_" not in name]
    if unlabelled:
        raise ValueError(
            f"class_cond needs labelled files, but {unlabelled[0]} has no class prefix: "
            "name image files CLASS_anything.ext, or pass --class_cond False"
        )
    classes = [name.split("_")[0] for name in names]
    class_index = {name: i for i, name in enumerate(sorted(set(classes)))}
    return np.array([class_index[name] for name in classes], dtype=np.int64)


def load_npz(path):
    """(images, labels or None) of a sample batch or downsampled-ImageNet `.npz`; see NPZ_LAYOUTS."""
    try:
        return _load_npz(path)
    except ValueError as err:
        if "allow_pickle" not in str(err):
            raise
        _bad_npz(path, "it holds pickled Python objects, which are never loaded")


def _load_npz(path):
    with bf.BlobFile(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
        if "arr_0" in npz:
            images = npz["arr_0"]
            labels = npz["arr_1"] if "arr_1" in npz else None
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                _bad_npz(path, f"arr_0 is {images.dtype} {images.shape}")
        elif "data" in npz:
            images = ImageChunks([_channel_first_images(npz["data"], path)])
            labels = npz["labels"] - 1 if "labels" in npz else None
        else:
            _bad_npz(path, f"keys {sorted(npz.files)}")
    if labels is not None and (labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer)):
        _bad_npz(path, f"{len(images)} images but labels are {labels.dtype} {labels.shape}")
    return images, None if labels is None else labels.astype(np.int64)


def _channel_first_images(data, path):
    """Downsampled-ImageNet rows (N, 3*S*S) -> a (N, 3, S, S) view (kept channel-first to save memory)."""
    side = math.isqrt(data.shape[-1] // 3) if data.ndim == 2 else 0
    if data.dtype != np.uint8 or side == 0 or data.shape[1] != 3 * side * side:
        _bad_npz(path, f"data is {data.dtype} {data.shape}")
    return data.reshape(len(data), 3, side, side)


def _bad_npz(path, found):
    raise ValueError(f"{path}: {found}; expected {NPZ_LAYOUTS}")


def _require_labels(labels, source):
    if labels is None:
        raise ValueError(
            f"class_cond needs labels, but {source} has none: add arr_1 (N integer labels) to the npz, "
            "or pass --class_cond False"
        )
    return labels


def load_digits_arrays(image_size=16):
    """The embedded digits as (uint8 NHWC images of image_size, int64 labels 0..9).

    The stored 8x8 images (values 0..16, ink high) become 16x16 gray-as-RGB by value*255/16 and PIL
    bilinear upsampling, then go through center_crop_arr when image_size is not 16.
    """
    with np.load(DIGITS_PATH) as npz:
        small, labels = npz["images"], npz["labels"].astype(np.int64)
    images = []
    for digit in np.round(small.astype(np.float64) * 255 / 16).astype(np.uint8):
        gray = Image.fromarray(digit).resize((16, 16), resample=Image.BILINEAR)
        images.append(center_crop_arr(gray.convert("RGB"), image_size))
    return np.stack(images), labels


def concatenate_npz(images_and_labels):
    """One (images, labels or None) from several load_npz results, without copying the images."""
    images, labels = zip(*images_and_labels)
    chunks = []
    for part in images:
        chunks.extend(part.chunks if isinstance(part, ImageChunks) else [part.transpose(0, 3, 1, 2)])
    merged_labels = None if any(part is None for part in labels) else np.concatenate(labels)
    return ImageChunks(chunks), merged_labels


class ImageChunks:
    """Several (N_k, 3, S, S) uint8 arrays read as one sequence of HWC images, without copying them."""

    def __init__(self, chunks):
        self.chunks = chunks
        self.starts = np.cumsum([0] + [len(chunk) for chunk in chunks])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, index):
        chunk = np.searchsorted(self.starts, index, side="right") - 1
        return self.chunks[chunk][index - self.starts[chunk]].transpose(1, 2, 0)


# ----- datasets, sampler, batches -----


class UnreadableImage:
    """Stands in for an image file that cannot be decoded, through collate to load_data."""

    def __init__(self, message):
        self.message = message


class AugmentedDataset(Dataset):
    """Item (index, sample_seed): image `index` cropped to image_size (random crop and flip drawn from
    sample_seed) as uint8 HWC, or an UnreadableImage; and its label (or None)."""

    def __init__(self, labels, image_size, random_crop, random_flip):
        self.labels = labels
        self.image_size = image_size
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __getitem__(self, key):
        index, sample_seed = key
        rng = np.random.default_rng(sample_seed)
        image = self.pil_image(index)
        if isinstance(image, UnreadableImage):
            return image, None
        if self.random_crop:
            arr = random_crop_arr(image, self.image_size, rng)
        else:
            arr = center_crop_arr(image, self.image_size)
        if self.random_flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return np.ascontiguousarray(arr), None if self.labels is None else self.labels[index]

    def pil_image(self, index):
        raise NotImplementedError


class ImageFileDataset(AugmentedDataset):
    """Image files, decoded and converted to RGB when read."""

    def __init__(self, paths, labels, **augment):
        super().__init__(labels, **augment)
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def pil_image(self, index):
        path = self.paths[index]
        image = read_image(path)
        if isinstance(image, UnreadableImage):
            return image
        try:
            return to_rgb8(image)
        except ValueError as err:
            return UnreadableImage(f"cannot read image {path}: {err}; convert it to 8-bit RGB")


PLAIN_MODES = ("1", "L", "P", "RGB", "CMYK", "YCbCr", "HSV")  # PIL's own conversion to RGB is what they mean
ALPHA_MODES = ("LA", "PA", "RGBA")
WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit gray (a 32-bit "I" image on the same scale)


def to_rgb8(image):
    """The 8-bit RGB image a PIL image of any mode means, or ValueError naming the mode. PIL's
    convert("RGB") alone clips 16-bit gray to white, turns float gray in [0, 1] black, keeps LAB's numbers
    as if RGB and drops alpha; here wide gray is scaled (65535 -> 255, float 1.0 -> 255), LAB goes through
    a colour transform, and transparent pixels are composited over white."""
    mode = image.mode
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in PLAIN_MODES:
        return image.convert("RGB")
    if mode in ALPHA_MODES:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:] / 255
        return _rgb_image(rgba[..., :3] * alpha + 255 * (1 - alpha))
    if mode in WIDE_GRAY_MODES or mode == "F":
        gray = np.asarray(image, dtype=np.float64)
        top = 1.0 if mode == "F" else 65535.0
        if not np.isfinite(gray).all() or gray.min() < 0 or gray.max() > top:
            raise ValueError(f"its {mode} gray values span {gray.min():g}..{gray.max():g}, outside 0..{top:g}")
        return _rgb_image(np.repeat(gray[..., None] * (255 / top), 3, axis=-1))
    if mode == "LAB":
        from PIL import ImageCms

        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        return ImageCms.applyTransform(image, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    known = ", ".join(PLAIN_MODES + ALPHA_MODES + WIDE_GRAY_MODES + ("F", "LAB"))
    raise ValueError(f"PIL mode {mode} is not read (modes read: {known})")


def _rgb_image(values):
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "RGB")


class ArrayDataset(AugmentedDataset):
    """uint8 NHWC images held in memory (any sequence of HWC arrays)."""

    def __init__(self, images, labels, **augment):
        super().__init__(labels, **augment)
        self.images = images

    def __len__(self):
        return len(self.images)

    def pil_image(self, index):
        return Image.fromarray(np.ascontiguousarray(self.images[index]))


class GlobalBatchSampler:
    """This process's index lists, forever: epoch e permutes all N indices with a generator seeded
    seed + e (identity order if not shuffle), cuts global batches of world_size * batch_size (dropping
    the incomplete last one), and keeps rows [rank*b, (rank+1)*b) of each. Every index comes with a
    sample seed drawn from the same generator, which fixes its crop and flip in that epoch."""

    def __init__(self, num_items, batch_size, rank, world_size, seed=0, shuffle=True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.global_batch = world_size * batch_size
        if num_items < self.global_batch:
            raise ValueError(
                f"one global batch needs {self.global_batch} images (batch_size {batch_size} x {world_size} "
                f"processes) but the data has {num_items}: lower --batch_size or add data"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.start_batch = 0  # global batches to pass over before the first one yielded

    def epoch_plan(self, epoch):
        """(order of the N indices, sample seed of each index) for this epoch."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_items, generator=generator) if self.shuffle else torch.arange(self.num_items)
        sample_seeds = torch.randint(0, 2**62, (self.num_items,), generator=generator)
        return order.tolist(), sample_seeds.tolist()

    def __iter__(self):
        first = self.rank * self.batch_size
        per_epoch = self.num_items // self.global_batch
        start_epoch, skip_in_epoch = divmod(self.start_batch, per_epoch)
        for epoch in count(start_epoch):
            order, sample_seeds = self.epoch_plan(epoch)
            begin = skip_in_epoch * self.global_batch if epoch == start_epoch else 0
            for start in range(begin, per_epoch * self.global_batch, self.global_batch):
                rows = order[start + first : start + first + self.batch_size]
                yield [(index, sample_seeds[index]) for index in rows]


def collate(samples):
    """[(uint8 HWC image, label or None)] -> (float32 NCHW in [-1, 1], {"y": int64 labels} or {}) (float32 CHW
    latents are stacked as they are), or the first UnreadableImage among them."""
    images, labels = zip(*samples)
    for image in images:
        if isinstance(image, UnreadableImage):
            return image
    if images[0].dtype == np.float32:  # latents, already CHW and scaled
        batch = torch.from_numpy(np.stack(images))
    else:
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1
    return batch, {} if labels[0] is None else {"y": torch.tensor(np.array(labels), dtype=torch.int64)}


# ----- resizing (as published) -----


def center_crop_arr(pil_image, image_size):
    """Halve with BOX while the short side is at least 2*image_size, scale the short side to image_size
    with BICUBIC, crop the center: a uint8 HWC array."""
    pil_image = _resize_short_side(pil_image, image_size)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def random_crop_arr(pil_image, image_size, rng, min_crop_frac=0.8, max_crop_frac=1.0):
    """Scale the short side to a size drawn uniformly from [image_size/max_crop_frac, image_size/min_crop_frac]
    (rounded up), as center_crop_arr does, and crop at a random place."""
    short_side = rng.integers(math.ceil(image_size / max_crop_frac), math.ceil(image_size / min_crop_frac) + 1)
    arr = np.asarray(_resize_short_side(pil_image, int(short_side)))
    top = rng.integers(arr.shape[0] - image_size + 1)
    left = rng.integers(arr.shape[1] - image_size + 1)
    return arr[top : top + image_size, left : left + image_size]


def _resize_short_side(pil_image, short_side):
    while min(*pil_image.size) >= 2 * short_side:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = short_side / min(*pil_image.size)
    return pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)


def digits_reference_sets(folder):
    """(digits_ref.npz, [digits_half_0.npz, digits_half_1.npz]) in `folder`, written once: all 1,797 digits (the
    reference batch of the digits evaluations) and its alternate halves (what real data score against real)."""
    ref = os.path.join(folder, "digits_ref.npz")
    halves = [os.path.join(folder, f"digits_half_{k}.npz") for k in (0, 1)]
    if not all(os.path.exists(p) for p in [ref, *halves]):
        images, labels = load_digits_arrays()
        for path, rows in ((ref, slice(None)), (halves[0], slice(0, None, 2)), (halves[1], slice(1, None, 2))):
            if not os.path.exists(path):
                save_npz(path, images[rows], labels[rows])
    return ref, halves
