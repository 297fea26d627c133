"""Stage 1: train an image tokenizer (KL-VAE, VA-VAE, VQGAN or RAE) with its GAN.

  accelerate launch train_stage1.py --tokenizer vavae --config configs/stage1/vavae_f16d32_stage1.yaml \
      --data-dir DATA --exp-name NAME

One optimisation step, for every kind:
  1. generator update: x -> tokenizer -> x_hat; the kind's loss in generator mode
       kl / vavae  VAVAELoss: nll (L1 + LPIPS) + KL + adaptive-weight GAN (+ VF alignment of the
                   projected latent with frozen foundation features resized to the latent grid)
       vqgan       VQLPIPSLoss: nll (L1 + LPIPS) + adaptive-weight GAN + codebook loss
       rae         RAELoss: L1 + LPIPS + adaptive-weight GAN through DiffAug (frozen encoder with
                   noise augmentation; only the decoder trains)
  2. discriminator update on the same batch (rae: a fresh eval-mode reconstruction, noise off),
     once the discriminator has started, every --disc-every steps; its gradients are averaged
     over ranks explicitly (the loss module is not wrapped in DDP);
  3. EMA of the tokenizer (optional; default on for the RAE recipes).
Each optimizer has its own LR schedule on its own clock (its own count of steps taken).
Evaluation (PSNR, SSIM, LPIPS, rFID through evaluation.reconstruction.reconstruction_metrics; codebook
usage and perplexity for VQ) runs on --eval-data-dir or a seeded held-out slice of the training
data, on the EMA model when there is one, with RAE noise off. Checkpoints hold everything needed
to continue bit-for-bit (models, EMA, both optimizers and schedulers, discriminator, RNG of every
rank, data position); export with save_vae_weights.py.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Subset
from tqdm.auto import tqdm

import utils
from datasources import (
    ClipFrames,
    CropFlip,
    ResumableDistributedSampler,
    RGBView,
    VideoClipDataset,
    build_image_dataset,
    flatten_video_batch,
    image_channels_on_disk,
    is_archive,
    load_class_to_idx,
    save_class_to_idx,
)

TOKENIZERS = ("kl", "vavae", "vqgan", "rae")
# Per-kind defaults of flags left unset (None): the published recipes' values.
KIND_DEFAULTS = {
    "kl": dict(optimizer="adam", adam_beta1=0.5, adam_beta2=0.9, learning_rate=1e-4, disc_start=5001,
               disc_weight=0.5, ema_decay=0.0, model="f16d32"),
    "vavae": dict(optimizer="adam", adam_beta1=0.5, adam_beta2=0.9, learning_rate=1e-4, disc_start=5001,
                  disc_weight=0.5, ema_decay=0.0, model="vavae-f16d32"),
    "vqgan": dict(optimizer="adam", adam_beta1=0.5, adam_beta2=0.9, learning_rate=4.5e-6, disc_start=250001,
                  disc_weight=0.8, ema_decay=0.0, model="imagenet-f16-1024"),
    "rae": dict(optimizer="adamw", adam_beta1=0.9, adam_beta2=0.95, learning_rate=2e-4, disc_start=0,
                disc_weight=0.75, ema_decay=0.9978, model="dinov2-b-xl"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train_stage1.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=str, default=None, help="YAML file of flag values (flags given explicitly win)")
    utils.add_common_training_flags(p)
    # Stage-1 defaults differ from the diffusion trainers': per-kind betas, no clipping, no compile.
    p.set_defaults(adam_beta1=None, adam_beta2=None, max_grad_norm=0.0, compile=False, batch_size=32,
                   checkpointing_steps=5000, sampling_steps=1000)
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", type=str, required=False, default=None, choices=TOKENIZERS + ("vq",),
                   help="what to train (vq: the same as vqgan, the other scripts' name of the kind)")
    g.add_argument("--model", type=str, default=None,
                   help="preset: VAE_PRESETS (kl/vavae), VQ_PRESETS (vqgan) or RAE_PRESETS (rae); default per kind")
    g.add_argument("--model-config", default=None,
                   help="LDM (kl/vavae) / taming (vqgan) / RAE model config: a YAML/JSON file, or a mapping in --config")
    g.add_argument("--in-channels", type=int, default=None, help="image channels (1 for spectrograms: in = out channels)")
    g.add_argument("--init-from", type=str, default=None,
                   help="start from released weights: VA-VAE/LDM .ckpt (state_dict), taming VQGAN .ckpt, RAE decoder file")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute decoder (and encoder) blocks in backward")
    g.add_argument("--ema-decay", type=float, default=None, help="EMA of the tokenizer (0: off; default per kind)")
    g = p.add_argument_group("loss (kl / vavae / vqgan)")
    g.add_argument("--disc-start", type=int, default=None, help="step at which the GAN term and discriminator updates start")
    g.add_argument("--lightning-global-step", action="store_true",
                   help="count --disc-start as the originals' Lightning global_step does with two optimizers (the "
                        "generator at 2 x step, the discriminator at 2 x step + 1; its optimizer steps every batch, "
                        "with a zero loss before the start), so an original's value applies verbatim")
    g.add_argument("--disc-weight", type=float, default=None, help="GAN weight (times the adaptive weight)")
    g.add_argument("--disc-factor", type=float, default=1.0, help="disc_factor after --disc-start")
    g.add_argument("--disc-every", type=int, default=1, help="update the discriminator every N steps")
    g.add_argument("--disc-loss", type=str, default="hinge", choices=["hinge", "vanilla"], help="discriminator loss")
    g.add_argument("--disc-num-layers", type=int, default=3, help="PatchGAN layers")
    g.add_argument("--disc-ndf", type=int, default=64, help="PatchGAN base width")
    g.add_argument("--use-actnorm", action="store_true", help="PatchGAN with ActNorm instead of BatchNorm")
    g.add_argument("--kl-weight", type=float, default=1e-6, help="KL weight (kl / vavae)")
    g.add_argument("--perceptual-weight", type=float, default=1.0, help="LPIPS weight")
    g.add_argument("--codebook-weight", type=float, default=1.0, help="VQ codebook loss weight")
    g.add_argument("--lpips-weights", type=str, default="imagenet", help="LPIPS VGG trunk: imagenet, a local file, or random")
    g = p.add_argument_group("VF alignment (vavae)")
    g.add_argument("--vf-model", type=str, default="dinov2-vit-l", help="frozen foundation model (models.encoders name)")
    g.add_argument("--vf-weight", type=float, default=0.1, help="VF loss weight")
    g.add_argument("--adaptive-vf", action=argparse.BooleanOptionalAction, default=True, help="adaptive VF weight at the encoder's last layer")
    g.add_argument("--cos-margin", type=float, default=0.5, help="marginal cosine margin")
    g.add_argument("--distmat-margin", type=float, default=0.25, help="distance-matrix margin")
    g.add_argument("--cos-weight", type=float, default=1.0, help="weight of the cosine term")
    g.add_argument("--distmat-weight", type=float, default=1.0, help="weight of the distance-matrix term")
    g.add_argument("--vf-legacy-input", action=argparse.BooleanOptionalAction, default=True,
                   help="feed the foundation model the unnormalised [-1, 1] image bilinearly resized, as the original "
                        "VA-VAE; --no-vf-legacy-input feeds it ImageNet-normalised bicubic input")
    g.add_argument("--encoder-weights-dir", type=str, default=None, help="local folder of foundation-model weights")
    g.add_argument("--random-init-encoders", action="store_true", help="foundation / RAE encoder with random weights (tests)")
    g = p.add_argument_group("VQ (vqgan)")
    g.add_argument("--quantizer", type=str, default=None, choices=["vq2", "ema"], help="gradient codebook or EMA codebook")
    g.add_argument("--n-embed", type=int, default=None, help="codebook size (default: the preset's)")
    g.add_argument("--vq-beta", type=float, default=0.25, help="commitment weight")
    g.add_argument("--vq-legacy", action=argparse.BooleanOptionalAction, default=True, help="taming's legacy beta placement")
    g.add_argument("--vq-ema-decay", type=float, default=0.99, help="EMA codebook decay")
    g.add_argument("--dead-code-restart", action="store_true", help="EMA codebook: restart codes whose usage fell below the threshold")
    g.add_argument("--dead-code-threshold", type=float, default=1e-3, help="EMA usage below which a code is dead")
    g.add_argument("--scale-lr", action="store_true", help="taming rule: lr = accumulation x processes x micro-batch x --learning-rate")
    g = p.add_argument_group("RAE")
    g.add_argument("--noise-tau", type=float, default=None, help="training noise tau (default: the config's)")
    g.add_argument("--gan-weight", type=float, default=None, help="GAN weight (default --disc-weight of the kind: 0.75)")
    g.add_argument("--disc-start-epoch", type=int, default=8, help="epoch from which the GAN term is used")
    g.add_argument("--disc-update-start-epoch", type=int, default=6, help="epoch from which the discriminator trains")
    g.add_argument("--diffaug-policy", type=str, default="translation,color",
                   help="DiffAug policy, applied in the order given (the original: translation, then colour)")
    g.add_argument("--disc-config", default=None, help="DINO discriminator config (mapping in --config, or 'tiny')")
    g = p.add_argument_group("optimisers and schedules")
    g.add_argument("--optimizer", type=str, default=None, choices=["adam", "adamw"], help="default per kind")
    g.add_argument("--learning-rate", type=float, default=None, help="tokenizer LR (default per kind)")
    g.add_argument("--disc-learning-rate", type=float, default=None, help="discriminator LR (default: --learning-rate)")
    g.add_argument("--disc-lr-horizon", type=str, default="run", choices=["run", "disc-steps"],
                   help="discriminator schedule: 'run' = the generator's schedule counted in the discriminator's own "
                        "steps, so a late start never reaches the final LR (the originals); 'disc-steps' = fitted to "
                        "its own number of updates")
    g.add_argument("--lr-schedule", type=str, default="constant", choices=["constant", "cosine", "linear"], help="LR schedule of both optimizers")
    g.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warmup steps (each optimizer on its own clock)")
    g.add_argument("--lr-warmup-epochs", type=float, default=None, help="warmup in epochs (overrides --lr-warmup-steps)")
    g.add_argument("--lr-decay-start", type=int, default=0, help="'linear' schedule: step where decay starts")
    g.add_argument("--lr-final-ratio", type=float, default=0.0, help="final LR / base LR")
    g.add_argument("--lr-total-steps", type=int, default=None,
                   help="schedule horizon (default: the run's last step); fix it when a run is later extended")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=str, default="data", help="image folder (any class naming), archive, images.h5, or clips")
    g.add_argument("--resolution", type=int, default=256, help="training crop size")
    g.add_argument("--load-size", type=int, default=None, help="images are loaded (ADM crop) at this size, then randomly cropped to --resolution")
    g.add_argument("--load-mode", type=str, default="adm", choices=["adm", "short-side"],
                   help="how images are loaded at --load-size before the random crop: ADM center crop, or the "
                        "originals' aspect-preserving short-side resize (image folders only)")
    g.add_argument("--hflip", action="store_true", help="random horizontal flips")
    g.add_argument("--no-augment", action="store_true", help="no crop or flip (spectrograms)")
    g.add_argument("--convert-channels", action="store_true", help="convert images to --in-channels instead of refusing a mismatch")
    g.add_argument("--video-frames", type=int, default=0, help="read clips of T frames and flatten (batch, frames) to frames")
    g.add_argument("--video-stride", type=int, default=1, help="frame stride inside a clip window")
    g.add_argument("--class-to-idx", type=str, default=None, help="JSON {class folder: id} remapping the labels (custom data)")
    g.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images instead of stopping")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    g.add_argument("--eval-data-dir", type=str, default=None,
                   help="evaluation images, e.g. the ImageNet validation folder of the papers' rFID (default: "
                        "--eval-samples images of --data-dir that also train, unless --eval-holdout)")
    g.add_argument("--eval-holdout", action="store_true",
                   help="without --eval-data-dir: remove the evaluation images from the training data")
    g.add_argument("--eval-samples", type=int, default=1000, help="images evaluated (0: no evaluation)")
    g.add_argument("--eval-batch-size", type=int, default=32, help="evaluation batch per process")
    g.add_argument("--eval-metrics", type=str, default="rfid,psnr,ssim,lpips", help="comma list of rfid, psnr, ssim, lpips")
    g.add_argument("--inception-weights", type=str, default=None, help="local Inception weights (torch-fidelity's file) for rFID")
    g.add_argument("--random-init-inception", action="store_true", help="random Inception (offline tests; not a real rFID)")
    g.add_argument("--inception-size", type=int, default=299, help="Inception input size (299 = protocol)")
    g.add_argument("--num-recon-images", type=int, default=8, help="pairs in each reconstruction grid")
    args = utils.finish_args(utils.parse_args_with_config(p, argv), "stage1")
    return resolve_defaults(args)


def resolve_defaults(args):
    """Fill the flags left unset with the kind's published values (KIND_DEFAULTS) and check them."""
    if args.tokenizer is None:
        raise SystemExit("--tokenizer is required (kl, vavae, vqgan, rae)")
    if args.tokenizer == "vq":
        args.tokenizer = "vqgan"
    for k, v in KIND_DEFAULTS[args.tokenizer].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.disc_learning_rate is None:
        args.disc_learning_rate = args.learning_rate
    if args.gan_weight is None:
        args.gan_weight = args.disc_weight
    if args.no_augment:
        args.load_size, args.hflip = None, False
    if args.load_size is not None and args.load_size < args.resolution:
        raise SystemExit(f"--load-size {args.load_size} is smaller than --resolution {args.resolution}")
    if args.disc_every < 1:
        raise SystemExit(f"--disc-every must be >= 1, got {args.disc_every}")
    if args.eval_holdout and args.eval_data_dir:
        raise SystemExit("--eval-holdout takes the evaluation images out of --data-dir; it cannot be combined "
                         "with --eval-data-dir")
    if args.lightning_global_step and args.tokenizer == "rae":
        raise SystemExit("--lightning-global-step counts --disc-start; RAE starts its GAN by epoch "
                         "(--disc-start-epoch / --disc-update-start-epoch)")
    return args


