"""Inception-V3 features for FID / sFID / IS / KID / precision-recall, through torch-fidelity.

The network is torch-fidelity's `FeatureExtractorInceptionV3`: the 2015 TensorFlow graph that the
ADM evaluator (and every published FID) uses, ported to PyTorch with TF-compatible padding,
pooling and bilinear resize, so no TensorFlow is needed. We walk its layers ourselves (instead of
calling its `forward`) for two reasons:
* sFID needs the spatial features of `mixed_6/conv` (the 1x1 branch of Mixed_6d, i.e. the 7th
  Inception block, after BN+ReLU): the ADM evaluator keeps its first 7 channels at 17x17 = 2023
  values per image; torch-fidelity does not expose them;
* the forward stops at the deepest feature that was asked for (cheap early features for tests).

Features (name: width):
  "pool" 2048 (FID, KID, precision/recall) | "logits_unbiased" 1008 (IS; pool @ fc.weight, no bias,
  as improved-GAN / ADM) | "spatial" 2023 (sFID) | "64", "192", "768": earlier pooled features.

Weights: `weights_path` (a local `.pth` as torch-fidelity ships it, for offline use), or None for
torch-fidelity's download into the torch hub cache (refused when HF_HUB_OFFLINE /
TORCH_HUB_OFFLINE is set and the file is not cached), or `random_init=True` for tests: a seeded
variance-preserving init with BN in identity mode. PyTorch's default conv init shrinks the signal
by ~sqrt(1/3) per layer, so after ~40 layers every image maps to nearly the same vector and FID is
meaningless; He-normal convs keep distinct images distinct.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURE_DIMS = {"64": 64, "192": 192, "768": 768, "spatial": 2023, "pool": 2048, "logits_unbiased": 1008}
# Order in which the features become available along the network (for early exit).
_FEATURE_DEPTH = {"64": 0, "192": 1, "spatial": 2, "768": 3, "pool": 4, "logits_unbiased": 5}
INCEPTION_SIZE = 299
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TORCH_HUB_OFFLINE")


def add_inception_flags(g) -> None:
    """The Inception network of every FID / rFID (generate.py --eval, the trainers' evaluation):
    one definition, so the three scripts read these flags alike."""
    g.add_argument("--inception-weights", type=str, default=None,
                   help="local torch-fidelity Inception weights (.pth; offline)")
    g.add_argument("--random-init-inception", action="store_true",
                   help="random-weight Inception (offline tests): every figure is labelled not comparable")
    g.add_argument("--inception-image-size", "--inception-size", dest="inception_image_size", type=int, default=299,
                   help="Inception input size (299 is the protocol; smaller: tests only)")


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in OFFLINE_ENV)


def _construct_without_weights():
    """torch-fidelity's constructor always loads weights; build the bare architecture instead."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        return fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])


@torch.no_grad()
def init_inception_randomly(net: nn.Module, seed: int = 0) -> nn.Module:
    """He-normal convs (fan_in, ReLU gain), identity BatchNorm, fc ~ N(0, 1/2048); seeded."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            m.weight.fill_(1.0)
            m.bias.zero_()
        elif isinstance(m, nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
            m.bias.zero_()
    return net


def build_inception(weights_path: Optional[str | os.PathLike] = None, random_init: bool = False,
                    seed: int = 0) -> nn.Module:
    """torch-fidelity's InceptionV3 (eval mode, frozen, float32). See the module docstring."""
    if random_init:
        net = init_inception_randomly(_construct_without_weights(), seed)
    elif weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"--inception-weights: no such file {path}")
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        net = _construct_without_weights()
        from utils import torch_load_safe

        sd = torch_load_safe(path, "--inception-weights file")
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        from utils import load_state_dict_strict

        load_state_dict_strict(net, sd, f"Inception weights {path}")
        assert isinstance(net, FeatureExtractorInceptionV3)
    else:
        import torch_fidelity.feature_extractor_inceptionv3 as fe

        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(fe.URL_INCEPTION_V3).name
        if _offline() and not cached.is_file():
            raise FileNotFoundError(f"Inception weights are not cached at {cached} and downloads are off "
                                    f"(HF_HUB_OFFLINE/TORCH_HUB_OFFLINE); pass --inception-weights PATH "
                                    f"(torch-fidelity's {Path(fe.URL_INCEPTION_V3).name})")
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    net = net.float().eval()
    net.requires_grad_(False)
    net.random_weights = bool(random_init)  # metrics computed with it are labelled "not comparable"
    return net


