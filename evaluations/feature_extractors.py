"""The networks whose activations the evaluator compares, chosen by `--features NAME`.

Each extractor maps a batch of uint8 NHWC images (any size) to
  - `pool`: one vector per image, for FID, precision and recall,
  - `spatial`: a flattened spatial activation per image, for sFID (None where it has none),
and, where it is a classifier, `logits(pool)` gives its class scores (Inception Score, class accuracy).

  inception  the TensorFlow Inception-v3 graph of 2015-12-05 the published evaluator runs, as torch-fidelity
             ports it: pool_3 (2048), the first 7 channels of mixed_6/conv (7*17*17, in TF's HWC order),
             softmax/logits without the bias (1008 classes), as published
  digits     a small CNN trained on the embedded digits set (train_digits_classifier.py): penultimate layer
             (128), the first 7 channels of its third convolution (7*8*8), its 10 logits
  random     a fixed-seed Gaussian projection of the 32x32 image to 256 dimensions: no sFID, no classifier
  dinov2     DINOv2 ViT-L/14 (evaluations/dinov2.py): its final-norm class token (1024), for FD_DINOv2 (Stein et al.
             2023; dgm-eval, EDM2); no sFID, no classifier
"""

import contextlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from cm.checkpoints import file_sha256, state_dict_mismatch, weights_file
from cm.dist_util import read_weight_file

from .dinov2 import VITL14, DinoVisionTransformer

FEATURES = ("inception", "digits", "random", "dinov2")

