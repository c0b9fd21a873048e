"""diffusers interop: exact round trips, the same U-Net function, the same samples as
ConsistencyModelPipeline, the published-checkpoint table, and the errors users meet."""

import json
import os
import shlex

import numpy as np
import pytest
import torch

from cm.denoiser import network_time
from cm.diffusers_convert import (
    diffusers_timesteps,
    load_folder,
    pipeline_from_model,
    state_dict_from_diffusers,
    state_dict_to_diffusers,
    ts_from_diffusers,
    unet_to_diffusers,
)
from cm.published import PUBLISHED, published_flags, published_table
from cm.random_util import get_generator
from cm.samplers import karras_sample
from cm.schedule import index_to_sigma
from cm.script_util import create_model_and_diffusion
from cm.checkpoints import with_config

from conftest import randomize, tiny_config
from test_scripts import ROOT, load_script

diffusers = pytest.importorskip("diffusers")

# ImageNet-like: class-conditional, scale-shift, attention below full resolution;
# LSUN-like: unconditional, plain (additive) time conditioning, three levels, two with attention
CONFIGS = {
    "imagenet_like": tiny_config(),
    "lsun_like": tiny_config(
        image_size=32, class_cond=False, use_scale_shift_norm=False, channel_mult="1,1,2",
        attention_resolutions="16,8", num_res_blocks=2, num_head_channels=8,
    ),
}


def make_model(flags, seed=0):
    model, diffusion = create_model_and_diffusion(**flags, distillation=True)
    return randomize(model, seed=seed).eval(), diffusion


def convert(argv):
    load_script("convert_to_diffusers").main(shlex.split(argv))


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_through_a_diffusers_folder_is_bit_identical(name, tmp_path):
    flags = CONFIGS[name]
    model, _ = make_model(flags)
    ckpt = tmp_path / "model.pt"
    torch.save(with_config(model.state_dict(), dict(flags, training_mode="consistency_training")), ckpt)
    folder = tmp_path / "pipe"
    convert(f"--model_path {ckpt} --output_dir {folder} --training_mode consistency_training --steps 40")
    pipe = diffusers.ConsistencyModelPipeline.from_pretrained(str(folder))
    assert isinstance(pipe.unet, diffusers.UNet2DModel) and pipe.scheduler.config.num_train_timesteps == 40
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()

    back = tmp_path / "back.pt"
    load_script("convert_from_diffusers").main(["--diffusers_path", str(folder), "--output", str(back)])
    original, converted = torch.load(ckpt, weights_only=True), torch.load(back, weights_only=True)
    assert set(original) == set(converted)
    for key in original:
        assert original[key].dtype == converted[key].dtype and torch.equal(original[key], converted[key]), key
    with open(tmp_path / "back.json") as f:
        preset_flags = json.load(f)["flags"]
    assert preset_flags == flags


@pytest.mark.parametrize("name", CONFIGS)
def test_flags_read_from_diffusers_configs_alone_rebuild_the_model(name):
    """A folder converted elsewhere (no cm_flags.json): the architecture comes from unet/config.json."""
    from cm.diffusers_convert import flags_from_unet_config

    flags = CONFIGS[name]
    model, _ = make_model(flags)
    unet = unet_to_diffusers(model, flags)
    derived = flags_from_unet_config(dict(unet.config))
    rebuilt, _ = create_model_and_diffusion(**derived, distillation=True)
    rebuilt.load_state_dict(state_dict_from_diffusers(unet.state_dict(), derived), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, rebuilt.state_dict()[key]), key