def loss_global_steps(args, step: int) -> tuple:
    """(generator, discriminator) global_step given to the loss at optimisation step `step`
    (0-based). Lightning, which the VA-VAE original trains with, advances global_step once per
    optimizer, so its disc_start=5001 switches the GAN term on at batch 2501 and the
    discriminator loss at batch 2500 (its second optimizer step)."""
    if args.lightning_global_step:
        return 2 * step, 2 * step + 1
    return step, step


def first_disc_step(args, steps_per_epoch: int) -> int:
    """The first optimisation step that steps the discriminator's optimizer (its schedule's clock
    starts there); with --lightning-global-step it steps from the first batch, as Lightning."""
    if args.tokenizer == "rae":
        return args.disc_update_start_epoch * steps_per_epoch
    return 0 if args.lightning_global_step else max(args.disc_start, 0)


def build_schedulers(opt, opt_disc, args, total_steps: int, warmup: int, disc_first: int) -> tuple:
    """The two LR schedules, each stepped on its own optimizer's clock. With --disc-lr-horizon run
    (the originals) the discriminator's schedule is the generator's, so one that starts at epoch 6
    of 16 ends 10 epochs into a 16-epoch decay (RAE: 8.2e-5, not the final 2e-5)."""
    sched = utils.lr_scheduler(opt, schedule=args.lr_schedule, warmup_steps=warmup, decay_start=args.lr_decay_start,
                               total_steps=total_steps, final_ratio=args.lr_final_ratio)
    if args.disc_lr_horizon == "run":
        decay_start, horizon = args.lr_decay_start, total_steps
    else:
        decay_start = max(args.lr_decay_start - disc_first, 0)
        horizon = max(1, len(range(disc_first, total_steps, args.disc_every)))
    sched_disc = utils.lr_scheduler(opt_disc, schedule=args.lr_schedule, warmup_steps=warmup, decay_start=decay_start,
                                    total_steps=horizon, final_ratio=args.lr_final_ratio)
    return sched, sched_disc


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def build_data(args, data_dir: str, channels: int, load_size: int, what: str):
    """The base dataset at `load_size` (images or clips) after the channel check."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise FileNotFoundError(f"data folder not found: {data_dir} (check {what})")
    on_disk = image_channels_on_disk(data_dir) if data_dir.is_dir() else None
    if on_disk is not None and on_disk != channels and not (args.convert_channels and not is_archive(data_dir)):
        raise SystemExit(f"{what} {data_dir} holds {on_disk}-channel images but the tokenizer takes "
                         f"--in-channels {channels}; pass --in-channels {on_disk}"
                         f"{'' if is_archive(data_dir) else ' or --convert-channels'}")
    if args.video_frames > 0:
        return VideoClipDataset(data_dir, args.video_frames, load_size, channels, args.video_stride, args.seed)
    crop = args.load_mode if what == "--data-dir" else "adm"  # evaluation images: the ADM protocol
    return build_image_dataset(data_dir, load_size, channels, skip_bad_images=args.skip_bad_images, crop=crop,
                               class_to_idx=load_class_to_idx(args.class_to_idx))


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
class RepeatChannels(nn.Module):
    """Wrap an RGB distance (LPIPS) so 1-channel images are repeated to 3 channels first."""

    def __init__(self, distance: nn.Module):
        super().__init__()
        self.distance = distance

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.distance(x, y)


class FoundationFeatures(nn.Module):
    """Frozen VF target for VA-VAE: images [B, C, H, W] in [-1, 1] -> features [B, D, h, w] on
    the latent grid (h, w), whatever the resolution: the token grid is bilinearly resized.

    Default input: the encoder's own preprocessing (ImageNet mean/std, bicubic resize).
    `legacy_input`: the original's unnormalised [-1, 1] image, bilinearly resized (reproduction)."""

    def __init__(self, encoder: nn.Module, legacy_input: bool = False):
        super().__init__()
        self.encoder, self.legacy_input = encoder, legacy_input
        self.embed_dim = encoder.embed_dim

    @torch.no_grad()
    def forward(self, x: torch.Tensor, grid) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.legacy_input:
            m, S = self.encoder.model, self.encoder.input_size
            x = F.interpolate(x.float(), size=(S, S), mode="bilinear", align_corners=False)
            tokens = m.forward_features(x.to(m.patch_embed.proj.weight.dtype))[:, m.num_prefix_tokens:]
        else:
            tokens = self.encoder((x.float() + 1) * 127.5)  # [B, N, D]; the encoder normalises
        B, N, D = tokens.shape
        g = math.isqrt(N)
        feats = tokens.transpose(1, 2).reshape(B, D, g, g).float()  # token n -> row n // g
        if (g, g) != tuple(grid):
            feats = F.interpolate(feats, size=tuple(grid), mode="bilinear", align_corners=False)
        return feats


