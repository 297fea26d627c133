"""Stage-2 diffusion transformers behind one registry and one velocity convention.

Families: SiT (REPA-E, `models/sit.py`), LightningDiT (`models/lightningdit.py`) and DiT^DH
(`models/ddt.py`). Trainers and samplers in this toolkit use ONE convention (REPA-E's and RAE's):
t = 1 is noise, x_t = (1 - t) x + t eps, the network predicts v = eps - x, on normalised latents.
hustvl's LightningDiT was trained the other way round (t = 1 is data, target x - eps); its released
checkpoints keep working through `VelocityModel(..., data_at_one=True)`, which evaluates
-net(x, 1 - t, y): the same field in our convention. Every sampler in `samplers.py` therefore serves
every family (they call `.inference(x, t, y)` and read `.num_classes`).

Latent normalisation: the SiT normalises its input with its own (fixed) BatchNorm, initialised from
the tokenizer's statistics; LightningDiT and DiT^DH receive (z - mean) / std from `LatentNormalizer`
(per channel for KL / VA-VAE / VQ latents, per position for RAE latents).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from models.ddt import DDT_models
from models.lightningdit import LightningDiT_models
from models.sit import SiT_models

FAMILIES = {"sit": SiT_models, "lightningdit": LightningDiT_models, "ddt": DDT_models}
DIFFUSION_MODELS = {name: fam for fam, reg in FAMILIES.items() for name in reg}


def model_family(name: str) -> str:
    if name not in DIFFUSION_MODELS:
        raise KeyError(f"unknown --model '{name}'; choose one of: {', '.join(DIFFUSION_MODELS)}")
    return DIFFUSION_MODELS[name]


def build_diffusion_model(name: str, latent_shape: Sequence[int], num_classes: int, class_dropout_prob: float = 0.1,
                          **options) -> nn.Module:
    """The raw network for latents [C, h, w]. `options` are the family's constructor kwargs
    (e.g. z_dims / encoder_depth / qk_norm for the SiT, use_qknorm / use_gembed for LightningDiT)."""
    family = model_family(name)
    c, h, w = (int(v) for v in latent_shape)
    if h != w:
        raise ValueError(f"--model {name}: latents must be square, got {c}x{h}x{w}")
    make = FAMILIES[family][name]
    return make(input_size=h, in_channels=c, num_classes=num_classes, class_dropout_prob=class_dropout_prob, **options)


class VelocityModel(nn.Module):
    """v(x_t, t, y) in the toolkit's convention (t = 1 noise, v = eps - x) for any family.

    `data_at_one`: the wrapped network was trained with t = 1 as data and target x - eps (hustvl
    LightningDiT); it is then evaluated as -net(x, 1 - t, y)."""

    def __init__(self, net: nn.Module, data_at_one: bool = False):
        super().__init__()
        self.net = net
        self.data_at_one = bool(data_at_one)

    @property
    def num_classes(self) -> int:
        return int(self.net.num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **label_kw) -> torch.Tensor:
        """`label_kw`: force_drop_ids for a training forward of LightningDiT / DiT^DH."""
        # the SiT's forward computes its training losses; its field is `inference`
        field = self.net.inference if hasattr(self.net, "inference") else self.net
        if self.data_at_one:
            return -field(x, 1 - t, y, **label_kw)
        return field(x, t, y, **label_kw)

    inference = forward


class LatentNormalizer(nn.Module):
    """(z - mean) / std with statistics [C, 1, 1] (per channel) or [C, h, w] (per position);
    std = sqrt(var + eps)."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, eps: float = 0.0):
        super().__init__()
        mean, var = mean.float(), var.float()
        if mean.dim() == 1:
            mean, var = mean[:, None, None], var[:, None, None]
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", (var + eps).sqrt())

    @classmethod
    def from_stats(cls, stats: Mapping[str, torch.Tensor], mode: str, latent_shape: Sequence[int],
                   eps: float = 0.0, source: str = "latent statistics") -> "LatentNormalizer":
        """From a `latents_stats.pt` dict (keys mean/var per position, channel_mean/channel_var)."""
        keys = {"position": ("mean", "var"), "channel": ("channel_mean", "channel_var")}
        if mode not in keys:
            raise ValueError(f"latent normalisation mode '{mode}' unknown (channel, position)")
        km, kv = keys[mode]
        missing = [k for k in (km, kv) if k not in stats]
        if missing:
            raise KeyError(f"{source} lacks {missing} needed for per-{mode} normalisation (has {sorted(stats)})")
        mean, var = stats[km].float(), stats[kv].float()
        c, h, w = (int(v) for v in latent_shape)
        want = (c,) if mode == "channel" else (c, h, w)
        if tuple(mean.shape) not in (want, (c, 1, 1)) or mean.shape != var.shape:
            raise ValueError(f"{source}: '{km}' has shape {tuple(mean.shape)}, '{kv}' {tuple(var.shape)}; "
                             f"per-{mode} statistics of {c}x{h}x{w} latents need {want}")
        return cls(mean, var, eps)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean


def sit_bn_from_stats(sit: nn.Module, stats: Mapping[str, torch.Tensor], source: str) -> None:
    """Initialise the SiT's input BatchNorm from per-channel statistics so that it normalises with
    (z - mean) / sqrt(var + bn_eps), the same map as `LatentNormalizer(mean, var, bn_eps)`."""
    if "channel_mean" not in stats or "channel_var" not in stats:
        raise KeyError(f"{source} lacks channel_mean / channel_var (the SiT normalises per channel)")
    eps = float(sit.bn.eps)
    scale = (stats["channel_var"].float() + eps).rsqrt()
    sit.init_bn(stats["channel_mean"].float(), scale, eps_included=eps)


def default_time_convention(name: str, options: Mapping) -> bool:
    """data_at_one default: hustvl LightningDiT (sinusoidal time embedding) trains with t = 1 as
    data; RAE's LightningDiT (Gaussian-Fourier, use_gembed) and the other families with t = 1 as noise."""
    return model_family(name) == "lightningdit" and not options.get("use_gembed", False)


def flow_matching_loss(model: VelocityModel, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor, direction_weight: float = 0.0, force_drop_ids: Optional[torch.Tensor] = None,
                       ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-sample loss [B] on normalised latents x [B, C, h, w] at times t [B] (force_drop_ids: the
    label-dropout mask, drawn by the network when None):
    MSE(v, eps - x) (+ direction_weight * mean over positions of 1 - cos_C(v, eps - x), LightningDiT's
    velocity-direction loss; the cosine is sign- and time-reversal-invariant, so it is the same term
    in either convention)."""
    tb = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    xt = (1 - tb) * x + tb * noise
    target = noise - x
    label_kw = {} if force_drop_ids is None else {"force_drop_ids": force_drop_ids}
    pred = model(xt, t.to(x.dtype), y, **label_kw).float()
    mse = (pred - target.float()).square().mean(dim=tuple(range(1, x.dim())))
    logs = {"mse": mse.detach().mean()}
    loss = mse
    if direction_weight > 0:
        cos = torch.nn.functional.cosine_similarity(pred, target.float(), dim=1)  # [B, h, w]
        direction = (1 - cos).flatten(1).mean(1)
        loss = loss + direction_weight * direction
        logs["direction"] = direction.detach().mean()
    return loss, logs
