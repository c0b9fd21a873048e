"""DiT (cm/networks/dit.py): output shape, adaLN-Zero's start (the zero function), the fixed position embedding, the
forward-mode JVP through its attention against finite differences, two-time conditioning, and a tiny DiT trained by
MeanFlow and sampled with no method flags."""

import math
import shlex

import numpy as np
import pytest
import torch

from cm.jvp import network_jvp
from cm.networks import build_network
from cm.networks.dit import CONFIGS, config_flags, sincos_2d

from test_scripts import load_script
from test_training import TRAIN

TINY = dict(image_size=8, image_channels=4, class_cond=True, num_classes=10, null_class=True, dit_depth=2,
            dit_hidden_size=32, dit_num_heads=4, dit_patch_size=2)


def randomized(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


@pytest.mark.parametrize("patch", [2, 4])
def test_the_output_has_the_input_shape_and_is_zero_at_initialisation(patch):
    torch.manual_seed(0)
    model = build_network("dit", dict(TINY, dit_patch_size=patch))
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.tensor([0.1, 5.0, 900.0]), torch.tensor([0, 9, 10]))  # 10: the null class
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # adaLN-Zero: gates and output layer zero
    out = randomized(model)(x, torch.tensor([0.1, 5.0, 900.0]), torch.tensor([0, 9, 10]))
    assert out.shape == x.shape and out.abs().mean() > 0.01


def test_the_output_equals_facebookresearch_dit_on_random_weights():
    """A fixture made with facebookresearch/DiT models.py (its DiT(input_size=8, patch_size=2, in_channels=4,
    hidden_size=32, depth=2, num_heads=4, num_classes=10, learn_sigma=False) with random weights): its state dict
    loads strictly (the names are DiT's), and the output on its inputs is DiT's (eval mode; 10 the null class)."""
    import os

    fixture = torch.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "dit_tiny_facebookresearch.pt"),
                         weights_only=True)
    model = build_network("dit", TINY)
    model.load_state_dict(fixture["state_dict"], strict=True)
    with torch.no_grad():
        out = model.eval()(fixture["x"], fixture["t"], fixture["y"])
    torch.testing.assert_close(out, fixture["out"], rtol=1e-5, atol=1e-6)


def test_the_position_embedding_is_the_2d_sine_cosine_of_the_token_grid():
    emb = sincos_2d(8, 3)  # 3 x 3 tokens, 8 channels: [sin, cos] of the column, then of the row, 2 frequencies each
    token = 1 * 3 + 2  # row 1, column 2
    omega = np.array([1.0, 1 / 100.0])
    expected = np.concatenate([np.sin(2 * omega), np.cos(2 * omega), np.sin(1 * omega), np.cos(1 * omega)])
    np.testing.assert_allclose(emb[token], expected)


def test_the_jvp_through_attention_agrees_with_finite_differences():
    torch.manual_seed(1)
    model = randomized(build_network("dit", TINY)).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    v = torch.randn_like(x)
    y = torch.tensor([3, 10])

    def net(z, s):  # (raw t, as a flow map passes it)
        return model(z, s, y)

    _, tangent = network_jvp(net, x, t, v, "forward")
    eps = 1e-6
    with torch.no_grad():
        central = (net(x + eps * v, t + eps) - net(x - eps * v, t - eps)) / (2 * eps)
    torch.testing.assert_close(tangent, central, rtol=1e-6, atol=1e-7)


def test_two_time_inputs_each_condition_the_output():
    torch.manual_seed(2)
    model = randomized(build_network("dit", dict(TINY, time_inputs=2)))
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    base = model(x, torch.tensor([[0.5, 0.1], [0.5, 0.1]]), y)
    for other in (torch.tensor([[0.7, 0.1], [0.7, 0.1]]), torch.tensor([[0.5, 0.3], [0.5, 0.3]])):
        assert not torch.allclose(model(x, other, y), base)


def test_every_published_configuration_builds():
    counts = {}
    for name in CONFIGS:
        with torch.device("meta"):
            model = build_network("dit", dict(config_flags(name), image_size=32, image_channels=4, class_cond=True,
                                               num_classes=1000, null_class=True))
        counts[name] = sum(p.numel() for p in model.parameters())
    # facebookresearch/DiT's DiT-XL/2 on 32x32 latents counts 675,129,632 (its code, run here); ours has no learned-sigma
    # half of the output layer (2 x 2 x 4 outputs of 1152 weights and a bias) and keeps the fixed positions (256 tokens
    # x 1152) as a buffer, not a frozen parameter
    assert counts["DiT-XL/2"] == 675129632 - (2 * 2 * 4) * 1153 - 256 * 1152
    assert counts["DiT-S/2"] < counts["DiT-B/2"] < counts["DiT-L/2"] < counts["DiT-XL/2"]
    assert math.isclose(counts["DiT-XL/8"] / counts["DiT-XL/2"], 1, rel_tol=0.01)


def test_a_tiny_dit_trains_with_meanflow_and_samples(tmp_path):
    flags = (TRAIN + " --network dit --dit_depth 2 --dit_hidden_size 32 --dit_num_heads 4 --dit_patch_size 4 "
             "--training_mode meanflow --dropout 0 --total_training_steps 2 --save_interval 2")
    load_script("cm_train").main(shlex.split(flags + f" --log_dir {tmp_path / 'run'}"))
    load_script("image_sample").main(shlex.split(
        f"--precision fp32 --sampler onestep --num_samples 4 --batch_size 4 --model_path {tmp_path / 'run' / 'model000002.pt'} "
        f"--log_dir {tmp_path / 'samples'}"))
    samples = np.load(tmp_path / "samples" / "samples_4x16x16x3.npz")["arr_0"]
    assert samples.shape == (4, 16, 16, 3) and samples.std() > 0