class TrainForward(nn.Module):
    """The generator pass as ONE module call, so DDP sees every trainable parameter used in
    `forward` (VA-VAE's projection included). Returns a dict:
      kl / vavae: posterior, recon [B, C, H, W] in [-1, 1], z_proj (vavae) [B, D_vf, h, w]
      vqgan:      recon, qloss, indices (flat code ids)
      rae:        recon in [-1, 1] (the input is [-1, 1] too; the RAE itself works in [0, 1])"""

    def __init__(self, kind: str, model: nn.Module):
        super().__init__()
        self.kind, self.model = kind, model

    def forward(self, x: torch.Tensor) -> dict:
        if self.kind in ("kl", "vavae"):
            posterior, z, recon = self.model(x)
            out = {"posterior": posterior, "recon": recon}
            if self.kind == "vavae":
                out["z_proj"] = self.model.linear_proj(z)
            return out
        if self.kind == "vqgan":
            quant, qloss, info = self.model.encode(x)
            return {"recon": self.model.decode(quant), "qloss": qloss, "indices": info[2].reshape(-1)}
        return {"recon": self.model((x + 1) / 2) * 2 - 1}


def _read_mapping(value, what: str):
    if value is None or isinstance(value, dict):
        return value
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return utils.load_yaml(path) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())


