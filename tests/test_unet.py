"""The U-Net: published parameter layout, attention, precision, gradient checkpointing, more than one time input."""

import math

import pytest
import torch

from cm.nn import timestep_embedding
from cm.script_util import create_model, create_model_and_diffusion
from cm.unet import QKVAttention

from conftest import randomize, tiny_config

IMAGENET64 = dict(
    image_size=64,
    num_channels=192,
    num_res_blocks=3,
    attention_resolutions="32,16,8",
    class_cond=True,
    num_head_channels=64,
    resblock_updown=True,
    use_scale_shift_norm=True,
    dropout=0.0,
)


def expected_keys(channels, mult, num_res_blocks, attn_ds, class_cond, resblock_updown):
    """Key names and shapes of a published checkpoint, written from the architecture description:
    conv stem; per level num_res_blocks ResBlocks (+ attention at the listed downsample rates) and
    a downsampler between levels; middle ResBlock-attention-ResBlock; decoder mirror with
    num_res_blocks + 1 blocks per level and skip concatenation; GroupNorm-SiLU-conv head.
    ResBlock: in_layers.{0 norm, 2 conv3x3}, emb_layers.1 linear, out_layers.{0 norm, 3 conv3x3},
    skip_connection (1x1 conv) when channels change. Attention: norm, qkv (1x1 Conv2d), proj_out."""
    emb = 4 * channels
    keys = {}

    def lin(name, i, o):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (o, i), (o,)

    def conv(name, i, o, k):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (o, i, k, k), (o,)

    def norm(name, c):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (c,), (c,)

    def res(name, i, o, scale_shift=True):
        norm(f"{name}.in_layers.0", i)
        conv(f"{name}.in_layers.2", i, o, 3)
        lin(f"{name}.emb_layers.1", emb, 2 * o if scale_shift else o)
        norm(f"{name}.out_layers.0", o)
        conv(f"{name}.out_layers.3", o, o, 3)
        if i != o:
            conv(f"{name}.skip_connection", i, o, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        conv(f"{name}.qkv", c, 3 * c, 1)
        conv(f"{name}.proj_out", c, c, 1)

    lin("time_embed.0", channels, emb)
    lin("time_embed.2", emb, emb)
    if class_cond:
        keys["label_emb.weight"] = (1000, emb)
    conv("input_blocks.0.0", 3, channels, 3)
    block, ch, ds, skips = 1, channels, 1, [channels]
    for level, m in enumerate(mult):
        for _ in range(num_res_blocks):
            res(f"input_blocks.{block}.0", ch, m * channels)
            ch = m * channels
            if ds in attn_ds:
                attn(f"input_blocks.{block}.1", ch)
            skips.append(ch)
            block += 1
        if level < len(mult) - 1:
            if resblock_updown:
                res(f"input_blocks.{block}.0", ch, ch)
            else:
                conv(f"input_blocks.{block}.0.op", ch, ch, 3)
            skips.append(ch)
            block += 1
            ds *= 2
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    block = 0
    for level in reversed(range(len(mult))):
        for i in range(num_res_blocks + 1):
            res(f"output_blocks.{block}.0", ch + skips.pop(), mult[level] * channels)
            ch = mult[level] * channels
            sub = 1
            if ds in attn_ds:
                attn(f"output_blocks.{block}.1", ch)
                sub = 2
            if level and i == num_res_blocks:
                if resblock_updown:
                    res(f"output_blocks.{block}.{sub}", ch, ch)
                else:
                    conv(f"output_blocks.{block}.{sub}.conv", ch, ch, 3)
                ds //= 2
            block += 1
    norm("out.0", ch)
    conv("out.2", channels, 3, 3)
    return keys


@pytest.fixture(scope="module")
def imagenet64_model():
    return create_model(**IMAGENET64)


def test_imagenet64_has_published_size_and_keys(imagenet64_model):
    n_params = sum(p.numel() for p in imagenet64_model.parameters())
    assert round(n_params / 1e6, 1) == 295.9
    want = expected_keys(192, (1, 2, 3, 4), 3, (2, 4, 8), True, True)
    got = {k: tuple(v.shape) for k, v in imagenet64_model.state_dict().items()}
    assert got == want
    assert got["input_blocks.5.1.qkv.weight"] == (3 * 384, 384, 1, 1)


def test_lsun256_layout_without_scale_shift():
    cfg = dict(
        image_size=256,
        num_channels=32,  # the key layout does not depend on the width; keep it cheap
        num_res_blocks=2,
        attention_resolutions="32,16,8",
        class_cond=False,
        num_head_channels=8,
        resblock_updown=True,
        use_scale_shift_norm=False,
    )
    model = create_model(**cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = expected_keys(32, (1, 1, 2, 2, 4, 4), 2, (8, 16, 32), False, True)
    # without scale-shift the embedding projection gives one value per channel, not two
    want = {
        k: ((s[0] // 2, s[1]) if ".emb_layers.1.weight" in k else (s[0] // 2,) if ".emb_layers.1.bias" in k else s)
        for k, s in want.items()
    }
    assert got == want


def test_state_dict_reloads_strictly():
    model, _ = create_model_and_diffusion(**tiny_config())
    randomize(model, seed=1)
    other, _ = create_model_and_diffusion(**tiny_config())
    other.load_state_dict(model.state_dict(), strict=True)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 50.0]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), other(x, t, y))


def naive_attention(qkv, heads):
    """float64 softmax(q^T k / sqrt(d)) v, with channels laid out [q heads | k heads | v heads]."""
    qkv = qkv.double()
    b, width, t = qkv.shape
    d = width // (3 * heads)
    q, k, v = (part.reshape(b, heads, d, t) for part in qkv.chunk(3, dim=1))
    w = torch.einsum("bhdt,bhds->bhts", q, k) / math.sqrt(d)
    w = torch.softmax(w, dim=-1)
    return torch.einsum("bhts,bhds->bhdt", w, v).reshape(b, heads * d, t)


@pytest.mark.parametrize("heads,head_dim", [(1, 8), (2, 16), (3, 24), (4, 64), (2, 96)])
def test_sdpa_attention_matches_naive_float64(heads, head_dim):
    qkv = torch.randn(2, 3 * heads * head_dim, 37, generator=torch.Generator().manual_seed(heads))
    got = QKVAttention(heads)(qkv)
    want = naive_attention(qkv, heads)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("convert", ["convert_to_fp16", "convert_to_bf16"])
def test_half_precision_forward_close_to_float32(convert):
    model, _ = create_model_and_diffusion(**tiny_config())
    randomize(model, seed=2)
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([0.5, 10.0, 100.0]), torch.tensor([0, 3, 9])
    with torch.no_grad():
        ref = model(x, t, y)
        getattr(model, convert)()
        assert model.dtype != torch.float32
        out = model(x, t, y)
    assert out.dtype == torch.float32  # the head runs in float32, as published
    assert _rel_err(out, ref) < 1e-2
    model.convert_to_fp32()
    with torch.no_grad():
        assert _rel_err(model(x, t, y), ref) < 1e-2


def test_use_checkpoint_gives_same_gradients():
    grads = []
    for use_checkpoint in (False, True):
        model, _ = create_model_and_diffusion(**tiny_config(use_checkpoint=use_checkpoint, dropout=0.0))
        randomize(model, seed=3)
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        model(x, torch.tensor([3.0, 30.0]), torch.tensor([4, 5])).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_labels_required_exactly_for_class_conditional_models():
    model, _ = create_model_and_diffusion(**tiny_config())
    with pytest.raises(ValueError, match="class-conditional"):
        model(torch.randn(1, 3, 16, 16), torch.ones(1))
    uncond, _ = create_model_and_diffusion(**tiny_config(class_cond=False))
    with pytest.raises(ValueError, match="class-conditional"):
        uncond(torch.randn(1, 3, 16, 16), torch.ones(1), torch.zeros(1, dtype=torch.long))


def test_num_head_channels_must_divide_channels():
    with pytest.raises(ValueError, match="num_head_channels"):
        create_model_and_diffusion(**tiny_config(num_head_channels=24))


def test_one_time_input_is_the_published_network():
    model = randomize(create_model_and_diffusion(**tiny_config())[0]).eval()
    assert model.time_embed[0].weight.shape == (128, 32)  # the published shapes (and names: expected_keys)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 50.0]), torch.tensor([1, 2])
    with torch.no_grad():
        out = model(x, t, y)
        model.time_features = lambda t: timestep_embedding(t, model.model_channels)  # the published embedding
        assert torch.equal(model(x, t, y), out)


def test_two_time_inputs_condition_on_each_time_of_each_row():
    model = randomize(create_model_and_diffusion(**tiny_config(time_inputs=2))[0]).eval()
    assert model.state_dict().keys() == create_model_and_diffusion(**tiny_config())[0].state_dict().keys()
    assert model.time_embed[0].in_features == 2 * 32  # one MLP on both times' features (py-meanflow's U-Net)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([[1.0, 0.5], [50.0, 20.0]]), torch.tensor([1, 2])
    with torch.no_grad():
        out = model(x, t, y)
        second = model(x, t + torch.tensor([[0.0, 0.0], [0.0, 3.0]]), y)
        first = model(x, t + torch.tensor([[0.0, 0.0], [3.0, 0.0]]), y)
    for moved in (first, second):
        torch.testing.assert_close(moved[0], out[0], rtol=0, atol=1e-6)
        assert not torch.allclose(moved[1], out[1])
    with pytest.raises(ValueError, match=r"timesteps of shape \[N x 2\]"):
        model(x, t[:, 0], y)
    with pytest.raises(ValueError, match="time_inputs must be a positive integer"):
        create_model_and_diffusion(**tiny_config(time_inputs=0))
