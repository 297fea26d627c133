"""The RAE decoder's stage-1 loss (`RAELoss`): L1 + LPIPS from the start, and from an epoch on an
adaptive-weight GAN against the DINO discriminator through DiffAug, with 8-bit quantised fakes.
The REPA-E, VA-VAE and VQGAN losses are in `loss/reconstruction.py`."""
from __future__ import annotations

import contextlib
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from loss.diffaug import diff_augment, parse_policy
from loss.gan import adaptive_weight, can_backprop, generator_loss, get_d_loss, run_discriminator
from loss.perceptual import LPIPS

RAE_LOSS_DEFAULTS = dict(perceptual_weight=1.0, gan_weight=0.75, disc_start_epoch=8, disc_update_start_epoch=6,
                         adaptive_eps=1e-6, adaptive_max=1e4, diffaug_policy="translation,color",
                         vgg_weights="imagenet", disc_loss="hinge", full_precision=False)


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> clamped and rounded to the 256 levels of an 8-bit image, back in
    [-1, 1]. The discriminator then sees fakes with the same value grid as the (uint8) reals and
    cannot spot them by their continuous values."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


class RAELoss(nn.Module):
    """The RAE decoder's loss: reconstruction from the start, adaptive-weight GAN from an epoch.

    generator_loss: rec = mean |x01 - x_hat01| (pixels in [0, 1]) + perceptual_weight * mean LPIPS;
      from `disc_start_epoch` on, + gan_weight * lambda * (-mean D(DiffAug(x_hat))) with
      lambda = clamp(||d rec / dW|| / (||d gan / dW|| + adaptive_eps), 0, adaptive_max), detached,
      computed in fp32, W = `last_layer` (the decoder's decoder_pred.weight). D runs with
      detached parameters, so the generator loss never gives D a gradient.
    discriminator_loss: fake = x_hat detached, clamped and 8-bit quantised; real and fake get
      independent DiffAug draws; hinge 0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake))).
      Both go through D in ONE call (D's TokenNorm is per sample, so batching them changes
      nothing but the cost).
    The two epoch thresholds are read through `use_gan(epoch)` / `update_discriminator(epoch)`.

    Args:
        discriminator: a module, or a `build_dino_discriminator` config dict (None = the released
            DINO ViT-S/8 from the hub; `{"pretrained": "random", ...}` offline).
        perceptual: a distance module `(x, y) -> [B, 1, 1, 1]` on [-1, 1] images replacing LPIPS;
            with perceptual_weight 0 no VGG is built.
        vgg_weights: LPIPS trunk ("imagenet", a local torchvision VGG16 file, or "random").
        full_precision: False (the original): LPIPS and the discriminator run under the caller's
            autocast (train_stage1.py computes the RAE losses inside it, so bf16 covers the whole
            step); True runs them in float32 with autocast off. The adaptive weight is fp32 always.
    Inputs are [B, 3, H, W] in [-1, 1]. Log values are detached 0-d tensors. `state_dict()`
    holds the discriminator heads only (`discriminator.heads.*`; LPIPS and the frozen DINO
    backbone are constants kept out of it).
    """

    def __init__(self, discriminator: Union[None, Mapping, nn.Module] = None, perceptual_weight: float = 1.0,
                 gan_weight: float = 0.75, disc_start_epoch: int = 8, disc_update_start_epoch: int = 6,
                 adaptive_eps: float = 1e-6, adaptive_max: float = 1e4, diffaug_policy: str = "translation,color",
                 vgg_weights: str = "imagenet", disc_loss: str = "hinge", perceptual: Optional[nn.Module] = None,
                 full_precision: bool = False):
        super().__init__()
        from models.discriminators import build_dino_discriminator

        self.full_precision = bool(full_precision)
        self.perceptual_weight = float(perceptual_weight)
        self.gan_weight = float(gan_weight)
        self.disc_start_epoch = int(disc_start_epoch)
        self.disc_update_start_epoch = int(disc_update_start_epoch)
        self.adaptive_eps, self.adaptive_max = float(adaptive_eps), float(adaptive_max)
        parse_policy(diffaug_policy)  # fail at construction on a typo, not at epoch 6
        self.diffaug_policy = diffaug_policy
        self.d_loss_fn = get_d_loss(disc_loss, "RAELoss disc_loss")
        if perceptual is None and self.perceptual_weight > 0:
            perceptual = LPIPS(vgg_weights=vgg_weights, input_range="[-1,1]")
        self.perceptual_loss = perceptual
        self.discriminator = (discriminator if isinstance(discriminator, nn.Module)
                              else build_dino_discriminator(discriminator))

    @classmethod
    def from_config(cls, cfg: Optional[Mapping] = None, source: str = "RAE loss config", **modules) -> "RAELoss":
        """From a dict with RAE_LOSS_DEFAULTS keys plus `discriminator` (a DINO disc config);
        unknown keys raise naming `source`."""
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - set(RAE_LOSS_DEFAULTS) - {"discriminator"})
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown} (known: {sorted(RAE_LOSS_DEFAULTS) + ['discriminator']})")
        return cls(**{**RAE_LOSS_DEFAULTS, **cfg, **modules})

    # ---- schedule ------------------------------------------------------------------------------
    def use_gan(self, epoch: int) -> bool:
        """Whether the generator loss includes the adversarial term at `epoch` (0-based)."""
        return epoch >= self.disc_start_epoch

    def update_discriminator(self, epoch: int) -> bool:
        """Whether the discriminator is trained at `epoch` (0-based)."""
        return epoch >= self.disc_update_start_epoch

    # ---- pieces --------------------------------------------------------------------------------
    def augment(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return diff_augment(x, self.diffaug_policy, generator)

    def reconstruction_terms(self, x: torch.Tensor, recon: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(l1 on [0, 1] pixels, mean LPIPS), both 0-d float32."""
        l1 = 0.5 * (x.float() - recon.float()).abs().mean()  # |x/2 + 1/2 - (r/2 + 1/2)| = |x - r| / 2
        if self.perceptual_loss is None or self.perceptual_weight == 0:
            return l1, torch.zeros((), device=x.device)
        # full_precision: LPIPS in float32 with autocast off; else under the caller's autocast
        with torch.autocast(device_type=x.device.type, enabled=False) if self.full_precision else contextlib.nullcontext():
            if self.full_precision:
                x, recon = x.float(), recon.float()
            return l1, self.perceptual_loss(x, recon).float().mean()

    def adaptive_weight(self, rec: torch.Tensor, gan: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """clamp(||grad_W rec|| / (||grad_W gan|| + eps), 0, max), detached, in fp32."""
        with torch.autocast(device_type=rec.device.type, enabled=False):
            return adaptive_weight(rec.float(), gan.float(), last_layer, self.adaptive_max, self.adaptive_eps)

    # ---- the two losses ------------------------------------------------------------------------
    def generator_loss(self, x: torch.Tensor, recon: torch.Tensor, last_layer: Optional[torch.Tensor], epoch: int,
                       generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        l1, lp = self.reconstruction_terms(x, recon)
        rec = l1 + self.perceptual_weight * lp
        zero = torch.zeros((), device=x.device)
        gan, weight, loss = zero, zero, rec
        if self.use_gan(epoch):
            logits = run_discriminator(self.discriminator, self.augment(recon, generator), freeze_params=True,
                                       full_precision=self.full_precision)
            gan = generator_loss(logits.float())
            if can_backprop(rec, gan):
                if last_layer is None:
                    raise ValueError("RAELoss.generator_loss: the adaptive GAN weight needs last_layer "
                                     "(the decoder's decoder_pred.weight)")
                weight = self.adaptive_weight(rec, gan, last_layer)
            loss = rec + self.gan_weight * weight * gan
        logs = {"rec": rec.detach(), "l1": l1.detach(), "lpips": lp.detach(), "gan": gan.detach(),
                "adaptive_weight": weight.detach(), "total": loss.detach()}
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, recon: torch.Tensor, generator: Optional[torch.Generator] = None
                           ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        real = self.augment(x.detach().float(), generator)
        fake = self.augment(quantize_8bit(recon.detach().float()), generator)  # an independent draw
        B = real.shape[0]
        logits = run_discriminator(self.discriminator, torch.cat([real, fake], dim=0),
                                   full_precision=self.full_precision).float()  # [2B, L]
        logits_real, logits_fake = logits[:B], logits[B:]
        loss = self.d_loss_fn(logits_real, logits_fake)
        logs = {"disc_loss": loss.detach(), "logits_real": logits_real.detach().mean(),
                "logits_fake": logits_fake.detach().mean(),
                "disc_acc": 0.5 * ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean()).detach()}
        return loss, logs


__all__ = ["RAELoss", "RAE_LOSS_DEFAULTS", "quantize_8bit"]