@pytest.mark.parametrize("name", CONFIGS)
def test_unet_outputs_match_at_several_sigmas(name):
    flags = CONFIGS[name]
    model, _ = make_model(flags, seed=1)
    unet = unet_to_diffusers(model, flags)
    size = flags["image_size"]
    sigmas = torch.tensor([0.002, 0.05, 0.7, 5.0, 80.0])
    x = torch.randn(len(sigmas), 3, size, size, generator=torch.Generator().manual_seed(2))
    y = torch.arange(len(sigmas)) if flags["class_cond"] else None
    with torch.no_grad():
        ours = model(x, network_time(sigmas), y=y)
        theirs = unet(x, network_time(sigmas), class_labels=y).sample
    for i in range(len(sigmas)):
        err = (ours[i] - theirs[i]).norm() / ours[i].norm()
        assert err < 1e-5, (sigmas[i].item(), err.item())


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("ts", [None, (0, 22, 39), (0, 9, 30, 39)])
def test_samples_equal_the_diffusers_pipeline(name, ts):
    flags = CONFIGS[name]
    model, diffusion = make_model(flags, seed=3)
    steps, batch, size = 40, 4, flags["image_size"]
    pipe = pipeline_from_model(model, flags, steps)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.tensor([1, 5, 7, 9]) if flags["class_cond"] else None
    call = dict(timesteps=diffusers_timesteps(ts, steps), num_inference_steps=None) if ts else dict(num_inference_steps=1)
    theirs = pipe(batch_size=batch, class_labels=labels, generator=torch.Generator().manual_seed(11), output_type="pt", **call).images
    ours = karras_sample(
        diffusion, model, (batch, 3, size, size), steps=steps, model_kwargs={"y": labels} if labels is not None else {},
        sampler="multistep" if ts else "onestep", ts=ts, generator=get_generator("torch", seed=11),
    )
    ours = (ours / 2 + 0.5).clamp(0, 1)  # the pipeline's [0, 1] output
    err = (ours - theirs).norm() / theirs.norm()
    assert err < 1e-4, err.item()
    assert theirs.std() > 2e-3  # images that vary, not a constant (random weights give faint ones)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_num_inference_steps_map_to_ts(k):
    """The scheduler's sigmas for num_inference_steps=k are our grid at ts = (0, N//k, ..., N-1)."""
    n = 201
    scheduler = diffusers.CMStochasticIterativeScheduler(num_train_timesteps=n)
    scheduler.set_timesteps(num_inference_steps=k)
    ts = ts_from_diffusers(range(0, k * (n // k), n // k), n)
    ours = [index_to_sigma(t, n, 0.002, 80.0) for t in ts]
    np.testing.assert_allclose(scheduler.sigmas.numpy(), np.array(ours), rtol=1e-6)
    assert diffusers_timesteps(ts, n) == list(range(0, k * (n // k), n // k))[::-1]
    with pytest.raises(ValueError, match="ends at|end at"):
        diffusers_timesteps((0, 50, 100), n)


def test_sampling_script_reads_a_diffusers_folder(tmp_path):
    flags = CONFIGS["imagenet_like"]
    model, _ = make_model(flags)
    ckpt = tmp_path / "m.pt"
    torch.save(model.state_dict(), ckpt)
    arch = ("--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 8 "
            "--num_head_channels 16 --class_cond True --num_classes 10 --resblock_updown True")
    convert(f"{arch} --model_path {ckpt} --output_dir {tmp_path / 'pipe'} --training_mode consistency_distillation")
    common = f"{arch} --training_mode consistency_distillation --sampler onestep --num_samples 4 --batch_size 4"
    sample = load_script("image_sample").main
    sample(shlex.split(common) + ["--model_path", str(ckpt), "--log_dir", str(tmp_path / "a")])
    sample(shlex.split(common) + ["--model_path", str(tmp_path / "pipe"), "--log_dir", str(tmp_path / "b")])
    a = np.load(tmp_path / "a" / "samples_4x16x16x3.npz")["arr_0"]
    b = np.load(tmp_path / "b" / "samples_4x16x16x3.npz")["arr_0"]
    assert np.array_equal(a, b)


def test_converted_model_fine_tunes_with_ct_and_teaches_cd(tmp_path):
    """CT fine-tuning resumes from a converted file (the target starts as the loaded network), and a
    converted diffusers folder serves as the teacher of consistency distillation."""
    from test_training import CT, TRAIN, train

    flags = CONFIGS["imagenet_like"]
    model, _ = make_model(flags)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    convert(f"{TRAIN.split(' --data_dir')[0]} --model_path {tmp_path / 'm.pt'} --output_dir {tmp_path / 'pipe'} "
            "--training_mode consistency_training")
    load_script("convert_from_diffusers").main(["--diffusers_path", str(tmp_path / "pipe"), "--output", str(tmp_path / "c.pt")])
    run = tmp_path / "ct"
    train("cm_train", TRAIN + " " + CT + f" --total_training_steps 2 --save_interval 2 --resume_checkpoint {tmp_path / 'c.pt'}", run)
    assert (run / "model000002.pt").exists()
    # with EMA rate 0.9 the target moved only a little from the loaded network, not from a random one
    target = torch.load(run / "target_model000002.pt", weights_only=True)
    start = model.state_dict()
    assert max((target[k] - start[k]).abs().max().item() for k in start) < 0.05
    teach = tmp_path / "cd"
    cd = CT.replace("consistency_training", "consistency_distillation")
    train("cm_train", TRAIN + " " + cd + f" --total_training_steps 1 --save_interval 1 --teacher_model_path {tmp_path / 'pipe'}", teach)
    student = torch.load(teach / "model000001.pt", weights_only=True)
    assert student.keys() == start.keys()


def test_truncated_and_mismatched_checkpoints_give_clear_errors(tmp_path, capsys):
    flags = CONFIGS["imagenet_like"]
    model, _ = make_model(flags)
    good = tmp_path / "m.pt"
    torch.save(model.state_dict(), good)
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated"):
        convert(f"--model_path {truncated} --output_dir {tmp_path / 'x'} --training_mode consistency_training "
                "--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 8 "
                "--num_head_channels 16 --class_cond True --num_classes 10 --resblock_updown True")
    with pytest.raises(ValueError, match=r"shape: .*label_emb.weight"):
        convert(f"--model_path {good} --output_dir {tmp_path / 'y'} --training_mode consistency_training "
                "--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 8 "
                "--num_head_channels 16 --class_cond True --num_classes 12 --resblock_updown True")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(ValueError, match="--num_head_channels"):
        state_dict_to_diffusers(model.state_dict(), dict(flags, num_head_channels=-1))
    with pytest.raises(ValueError, match="only consistency models"):
        convert(f"--model_path {good} --output_dir {tmp_path / 'z'} --training_mode edm")
    # a diffusers UNet of another family
    other = diffusers.UNet2DModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="not a consistency-models U-Net"):
        load_folder(str(tmp_path / "other"))


def test_published_table_covers_the_twelve_checkpoints():
    from cm.config import load_preset

    assert len(PUBLISHED) == 12
    model, _ = create_model_and_diffusion(**published_flags("ct_imagenet64"))
    assert round(sum(p.numel() for p in model.parameters()) / 1e5) == 2959  # 295.9M, as published
    for name, (train, mode, first, second, _) in PUBLISHED.items():
        assert load_preset(train)["flags"].get("training_mode", "edm") == mode
        for preset in filter(None, (first, second)):
            assert load_preset(preset)["flags"]["training_mode"] == mode
            assert f"{name}.pt" in load_preset(preset)["description"]
    with open(os.path.join(ROOT, "docs", "published.md")) as f:
        assert published_table() in f.read()  # the docs' table is this table