def build_model(args, vf_dim=None):
    """The tokenizer with random weights (seeded: identical on every rank and world size)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        cfg = _read_mapping(args.model_config, "--model-config")
        if args.tokenizer in ("kl", "vavae"):
            from models.autoencoder import VAE_PRESETS, AutoencoderKL, build_vae

            over = {} if args.in_channels is None else dict(in_channels=args.in_channels, out_ch=args.in_channels)
            if cfg is not None:
                cfg = dict(cfg.get("model", cfg))
                cfg = dict(cfg.get("params", cfg))
                cfg["ddconfig"] = {**cfg["ddconfig"], **over}
                if args.tokenizer == "kl":
                    cfg.pop("use_vf", None)
                elif "use_vf" not in cfg:
                    cfg["use_vf"] = "dinov2"
                return AutoencoderKL.from_ldm_config(cfg, vf_feature_dim=vf_dim, source="--model-config")
            if args.model not in VAE_PRESETS:
                raise SystemExit(f"--model {args.model}: not a VAE preset (known: {sorted(VAE_PRESETS)})")
            if args.tokenizer == "vavae":
                over.update(vf_dim=vf_dim, reverse_proj=True)
            else:
                over["vf_dim"] = None
            return build_vae(args.model, **over)
        if args.tokenizer == "vqgan":
            from models.vqgan import VQ_PRESETS, VQModel

            if cfg is not None:
                cfg = dict(cfg.get("model", cfg))
                cfg = dict(cfg.get("params", cfg))
            elif args.model in VQ_PRESETS:
                cfg = copy.deepcopy(VQ_PRESETS[args.model])
            else:
                raise SystemExit(f"--model {args.model}: not a VQGAN preset (known: {sorted(VQ_PRESETS)})")
            if args.in_channels is not None:
                cfg["ddconfig"] = {**cfg["ddconfig"], "in_channels": args.in_channels, "out_ch": args.in_channels}
            if args.n_embed is not None:
                cfg["n_embed"] = args.n_embed
            quantizer = args.quantizer or cfg.get("quantizer", "vq2")
            cfg.update(quantizer=quantizer, beta=args.vq_beta)
            if quantizer == "ema":
                cfg.update(decay=args.vq_ema_decay, restart_dead_codes=args.dead_code_restart,
                           dead_code_threshold=args.dead_code_threshold)
            else:
                cfg["legacy"] = args.vq_legacy
            return VQModel.from_config(cfg, source="--model-config")
        from models.rae import build_rae
        from models.tokenizers import rae_spec

        if args.in_channels not in (None, 3):
            raise SystemExit(f"--tokenizer rae takes RGB images (its encoders are RGB); got --in-channels {args.in_channels}")
        _, spec = rae_spec(None if cfg is not None else args.model, cfg)
        params = dict(spec["params"])
        if args.noise_tau is not None:
            params["noise_tau"] = args.noise_tau
        params.pop("pretrained_decoder_path", None)  # the decoder trains; --init-from loads one
        return build_rae(params, encoder_config=spec.get("encoder_config"), image_processor=spec.get("image_processor"),
                         decoder_config=spec.get("decoder_config"), random_init=args.random_init_encoders)


def model_in_channels(kind: str, model: nn.Module) -> int:
    return 3 if kind == "rae" else int(model.ddconfig.get("in_channels", 3))


def vq_state_dict(obj) -> dict:
    """taming checkpoint -> VQModel weights: `state_dict` if present, training `loss.*` dropped."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return {k: v for k, v in obj.items() if not k.startswith("loss.")}


def init_from(args, model: nn.Module, logger) -> None:
    """Load released weights strictly (errors name --init-from and what does not fit)."""
    path = args.init_from
    obj = utils.load_checkpoint_file(path)
    source = f"--init-from {path}"
    if args.tokenizer in ("kl", "vavae"):
        from models.autoencoder import vae_state_dict_from_checkpoint

        sd = vae_state_dict_from_checkpoint(obj, model)
    elif args.tokenizer == "vqgan":
        sd = vq_state_dict(obj)
        key = "quantize.embedding.weight"
        if key in sd and tuple(sd[key].shape) != tuple(model.state_dict()[key].shape):
            (k_ckpt, d_ckpt), (k_model, d_model) = sd[key].shape, model.state_dict()[key].shape
            raise SystemExit(f"{source}: its codebook has {k_ckpt} codes of dimension {d_ckpt} but the model's has "
                             f"{k_model} codes of dimension {d_model}; set --n-embed {k_ckpt} (or the matching "
                             f"--model / --model-config)")
    else:
        sd, model = obj, model.decoder
    own = model.state_dict()
    conv = "encoder.conv_in.weight"
    if conv in sd and conv in own and sd[conv].shape[1] != own[conv].shape[1]:
        if (sd[conv].shape[1], own[conv].shape[1]) != (3, 1):
            raise SystemExit(f"{source} takes {sd[conv].shape[1]}-channel images but the model was built for "
                             f"--in-channels {own[conv].shape[1]}; pass --in-channels {sd[conv].shape[1]}")
        sd = rgb_to_gray_state_dict(sd)
        logger.info(f"{source}: RGB weights adapted to 1-channel images: encoder.conv_in sums its RGB kernels "
                    f"(a grey image g seen as (g, g, g)), decoder.conv_out averages its RGB output rows and bias; "
                    f"every other weight loads unchanged")
    utils.load_state_dict_strict(model, sd, source)
    logger.info(f"initialised from {path}")


