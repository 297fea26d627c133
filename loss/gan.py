"""Adversarial-loss pieces shared by every tokenizer loss (REPA-E, VA-VAE/LDM, VQGAN).

* discriminator losses: hinge and vanilla (softplus), both 0.5 * (real term + fake term);
* generator loss -mean(D(x_hat)) and `adopt_weight` (the warm-up switch);
* the adaptive GAN weight of taming-transformers, ||grad nll|| / (||grad g|| + eps) at the
  decoder's last layer, clamped and detached (also used with another clamp for VA-VAE's VF weight);
* the LeCam regulariser (Tseng et al. 2021) with EMA buffers of the real/fake logit means;
* `run_discriminator`: the discriminator always runs in float32 with autocast disabled, so
  mixed-precision training never changes the GAN's numerics.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating BCE written with softplus: 0.5 * (mean sp(-D(x)) + mean sp(D(x_hat)))."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}


def get_d_loss(name: str, source: str = "disc_loss") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in D_LOSSES:
        raise ValueError(f"{source}: unknown discriminator loss {name!r} (choose from {sorted(D_LOSSES)})")
    return D_LOSSES[name]


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss -mean(D(x_hat)) (used with both D losses, as the originals)."""
    return -logits_fake.mean()


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """`value` (0) before step `threshold`, `weight` from then on: the discriminator warm-up."""
    return value if global_step < threshold else weight


# --------------------------------------------------------------------------------------------
# Adaptive weight
# --------------------------------------------------------------------------------------------
def adaptive_weight(rec_loss: torch.Tensor, other_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """clamp(||d rec_loss / d W|| / (||d other_loss / d W|| + eps), 0, max_weight), detached.

    Balances a second loss against the reconstruction at the layer W (taming: the decoder's
    `conv_out.weight`, clamp 1e4; VA-VAE's VF weight: the encoder's, clamp 1e8). Both graphs are
    retained: the caller still backpropagates the total loss. Scale by the configured weight.
    """
    if not isinstance(last_layer, torch.Tensor) or not last_layer.requires_grad:
        raise ValueError("adaptive_weight: last_layer must be a parameter that requires grad "
                         "(e.g. vae.decoder.conv_out.weight)")
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    other_grad = torch.autograd.grad(other_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(rec_grad) / (torch.norm(other_grad) + eps)
    return torch.clamp(weight, 0.0, max_weight).detach()


def can_backprop(*losses: torch.Tensor) -> bool:
    """Whether gradients through all `losses` exist (False under no_grad, e.g. validation)."""
    return torch.is_grad_enabled() and all(isinstance(t, torch.Tensor) and t.requires_grad for t in losses)


# --------------------------------------------------------------------------------------------
# LeCam
# --------------------------------------------------------------------------------------------
def lecam_loss(real_mean: torch.Tensor, fake_mean: torch.Tensor,
               ema_real: torch.Tensor, ema_fake: torch.Tensor) -> torch.Tensor:
    """relu(mean D(x) - ema_fake)^2 + relu(ema_real - mean D(x_hat))^2 (0-d).

    real_mean, fake_mean: the current batch's logit means (0-d); ema_*: the EMA buffers (1,)
    *before* this step's update. Keeps D's outputs on real and fake data from drifting apart.
    """
    return (F.relu(real_mean - ema_fake).pow(2).mean() + F.relu(ema_real - fake_mean).pow(2).mean())


@torch.no_grad()
def update_lecam_ema_(ema_real: torch.Tensor, ema_fake: torch.Tensor, real_mean: torch.Tensor,
                      fake_mean: torch.Tensor, decay: float) -> None:
    """In place: ema <- ema * decay + batch mean * (1 - decay), for real and fake logits."""
    ema_real.mul_(decay).add_(real_mean.detach().to(ema_real.dtype) * (1.0 - decay))
    ema_fake.mul_(decay).add_(fake_mean.detach().to(ema_fake.dtype) * (1.0 - decay))


# --------------------------------------------------------------------------------------------
# Running the discriminator
# --------------------------------------------------------------------------------------------
def run_discriminator(discriminator: nn.Module, x: torch.Tensor, freeze_params: bool = False,
                      full_precision: bool = True) -> torch.Tensor:
    """D(x), by default in float32 with autocast disabled (the REPA-E / taming GANs, sensitive to
    fp16 rounding, run so in the originals); `full_precision=False` runs D under the caller's
    autocast, as RAE's original does with its DINO discriminator.

    freeze_params: run D with detached parameters (the generator step): gradients reach x but not
    D, without toggling `requires_grad` (no global state, torch.compile-friendly). Buffers are
    D's own, so BatchNorm in train mode still updates its running statistics as in the originals.
    """
    with torch.autocast(device_type=x.device.type, enabled=False) if full_precision else contextlib.nullcontext():
        if full_precision:
            x = x.float()
        if freeze_params:
            params = {name: p.detach() for name, p in discriminator.named_parameters()}
            return torch.func.functional_call(discriminator, params, (x,))
        return discriminator(x)


__all__ = ["hinge_d_loss", "vanilla_d_loss", "D_LOSSES", "get_d_loss", "generator_loss", "adopt_weight",
           "adaptive_weight", "can_backprop", "lecam_loss", "update_lecam_ema_", "run_discriminator"]
