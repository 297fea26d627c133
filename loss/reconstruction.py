"""Tokenizer training losses with a generator mode and a discriminator mode.

* `ReconstructionLoss`: REPA-E's `ReconstructionLoss_Single_Stage` in "vae" mode, configured by
  `configs/l1_lpips_kl_gan.yaml` (same keys). Fixed GAN weight (optionally adaptive), LeCam.
* `VAVAELoss` (alias `LPIPSWithDiscriminator`): the LDM / VA-VAE loss of
  `vavae/ldm/modules/losses/contperceptual.py`: nll with a log-variance, KL, adaptive GAN weight
  at the DECODER's last layer, and the VF alignment term with its adaptive weight at the
  ENCODER's last layer.

* `VQLPIPSLoss`: taming's `VQLPIPSWithDiscriminator` for VQGAN training.
(RAE's decoder loss is in `loss/rae.py`.)

They share the pieces below (pixel loss, KL per batch, the generator's adversarial term with a
frozen fp32 discriminator, the two-call discriminator step) and `loss.gan` / `loss.alignment`.

Shapes: inputs / reconstructions [B, C, H, W] in [-1, 1]; posterior = a
`models.autoencoder.DiagonalGaussianDistribution` over [B, E, h, w] (`kl()` gives [B]).
Returned log values are detached 0-d tensors.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from loss.alignment import adaptive_vf_weight, vf_loss
from loss.gan import (adaptive_weight, adopt_weight, can_backprop, generator_loss, get_d_loss, hinge_d_loss,
                      lecam_loss, run_discriminator, update_lecam_ema_)
from loss.perceptual import LPIPS, PerceptualLoss, ZeroPerceptual
from models.discriminators import NLayerDiscriminator

# REPA-E's hard-coded discriminator (ndf 64, 3 layers, BatchNorm).
DEFAULT_DISCRIMINATOR = dict(input_nc=3, ndf=64, n_layers=3, use_actnorm=False)


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------
PIXEL_LOSSES = ("l1", "l2")


def pixel_loss(inputs: torch.Tensor, reconstructions: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Per-element |x - x_hat| ("l1") or (x - x_hat)^2 ("l2"), [B, C, H, W]."""
    if kind == "l1":
        return (inputs - reconstructions).abs()
    if kind == "l2":
        return (inputs - reconstructions).pow(2)
    raise ValueError(f"reconstruction_loss must be 'l1' or 'l2', got {kind!r}")


def kl_per_batch(posterior) -> torch.Tensor:
    """sum_n KL(q(z|x_n) || N(0, I)) / B: KL summed over latent dims, averaged over samples (0-d)."""
    kl = posterior.kl().float()  # [B]
    return kl.sum() / kl.shape[0]


def build_discriminator(spec: Union[None, Mapping, nn.Module], source: str) -> nn.Module:
    """A discriminator module from NLayerDiscriminator kwargs, a ready module, or None (default)."""
    if isinstance(spec, nn.Module):
        return spec
    kwargs = dict(DEFAULT_DISCRIMINATOR if spec is None else spec)
    unknown = sorted(set(kwargs) - set(DEFAULT_DISCRIMINATOR))
    if unknown:
        raise ValueError(f"{source}: unknown discriminator keys {unknown} (known: {sorted(DEFAULT_DISCRIMINATOR)})")
    return NLayerDiscriminator(**kwargs)


def adversarial_generator_loss(discriminator: nn.Module, reconstructions: torch.Tensor) -> torch.Tensor:
    """-mean D(x_hat) with D frozen (gradients reach the reconstruction, not D) and run in fp32."""
    return generator_loss(run_discriminator(discriminator, reconstructions, freeze_params=True))