class InceptionFeatures(nn.Module):
    """uint8 images [N, 3, H, W] -> {feature name: float32 [N, dim]}.

    `image_size` is the network's input size after the TF-compatible bilinear resize; 299 is the
    protocol. Smaller values (>= 75) only serve fast CPU tests with random weights.

    The network always runs on chunks of exactly `chunk_size` images (the last one zero-padded):
    convolution libraries pick their algorithm by batch size, which moves features by ~1e-6, while
    at a fixed batch size an image's features do not depend on its neighbours. So the features,
    and every metric, are bit-identical whatever evaluation batch or world size the caller uses.
    """

    def __init__(self, net: nn.Module, image_size: int = INCEPTION_SIZE, chunk_size: int = 50):
        super().__init__()
        self.net = net
        self.image_size = image_size
        self.chunk_size = chunk_size

    @property
    def random_weights(self) -> bool:
        """True for a randomly initialised network (offline tests): its figures compare to nothing."""
        return bool(getattr(self.net, "random_weights", False))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, features: Sequence[str] = ("pool",)) -> Dict[str, torch.Tensor]:
        n, c = images.shape[0], self.chunk_size
        outs = []
        for start in range(0, max(n, 1), c):
            part = images[start:start + c]
            if part.shape[0] < c:
                part = torch.cat([part, part.new_zeros((c - part.shape[0], *part.shape[1:]))])
            outs.append(self._forward_chunk(part, features))
        return {f: torch.cat([o[f] for o in outs])[:n] for f in features}

    def _forward_chunk(self, images: torch.Tensor, features: Sequence[str]) -> Dict[str, torch.Tensor]:
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        unknown = [f for f in features if f not in FEATURE_DIMS]
        if unknown:
            raise ValueError(f"unknown Inception features {unknown}; known: {sorted(FEATURE_DIMS)}")
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        n = self.net
        want = set(features)
        depth = max(_FEATURE_DEPTH[f] for f in want)
        out: Dict[str, torch.Tensor] = {}

        def pooled(x):  # [N, C, h, w] -> [N, C]
            return F.adaptive_avg_pool2d(x, 1).flatten(1).float()

        x = images.float()
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(self.image_size, self.image_size), align_corners=False)
        x = (x - 128) / 128  # [N, 3, 299, 299] in [-1, 1)
        x = n.MaxPool_1(n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x))))  # [N, 64, 73, 73]
        if "64" in want:
            out["64"] = pooled(x)
        if depth >= 1:
            x = n.MaxPool_2(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)))  # [N, 192, 35, 35]
            if "192" in want:
                out["192"] = pooled(x)
        if depth >= 2:
            x = n.Mixed_6c(n.Mixed_6b(n.Mixed_6a(n.Mixed_5d(n.Mixed_5c(n.Mixed_5b(x))))))  # [N, 768, 17, 17]
            if "spatial" in want:
                # ADM's `mixed_6/conv`: the 1x1 branch of the next block, first 7 channels.
                out["spatial"] = n.Mixed_6d.branch1x1(x)[:, :7].flatten(1).float()  # [N, 7*17*17]
        if depth >= 3:
            x = n.Mixed_6e(n.Mixed_6d(x))  # [N, 768, 17, 17]
            if "768" in want:
                out["768"] = pooled(x)
        if depth >= 4:
            x = n.Mixed_7c(n.Mixed_7b(n.Mixed_7a(x)))  # [N, 2048, 8, 8]
            x = n.AvgPool(x).flatten(1)  # [N, 2048]
            out["pool"] = x.float()
        if depth >= 5:
            out["logits_unbiased"] = x.mm(n.fc.weight.T).float()  # [N, 1008]
        return {f: out[f] for f in features}
