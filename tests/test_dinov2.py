"""FD_DINOv2: the ViT-L/14 against the checkpoint's key list and shapes, its position-embedding resampling, the
feature path end to end with random weights (a one-block network of the full width, for time), the weight file
from a path, and the offline error."""

import os
import urllib.error

import numpy as np
import pytest
import torch

from evaluations import feature_extractors as fx
from evaluations.dinov2 import VITL14, DinoVisionTransformer
from evaluations.evaluator import Evaluator


def expected_vitl14_keys():
    """dinov2_vitl14_pretrain.pth's parameters, written out from the architecture (1024 wide, 24 blocks, MLP 4096)."""
    keys = {"cls_token": (1, 1, 1024), "pos_embed": (1, 37 * 37 + 1, 1024), "mask_token": (1, 1024),
            "patch_embed.proj.weight": (1024, 3, 14, 14), "patch_embed.proj.bias": (1024,),
            "norm.weight": (1024,), "norm.bias": (1024,)}
    for i in range(24):
        block = {"norm1.weight": (1024,), "norm1.bias": (1024,), "attn.qkv.weight": (3072, 1024), "attn.qkv.bias": (3072,),
                 "attn.proj.weight": (1024, 1024), "attn.proj.bias": (1024,), "ls1.gamma": (1024,),
                 "norm2.weight": (1024,), "norm2.bias": (1024,), "mlp.fc1.weight": (4096, 1024), "mlp.fc1.bias": (4096,),
                 "mlp.fc2.weight": (1024, 4096), "mlp.fc2.bias": (1024,), "ls2.gamma": (1024,)}
        keys.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return keys


def test_the_network_has_the_checkpoints_parameter_names_and_shapes():
    with torch.device("meta"):
        net = DinoVisionTransformer(**VITL14)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == expected_vitl14_keys() and len(got) == 343
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(304.4e6, rel=1e-3)


def cubic_resample_matrix(n_in, n_out, scale, a=-0.75):
    """[n_out, n_in] weights of PyTorch's bicubic (Keys, a = -0.75) at source x = (i + 0.5) / scale - 0.5, the
    taps clamped to the border: written out here as an independent reference."""
    def w(d):
        d = abs(d)
        return ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else (((d - 5) * d + 8) * d - 4) * a if d < 2 else 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) / scale - 0.5
        x0 = int(np.floor(x))
        for k in range(x0 - 1, x0 + 3):
            m[i, min(max(k, 0), n_in - 1)] += w(x - k)
    return m


def test_position_embeddings_are_kept_at_the_stored_grid_and_resampled_as_dinov2_does():
    torch.manual_seed(0)
    net = DinoVisionTransformer(embed_dim=8, depth=0, num_heads=2, mlp_ratio=4, patch_size=14, stored_grid=37)
    with torch.no_grad():
        net.pos_embed.normal_()
    assert torch.equal(net.interpolated_pos_embed(37), net.pos_embed)
    pos = net.interpolated_pos_embed(16)
    assert pos.shape == (1, 257, 8) and torch.equal(pos[:, 0], net.pos_embed[:, 0])
    m = cubic_resample_matrix(37, 16, 16.1 / 37)  # scale factor (16 + 0.1) / 37, not 16 / 37
    stored = net.pos_embed[0, 1:].detach().double().numpy().reshape(37, 37, 8)
    expected = np.einsum("ij,jkc,lk->ilc", m, stored, m).reshape(256, 8)
    np.testing.assert_allclose(pos[0, 1:].detach().numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def one_block(monkeypatch):
    monkeypatch.setitem(fx.DINOV2_ARCH, "depth", 1)


def test_features_end_to_end_with_random_weights(tmp_path, one_block):
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    a, b = fx.DinoV2Features(pretrained=False), fx.DinoV2Features(pretrained=False)
    pool, spatial = a.features(images)
    assert pool.shape == (8, 1024) and spatial is None and torch.isfinite(pool).all()
    torch.testing.assert_close(b.features(images)[0], pool, rtol=0, atol=0)  # seeded: the same network twice
    assert not torch.allclose(pool[0], pool[1])
    ref = tmp_path / "ref.npz"
    np.savez(ref, images)
    metrics = Evaluator("dinov2", device="cpu", pretrained=False, progress=False, cache=False).evaluate(str(ref), str(ref))
    assert abs(metrics["fid"]) < 1e-3 and metrics["sfid"] is None and metrics["inception_score"] is None
    assert metrics["precision"] == metrics["recall"] == 1.0
    # the same weights from a file (--dinov2_path) give the same features
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(a.net.state_dict(), path)
    loaded = fx.DinoV2Features(str(path))
    torch.testing.assert_close(loaded.features(images)[0], pool, rtol=0, atol=0)
    assert loaded.fingerprint.startswith("dinov2-sha256-")


def test_missing_or_wrong_dinov2_weights_are_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as err:
        Evaluator("dinov2", device="cpu")
    message = str(err.value)
    cache_dir = os.path.join(str(tmp_path / "torch"), "hub", "checkpoints")
    assert fx.DINOV2_FILE in message and cache_dir in message and fx.DINOV2_URLS[0] in message
    assert "--dinov2_path" in message and "\n" not in message
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="does not fit DINOv2 ViT-L/14"):
        fx.DinoV2Features(str(other))
