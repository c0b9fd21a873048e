"""LPIPS: piq 0.7.0's LPIPS(replace_pooling=True), on torchvision's VGG-16 and the lpips package's weights."""

import copy
import os
import types
import urllib.error

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cm.lpips import VGG16_URL, LPIPS, normalize_channels

POOLS = (4, 9, 16, 23, 30)  # the max-pooling layers of torchvision's vgg16().features


@pytest.fixture(scope="module")
def metric():
    torch.manual_seed(0)
    return LPIPS(pretrained=False)


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 64, generator=gen)
    y = (x + 0.2 * torch.randn(2, 3, 64, 64, generator=gen)).clamp(0, 1)
    return x, y


def with_max_pooling(backbone):
    """A copy of the backbone with torchvision's original max-pooling layers put back."""
    backbone = copy.deepcopy(backbone)
    for i in POOLS:
        backbone[i] = nn.MaxPool2d(kernel_size=2, stride=2)
    return backbone


def lin_weights_from_lpips_package():
    lpips = pytest.importorskip("lpips")
    path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return [state_dict[f"lin{i}.model.1.weight"] for i in range(5)]


def reference_lpips(metric, x, y):
    """LPIPS from its formulas: ImageNet-normalise, VGG-16 (conv3x3 + ReLU, 2x2 average
    pooling) taking relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, unit-normalise channels with
    eps 1e-10 outside the root, squared difference, weight each channel, spatial mean, sum."""
    cfg = [64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512]
    convs = [m for m in metric.backbone if isinstance(m, nn.Conv2d)]
    weights = lin_weights_from_lpips_package()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def feats(img):
        h, out, conv = (img - mean) / std, [], iter(convs)
        for item in cfg:
            if item == "P":
                out.append(h)
                h = F.avg_pool2d(h, 2)
            else:
                c = next(conv)
                assert c.out_channels == item
                h = F.relu(F.conv2d(h, c.weight, c.bias, padding=1))
        out.append(h)
        return [f / (torch.sqrt((f**2).sum(dim=1, keepdim=True)) + 1e-10) for f in out]

    return sum(
        (w * (fx - fy) ** 2).mean(dim=(2, 3)).sum(dim=1) for fx, fy, w in zip(feats(x), feats(y), weights)
    )


def test_distance_properties(metric, images):
    x, y = images
    with torch.no_grad():
        d = metric(x, y)
        assert d.shape == (2,)
        assert (d > 0).all()
        torch.testing.assert_close(metric(x, x), torch.zeros(2), rtol=0, atol=1e-7)
        torch.testing.assert_close(metric(y, x), d, rtol=1e-6, atol=0)
        torch.testing.assert_close(metric(x[1:], y[1:]), d[1:], rtol=1e-5, atol=0)  # per sample


def test_gradient_flows_to_input_and_module_is_frozen(metric, images):
    x = images[0].clone().requires_grad_(True)
    metric(x, images[1]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in metric.parameters())
    metric.train()  # an enclosing module switching to training leaves the metric in eval mode
    assert not any(m.training for m in metric.modules())


def test_max_pooling_replaced_by_2x2_average_pooling(metric):
    assert not any(isinstance(m, nn.MaxPool2d) for m in metric.modules())
    pools = [i for i, m in enumerate(metric.backbone) if isinstance(m, nn.AvgPool2d)]
    assert pools == list(POOLS)
    for i in pools:
        p = metric.backbone[i]
        assert (p.kernel_size, p.stride, p.padding, p.ceil_mode) == (2, 2, 0, False)


