"""Networks by name: adm is the published U-Net; a network registered from outside cm/ (the toy example of
docs/library.md, run as the file it shows) trains, checkpoints, resumes, samples and reloads through the unchanged
loop and scripts."""

import os
import shlex
import types

import numpy as np
import pytest
import torch

from cm import networks
from cm.checkpoints import checkpoint_config, load_model_weights
from cm.networks import register
from cm.script_util import create_model, create_model_and_diffusion, model_and_diffusion_defaults
from cm.unet import UNetModel

from conftest import tiny_config
from test_scripts import ROOT, load_script
from test_training import run_in_process, train


def docs_example(first_line, package=None):
    """The module that a ```python block of docs/library.md beginning with `first_line` shows (`package`: where its
    relative imports start, as for the file it names)."""
    with open(os.path.join(ROOT, "docs", "library.md")) as f:
        code = f.read().split(f"```python\n{first_line}\n", 1)[1].split("```", 1)[0]
    module = types.ModuleType(first_line)
    module.__package__ = package
    exec(code, module.__dict__)
    return module


toy = docs_example("# cm/networks/toy.py")  # its class and FLAGS


@pytest.fixture
def toy_network():
    register("toy", toy.ToyNet, toy.FLAGS)  # the one registry line
    yield
    del networks.NETWORKS["toy"]


TOY = "--network toy --toy_width 8 --image_size 16 --class_cond True --num_classes 10 --precision fp32"
TRAIN = (TOY + " --data_dir digits --global_batch_size 8 --lr 1e-3 --ema_rate 0.9 --progress False --save_interval 2 "
         "--training_mode consistency_training --loss_norm l2 --start_scales 4 --end_scales 4")


def test_a_network_registered_from_outside_trains_resumes_samples_and_reloads(toy_network, tmp_path, monkeypatch, capsys):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    train("cm_train", TRAIN + " --total_training_steps 4", whole)
    train("cm_train", TRAIN + " --total_training_steps 2", halves)
    train("cm_train", TRAIN + " --total_training_steps 4", halves)  # resumes at step 2
    for name in ("model000004.pt", "ema_0.9_000004.pt", "target_model000004.pt", "opt000004.pt"):
        a, b = (torch.load(run / name, weights_only=True) for run in (whole, halves))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k])), name
    state = torch.load(halves / "model000004.pt", weights_only=True)
    config = checkpoint_config(state)
    assert config["network"] == "toy" and config["toy_width"] == 8
    model, _ = create_model_and_diffusion(**{k: config[k] for k in model_and_diffusion_defaults()})  # from it alone
    assert isinstance(model, toy.ToyNet) and not isinstance(model, UNetModel)
    load_model_weights(model, halves / "model000004.pt")

    sample = TOY + " --training_mode consistency_training --sampler onestep --num_samples 4 --batch_size 4"
    load_script("image_sample").main(shlex.split(sample + f" --model_path {halves / 'model000004.pt'} --log_dir "
                                                 f"{tmp_path / 'samples'}"))
    with np.load(tmp_path / "samples" / "samples_4x16x16x3.npz") as data:
        assert data["arr_0"].shape == (4, 16, 16, 3) and data["arr_1"].shape == (4,)

    # a script handed the toy's checkpoint as another network, and a resume with another network: one line each
    wrong = sample.replace("--network toy", "--network adm") + f" --model_path {halves / 'model000004.pt'}"
    result = run_in_process("image_sample", [*shlex.split(wrong), "--log_dir", str(tmp_path / "x")], monkeypatch, capsys)
    assert result.returncode == 1 and "--network toy" in result.stderr and "Traceback" not in result.stderr, result.stderr
    resumed = TRAIN.replace("--network toy", "--network adm") + " --total_training_steps 6 --attention_resolutions 8"
    result = run_in_process("cm_train", [*shlex.split(resumed), "--log_dir", str(halves)], monkeypatch, capsys)
    assert result.returncode == 1 and "--network toy -> adm" in result.stderr, result.stderr
    # the toy's own flag makes a run what it is, as adm's do (declared in its file only)
    wider = TRAIN + " --total_training_steps 6 --toy_width 12"
    result = run_in_process("cm_train", [*shlex.split(wider), "--log_dir", str(halves)], monkeypatch, capsys)
    assert result.returncode == 1 and "--toy_width 8 -> 12" in result.stderr, result.stderr


def test_the_published_flags_build_adm_and_other_networks_are_refused_by_name(toy_network, tmp_path):
    model = create_model(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8")
    assert type(model) is UNetModel and model.network_name == "adm"
    path = tmp_path / "adm.pt"
    torch.save(model.state_dict(), path)  # no stored config: a published file, so adm
    net, _ = create_model_and_diffusion(**tiny_config(network="toy"))
    with pytest.raises(ValueError, match=f"{path} was trained with --network adm; pass --network adm"):
        load_model_weights(net, path)
    with pytest.raises(ValueError, match="unknown --network nonesuch; choose one of adm, edm2, dit, toy"):
        create_model_and_diffusion(**tiny_config(network="nonesuch"))
    with pytest.raises(TypeError, match="toy_depth"):
        create_model(16, 32, 1, network="toy", toy_depth=2)
    with pytest.raises(ValueError, match="num_classes of network adm have other defaults"):
        register("toy10", toy.ToyNet, {**toy.FLAGS, "num_classes": (10, "")})
