"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) for discriminator inputs.

The RAE stage-1 GAN shows its DINO discriminator augmented real and fake images, so the
discriminator cannot win by memorising exact pixels. Every operation is differentiable w.r.t.
the image (the generator's adversarial gradient passes through it), draws its parameters per
sample, and is fully vectorised (no Python loop over the batch).

Images are [B, C, H, W] floats in [-1, 1]; the colour offsets below are the original's values
for that range, and "zero fill" is 0 in that range (mid-grey).

Policies (comma-separated, applied in the order given; "" = identity):
    color        brightness x + U(-0.5, 0.5); saturation (x - mean_c) * U(0, 2) + mean_c;
                 contrast (x - mean) * U(0.5, 1.5) + mean   (mean_c: per-pixel channel mean,
                 mean: per-sample mean over C, H, W)
    translation  shift by integer (dy, dx), each uniform in [-round(0.125 H), round(0.125 H)]
                 (W for dx), content moves by (dy, dx) and the uncovered border is zero
    cutout       zero a square of half the image size centred uniformly at random

Random draws come from `generator` (a `torch.Generator`) in a fixed order (per op: its scalars,
in the order listed), so a seeded generator reproduces the augmentation exactly.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def _rand(shape, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """U[0, 1) of `shape` in x's dtype on x's device, drawn from `generator` on its own device
    (a CPU generator can drive CUDA images)."""
    device = generator.device if generator is not None else x.device
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32).to(x.device, x.dtype)


def _randint(low: int, high: int, shape, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Integers uniform in [low, high) (long) on x's device."""
    device = generator.device if generator is not None else x.device
    return torch.randint(low, high, shape, generator=generator, device=device).to(x.device)


# --------------------------------------------------------------------------------------------
# Colour
# --------------------------------------------------------------------------------------------
def rand_brightness(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    # x: [B, C, H, W]; one offset per sample
    return x + (_rand((x.shape[0], 1, 1, 1), x, generator) - 0.5)


def rand_saturation(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)  # [B, 1, H, W] grey value of each pixel
    return (x - mean) * (_rand((x.shape[0], 1, 1, 1), x, generator) * 2) + mean


def rand_contrast(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
    return (x - mean) * (_rand((x.shape[0], 1, 1, 1), x, generator) + 0.5) + mean


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
def max_shift(size: int, ratio: float = TRANSLATION_RATIO) -> int:
    """Largest translation in pixels for a side of `size` (round half up, as the original)."""
    return int(size * ratio + 0.5)


def sample_translation(x: torch.Tensor, generator: Optional[torch.Generator] = None,
                       ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    """Per-sample integer shifts [B, 2] = (dy, dx), dy in [-sy, sy], dx in [-sx, sx]."""
    B, _, H, W = x.shape
    sy, sx = max_shift(H, ratio), max_shift(W, ratio)
    dy = _randint(-sy, sy + 1, (B,), x, generator)
    dx = _randint(-sx, sx + 1, (B,), x, generator)
    return torch.stack([dy, dx], dim=1)


def translate(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, i - dy_b, j - dx_b] where that index is inside the image, else 0.

    x: [B, C, H, W]; shifts: [B, 2] integer (dy, dx). A gather over flat pixel indices: exact
    (no interpolation), differentiable w.r.t. x, one kernel for the whole batch.
    """
    B, C, H, W = x.shape
    shifts = shifts.to(x.device).long()
    rows = torch.arange(H, device=x.device).view(1, H, 1) - shifts[:, 0].view(B, 1, 1)  # [B, H, 1]
    cols = torch.arange(W, device=x.device).view(1, 1, W) - shifts[:, 1].view(B, 1, 1)  # [B, 1, W]
    valid = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)  # [B, H, W]
    src = rows.clamp(0, H - 1) * W + cols.clamp(0, W - 1)  # [B, H, W] flat source index
    out = torch.gather(x.reshape(B, C, H * W), 2, src.reshape(B, 1, H * W).expand(B, C, H * W))
    return out.view(B, C, H, W) * valid.unsqueeze(1).to(x.dtype)


def rand_translation(x: torch.Tensor, generator: Optional[torch.Generator] = None,
                     ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    return translate(x, sample_translation(x, generator, ratio))


def rand_cutout(x: torch.Tensor, generator: Optional[torch.Generator] = None,
                ratio: float = CUTOUT_RATIO) -> torch.Tensor:
    """Zero a (ratio H) x (ratio W) square per sample, centre uniform over the image (clipped)."""
    B, _, H, W = x.shape
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    cy = _randint(0, H + (1 - ch % 2), (B,), x, generator)
    cx = _randint(0, W + (1 - cw % 2), (B,), x, generator)
    rows = torch.arange(H, device=x.device).view(1, H, 1) - (cy.view(B, 1, 1) - ch // 2)  # [B, H, 1]
    cols = torch.arange(W, device=x.device).view(1, 1, W) - (cx.view(B, 1, 1) - cw // 2)  # [B, 1, W]
    inside = (rows >= 0) & (rows < ch) & (cols >= 0) & (cols < cw)  # [B, H, W]
    return x * (~inside).unsqueeze(1).to(x.dtype)


AUGMENTS: Dict[str, list[Callable]] = {
    "color": [rand_brightness, rand_saturation, rand_contrast],
    "translation": [rand_translation],
    "cutout": [rand_cutout],
}


def parse_policy(policy: str) -> list[str]:
    """'color,translation' -> ['color', 'translation']; unknown names raise naming the policy."""
    names = [p.strip() for p in (policy or "").split(",") if p.strip()]
    unknown = [n for n in names if n not in AUGMENTS]
    if unknown:
        raise ValueError(f"diffaug policy {policy!r}: unknown augmentation(s) {unknown} (known: {sorted(AUGMENTS)})")
    return names


def diff_augment(x: torch.Tensor, policy: str = "translation,color",
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Apply `policy` to images [B, C, H, W] in [-1, 1]; returns a new tensor of the same shape.

    The identity (same tensor) when the policy is empty.
    """
    names = parse_policy(policy)
    if not names:
        return x
    if x.ndim != 4:
        raise ValueError(f"diff_augment expects images [B, C, H, W], got shape {tuple(x.shape)}")
    for name in names:
        for fn in AUGMENTS[name]:
            x = fn(x, generator=generator)
    return x.contiguous()


__all__ = ["diff_augment", "parse_policy", "AUGMENTS", "rand_brightness", "rand_saturation", "rand_contrast",
           "rand_translation", "sample_translation", "translate", "rand_cutout", "max_shift"]
