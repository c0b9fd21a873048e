"""SD-VAE latent space with a tiny random-weight AutoencoderKL: the codec's scaling and decoding against the VAE itself,
scripts/encode_latents.py (ImageNet's folder layout, shards, resumption), and a latent training run that resumes
exactly and samples decoded images; latent models refused where they cannot work."""

import json
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from cm.image_datasets import LatentDataset, load_digits_arrays
from cm.latents import LatentCodec, draw_latent, latent_scaling, load_vae

from test_scripts import load_script
from test_training import TRAIN, assert_same, state


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A random-weight AutoencoderKL that halves the side (16x16 RGB -> 4 x 8 x 8), saved as a diffusers folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    folder = tmp_path_factory.mktemp("vae") / "tiny_vae"
    vae.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def imagenet_layout(tmp_path_factory):
    """30 digits as PNGs in class folders (ImageNet's layout: train/<class>/<image>)."""
    root = tmp_path_factory.mktemp("images") / "train"
    images, labels = load_digits_arrays(16)
    for k in range(30):
        folder = root / f"n{labels[k]:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[k]).save(folder / f"img_{k:03d}.png")
    return root


def test_the_codec_scales_and_decodes_as_the_vae_and_edm2_do(tiny_vae):
    vae = load_vae(tiny_vae)
    codec = LatentCodec(vae)
    images = torch.from_numpy(load_digits_arrays(16)[0][:3]).permute(0, 3, 1, 2)
    mean_std = codec.encode_pixels(images)
    with torch.no_grad():
        dist = vae.encode(images.float() / 255).latent_dist  # EDM2 encodes pixels in [0, 1]
    torch.testing.assert_close(mean_std, torch.cat([dist.mean, dist.std], dim=1))
    scale, bias = (torch.from_numpy(a).view(1, -1, 1, 1) for a in latent_scaling())
    torch.testing.assert_close(scale.flatten(), 0.5 / torch.tensor([4.17, 4.62, 3.71, 3.28]))  # EDM2's raw std -> 0.5
    noise = torch.randn(3, 4, 8, 8)
    latents = torch.from_numpy(draw_latent(mean_std.numpy(), noise.numpy()))
    torch.testing.assert_close(latents, (dist.mean + dist.std * noise) * scale + bias)
    with torch.no_grad():
        pixels = vae.decode((latents - bias) / scale).sample
    expected = (pixels.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(codec.decode(latents), expected)


def test_encoding_a_folder_writes_resumable_shards_with_its_labels(tiny_vae, imagenet_layout, tmp_path):
    encode = load_script("encode_latents").main
    argv = ["--source", str(imagenet_layout), "--latent_vae", tiny_vae, "--resolution", "16", "--shard_size", "8",
            "--batch_size", "3", "--device", "cpu"]
    encode(argv + ["--dest", str(tmp_path / "whole")])
    info = json.loads((tmp_path / "whole" / "dataset.json").read_text())
    assert (info["count"], info["channels"], info["size"], len(info["shards"]), info["labels"]) == (30, 4, 8, 4, True)
    labels = np.concatenate([np.load(tmp_path / "whole" / f"labels-{k:05d}.npy") for k in range(4)])
    digit_labels = load_digits_arrays(16)[1][:30]  # (all ten digits: folder k is class k; files listed folder by folder)
    assert len(set(digit_labels)) == 10
    np.testing.assert_array_equal(labels, np.sort(digit_labels))
    # cut short after two shards: the same command finishes it, the same numbers
    part = tmp_path / "part"
    encode(argv + ["--dest", str(part), "--max_images", "30"])
    cut = json.loads((part / "dataset.json").read_text())
    cut["shards"], cut["count"] = cut["shards"][:2], 16
    (part / "dataset.json").write_text(json.dumps(cut))
    (part / "latents-00003.npy").unlink()
    encode(argv + ["--dest", str(part), "--max_images", "30"])
    for k in range(4):
        np.testing.assert_array_equal(np.load(part / f"latents-{k:05d}.npy"), np.load(tmp_path / "whole" / f"latents-{k:05d}.npy"))
    with pytest.raises(ValueError, match="other settings \\(resolution"):
        encode(argv[:-6] + ["--resolution", "32", "--shard_size", "8", "--batch_size", "3", "--device", "cpu",
                            "--dest", str(part), "--max_images", "30"])
    # each epoch draws a new latent of an image, the same one for the same sample seed
    dataset = LatentDataset(str(tmp_path / "whole"), class_cond=True)
    a, b, c = dataset[(5, 11)][0], dataset[(5, 11)][0], dataset[(5, 12)][0]
    assert a.shape == (4, 8, 8) and a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)


