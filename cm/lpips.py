"""LPIPS (Zhang et al. 2018) exactly as the published code computes it, piq 0.7.0's
LPIPS(replace_pooling=True): VGG-16 with every max-pooling replaced by 2x2 average pooling.
Linear weights: the `lpips` package's v0.1 vgg.pth. VGG-16: torchvision's ImageNet checkpoint
vgg16-397923af.pth, from a given path, else the torch hub cache, else a download."""

import importlib.util
import os

import torch
import torch.nn as nn
import torchvision

from .checkpoints import state_dict_mismatch, weights_file
from .dist_util import read_weight_file

VGG16_URL = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
VGG16_FILE = os.path.basename(VGG16_URL)  # vgg16-397923af.pth
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Indices in vgg16().features of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (LPIPS paper, Sec. 3).
LPIPS_LAYERS = (3, 8, 15, 22, 29)
EPS = 1e-10


def normalize_channels(feat, eps=EPS):
    """Unit-normalise each feature vector along channels (LPIPS paper, Sec. 3): y / (||y||_2 + eps).
    The value of piq's and lpips' sqrt(sum y^2), but with a finite gradient, not NaN, at y = 0."""
    return feat / (torch.linalg.vector_norm(feat, dim=1, keepdim=True) + eps)


def lpips_linear_weights():
    """The five per-channel weights w_l of the `lpips` package's v0.1 VGG model, each [1, C, 1, 1]."""
    spec = importlib.util.find_spec("lpips")
    if spec is None:
        raise ModuleNotFoundError("LPIPS needs the `lpips` package for its linear weights: pip install lpips")
    path = os.path.join(spec.submodule_search_locations[0], "weights", "v0.1", "vgg.pth")
    state_dict = read_weight_file(path, what="the lpips package's weights", fix="; reinstall it: pip install -I lpips")
    return [state_dict[f"lin{i}.model.1.weight"] for i in range(len(LPIPS_LAYERS))]


def vgg16_weights_path(vgg_weights=None):
    """The ImageNet VGG-16 checkpoint: `vgg_weights` if given, else torch hub's cached copy,
    downloaded there first if missing; offline, one error saying where to put the file."""
    return weights_file("LPIPS", vgg_weights, "--lpips_vgg_path", (VGG16_FILE,), (VGG16_URL,))


def load_vgg16_features(features, path):
    """Load the `features.*` entries of torchvision's VGG-16 state dict at `path` into `features`."""
    state_dict = read_weight_file(path, what="LPIPS VGG-16 weights", fix=f"; fetch {VGG16_FILE} again from {VGG16_URL}")
    items = state_dict.items() if isinstance(state_dict, dict) else ()  # (not a dict: every key missing below)
    state_dict = {k[len("features.") :]: v for k, v in items if k.startswith("features.")}
    problems = state_dict_mismatch(features, state_dict)
    if problems:
        raise ValueError(f"{path} is not torchvision's VGG-16 ({VGG16_FILE}): {'; '.join(problems)}")
    features.load_state_dict(state_dict)


class LPIPS(nn.Module):
    """Per-sample LPIPS distance between images x, y in [0, 1] (NCHW), frozen and always in eval mode:
    d(x, y) = sum_l mean_hw sum_c w_lc (y_hat^l_x - y_hat^l_y)_chw^2, the paper's eq. 1 with w_l applied
    to the squared difference, as its code and piq do."""

    def __init__(self, vgg_weights=None, pretrained=True):
        super().__init__()
        path = vgg16_weights_path(vgg_weights) if pretrained else None
        self.backbone = torchvision.models.vgg16(weights=None).features
        for i, layer in enumerate(self.backbone):
            if isinstance(layer, nn.MaxPool2d):  # piq's replace_pooling=True
                self.backbone[i] = nn.AvgPool2d(kernel_size=2, stride=2, padding=0)
        if path is not None:
            load_vgg16_features(self.backbone, path)
        self.lins = nn.ParameterList(lpips_linear_weights())
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        # A fixed metric: stays in eval mode whatever the enclosing module is switched to.
        return super().train(False)

    def features(self, x):
        """The unit-normalised activations of the five LPIPS layers for x in [0, 1] (ImageNet-normalised first)."""
        h = (x - self.mean) / self.std
        feats = []
        for i, layer in enumerate(self.backbone[: LPIPS_LAYERS[-1] + 1]):
            h = layer(h)
            if i in LPIPS_LAYERS:
                feats.append(normalize_channels(h))
        return feats

    def forward(self, x, y):
        dist = 0
        for fx, fy, w in zip(self.features(x), self.features(y), self.lins):
            dist = dist + ((fx - fy).square() * w).mean(dim=(2, 3)).sum(dim=1)
        return dist