def rgb_to_gray_state_dict(sd: dict) -> dict:
    """An RGB tokenizer's weights for 1-channel images. The first conv sees the grey image g as
    the RGB image (g, g, g), so its kernels summed over the input channels give the same
    response; the last conv's grey output is the mean of its R, G, B outputs (rows and bias)."""
    sd = dict(sd)
    sd["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"].sum(dim=1, keepdim=True)  # [C, 3, k, k] -> [C, 1, k, k]
    for key in ("decoder.conv_out.weight", "decoder.conv_out.bias"):
        if key in sd:
            sd[key] = sd[key].mean(dim=0, keepdim=True)  # [3, ...] -> [1, ...]
    return sd


def make_optimizer(params, lr: float, args) -> torch.optim.Optimizer:
    if args.optimizer == "adamw":
        return utils.adamw(params, lr, args, betas=(args.adam_beta1, args.adam_beta2))
    return torch.optim.Adam(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                            weight_decay=args.adam_weight_decay, fused=torch.cuda.is_available() or None)


def codebook_stats(counts: torch.Tensor) -> dict:
    """Fraction of codes used and perplexity exp(H(p)) of the usage histogram `counts` [K], as
    0-d tensors on counts' device (no host sync in the training step)."""
    p = counts.double() / counts.sum().clamp_min(1)
    return {"codebook_usage": (counts > 0).double().mean(), "perplexity": torch.exp(-(p * torch.log(p + 1e-10)).sum())}