def test_matches_formulas(metric, images):
    x, y = images
    with torch.no_grad():
        torch.testing.assert_close(metric(x, y), reference_lpips(metric, x, y), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")  # lpips builds its VGG with torchvision's deprecated `pretrained`
def test_is_lpips_package_vgg_apart_from_pooling(metric, images):
    """With max pooling put back, the module is the lpips package's LPIPS(net="vgg", version="0.1"):
    same layers, linear weights and normalisation (its ScalingLayer on 2x - 1 is the ImageNet mean/std)."""
    lpips = pytest.importorskip("lpips")
    ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    with torch.no_grad():
        for part in (ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5):
            for name, layer in part.named_children():
                if isinstance(layer, nn.Conv2d):
                    layer.weight.copy_(metric.backbone[int(name)].weight)
                    layer.bias.copy_(metric.backbone[int(name)].bias)
    max_pooled = copy.deepcopy(metric)
    max_pooled.backbone = with_max_pooling(metric.backbone)
    x, y = images
    with torch.no_grad():
        torch.testing.assert_close(max_pooled(x, y), ref(x, y, normalize=True).flatten(), rtol=1e-5, atol=1e-6)


def test_equals_piq_lpips_with_average_pooling(metric, images, monkeypatch):
    """The published loss, piq.LPIPS(replace_pooling=True, reduction="none"), given the same max-pooling
    backbone (it replaces the pooling itself) and linear weights offline (it would download torchvision's
    VGG-16 and its own copy of the weights)."""
    piq = pytest.importorskip("piq")
    if piq.__version__ != "0.7.0":
        pytest.skip(f"piq {piq.__version__} installed, the published code used 0.7.0")
    import piq.perceptual

    backbone = types.SimpleNamespace(features=with_max_pooling(metric.backbone))
    monkeypatch.setattr(piq.perceptual, "vgg16", lambda **kw: backbone)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **kw: lin_weights_from_lpips_package())
    ref = piq.LPIPS(replace_pooling=True, reduction="none")
    assert [type(ref.model[i]) for i in POOLS] == [nn.AvgPool2d] * len(POOLS)
    x, y = images
    with torch.no_grad():
        torch.testing.assert_close(metric(x, y), ref(x, y), rtol=1e-5, atol=1e-7)


def test_channel_normalisation_value_and_gradient_at_zero():
    f = torch.randn(2, 8, 3, 3)
    f[0, :, 1, 1] = 0  # an all-zero feature vector: sqrt's gradient there would be NaN
    f.requires_grad_(True)
    out = normalize_channels(f)
    torch.testing.assert_close(out, f / (torch.sqrt((f**2).sum(dim=1, keepdim=True)) + 1e-10))
    out.sum().backward()
    assert torch.isfinite(f.grad).all()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and no network: downloads fail as they do offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torch.hub.get_dir() == os.path.join(str(tmp_path), "hub")

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return os.path.join(str(tmp_path), "hub", "checkpoints")


def test_missing_vgg_weights_offline_is_one_clear_error(offline_hub, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        LPIPS()
    message = str(err.value)
    assert "vgg16-397923af.pth" in message and offline_hub in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message and VGG16_URL in message
    assert "--lpips_vgg_path" in message and "\n" not in message
    missing = str(tmp_path / "elsewhere" / "vgg16.pth")
    with pytest.raises(FileNotFoundError, match="--lpips_vgg_path") as err:
        LPIPS(vgg_weights=missing)
    assert missing in str(err.value)


def test_vgg_weights_from_cache_or_path(metric, offline_hub, tmp_path):
    state_dict = {f"features.{k}": v for k, v in metric.backbone.state_dict().items()}
    os.makedirs(offline_hub)
    cached = os.path.join(offline_hub, "vgg16-397923af.pth")
    torch.save(state_dict, cached)
    for loaded in (LPIPS(), LPIPS(vgg_weights=cached)):
        for k, v in metric.backbone.state_dict().items():
            assert torch.equal(loaded.backbone.state_dict()[k], v)
    truncated = str(tmp_path / "truncated.pth")
    with open(cached, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(1000))
    with pytest.raises(ValueError, match="truncated.pth"):
        LPIPS(vgg_weights=truncated)
    other = str(tmp_path / "vgg11.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, other)
    with pytest.raises(ValueError, match=r"vgg11.pth is not torchvision's VGG-16 .*missing: 0.bias"):
        LPIPS(vgg_weights=other)
