"""The training data pipeline: sources, resizing, labels, sharding across processes, and its errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from cm import image_datasets
from cm.image_datasets import load_data, load_digits_arrays, to_rgb8


def solid(value, size=(12, 10)):
    """A W x H RGB image of one colour (value, 255 - value, 7)."""
    return Image.new("RGB", size, (value, 255 - value, 7))


def to_input(arr):
    """uint8 HWC / NHWC -> what load_data yields for it, computed independently."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t.permute(2, 0, 1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return t.float() / 127.5 - 1


def batches(n, **kw):
    kw.setdefault("num_workers", 0)
    data = load_data(**kw)
    return [next(data) for _ in range(n)]


def write_npz(path, images, labels=None):
    np.savez(path, *([images] if labels is None else [images, labels]))
    return str(path)


def noise_images(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_folder_order_labels_range_and_dtype(tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    files = {"b_1.png": 10, "a_2.PNG": 250, "sub/c_0.gif": 0, "sub/deep/a_9.png": 255, "sub/dog.png": 99}
    for name, value in files.items():
        solid(value).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    # sorted listdir, recursively: a_2, b_1, sub/c_0, sub/deep/a_9, sub/dog
    images, cond = batches(1, data_dir=str(tmp_path), batch_size=5, image_size=8, deterministic=True,
                           random_flip=False)[0]
    assert images.dtype == torch.float32 and images.shape == (5, 3, 8, 8) and cond == {}
    assert images.min() == -1 and images.max() == 1
    red = ((images[:, 0, 0, 0] + 1) * 127.5).round().tolist()
    assert red == [250, 10, 0, 255, 99]

    (tmp_path / "sub" / "dog.png").rename(tmp_path / "sub" / "dog_3.png")
    _, cond = batches(1, data_dir=str(tmp_path), batch_size=5, image_size=8, deterministic=True,
                      class_cond=True)[0]
    # classes a, b, c, dog -> 0, 1, 2, 3
    assert cond["y"].dtype == torch.int64 and cond["y"].tolist() == [0, 1, 2, 0, 3]


def test_center_crop_matches_pil_box_then_bicubic(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    # 70x40 to 16: short side 40 >= 32 so BOX-halve to 35x20, BICUBIC to round(35*0.8) x 16 = 28x16, crop x 6..22
    expected = Image.fromarray(arr).resize((35, 20), resample=Image.BOX).resize((28, 16), resample=Image.BICUBIC)
    expected = np.asarray(expected)[:, 6:22]
    images, _ = batches(1, data_dir=str(tmp_path), batch_size=1, image_size=16, random_flip=False)[0]
    assert torch.equal(images[0], to_input(expected))


def test_npz_sample_batch_with_and_without_resizing(tmp_path):
    images = noise_images(3, size=8)
    path = write_npz(tmp_path / "b.npz", images, np.array([4, 0, 9]))
    x, cond = batches(1, data_dir=path, batch_size=3, image_size=8, class_cond=True, deterministic=True,
                      random_flip=False)[0]
    assert torch.equal(x, to_input(images)) and cond["y"].tolist() == [4, 0, 9]
    # 8x8 to 4: BOX-halve once, then a same-size bicubic resize (no change)
    x, _ = batches(1, data_dir=path, batch_size=3, image_size=4, deterministic=True, random_flip=False)[0]
    halved = np.stack([np.asarray(Image.fromarray(im).resize((4, 4), resample=Image.BOX)) for im in images])
    assert torch.equal(x, to_input(halved))


def test_downsampled_imagenet_files_and_folder(tmp_path):
    images = noise_images(7, size=8, seed=2)
    labels = np.array([1, 5, 1000, 3, 2, 2, 7])  # counted from 1
    rows = images.transpose(0, 3, 1, 2).reshape(7, -1)  # channel-first rows, as the format stores them
    np.savez(tmp_path / "one.npz", data=rows, labels=labels)
    x, cond = batches(1, data_dir=str(tmp_path / "one.npz"), batch_size=7, image_size=8, class_cond=True,
                      deterministic=True, random_flip=False)[0]
    assert torch.equal(x, to_input(images)) and cond["y"].tolist() == (labels - 1).tolist()

    folder = tmp_path / "train"
    folder.mkdir()
    for name, part in [("train_data_batch_10.npz", [5, 6]), ("train_data_batch_1.npz", [0, 1]),
                       ("train_data_batch_2.npz", [2, 3, 4])]:
        np.savez(folder / name, data=rows[part], labels=labels[part])
    x, cond = batches(1, data_dir=str(folder), batch_size=7, image_size=8, class_cond=True, deterministic=True,
                      random_flip=False)[0]
    assert torch.equal(x, to_input(images)) and cond["y"].tolist() == (labels - 1).tolist()


def test_digits():
    images, labels = load_digits_arrays()
    assert images.shape == (1797, 16, 16, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and sorted(set(labels.tolist())) == list(range(10))
    assert all(170 <= n <= 190 for n in np.bincount(labels))
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()
    # bright ink on a dark background: the side columns are nearly empty, the centre is inked,
    # and every digit has bright strokes
    assert images[:, :, :2].mean() < 10 and images[:, :, -2:].mean() < 10
    assert images[:, 6:10, 6:10].mean() > 100 and images.max(axis=(1, 2, 3)).min() > 150
    x, cond = batches(1, data_dir="digits", batch_size=8, image_size=8, class_cond=True)[0]
    assert x.shape == (8, 3, 8, 8) and cond["y"].shape == (8,)


def test_global_batches_are_seeded_permutations(tmp_path):
    # labels = indices, so the yielded labels show which samples each batch holds
    path = write_npz(tmp_path / "d.npz", noise_images(10), np.arange(10))
    got = [cond["y"].tolist() for _, cond in batches(4, data_dir=path, batch_size=4, image_size=8, class_cond=True,
                                                     seed=3)]
    for epoch in (0, 1):
        order = torch.randperm(10, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        assert got[2 * epoch : 2 * epoch + 2] == [order[:4], order[4:8]]  # last 2 of each epoch dropped
    ordered = [cond["y"].tolist() for _, cond in batches(3, data_dir=path, batch_size=4, image_size=8,
                                                         class_cond=True, deterministic=True)]
    assert ordered == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]


@pytest.mark.parametrize("random_crop", [False, True])
def test_two_processes_read_what_one_process_reads(tmp_path, random_crop):
    path = write_npz(tmp_path / "d.npz", noise_images(11), np.arange(11))
    kw = dict(data_dir=path, image_size=8, class_cond=True, random_crop=random_crop, seed=5)
    whole = batches(7, batch_size=4, world_size=1, rank=0, **kw)  # 2 global batches an epoch: 3 epochs
    halves = [batches(7, batch_size=2, world_size=2, rank=r, **kw) for r in (0, 1)]
    for (x, cond), (x0, cond0), (x1, cond1) in zip(whole, *halves):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(cond["y"], torch.cat([cond0["y"], cond1["y"]]))
    # the augmentation happened
    plain = to_input(np.load(path)["arr_0"])
    rows = [(row, plain[i]) for x, cond in whole for row, i in zip(x, cond["y"].tolist())]
    if random_crop:
        assert any(not torch.equal(row, ref) for row, ref in rows)
    else:
        flipped = sum(torch.equal(row, ref.flip(-1)) for row, ref in rows)
        unflipped = sum(torch.equal(row, ref) for row, ref in rows)
        assert flipped + unflipped == len(rows) and 0 < flipped < len(rows)


def test_workers_give_the_same_batches(tmp_path):
    for i in range(6):
        Image.fromarray(noise_images(1, size=10, seed=i)[0]).save(tmp_path / f"c{i % 2}_{i}.png")
    kw = dict(data_dir=str(tmp_path), batch_size=2, image_size=8, class_cond=True, random_crop=True)
    for (x, cond), (xw, condw) in zip(batches(5, **kw), batches(5, num_workers=1, **kw)):
        assert torch.equal(x, xw) and torch.equal(cond["y"], condw["y"])


def test_global_random_state_is_untouched(tmp_path):
    state = torch.get_rng_state()
    next(load_data(data_dir="digits", batch_size=2, image_size=16))
    assert torch.equal(torch.get_rng_state(), state)


def error_cases(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a_1.png").write_bytes(b"not a png")
    (tmp_path / "unlabelled").mkdir()
    solid(3).save(tmp_path / "unlabelled" / "cat.png")
    write_npz(tmp_path / "nolabels.npz", noise_images(4))
    write_npz(tmp_path / "gray.npz", noise_images(4)[..., 0])
    write_npz(tmp_path / "float.npz", noise_images(4).astype(np.float32))
    np.savez(tmp_path / "other.npz", pictures=noise_images(4))
    write_npz(tmp_path / "twenty.npz", noise_images(4), np.array([0, 19, 3, 4]))
    write_npz(tmp_path / "negative.npz", noise_images(4), np.array([0, -1, 3, 4]))
    np.savez(tmp_path / "objects.npz", np.array([noise_images(1)[0], "x"], dtype=object))
    (tmp_path / "prefixes").mkdir()
    for k in range(12):
        solid(k).save(tmp_path / "prefixes" / f"c{k:02d}_0.png")
    return [
        (dict(data_dir=str(tmp_path / "twenty.npz"), class_cond=True, num_classes=10), ValueError,
         r"twenty.npz has labels 0..19 \(4 classes\), outside 0..9 of --num_classes 10; pass --num_classes 20"),
        (dict(data_dir=str(tmp_path / "negative.npz"), class_cond=True, num_classes=10), ValueError,
         r"labels -1..4 .*relabel them from 0"),
        (dict(data_dir=str(tmp_path / "prefixes"), class_cond=True, num_classes=10), ValueError,
         r"labels 0..11 \(12 classes\).*--num_classes 12"),
        (dict(data_dir=str(tmp_path / "objects.npz")), ValueError, r"objects.npz: it holds pickled Python objects"),
        (dict(data_dir=""), ValueError, "pass --data_dir"),
        (dict(data_dir=str(tmp_path / "broken"), batch_size=1), ValueError, "^cannot read image .*broken/a_1.png.*delete or replace"),
        (dict(data_dir=str(tmp_path / "nowhere")), FileNotFoundError, "data_dir not found: .*nowhere"),
        (dict(data_dir=str(tmp_path / "empty")), FileNotFoundError, "no images .* under .*empty"),
        (dict(data_dir=str(tmp_path / "unlabelled"), class_cond=True), ValueError, "cat.png has no class prefix.*CLASS_"),
        (dict(data_dir=str(tmp_path / "nolabels.npz"), class_cond=True), ValueError, "nolabels.npz has none.*arr_1"),
        (dict(data_dir=str(tmp_path / "gray.npz")), ValueError, r"gray.npz: arr_0 is uint8 \(4, 8, 8\).*\(N, H, W, 3\)"),
        (dict(data_dir=str(tmp_path / "float.npz")), ValueError, r"float.npz: arr_0 is float32.*uint8"),
        (dict(data_dir=str(tmp_path / "other.npz")), ValueError, r"keys \['pictures'\].*arr_0"),
        (dict(data_dir=str(tmp_path / "nolabels.npz"), world_size=2, rank=0), ValueError,
         r"needs 6 images \(batch_size 3 x 2 processes\) but the data has 4"),
    ]


def test_errors_name_the_problem_and_the_fix(tmp_path):
    for kw, error, message in error_cases(tmp_path):
        with pytest.raises(error, match=message):
            load_data(**{"batch_size": 3, "image_size": 8, **kw})
    for workers in (0, 1):
        # a file that breaks after the data were opened is still named when its batch comes
        (tmp_path / f"later{workers}").mkdir()
        solid(3).save(tmp_path / f"later{workers}" / "a_1.png")
        data = load_data(data_dir=str(tmp_path / f"later{workers}"), batch_size=1, image_size=8, num_workers=workers)
        (tmp_path / f"later{workers}" / "a_1.png").write_bytes(b"not a png")
        with pytest.raises(ValueError, match=f"^cannot read image .*later{workers}/a_1.png.*delete or replace") as err:
            next(data)
        assert "\n" not in str(err.value)


def test_a_corrupt_or_truncated_image_is_named_when_the_data_are_opened(tmp_path):
    def encoded(fmt, seed):
        path = tmp_path / f"image.{fmt}"
        Image.fromarray(noise_images(1, size=24, seed=seed)[0]).save(path)
        return path.read_bytes()

    png, jpeg = encoded("png", 1), encoded("jpg", 2)
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 0xFF  # inside the image data: its chunk's CRC no longer matches
    bad_files = {"c.png": png[: len(png) // 2], "d.jpg": jpeg[:-2], "e.png": bytes(flipped), "f.jpg": jpeg[: len(jpeg) * 2 // 3]}
    for name, data in bad_files.items():
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        for i in range(3):
            (folder / f"a{i}.png").write_bytes(png)
            (folder / f"b{i}.jpg").write_bytes(jpeg)
        (folder / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"^cannot read image {folder / name} \\(.*\\); delete or replace") as err:
            load_data(data_dir=str(folder), batch_size=2, image_size=8)
        assert "\n" not in str(err.value)
        (folder / name).unlink()
        next(load_data(data_dir=str(folder), batch_size=2, image_size=8, num_workers=0))  # the good ones open and read
    # a JPEG with bytes after its end-of-image marker still reads, so it is not refused
    (tmp_path / "d_jpg" / "d.jpg").write_bytes(jpeg + b"trailer")
    next(load_data(data_dir=str(tmp_path / "d_jpg"), batch_size=7, image_size=8, num_workers=0))


def test_the_file_check_shows_a_progress_bar_on_rank_0_for_large_folders(tmp_path, monkeypatch, capsys):
    for i in range(4):
        solid(i).save(tmp_path / f"{i}.png")
    for size, rank, shown in ((4, 0, True), (5, 0, False), (4, 1, False)):
        monkeypatch.setattr(image_datasets, "CHECK_PROGRESS_MIN_FILES", size)
        load_data(data_dir=str(tmp_path), batch_size=1, image_size=8, rank=rank, world_size=2)
        assert ("checking images" in capsys.readouterr().err) == shown


def test_skip_starts_the_stream_later_without_reading(tmp_path):
    # 1797 digits in global batches of 2 x 64: 14 per epoch; skipping 20 crosses into the second epoch
    full = load_data(data_dir="digits", batch_size=64, image_size=16, class_cond=True, rank=1, world_size=2, seed=3)
    batches = [next(full) for _ in range(23)]
    later = load_data(data_dir="digits", batch_size=64, image_size=16, class_cond=True, rank=1, world_size=2, seed=3)
    later.skip(20)
    for want in batches[20:]:
        got = next(later)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1]["y"], want[1]["y"])
    with pytest.raises(RuntimeError, match="before the first batch"):
        later.skip(1)


def test_every_pil_mode_reads_as_the_rgb_it_means(tmp_path):
    """Files of each mode the listed formats (png, jpg, gif) produce, and PIL's other modes in memory, against
    the 8-bit RGB computed here by hand; convert("RGB") alone makes 16-bit gray white and float gray black."""
    gray = np.arange(0, 256, 4, dtype=np.uint8).reshape(8, 8)
    rgb = np.stack([gray, 255 - gray, np.full_like(gray, 7)], -1)
    alpha = np.where(np.arange(64).reshape(8, 8) % 2, 255, 64).astype(np.uint8)
    over_white = lambda c, a: np.rint(c * (a / 255) + 255 * (1 - a / 255)).astype(np.uint8)
    gray3 = np.repeat(gray[..., None], 3, -1)
    cases = {
        "L.png": (Image.fromarray(gray), gray3),
        "1.png": (Image.fromarray(gray >= 128), np.repeat(np.where(gray >= 128, 255, 0)[..., None], 3, -1)),
        "I16.png": (Image.fromarray(gray.astype(np.uint16) * 257), gray3),
        "LA.png": (Image.fromarray(np.stack([gray, alpha], -1), "LA"), over_white(gray3, alpha[..., None])),
        "RGBA.png": (Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), over_white(rgb, alpha[..., None])),
        "P.gif": (Image.fromarray(rgb).quantize(64), None),  # expected: the palette looked up, below
        "CMYK.jpg": (Image.fromarray(rgb).convert("CMYK"), None),  # lossy: compared loosely, below
    }
    for name, (image, expected) in cases.items():
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as f:
            f.load()
            out = np.asarray(to_rgb8(f))
        assert out.dtype == np.uint8 and out.shape == (8, 8, 3), name
        if name == "P.gif":
            palette = np.asarray(image.getpalette(), dtype=np.uint8).reshape(-1, 3)
            expected = palette[np.asarray(image)]
        if name == "CMYK.jpg":
            assert np.abs(out.astype(int) - rgb).mean() < 8, name
            continue
        np.testing.assert_array_equal(out, expected, err_msg=name)
    # modes the listed formats do not produce, in memory
    np.testing.assert_array_equal(np.asarray(to_rgb8(Image.fromarray(gray.astype(np.int32) * 257))), gray3)
    np.testing.assert_array_equal(np.asarray(to_rgb8(Image.fromarray(gray.astype(np.float32) / 255))), gray3)
    mid_gray_lab = Image.new("LAB", (2, 2), (128, 128, 128))  # L* 50, a* = b* = 0: sRGB 119
    assert np.abs(np.asarray(to_rgb8(mid_gray_lab)).astype(int) - 119).max() <= 1
    np.testing.assert_array_equal(np.asarray(to_rgb8(Image.new("HSV", (1, 1), (0, 255, 255)))), [[[255, 0, 0]]])
    with pytest.raises(ValueError, match=r"F gray values span 0..2, outside 0..1"):
        to_rgb8(Image.fromarray(np.array([[0, 2]], dtype=np.float32)))
    with pytest.raises(ValueError, match="PIL mode RGBa is not read"):
        to_rgb8(Image.new("RGBa", (1, 1)))
    (tmp_path / "data").mkdir()
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "data" / "a_0.png")
    images, _ = next(load_data(data_dir=str(tmp_path / "data"), batch_size=1, image_size=8, random_flip=False, num_workers=0))
    assert torch.equal(images[0], to_input(gray3))