def allreduce_grads(params, accelerator) -> None:
    """Average the gradients of `params` over ranks in one flat all-reduce (the discriminator
    is not wrapped in DDP: its loss is a method call, not a forward)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def main(args):
    kind = args.tokenizer
    run = utils.start_run(args, f"train_stage1_{kind}")
    accelerator, logger, device, world, rank = run.accelerator, run.logger, run.device, run.world, run.rank
    exp_dir, local_bs = run.exp_dir, run.local_batch_size

    # ---------------- models
    foundation = None
    if kind == "vavae":
        from models.encoders import build_encoder

        if args.resolution % 16:
            raise SystemExit(f"--vf-model {args.vf_model}: --resolution {args.resolution} must be a multiple of 16 "
                             f"(the foundation token grid is resolution // 16 per side)")
        foundation = FoundationFeatures(build_encoder(args.vf_model, args.resolution, args.random_init_encoders,
                                                      args.encoder_weights_dir), args.vf_legacy_input).to(device)
    model = build_model(args, vf_dim=foundation.embed_dim if foundation is not None else None)
    if kind == "vavae" and model.linear_proj.out_channels != foundation.embed_dim:
        raise SystemExit(f"--model-config projects latents to {model.linear_proj.out_channels} channels but --vf-model "
                         f"{args.vf_model} gives {foundation.embed_dim}-d features; use the matching use_vf / --vf-model")
    in_channels = model_in_channels(kind, model)
    if args.in_channels is None:
        args.in_channels = in_channels
    if args.init_from:
        init_from(args, model, logger)
    if args.grad_checkpointing:
        (model.decoder if kind == "rae" else model).set_grad_checkpointing(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if kind == "rae":
        model.encoder.requires_grad_(False)
        trainable = list(model.decoder.parameters())
    if kind == "vqgan" and args.quantizer == "ema":
        assert not any(p.requires_grad for p in model.quantize.parameters())  # EMA codebook: no gradient
    latent_grid = None
    if kind in ("kl", "vavae", "vqgan"):
        f = model.downsample_factor
        if args.resolution % f:
            raise SystemExit(f"--resolution {args.resolution} is not a multiple of the model's downsampling factor {f}")
        latent_grid = (args.resolution // f, args.resolution // f)
    elif args.resolution != model.image_size:
        raise SystemExit(f"--resolution {args.resolution}: the RAE decodes {model.image_size}px images "
                         f"(decoder patch {model.decoder.patch_size} x {model.grid} tokens)")

    # ---------------- loss (LPIPS shared with evaluation)
    from loss.perceptual import LPIPS
    from loss.reconstruction import RAELoss, VAVAELoss, VQLPIPSLoss

    # The discriminator (and any random loss network) from one seed, not the per-rank stream:
    # every rank and every world size starts from the same discriminator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1)
        lpips_net = LPIPS(vgg_weights=args.lpips_weights) if args.perceptual_weight > 0 or "lpips" in args.eval_metrics else None
        perceptual = RepeatChannels(lpips_net) if lpips_net is not None and args.perceptual_weight > 0 else None
        if kind in ("kl", "vavae"):
            loss_fn = VAVAELoss(disc_start=args.disc_start, kl_weight=args.kl_weight, disc_num_layers=args.disc_num_layers,
                                disc_in_channels=in_channels, disc_factor=args.disc_factor, disc_weight=args.disc_weight,
                                perceptual_weight=args.perceptual_weight, use_actnorm=args.use_actnorm,
                                disc_loss=args.disc_loss, vf_weight=args.vf_weight, adaptive_vf=args.adaptive_vf,
                                cos_margin=args.cos_margin, distmat_margin=args.distmat_margin,
                                distmat_weight=args.distmat_weight, cos_weight=args.cos_weight, disc_ndf=args.disc_ndf,
                                perceptual=perceptual)
        elif kind == "vqgan":
            loss_fn = VQLPIPSLoss(disc_start=args.disc_start, codebook_weight=args.codebook_weight,
                                  disc_num_layers=args.disc_num_layers, disc_in_channels=in_channels,
                                  disc_factor=args.disc_factor, disc_weight=args.disc_weight,
                                  perceptual_weight=args.perceptual_weight, use_actnorm=args.use_actnorm,
                                  disc_ndf=args.disc_ndf, disc_loss=args.disc_loss, perceptual=perceptual)
        else:
            from models.discriminators import DINO_DISC_TINY

            disc_cfg = DINO_DISC_TINY if args.disc_config == "tiny" else _read_mapping(args.disc_config, "--disc-config")
            loss_fn = RAELoss(discriminator=dict(disc_cfg) if disc_cfg else None, perceptual_weight=args.perceptual_weight,
                              gan_weight=args.gan_weight, disc_start_epoch=args.disc_start_epoch,
                              disc_update_start_epoch=args.disc_update_start_epoch,
                              diffaug_policy=args.diffaug_policy, disc_loss=args.disc_loss,
                              perceptual=perceptual if perceptual is not None else None,
                              vgg_weights=args.lpips_weights)
    loss_fn = loss_fn.to(device)
    disc_params = [p for p in loss_fn.discriminator.parameters() if p.requires_grad]

    # ---------------- data
    load_size = args.load_size or args.resolution
    base = build_data(args, args.data_dir, in_channels, load_size, "--data-dir")
    if getattr(base, "num_bad", 0):
        logger.info(f"skipped {base.num_bad} unreadable images, e.g. {base.bad_files[:3]}")
    if accelerator.is_main_process and getattr(base, "class_to_idx", None):
        save_class_to_idx(base.class_to_idx, exp_dir / "class_to_idx.json")
    unit = f"clips of {args.video_frames} frames" if args.video_frames else "images"
    holdout = min(args.eval_samples, len(base) // 2) if args.eval_holdout and args.eval_samples > 0 else 0
    order = torch.randperm(len(base), generator=torch.Generator().manual_seed(args.seed)).tolist()
    train_base = Subset(base, sorted(order[holdout:])) if holdout else base
    train_ds = CropFlip(train_base, args.resolution, random=True, hflip=args.hflip, seed=args.seed)
    eval_ds = None
    if args.eval_samples > 0:
        if args.eval_data_dir:
            eval_base = build_data(args, args.eval_data_dir, in_channels, load_size, "--eval-data-dir")
            logger.info(f"evaluation on --eval-data-dir {args.eval_data_dir}: {len(eval_base)} {unit}")
        elif holdout:
            eval_base = Subset(base, sorted(order[:holdout]))
            logger.info(f"--eval-holdout: {holdout} {unit} of --data-dir {args.data_dir} held out for evaluation, "
                        f"{len(train_base)} {unit} left for training")
        else:
            # Every rank picks the same seeded subset (the evaluation shards it); these images also train.
            eval_base = Subset(base, sorted(order[:min(args.eval_samples, len(base))]))
            logger.info(f"evaluation on {len(eval_base)} of the {len(base)} training {unit} of --data-dir "
                        f"{args.data_dir} (not held out: pass --eval-data-dir, e.g. the validation images of the "
                        f"papers' rFID, or --eval-holdout)")
        eval_ds = CropFlip(eval_base, args.resolution, random=False)
        if args.video_frames > 0:
            eval_ds = ClipFrames(eval_ds, args.video_frames)
        if len(eval_ds) > args.eval_samples:
            eval_ds = Subset(eval_ds, range(args.eval_samples))
    sampler = ResumableDistributedSampler(len(train_ds), local_bs, rank, world, seed=args.seed)
    loader = utils.training_loader(train_ds, local_bs, sampler, args)
    steps_per_epoch = max(sampler.batches_per_epoch // args.gradient_accumulation_steps, 1)
    utils.apply_config_epochs(args, steps_per_epoch, logger)
    total_steps = args.lr_total_steps or min(args.max_train_steps, args.epochs * steps_per_epoch)
    logger.info(f"{kind} tokenizer {args.model_config and 'from --model-config' or args.model}: "
                f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trainable params, discriminator "
                f"{sum(p.numel() for p in disc_params) / 1e6:.2f}M; data {args.data_dir}: {len(train_ds)} {unit} "
                f"for training, {len(eval_ds) if eval_ds is not None else 0} {'frames' if args.video_frames else 'images'} "
                f"evaluated; "
                f"batch {args.batch_size} = {world} x {args.gradient_accumulation_steps} x {local_bs}")

    # ---------------- optimisers and schedules (each on its own clock)
    lr = args.learning_rate
    if args.scale_lr:
        lr = args.gradient_accumulation_steps * world * local_bs * args.learning_rate
        logger.info(f"--scale-lr: lr = {args.gradient_accumulation_steps} x {world} x {local_bs} x "
                    f"{args.learning_rate:.2e} = {lr:.2e}")
    disc_lr = args.disc_learning_rate * (lr / args.learning_rate)  # scaled by the same rule
    opt = make_optimizer(trainable, lr, args)
    opt_disc = make_optimizer(disc_params, disc_lr, args)
    warmup = (round(args.lr_warmup_epochs * steps_per_epoch) if args.lr_warmup_epochs is not None
              else args.lr_warmup_steps)
    sched, sched_disc = build_schedulers(opt, opt_disc, args, total_steps, warmup, first_disc_step(args, steps_per_epoch))

    # ---------------- resume
    step, epoch, batch_pos = 0, 0, 0
    ckpt = utils.load_resume_checkpoint(run)
    ema_state = None
    if ckpt is not None:
        src = run.resume_path
        utils.load_state_dict_strict(model, ckpt["model"], f"{src}['model']")
        utils.load_state_dict_strict(loss_fn, ckpt["loss"], f"{src}['loss']")
        opt.load_state_dict(ckpt["opt"])
        opt_disc.load_state_dict(ckpt["opt_disc"])
        sched.load_state_dict(ckpt["sched"])
        sched_disc.load_state_dict(ckpt["sched_disc"])
        ema_state = ckpt.get("ema")
        step, epoch, batch_pos = utils.resume_position(run, ckpt)
    fwd = TrainForward(kind, model)
    if args.compile:
        fwd = torch.compile(fwd)
    fwd, opt, opt_disc = accelerator.prepare(fwd, opt, opt_disc)
    model = utils.unwrap(fwd).model
    # EMA made AFTER prepare, i.e. after DDP has broadcast rank 0's weights to every rank.
    ema = None
    if args.ema_decay > 0:
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        if ema_state is not None:
            utils.load_state_dict_strict(ema, ema_state, f"{run.resume_path}['ema']")
    elif ema_state is not None:
        raise SystemExit(f"{run.resume_path} holds an EMA but --ema-decay is 0; resume with the same --ema-decay")
    if ckpt is not None:
        utils.restore_scaler(run, ckpt)
        utils.restore_rng(run, ckpt)
        del ckpt
    # The discriminator is not wrapped in DDP: gradients are averaged by hand, and its state is
    # rank 0's at the start, and its buffers (BatchNorm statistics of the local batches) after
    # every step, as DDP's buffer broadcast does for the originals. ActNorm initialises its
    # parameters from the first local batch: those are broadcast until every ActNorm is set.
    from models.discriminators import ActNorm

    disc = loss_fn.discriminator
    disc_state = list(disc.state_dict(keep_vars=True).values())  # DINO: the heads only (the backbone is constant)
    disc_buffers = [t for t in disc_state if not isinstance(t, nn.Parameter)]
    actnorms = [m for m in disc.modules() if isinstance(m, ActNorm)]
    actnorm_pending = bool(actnorms)
    utils.broadcast_from_main(disc_state, accelerator)

    from models.tokenizers import describe_model

    description = describe_model(kind, model)  # what the export's NAME.json says (save_vae_weights.py)

    def save_checkpoint():
        def state():
            out = {"model": model.state_dict(), "loss": loss_fn.state_dict(), "opt": opt.optimizer.state_dict(),
                   "opt_disc": opt_disc.optimizer.state_dict(), "sched": sched.state_dict(),
                   "sched_disc": sched_disc.state_dict(), "tokenizer": kind, "tokenizer_config": description}
            if ema is not None:
                out["ema"] = ema.state_dict()
            if kind == "rae" and model.latent_stats() is not None:
                out["latent_stats"] = model.latent_stats()
            return out

        utils.save_training_checkpoint(run, step, {"epoch": epoch, "batch": batch_pos}, state, keep=args.keep_checkpoints)

    # ---------------- evaluation
    metrics = [m.strip() for m in args.eval_metrics.split(",") if m.strip()]
    extractor = None
    if eval_ds is not None and "rfid" in metrics:
        from evaluation.metrics import get_extractor

        extractor = get_extractor(weights_path=args.inception_weights, device=device, image_size=args.inception_size,
                                  random_init=args.random_init_inception)
    grid_images = None
    if eval_ds is not None:
        grid_images = torch.stack([eval_ds[i][0] for i in range(min(args.num_recon_images, len(eval_ds)))])

    def eval_tokenizer():
        """The tokenizer evaluated: the EMA when there is one (noise off: Tokenizer never adds it)."""
        from models.tokenizers import Tokenizer

        net = ema if ema is not None else model
        return net, Tokenizer({"vqgan": "vq"}.get(kind, kind), net, kind)

    @torch.no_grad()
    def recon_grid(at_step: int) -> None:
        """Main process: PNG grid of (input | reconstruction) pairs of fixed evaluation images."""
        net, tok = eval_tokenizer()
        was_training = net.training
        tok.eval()
        x = grid_images.to(device)
        rec = tok.reconstruct(x)  # [N, C, H, W] in about [-1, 1]
        pairs = torch.cat([x.float() / 255, (rec.float().clamp(-1, 1) + 1) / 2], dim=3)  # 1-channel data: grey PNG
        utils.save_image_grid(pairs.cpu(), exp_dir / "samples" / f"recon_{at_step:07d}.png")
        utils.log_images(accelerator, pairs.cpu(), at_step, "reconstructions")
        net.train(was_training)
        model.train()

    @torch.no_grad()
    def evaluate(at_step: int) -> dict:
        """Collective. PSNR / SSIM / LPIPS / rFID on the evaluation set through the shared code
        path (+ codebook usage and perplexity for VQ) and a reconstruction grid."""
        from evaluation.metrics import format_scores, local_indices
        from evaluation.reconstruction import reconstruction_metrics

        net, tok = eval_tokenizer()
        was_training = net.training
        ds = eval_ds
        if in_channels == 1:  # LPIPS / Inception are RGB networks: compare the grey image repeated
            ds, tok = RGBView(eval_ds), _GrayTokenizer(tok)
        res = reconstruction_metrics(tok, ds, inception=extractor, metrics=metrics, batch_size=args.eval_batch_size,
                                     device=device, lpips=lpips_net if lpips_net is not None else "random")
        if kind == "vqgan":  # histogram of code ids over the evaluation set, summed over ranks
            K = getattr(net.quantize, "re_embed", net.n_embed)
            counts = torch.zeros(K, dtype=torch.float64, device=device)
            idx = local_indices(len(eval_ds))
            for s in range(0, len(idx), args.eval_batch_size):
                x = torch.stack([eval_ds[i][0] for i in idx[s:s + args.eval_batch_size]]).to(device)
                ids = net.encode(x.float() / 127.5 - 1)[2][2].reshape(-1)  # info = (.., .., indices)
                counts += torch.bincount(ids, minlength=K).double()
            res.update({k: float(v) for k, v in codebook_stats(accelerator.reduce(counts, reduction="sum")).items()})
        net.train(was_training)
        model.train()
        if accelerator.is_main_process:
            recon_grid(at_step)
        accelerator.wait_for_everyone()
        summary["evaluations"][str(at_step)] = res
        # The metrics may carry notes (e.g. a random Inception's): numbers go to the tracker.
        accelerator.log({f"eval/{k}": v for k, v in res.items() if isinstance(v, (int, float))}, step=at_step)
        logger.info(f"eval at step {at_step} ({'EMA' if ema is not None else 'model'}): " + format_scores(res))
        return res

    # ---------------- loop
    summary = {"start_step": step, "tokenizer": kind, "evaluations": {}}
    last_layer = model.decoder.decoder_pred.weight if kind == "rae" else model.get_last_layer()
    enc_last_layer = model.get_encoder_last_layer() if kind == "vavae" else None
    fwd.train()
    loss_fn.train()
    progress = tqdm(total=min(args.max_train_steps, args.epochs * steps_per_epoch), initial=step,
                    disable=not accelerator.is_main_process,
                    desc=f"train_stage1 {kind}", dynamic_ncols=True)
    data_iter = utils.infinite_epochs(loader, sampler, epoch, batch_pos)
    stop = utils.StopRequest().install()
    monitor = utils.StepMonitor(run, stop)
    speed = utils.Throughput(step, args.max_train_steps)
    try:
        while step < args.max_train_steps and epoch < args.epochs:
            epoch, batch_pos, (raw, _labels) = next(data_iter)
            batch_pos += 1  # position of the NEXT micro-batch, what a checkpoint must record
            raw = raw.to(device, non_blocking=True)
            if raw.ndim == 5:  # clips (B, T, H, W, C) -> frames (B*T, C, H, W)
                raw = flatten_video_batch(raw)
            if raw.shape[1] != in_channels:
                raise SystemExit(f"{args.data_dir} yields {raw.shape[1]}-channel images but --in-channels is {in_channels}")
            x = raw.float() / 127.5 - 1  # [B, C, H, W] in [-1, 1]
            g_step, d_step = loss_global_steps(args, step)
            use_d = (loss_fn.update_discriminator(epoch) if kind == "rae" else d_step >= args.disc_start) \
                and step % args.disc_every == 0
            with accelerator.accumulate(fwd):
                # -- generator update
                with accelerator.autocast():
                    out = fwd(x)
                recon = out["recon"]
                logs = {}
                if kind in ("kl", "vavae"):
                    aux = foundation(x, latent_grid) if kind == "vavae" else None
                    g_loss, logs = loss_fn(x, recon, out["posterior"], 0, g_step, last_layer=last_layer,
                                           z=out.get("z_proj"), aux_feature=aux, enc_last_layer=enc_last_layer)
                elif kind == "vqgan":
                    g_loss, logs = loss_fn(out["qloss"], x, recon, 0, g_step, last_layer=last_layer)
                else:
                    g_loss, logs = loss_fn.generator_loss(x, recon, last_layer, epoch)
                accelerator.backward(g_loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                opt.step()
                if accelerator.sync_gradients:
                    sched.step()
                opt.zero_grad(set_to_none=True)

                # -- discriminator update
                d_loss = torch.zeros((), device=device)
                if use_d:
                    if kind == "rae":  # a fresh reconstruction in eval mode: noise off
                        with torch.no_grad():
                            model.eval()
                            fake = model((x + 1) / 2) * 2 - 1
                            model.train()
                        d_loss, d_logs = loss_fn.discriminator_loss(x, fake)
                    elif kind == "vqgan":
                        d_loss, d_logs = loss_fn(out["qloss"], x, recon.detach(), 1, d_step)
                    else:
                        d_loss, d_logs = loss_fn(x, recon.detach(), out["posterior"], 1, d_step)
                    logs.update(d_logs)
                    accelerator.backward(d_loss)
                    if accelerator.sync_gradients:
                        allreduce_grads(disc_params, accelerator)
                        if args.max_grad_norm > 0:
                            torch.nn.utils.clip_grad_norm_(disc_params, args.max_grad_norm)
                    opt_disc.step()
                    if accelerator.sync_gradients:
                        sched_disc.step()
                    opt_disc.zero_grad(set_to_none=True)
                elif args.lightning_global_step and d_step < args.disc_start:
                    # Lightning steps both optimizers on every batch; before disc_start the
                    # discriminator's loss is 0, so Adam only counts steps (moments stay 0, weights
                    # do not move), which sets the bias correction of its first real updates.
                    for p in disc_params:
                        p.grad = torch.zeros_like(p)
                    opt_disc.step()
                    if accelerator.sync_gradients:
                        sched_disc.step()
                    opt_disc.zero_grad(set_to_none=True)

            speed.update(raw.shape[0] * world, step + accelerator.sync_gradients)
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                utils.update_ema(ema, model, args.ema_decay)
            step += 1
            if world > 1:
                utils.broadcast_from_main(disc_state if actnorm_pending else disc_buffers, accelerator)
                actnorm_pending = actnorm_pending and not all(int(m.initialized) for m in actnorms)
            if args.check_ranks_every > 0 and step % args.check_ranks_every == 0:
                utils.check_ranks_identical(accelerator, utils.training_state_tensors(
                    model=model, **({"ema": ema} if ema is not None else {}), discriminator=disc,
                    opt=opt, opt_disc=opt_disc), step)

            losses = {"g_loss": g_loss.detach(), "d_loss": d_loss.detach()}
            if kind == "vqgan":  # this batch's code usage (averaged over ranks with the losses)
                K = getattr(model.quantize, "re_embed", model.n_embed)
                losses.update(codebook_stats(torch.bincount(out["indices"].detach(), minlength=K)))
            logged = step % args.log_every == 0 or step == args.max_train_steps
            vals, stop_requested = monitor(losses, step, record=logged)
            if logged:
                vals.update(lr=sched.get_last_lr()[0], disc_lr=sched_disc.get_last_lr()[0], images_per_sec=speed.rate())
                accelerator.log(vals | utils.scalars_to_host(logs),
                                step=step)
                progress.set_postfix({k: f"{v:.4f}" for k, v in vals.items() if k in losses})
                logger.info(f"step {step:07d} epoch {epoch} " + " ".join(f"{k}={v:.4g}" for k, v in vals.items()))
            progress.update(1)

            if eval_ds is not None and args.eval_every > 0 and step % args.eval_every == 0 and step != args.max_train_steps:
                evaluate(step)
            elif eval_ds is not None and utils.should_run(step, args.sampling_steps, args.max_train_steps) \
                    and step != args.max_train_steps:
                if accelerator.is_main_process:
                    recon_grid(step)
                accelerator.wait_for_everyone()
            if utils.checkpoint_or_stop(run, step, stop_requested, save_checkpoint):
                break
    finally:
        stop.restore()
        progress.close()

    summary["final_eval"] = evaluate(step) if eval_ds is not None and step > summary["start_step"] else None
    return utils.finish_run(run, summary, step, monitor, speed)


class _GrayTokenizer(nn.Module):
    """Evaluation adapter for 1-channel tokenizers: takes the RGB view of a grey image (channel
    0 is the image), reconstructs it and repeats the result to 3 channels."""

    def __init__(self, tok: nn.Module):
        super().__init__()
        self.tok = tok

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.tok.reconstruct(images[:, :1].contiguous()).expand(-1, 3, -1, -1)


if __name__ == "__main__":
    main(parse_args())