def discriminator_step(discriminator: nn.Module, inputs: torch.Tensor, reconstructions: torch.Tensor,
                       d_loss_fn=hinge_d_loss) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_loss, logits_real, logits_fake): real and fake go through D in two SEPARATE calls, as
    both originals do (BatchNorm in train mode normalises each with its own batch statistics)."""
    logits_real = run_discriminator(discriminator, inputs.detach())
    logits_fake = run_discriminator(discriminator, reconstructions.detach())
    return d_loss_fn(logits_real, logits_fake), logits_real, logits_fake


def _check_mode(mode: str) -> str:
    if mode not in ("generator", "discriminator"):
        raise ValueError(f"loss mode must be 'generator' or 'discriminator', got {mode!r}")
    return mode


def _scalar(value) -> torch.Tensor:
    return value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# REPA-E
# --------------------------------------------------------------------------------------------
REPAE_LOSS_KEYS = ("discriminator_start", "discriminator_factor", "discriminator_weight", "quantizer_weight",
                   "perceptual_loss", "perceptual_weight", "reconstruction_loss", "reconstruction_weight",
                   "lecam_regularization_weight", "kl_weight", "logvar_init")
# Optional keys (ours, with defaults): the original's lecam_ema_decay, then extras.
REPAE_OPTIONAL_KEYS = {
    "lecam_ema_decay": 0.999,
    "discriminator": None,  # NLayerDiscriminator kwargs; None = REPA-E's (3, 64, 3 layers, BatchNorm)
    "adaptive_disc_weight": False,  # taming's adaptive GAN weight instead of the fixed one
    "perceptual_input_range": "[-1,1]",  # "repae_quirk" reproduces the published REPA-E runs
    "perceptual_vgg_weights": "imagenet",  # or a local torchvision VGG16 file, or "random"
}


class ReconstructionLoss(nn.Module):
    """REPA-E's VAE loss (`ReconstructionLoss_Single_Stage`, quantize_mode "vae").

    Runs in float32 with autocast disabled (as the original), under any mixed precision.

    generator: rec = mean |x - x_hat| (or squared) * reconstruction_weight / exp(logvar) (no
      +logvar term; logvar is a frozen scalar) + perceptual_weight * mean LPIPS + kl_weight * KL
      + d_weight * factor * (-mean D(x_hat)), factor = discriminator_factor once global_step >=
      discriminator_start, else 0 (D is then not run). d_weight = discriminator_weight, or with
      `adaptive_disc_weight` that times clamp(||grad rec|| / (||grad gan|| + 1e-4), 0, 1e4) at
      `last_layer` (pass the decoder's conv_out.weight).
    discriminator: factor * hinge(D(x), D(x_hat)) + LeCam (when its weight > 0; counted during
      warm-up too) against EMA logit means updated after use.

    Args:
        config: the YAML's dict (`{model: {vq_model: {quantize_mode: vae}}, losses: {...}}`) or its
            `losses` mapping alone; keys as `configs/l1_lpips_kl_gan.yaml` plus REPAE_OPTIONAL_KEYS.
        discriminator: NLayerDiscriminator kwargs or a module; overrides `losses.discriminator`.
        perceptual: a distance module `(x, y) -> [B, 1, 1, 1]` to use instead of LPIPS. With
            perceptual_weight 0 no network is built and the term is skipped.
    State dict: `discriminator.main.*`, `logvar`, `perceptual_loss.imagenet_mean/std`, and
    `ema_real_logits_mean` / `ema_fake_logits_mean` only with LeCam (the original's keys).
    """

    def __init__(self, config: Mapping, discriminator: Union[None, Mapping, nn.Module] = None,
                 perceptual: Optional[nn.Module] = None, source: str = "loss config"):
        super().__init__()
        losses = self._losses_section(config, source)
        missing = [k for k in REPAE_LOSS_KEYS if k not in losses]
        if missing:
            raise KeyError(f"{source}: missing loss keys {missing}")
        unknown = sorted(set(losses) - set(REPAE_LOSS_KEYS) - set(REPAE_OPTIONAL_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown loss keys {unknown}")
        opts = {**REPAE_OPTIONAL_KEYS, **{k: losses[k] for k in REPAE_OPTIONAL_KEYS if k in losses}}

        self.discriminator_start = int(losses["discriminator_start"])
        self.discriminator_factor = float(losses["discriminator_factor"])
        self.discriminator_weight = float(losses["discriminator_weight"])
        self.quantizer_weight = float(losses["quantizer_weight"])  # unused in vae mode, kept for configs
        self.perceptual_weight = float(losses["perceptual_weight"])
        self.reconstruction_loss = str(losses["reconstruction_loss"])
        if self.reconstruction_loss not in PIXEL_LOSSES:
            raise ValueError(f"{source}: reconstruction_loss must be one of {PIXEL_LOSSES}, got {self.reconstruction_loss!r}")
        self.reconstruction_weight = float(losses["reconstruction_weight"])
        self.lecam_regularization_weight = float(losses["lecam_regularization_weight"])
        self.lecam_ema_decay = float(opts["lecam_ema_decay"])
        self.kl_weight = float(losses["kl_weight"])
        self.adaptive_disc_weight = bool(opts["adaptive_disc_weight"])

        if perceptual is None and self.perceptual_weight > 0:
            if losses["perceptual_loss"] != "lpips":
                raise ValueError(f"{source}: perceptual_loss {losses['perceptual_loss']!r} is not supported (use 'lpips')")
            perceptual = LPIPS(vgg_weights=opts["perceptual_vgg_weights"], input_range=opts["perceptual_input_range"])
        self.perceptual_loss = PerceptualLoss(perceptual if perceptual is not None else ZeroPerceptual())
        self.discriminator = build_discriminator(discriminator if discriminator is not None else opts["discriminator"],
                                                 f"{source}: discriminator")
        # A frozen scalar: the reconstruction term is divided by exp(logvar) (no +logvar term).
        self.logvar = nn.Parameter(torch.ones(()) * float(losses["logvar_init"]), requires_grad=False)
        if self.lecam_regularization_weight > 0:
            self.register_buffer("ema_real_logits_mean", torch.zeros(1))
            self.register_buffer("ema_fake_logits_mean", torch.zeros(1))

    @staticmethod
    def _losses_section(config: Mapping, source: str) -> Mapping:
        if "losses" not in config:
            return config
        mode = ((config.get("model") or {}).get("vq_model") or {}).get("quantize_mode", "vae")
        if mode != "vae":
            raise ValueError(f"{source}: model.vq_model.quantize_mode={mode!r}; only 'vae' is supported")
        return config["losses"]

    def factor(self, global_step: int) -> float:
        return adopt_weight(self.discriminator_factor, global_step, threshold=self.discriminator_start)

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posterior, global_step: int,
                mode: str = "generator", last_layer: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        # The whole loss (pixel term, LPIPS, KL, discriminator) runs in float32 with autocast off,
        # whatever the caller's mixed precision: the original's forward is @autocast(enabled=False).
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            inputs, reconstructions = inputs.float().contiguous(), reconstructions.float().contiguous()
            if _check_mode(mode) == "generator":
                return self._generator(inputs, reconstructions, posterior, global_step, last_layer)
            return self._discriminator(inputs, reconstructions, global_step)

    def _generator(self, inputs, reconstructions, posterior, global_step, last_layer):
        rec = pixel_loss(inputs, reconstructions, self.reconstruction_loss).mean() * self.reconstruction_weight
        rec = rec / torch.exp(self.logvar)
        if self.perceptual_weight > 0:
            perc = self.perceptual_loss(inputs, reconstructions).mean()
        else:
            perc = inputs.new_zeros(())
        factor = self.factor(global_step)
        gan = inputs.new_zeros(())
        d_weight = self.discriminator_weight
        if factor > 0 and self.discriminator_weight > 0:
            gan = adversarial_generator_loss(self.discriminator, reconstructions)
            if self.adaptive_disc_weight:
                nll = rec + self.perceptual_weight * perc
                if can_backprop(nll, gan):
                    if last_layer is None:
                        raise ValueError("ReconstructionLoss: adaptive_disc_weight needs last_layer "
                                         "(the decoder's conv_out.weight)")
                    d_weight = adaptive_weight(nll, gan, last_layer) * self.discriminator_weight
                else:  # no graph (validation): the GAN term is not weighted
                    d_weight = 0.0
        kl = kl_per_batch(posterior)
        weighted_gan = d_weight * factor * gan
        total = rec + self.perceptual_weight * perc + self.kl_weight * kl + weighted_gan
        return total, {
            "total_loss": total.detach(),
            "reconstruction_loss": rec.detach(),
            "perceptual_loss": (self.perceptual_weight * perc).detach(),
            "kl_loss": (self.kl_weight * kl).detach(),
            "weighted_gan_loss": weighted_gan.detach(),
            "discriminator_factor": _scalar(factor),
            "d_weight": _scalar(d_weight),
            "gan_loss": gan.detach(),
        }

    def _discriminator(self, inputs, reconstructions, global_step):
        hinge, logits_real, logits_fake = discriminator_step(self.discriminator, inputs, reconstructions)
        loss = self.factor(global_step) * hinge
        lecam = inputs.new_zeros(())
        if self.lecam_regularization_weight > 0:
            real_mean, fake_mean = logits_real.mean(), logits_fake.mean()
            lecam = lecam_loss(real_mean, fake_mean, self.ema_real_logits_mean, self.ema_fake_logits_mean) \
                * self.lecam_regularization_weight
            update_lecam_ema_(self.ema_real_logits_mean, self.ema_fake_logits_mean, real_mean, fake_mean,
                              self.lecam_ema_decay)
        loss = loss + lecam
        return loss, {
            "discriminator_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
            "lecam_loss": lecam.detach(),
        }


# --------------------------------------------------------------------------------------------
# VA-VAE / LDM
# --------------------------------------------------------------------------------------------
class VAVAELoss(nn.Module):
    """VA-VAE's `LPIPSWithDiscriminator` (LDM contperceptual loss + VF alignment).

    optimizer_idx 0 (autoencoder):
      rec = |x - x_hat| + perceptual_weight * LPIPS (per element), nll = rec / exp(logvar) + logvar,
      nll_loss = sum(nll) / B, kl_loss = sum(KL) / B, g_loss = -mean D(x_hat) (always computed),
      d_weight = clamp(||grad nll|| / (||grad g|| + 1e-4), 0, 1e4) * disc_weight at `last_layer`
      (the DECODER's conv_out.weight; 0 when disc_factor is 0 or without a graph),
      VF (when z and aux_feature are given): vf_loss of loss.alignment, weight vf_weight or, with
      adaptive_vf, clamp(||grad nll|| / (||grad vf|| + 1e-4), 0, 1e8) * vf_weight at
      `enc_last_layer` (the ENCODER's conv_out.weight),
      loss = sum(weights * nll) / B + kl_weight * kl_loss + d_weight * disc_factor * g_loss
             + vf_weight * vf_loss, disc_factor = 0 before global_step disc_start.
    optimizer_idx 1 (discriminator): disc_factor * disc_loss(D(x), D(x_hat)), two separate D calls.

    Constructor arguments are the original's (`lossconfig.params` of the VA-VAE YAMLs);
    `pixelloss_weight` is accepted and unused, as in the original. Extras: `disc_ndf`, and
    `perceptual` (a distance module replacing LPIPS), `perceptual_vgg_weights`.
    `disc_conditional` and `pp_style` are not supported. logvar is a frozen scalar (the original
    never optimises it). State dict: `discriminator.main.*`, `logvar`.
    """

    def __init__(self, disc_start: int, logvar_init: float = 0.0, kl_weight: float = 1.0,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 1.0, perceptual_weight: float = 1.0,
                 use_actnorm: bool = False, disc_conditional: bool = False, disc_loss: str = "hinge",
                 pp_style: bool = False, vf_weight: float = 1e2, adaptive_vf: bool = False, cos_margin: float = 0.0,
                 distmat_margin: float = 0.0, distmat_weight: float = 1.0, cos_weight: float = 1.0,
                 disc_ndf: int = 64, perceptual: Optional[nn.Module] = None, perceptual_vgg_weights: str = "imagenet"):
        super().__init__()
        if disc_conditional:
            raise ValueError("VAVAELoss: disc_conditional=True is not supported")
        if pp_style:
            raise ValueError("VAVAELoss: pp_style=True is not supported")
        self.disc_loss = get_d_loss(disc_loss, "VAVAELoss disc_loss")
        self.discriminator_iter_start = int(disc_start)
        self.kl_weight = float(kl_weight)
        self.pixel_weight = float(pixelloss_weight)
        self.disc_factor = float(disc_factor)
        self.discriminator_weight = float(disc_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.vf_weight = float(vf_weight)
        self.adaptive_vf = bool(adaptive_vf)
        self.vf_kwargs = dict(distmat_margin=float(distmat_margin), cos_margin=float(cos_margin),
                              distmat_weight=float(distmat_weight), cos_weight=float(cos_weight))
        if perceptual is None and self.perceptual_weight > 0:
            perceptual = LPIPS(vgg_weights=perceptual_vgg_weights, input_range="[-1,1]")
        if perceptual is not None:
            self.perceptual_loss = perceptual
        self.logvar = nn.Parameter(torch.ones(()) * float(logvar_init), requires_grad=False)
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, ndf=disc_ndf, n_layers=disc_num_layers,
                                                 use_actnorm=use_actnorm)

    def factor(self, global_step: int) -> float:
        return adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)

    def vf_term(self, z: torch.Tensor, aux_feature: torch.Tensor, nll_loss: Optional[torch.Tensor] = None,
                enc_last_layer: Optional[torch.Tensor] = None) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """(VF components, the weight of vf_loss): adaptive at the encoder's last layer when
        `adaptive_vf` and a graph exists, else the constant vf_weight (0 without a graph when
        adaptive, as the original in validation)."""
        parts = vf_loss(z, aux_feature, **self.vf_kwargs)
        if not self.adaptive_vf:
            return parts, torch.tensor(self.vf_weight, dtype=torch.float32, device=z.device)
        if nll_loss is None or not can_backprop(nll_loss, parts["vf_loss"]):
            return parts, torch.zeros((), device=z.device)
        if enc_last_layer is None:
            raise ValueError("VAVAELoss: adaptive_vf needs enc_last_layer (the encoder's conv_out.weight)")
        return parts, adaptive_vf_weight(nll_loss, parts["vf_loss"], enc_last_layer, self.vf_weight)

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posteriors, optimizer_idx: int,
                global_step: int, last_layer: Optional[torch.Tensor] = None, cond=None, split: str = "train",
                weights: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                aux_feature: Optional[torch.Tensor] = None, enc_last_layer: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if cond is not None:
            raise ValueError("VAVAELoss: cond is not supported (disc_conditional)")
        inputs, reconstructions = inputs.float().contiguous(), reconstructions.float().contiguous()
        if optimizer_idx == 0:
            return self._generator(inputs, reconstructions, posteriors, global_step, last_layer, split, weights,
                                   z, aux_feature, enc_last_layer)
        if optimizer_idx == 1:
            d_loss, logits_real, logits_fake = discriminator_step(self.discriminator, inputs, reconstructions,
                                                                  self.disc_loss)
            d_loss = self.factor(global_step) * d_loss
            return d_loss, {f"{split}/disc_loss": d_loss.detach(),
                            f"{split}/logits_real": logits_real.detach().mean(),
                            f"{split}/logits_fake": logits_fake.detach().mean()}
        raise ValueError(f"VAVAELoss: optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}")

    def _generator(self, inputs, reconstructions, posteriors, global_step, last_layer, split, weights,
                   z, aux_feature, enc_last_layer):
        rec = pixel_loss(inputs, reconstructions, "l1")  # [B, C, H, W]
        if self.perceptual_weight > 0:
            rec = rec + self.perceptual_weight * self.perceptual_loss(inputs, reconstructions)  # + [B, 1, 1, 1]
        nll = rec / torch.exp(self.logvar) + self.logvar
        weighted = nll if weights is None else weights * nll
        weighted_nll_loss = weighted.sum() / weighted.shape[0]
        nll_loss = nll.sum() / nll.shape[0]
        kl = kl_per_batch(posteriors)

        g_loss = adversarial_generator_loss(self.discriminator, reconstructions)
        d_weight = torch.zeros((), device=inputs.device)
        if self.disc_factor > 0 and can_backprop(nll_loss, g_loss):
            if last_layer is None:
                raise ValueError("VAVAELoss: the adaptive GAN weight needs last_layer (the decoder's conv_out.weight)")
            d_weight = adaptive_weight(nll_loss, g_loss, last_layer) * self.discriminator_weight
        disc_factor = self.factor(global_step)
        loss = weighted_nll_loss + self.kl_weight * kl + d_weight * disc_factor * g_loss

        log = {f"{split}/logvar": self.logvar.detach(), f"{split}/kl_loss": kl.detach(),
               f"{split}/nll_loss": nll_loss.detach(), f"{split}/rec_loss": rec.detach().mean(),
               f"{split}/d_weight": d_weight.detach(), f"{split}/disc_factor": _scalar(disc_factor),
               f"{split}/g_loss": g_loss.detach()}
        if z is not None and aux_feature is not None:
            parts, vf_weight = self.vf_term(z, aux_feature, nll_loss, enc_last_layer)
            loss = loss + vf_weight * parts["vf_loss"]
            log[f"{split}/vf_loss"] = parts["vf_loss"].detach()
            log[f"{split}/vf_weight"] = vf_weight.detach()
        log[f"{split}/total_loss"] = loss.detach()
        return loss, log


# The name VA-VAE / LDM configs use (`ldm.modules.losses.LPIPSWithDiscriminator`).
LPIPSWithDiscriminator = VAVAELoss

__all__ = ["ReconstructionLoss", "VAVAELoss", "LPIPSWithDiscriminator", "pixel_loss", "kl_per_batch",
           "adversarial_generator_loss", "discriminator_step", "build_discriminator", "DEFAULT_DISCRIMINATOR"]




# --------------------------------------------------------------------------------------------
# VQGAN (appended section: taming's VQLPIPSWithDiscriminator)
# --------------------------------------------------------------------------------------------
class VQLPIPSLoss(nn.Module):
    """taming-transformers' `VQLPIPSWithDiscriminator` for `VQModel` training.

    optimizer_idx 0 (autoencoder):
      nll = mean(|x - x_hat| + perceptual_weight * LPIPS(x, x_hat)) (LPIPS broadcast per pixel),
      g = -mean D(x_hat) (D frozen, fp32),
      d_w = clamp(||grad_W nll|| / (||grad_W g|| + 1e-4), 0, 1e4) * disc_weight at `last_layer`
            (the decoder's conv_out.weight; 0 without a graph, e.g. validation),
      loss = nll + d_w * disc_factor * g + codebook_weight * mean(qloss),
      disc_factor = 0 before global_step disc_start. Unlike taming, D is not run at all while
      disc_factor is 0 (the term is multiplied by 0 there anyway; this saves a D forward and an
      adaptive-weight backward per step).
    optimizer_idx 1 (discriminator): disc_factor * disc_loss(D(x), D(x_hat)) with real and fake in
      two separate D calls (hinge or vanilla).

    Constructor arguments are taming's (`lossconfig.params` of its YAMLs); `pixelloss_weight` is
    accepted and unused, as in taming. Extras: `disc_ndf`, `perceptual` (a distance module
    replacing LPIPS, e.g. one that repeats 1-channel images to RGB), `perceptual_vgg_weights`.
    State dict: `discriminator.main.*` only.
    """

    def __init__(self, disc_start: int, codebook_weight: float = 1.0, pixelloss_weight: float = 1.0,
                 disc_num_layers: int = 3, disc_in_channels: int = 3, disc_factor: float = 1.0,
                 disc_weight: float = 1.0, perceptual_weight: float = 1.0, use_actnorm: bool = False,
                 disc_conditional: bool = False, disc_ndf: int = 64, disc_loss: str = "hinge",
                 perceptual: Optional[nn.Module] = None, perceptual_vgg_weights: str = "imagenet"):
        super().__init__()
        if disc_conditional:
            raise ValueError("VQLPIPSLoss: disc_conditional=True is not supported")
        self.discriminator_iter_start = int(disc_start)
        self.codebook_weight = float(codebook_weight)
        self.pixel_weight = float(pixelloss_weight)
        self.disc_factor = float(disc_factor)
        self.discriminator_weight = float(disc_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.disc_loss = get_d_loss(disc_loss, "VQLPIPSLoss disc_loss")
        if perceptual is None and self.perceptual_weight > 0:
            perceptual = LPIPS(vgg_weights=perceptual_vgg_weights, input_range="[-1,1]")
        self.perceptual_loss = perceptual
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, ndf=disc_ndf, n_layers=disc_num_layers,
                                                 use_actnorm=use_actnorm)

    def factor(self, global_step: int) -> float:
        return adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)

    def forward(self, codebook_loss: torch.Tensor, inputs: torch.Tensor, reconstructions: torch.Tensor,
                optimizer_idx: int, global_step: int, last_layer: Optional[torch.Tensor] = None, cond=None,
                split: str = "train") -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if cond is not None:
            raise ValueError("VQLPIPSLoss: cond is not supported (disc_conditional)")
        inputs, reconstructions = inputs.float().contiguous(), reconstructions.float().contiguous()
        disc_factor = self.factor(global_step)
        if optimizer_idx == 1:
            d_loss, logits_real, logits_fake = discriminator_step(self.discriminator, inputs, reconstructions,
                                                                  self.disc_loss)
            d_loss = disc_factor * d_loss
            return d_loss, {f"{split}/disc_loss": d_loss.detach(),
                            f"{split}/logits_real": logits_real.detach().mean(),
                            f"{split}/logits_fake": logits_fake.detach().mean()}
        if optimizer_idx != 0:
            raise ValueError(f"VQLPIPSLoss: optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}")
        rec = pixel_loss(inputs, reconstructions, "l1")  # [B, C, H, W]
        p_loss = inputs.new_zeros(())
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs, reconstructions)  # [B, 1, 1, 1]
            rec = rec + self.perceptual_weight * p_loss
        nll_loss = rec.mean()
        g_loss = inputs.new_zeros(())
        d_weight = inputs.new_zeros(())
        if disc_factor > 0:
            g_loss = adversarial_generator_loss(self.discriminator, reconstructions)
            if can_backprop(nll_loss, g_loss):
                if last_layer is None:
                    raise ValueError("VQLPIPSLoss: the adaptive GAN weight needs last_layer (the decoder's conv_out.weight)")
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer) * self.discriminator_weight
        codebook_loss = codebook_loss.float().mean()
        loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss
        return loss, {f"{split}/total_loss": loss.detach(), f"{split}/quant_loss": codebook_loss.detach(),
                      f"{split}/nll_loss": nll_loss.detach(), f"{split}/rec_loss": (inputs - reconstructions).abs().mean().detach(),
                      f"{split}/p_loss": p_loss.detach().mean(), f"{split}/d_weight": d_weight.detach(),
                      f"{split}/disc_factor": _scalar(disc_factor), f"{split}/g_loss": g_loss.detach()}


__all__ += ["VQLPIPSLoss"]