LATENT = (TRAIN + " --network edm2 --image_channels 4 --image_size 8 --num_channels 16 --channel_mult 1,2 "
          "--num_res_blocks 1 --attention_resolutions 4 --edm2_channels_per_head 8 --c_noise edm --global_batch_size 8 "
          "--training_mode consistency_training --scale_mode fixed --start_scales 10 --loss_norm l2 --save_interval 3")


def test_a_latent_run_resumes_exactly_and_samples_decoded_images(tiny_vae, imagenet_layout, tmp_path):
    load_script("encode_latents").main(["--source", str(imagenet_layout), "--dest", str(tmp_path / "latents"),
                                        "--latent_vae", tiny_vae, "--resolution", "16", "--device", "cpu"])
    main = load_script("cm_train").main
    flags = LATENT.replace("--data_dir digits", f"--data_dir {tmp_path / 'latents'}") + f" --latent_vae {tiny_vae}"
    main(shlex.split(flags + f" --total_training_steps 3 --log_dir {tmp_path / 'run'}"))
    main(shlex.split(flags + f" --total_training_steps 6 --log_dir {tmp_path / 'run'}"))
    # (straight through, evaluated at its last step on decoded samples: the same weights)
    evaluated = " --eval_interval 6 --eval_samples 4 --eval_features digits --eval_ref digits --eval_ema 0.9"
    main(shlex.split(flags + evaluated + f" --total_training_steps 6 --log_dir {tmp_path / 'straight'}"))
    assert_same(state(tmp_path / "run", 6), state(tmp_path / "straight", 6))
    assert "fid_2step_ema0.9" in (tmp_path / "straight" / "progress.csv").read_text()
    assert Image.open(tmp_path / "straight" / "eval" / "1step_ema0.9_000006.png").mode == "RGB"  # decoded pixels
    load_script("image_sample").main(shlex.split(
        f"--precision fp32 --sampler onestep --num_samples 4 --batch_size 4 --model_path {tmp_path / 'run' / 'model000006.pt'} "
        f"--log_dir {tmp_path / 'samples'}"))  # the file says it is a latent model of that VAE: decoded to 16x16 RGB
    samples = np.load(tmp_path / "samples" / "samples_4x16x16x3.npz")["arr_0"]
    assert samples.dtype == np.uint8 and samples.std() > 0
    with pytest.raises(ValueError, match="is a latent model .* edit with a pixel model"):
        load_script("image_edit").main(shlex.split(
            f"--task colorization --data_dir digits --num_images 2 --model_path {tmp_path / 'run' / 'model000006.pt'} "
            f"--log_dir {tmp_path / 'edit'}"))


def test_latent_data_need_the_flags_that_say_so(tiny_vae, imagenet_layout, tmp_path):
    load_script("encode_latents").main(["--source", str(imagenet_layout), "--dest", str(tmp_path / "latents"),
                                        "--latent_vae", tiny_vae, "--resolution", "16", "--device", "cpu"])
    main = load_script("cm_train").main
    flags = LATENT.replace("--data_dir digits", f"--data_dir {tmp_path / 'latents'}") + " --total_training_steps 1"
    with pytest.raises(ValueError, match=f"holds SD-VAE latents: pass --latent_vae {tiny_vae}"):
        main(shlex.split(flags + f" --log_dir {tmp_path / 'a'}"))
    with pytest.raises(ValueError, match="--network adm sees RGB images only"):
        main(shlex.split(flags + f" --latent_vae {tiny_vae} --network adm --log_dir {tmp_path / 'b'}"))
    with pytest.raises(ValueError, match="trains in latent space: pass --data_dir"):
        main(shlex.split(LATENT + f" --latent_vae {tiny_vae} --total_training_steps 1 --log_dir {tmp_path / 'c'}"))


def test_a_vae_that_is_neither_cached_nor_reachable_is_one_line_naming_what_to_download(monkeypatch):
    from diffusers import AutoencoderKL

    def offline(name, **kwargs):  # what from_pretrained raises with no cache and no network
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}.\nCheck your connection")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(FileNotFoundError) as err:
        load_vae("stabilityai/sd-vae-ft-mse")
    message = str(err.value)
    assert "huggingface-cli download stabilityai/sd-vae-ft-mse" in message and "--latent_vae" in message and "\n" not in message