# The TF graph's weights as a PyTorch state dict: per torch-fidelity's notes, the checkpoint pytorch-fid's author
# exported; both projects publish it, under these names with the same hex, the file's SHA-256 prefix (torch hub's
# convention), checked on download.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_URLS = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
)
# Names the same weights have in a torch hub cache: torch-fidelity's, then pytorch-fid's.
INCEPTION_CACHE_NAMES = (INCEPTION_FILE, "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_SPATIAL_CHANNELS = 7  # published: spatial[..., :7] of mixed_6/conv

DIGITS_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_classifier.pt")
DIGITS_SIZE = 16
DIGITS_SPATIAL_CHANNELS = 7
RANDOM_SIZE = 32
RANDOM_DIM = 256
RANDOM_SEED = 0

# facebookresearch/dinov2's ViT-L/14 weights, as torch.hub caches them (the Hub loader checks no hash)
DINOV2_FILE = "dinov2_vitl14_pretrain.pth"
DINOV2_URLS = ("https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",)
DINOV2_SIZE = 224  # dgm-eval's and EDM2's input size
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DINOV2_ARCH = dict(VITL14)


def create_feature_extractor(name, device="cpu", inception_path=None, pretrained=True, dinov2_path=None):
    """The extractor called `name` (see FEATURES), in eval mode on `device`.

    :param inception_path: the Inception weight file (default: the torch hub cache, else a download).
    :param dinov2_path: the DINOv2 ViT-L/14 weight file (default: the torch hub cache, else a download).
    :param pretrained: False builds the network with seeded random weights and reads no file (for tests).
    """
    if name == "inception":
        extractor = InceptionV3Features(inception_path, pretrained)
    elif name == "digits":
        extractor = DigitsFeatures(DIGITS_WEIGHTS if pretrained else None)
    elif name == "random":
        extractor = RandomProjectionFeatures()
    elif name == "dinov2":
        extractor = DinoV2Features(dinov2_path, pretrained)
    else:
        raise ValueError(f"unknown features {name!r}: choose one of {', '.join(FEATURES)}")
    return extractor.to(device).eval()


def to_float_nchw(images, device):
    """uint8 NHWC (numpy or tensor) -> float32 NCHW in [0, 255] on `device`."""
    return torch.as_tensor(images).to(device).permute(0, 3, 1, 2).float()


def resize(x, size):
    """Bilinear resize of float NCHW images to size x size, antialiased when shrinking; unchanged at that size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class FeatureExtractor(nn.Module):
    """Common interface; subclasses set the class attributes and implement features()."""

    name = None
    has_spatial = False  # gives sFID features
    has_classifier = False  # gives logits (Inception Score)
    predicts_labels = False  # its classes are the sample labels' (class accuracy)

    def features(self, images):
        """uint8 NHWC images -> (pool [N, D], spatial [N, S] or None), float32 tensors."""
        raise NotImplementedError

    def logits(self, pool):
        raise ValueError(f"the {self.name} features have no classifier (no Inception Score or class accuracy)")

    @property
    def fingerprint(self):
        """A string naming these exact weights (part of the reference-statistics cache key)."""
        raise NotImplementedError


# ----- Inception-v3 (torch-fidelity's port of the TF 2015-12-05 graph) -----


def inception_weights_path(inception_path=None):
    """The Inception weight file: `inception_path` if given, else the torch hub cache (under torch-fidelity's
    or pytorch-fid's name), else downloaded there with its SHA-256 prefix checked; offline, one clear error."""
    return weights_file(
        "Inception", inception_path, "--inception_path", INCEPTION_CACHE_NAMES, INCEPTION_URLS,
        INCEPTION_SHA256_PREFIX,
    )


def load_inception_state_dict(path):
    state_dict = read_weight_file(path, what="Inception weights", fix=f"; fetch {INCEPTION_FILE} again from {INCEPTION_URLS[0]}")
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict; expected {INCEPTION_FILE}")
    return state_dict


@contextlib.contextmanager
def _torch_fidelity_weights(state_dict):
    """torch-fidelity's Inception fetches its weights from the web in its constructor (through
    torch.hub.load_state_dict_from_url); hand it the state dict resolved and loaded here instead."""
    from torch_fidelity import feature_extractor_inceptionv3 as module

    original = module.load_state_dict_from_url
    module.load_state_dict_from_url = lambda *args, **kwargs: state_dict
    try:
        yield
    finally:
        module.load_state_dict_from_url = original


def _tf_inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3, accepting a None state dict (keep random weights)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise ImportError(
            "the inception features need torch-fidelity (pip install 'torch-fidelity>=0.3.0')"
        ) from err

    class TFInceptionV3(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            if state_dict is None:
                return None
            # BatchNorm's num_batches_tracked counters are not part of the converted TF weights
            filled = dict(state_dict)
            for key, value in self.state_dict().items():
                if key.endswith("num_batches_tracked"):
                    filled.setdefault(key, value)
            problems = state_dict_mismatch(self, filled)
            if problems:
                raise ValueError(
                    f"the Inception weights do not fit torch-fidelity's Inception-v3 ({'; '.join(problems)}); "
                    f"expected {INCEPTION_FILE} from {INCEPTION_URLS[0]}"
                )
            return super().load_state_dict(filled, *args, **kwargs)

    return TFInceptionV3


def randomize_(module, seed=0):
    """Seeded He-normal weights for every convolution and linear layer (activations keep their scale
    through the depth, so random-weight features stay finite and varied); BatchNorm stays the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
                if layer.bias is not None:
                    layer.bias.zero_()
    return module


class InceptionV3Features(FeatureExtractor):
    """The published evaluator's Inception features. Inputs go in as uint8 NCHW; torch-fidelity resizes them
    to 299x299 with TF1's bilinear resize (align_corners=False, no half-pixel offset) and maps [0, 255] to
    [-1, 1), as the graph's ResizeBilinear/Sub/Mul do.

    - pool: `pool_3:0`, the 2048-d average pool (torch-fidelity's "2048").
    - spatial: `mixed_6/conv:0`[..., :7], flattened in NHWC order as TF flattens it. In the graph the tensor
      `mixed_6/conv` is the output (after batch norm and ReLU) of the 1x1 branch of the 6th mixed block
      (17x17x192); torch-fidelity names that block Mixed_6d (mixed, mixed_1, mixed_2 = Mixed_5b-d; mixed_3 =
      Mixed_6a; mixed_4..mixed_7 = Mixed_6b-e) and that branch Mixed_6d.branch1x1, whose output (its
      BasicConv2d: conv, batch norm, ReLU) a forward hook reads.
    - logits: pool @ softmax/logits weights, no bias (the published `softmax/logits/MatMul`), 1008 classes.
    """

    name = "inception"
    has_spatial = True
    has_classifier = True

    def __init__(self, inception_path=None, pretrained=True):
        super().__init__()
        self.weights_path = inception_weights_path(inception_path) if pretrained else None
        state_dict = load_inception_state_dict(self.weights_path) if pretrained else None
        with _torch_fidelity_weights(state_dict):
            self.net = _tf_inception_class()("inception-v3-compat", ["2048"])
        if not pretrained:
            randomize_(self.net, seed=RANDOM_SEED)
        self.net.requires_grad_(False)
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)
        self._fingerprint = None

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output[:, :INCEPTION_SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1)

    @torch.no_grad()
    def features(self, images):
        x = torch.as_tensor(images).to(self.net.fc.weight.device).permute(0, 3, 1, 2).contiguous()
        (pool,) = self.net(x)
        spatial, self._spatial = self._spatial, None
        return pool.float(), spatial.float()

    @torch.no_grad()
    def logits(self, pool):
        weight = self.net.fc.weight
        return torch.as_tensor(pool, device=weight.device, dtype=weight.dtype) @ weight.T

    @property
    def fingerprint(self):
        if self._fingerprint is None:
            self._fingerprint = (
                f"inception-random-seed{RANDOM_SEED}"
                if self.weights_path is None
                else f"inception-sha256-{file_sha256(self.weights_path)}"
            )
        return self._fingerprint


# ----- the digits classifier -----


class DigitsClassifier(nn.Module):
    """A small CNN for 16x16 RGB digits (inputs in [-1, 1]): three 3x3 convolutions with ReLU (16, 32, 32
    channels; 2x2 max pooling after the first and the third), a 128-unit hidden layer, 10 logits."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def embed(self, x):
        """-> (penultimate features [N, 128], conv3 output after ReLU [N, 32, 8, 8])."""
        h = F.relu(self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2)))
        spatial = F.relu(self.conv3(h))
        h = F.max_pool2d(spatial, 2)
        return F.relu(self.fc1(h.flatten(1))), spatial

    def forward(self, x):
        return self.fc2(self.embed(x)[0])


def digits_input(images, device):
    """uint8 NHWC images of any size -> the classifier's input: 16x16 (bilinear, antialiased when
    shrinking), scaled to [-1, 1]."""
    return resize(to_float_nchw(images, device), DIGITS_SIZE) / 127.5 - 1


def load_digits_weights(model, path):
    """Load the digits classifier's state dict (weights_only) into `model`, with one clear error if it is
    missing, unreadable or of another architecture."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"digits classifier weights not found at {path}; make them with "
            "python evaluations/train_digits_classifier.py"
        )
    state_dict = read_weight_file(path, what="digits classifier weights",
                              fix="; retrain with python evaluations/train_digits_classifier.py")
    problems = state_dict_mismatch(model, state_dict) if isinstance(state_dict, dict) else ["not a state dict"]
    if problems:
        raise ValueError(
            f"{path} does not fit DigitsClassifier ({'; '.join(problems)}); "
            "retrain with python evaluations/train_digits_classifier.py"
        )
    model.load_state_dict(state_dict)


class DigitsFeatures(FeatureExtractor):
    """pool: the classifier's 128-d penultimate layer; spatial: the first 7 channels of conv3's output after
    its ReLU (8x8), flattened in HWC order like the Inception one; logits: its 10 class scores."""

    name = "digits"
    has_spatial = True
    has_classifier = True
    predicts_labels = True

    def __init__(self, weights_path=DIGITS_WEIGHTS):
        super().__init__()
        self.net = DigitsClassifier()
        self.weights_path = weights_path
        if weights_path is None:
            randomize_(self.net, seed=RANDOM_SEED)
        else:
            load_digits_weights(self.net, weights_path)
        self.net.requires_grad_(False)

    @torch.no_grad()
    def features(self, images):
        pool, spatial = self.net.embed(digits_input(images, self.net.fc2.weight.device))
        spatial = spatial[:, :DIGITS_SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(spatial), -1)
        return pool, spatial

    @torch.no_grad()
    def logits(self, pool):
        weight = self.net.fc2.weight
        return self.net.fc2(torch.as_tensor(pool, device=weight.device, dtype=weight.dtype))

    @property
    def fingerprint(self):
        if self.weights_path is None:
            return f"digits-random-seed{RANDOM_SEED}"
        return f"digits-sha256-{file_sha256(self.weights_path)}"


# ----- the random-projection baseline -----


class RandomProjectionFeatures(FeatureExtractor):
    """pool: the image resized to 32x32 (bilinear, antialiased), scaled to [-1, 1], flattened (3072) and
    multiplied by a fixed Gaussian matrix (seed 0, entries N(0, 1/3072)) to 256 dimensions."""

    name = "random"

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(RANDOM_SEED)
        dim_in = 3 * RANDOM_SIZE * RANDOM_SIZE
        self.register_buffer("projection", torch.randn(dim_in, RANDOM_DIM, generator=generator) / dim_in**0.5)

    @torch.no_grad()
    def features(self, images):
        x = resize(to_float_nchw(images, self.projection.device), RANDOM_SIZE) / 127.5 - 1
        return x.flatten(1) @ self.projection, None

    @property
    def fingerprint(self):
        return f"random-{RANDOM_SIZE}px-{RANDOM_DIM}d-seed{RANDOM_SEED}"


# ----- DINOv2 ViT-L/14 -----


def randomize_vit_(model, seed=RANDOM_SEED):
    """Seeded random weights for a DinoVisionTransformer: He-normal linear and patch layers (randomize_), small
    normal position embeddings and class token, LayerScale 1 and LayerNorm the identity as initialised."""
    randomize_(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in (model.pos_embed, model.cls_token):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model


class DinoV2Features(FeatureExtractor):
    """pool: DINOv2 ViT-L/14's class token after its final norm (1024), the features of FD_DINOv2. Images are
    resized to 224x224 by bicubic interpolation with antialiasing on float [0, 255] (EDM2's default; dgm-eval
    resizes the PIL image with PIL's bicubic filter, which EDM2 notes gives almost the same result), scaled to
    [0, 1] and normalised with the ImageNet mean and standard deviation; no crop."""

    name = "dinov2"

    def __init__(self, weights_path=None, pretrained=True):
        super().__init__()
        self.weights_path = None
        if pretrained:
            self.weights_path = weights_file("DINOv2 ViT-L/14", weights_path, "--dinov2_path", (DINOV2_FILE,), DINOV2_URLS)
            self.net = load_dinov2(self.weights_path)
        else:
            self.net = randomize_vit_(DinoVisionTransformer(**DINOV2_ARCH))
        self.net.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    @torch.no_grad()
    def features(self, images):
        x = to_float_nchw(images, self.mean.device)
        if x.shape[-2:] != (DINOV2_SIZE, DINOV2_SIZE):
            x = F.interpolate(x, size=(DINOV2_SIZE, DINOV2_SIZE), mode="bicubic", antialias=True)
        return self.net((x / 255 - self.mean) / self.std), None

    @property
    def fingerprint(self):
        if self.weights_path is None:
            return f"dinov2-random-seed{RANDOM_SEED}-depth{DINOV2_ARCH['depth']}"
        return f"dinov2-sha256-{file_sha256(self.weights_path)}"


def load_dinov2(path):
    """The ViT-L/14 of the checkpoint at `path` (weights_only, strict; built without initialising its 304 M
    parameters first), one clear error if the file is unreadable or of another network."""
    with torch.device("meta"):
        model = DinoVisionTransformer(**DINOV2_ARCH)
    state_dict = read_weight_file(path, what="the DINOv2 weights", fix=f"; fetch {DINOV2_FILE} again from {DINOV2_URLS[0]}")
    problems = state_dict_mismatch(model, state_dict) if isinstance(state_dict, dict) else ["not a state dict"]
    if problems:
        raise ValueError(f"{path} does not fit DINOv2 ViT-L/14 ({'; '.join(problems)}); expected {DINOV2_FILE} "
                         f"from {DINOV2_URLS[0]}")
    model.load_state_dict(state_dict, assign=True)
    return model
