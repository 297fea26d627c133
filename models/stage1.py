"""The four tokenizer families as train_stage1.py trains them: what differs per family on the
network side, so the script's `main` holds only the loop.

  kl / vavae  models.autoencoder.AutoencoderKL (vavae: + the projection onto frozen foundation
              features, `FoundationFeatures`, for the VF loss)
  vqgan       models.vqgan.VQModel (gradient or EMA codebook)
  rae         models.rae.RAE (frozen representation encoder; only the ViT decoder trains)

Per family: the published recipe's defaults of the flags left unset (`KIND_DEFAULTS`), the network
with random weights from a preset or an original's config (`build_model`), the geometry checks
(`check_model`), what the generator optimizer updates (`trainable_parameters`), released weights
to start from (`init_from`), its EMA (`make_ema`), what --fsdp shards (`FSDP_UNITS`), the training
forward pass (`TrainForward`) and the evaluation adapters. The objective of each family (losses, discriminator, GAN clock) is its counterpart in
`loss/stage1.py`: it lives in loss/ because loss/ may import models/, never the reverse; the
export description is `models.tokenizers.describe_model`.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

TOKENIZERS = ("kl", "vavae", "vqgan", "rae")
# Per-kind defaults of flags left unset (None): the published recipes' values.
KIND_DEFAULTS = {
    "kl": dict(optimizer="adam", adam_beta1=0.5, adam_beta2=0.9, learning_rate=1e-4, disc_start=5001,
               disc_weight=0.5, ema_decay=0.0, model="f16d32", short_side_resize="cv2-linear"),
    "vavae": dict(optimizer="adam", adam_beta1=0.5, adam_beta2=0.9, learning_rate=1e-4, disc_start=5001,
                  disc_weight=0.5, ema_decay=0.0, model="vavae-f16d32", short_side_resize="cv2-linear"),
    "vqgan": dict(optimizer="adam", adam_beta1=0.5, adam_beta2=0.9, learning_rate=4.5e-6, disc_start=250001,
                  disc_weight=0.8, ema_decay=0.0, model="imagenet-f16-1024",
                  short_side_resize="cv2-linear"),
    "rae": dict(optimizer="adamw", adam_beta1=0.9, adam_beta2=0.95, learning_rate=2e-4, disc_start=0,
                disc_weight=0.75, ema_decay=0.9978, model="dinov2-b-xl",
                short_side_resize="pil-bicubic"),
}


# --fsdp (utils/fsdp.py): per family, the trained submodule sharded per transformer block and the
# ModuleList of its blocks. The conv nets (kl, vavae, vqgan) have no blocks to shard by.
FSDP_UNITS = {"rae": ("decoder", "decoder_layers")}


def check_fsdp(args) -> None:
    """Refuse --fsdp for a family without transformer blocks, and what utils.fsdp refuses."""
    from utils.fsdp import check_fsdp_args

    if getattr(args, "fsdp", False) and args.tokenizer not in FSDP_UNITS:
        raise SystemExit(f"--fsdp shards a tokenizer's transformer blocks; --tokenizer {args.tokenizer} trains a "
                         f"convolutional network without any: train it without --fsdp (--fsdp supports --tokenizer "
                         f"{', '.join(FSDP_UNITS)})")
    check_fsdp_args(args)


def read_mapping(value, what: str):
    """A mapping given inline (from --config) or as a YAML/JSON file named by the flag `what`."""
    if value is None or isinstance(value, dict):
        return value
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return utils.load_yaml(path) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())


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


def build_foundation(args, device) -> Optional[FoundationFeatures]:
    """VA-VAE's frozen VF target on `device` (None for the other kinds)."""
    if args.tokenizer != "vavae":
        return None
    from models.encoders import build_encoder

    if args.resolution % 16:
        raise SystemExit(f"--vf-model {args.vf_model}: --resolution {args.resolution} must be a multiple of 16 "
                         f"(the foundation token grid is resolution // 16 per side)")
    return FoundationFeatures(build_encoder(args.vf_model, args.resolution, args.random_init_encoders,
                                            args.encoder_weights_dir), args.vf_legacy_input).to(device)


def build_model(args, vf_dim=None):
    """The tokenizer with random weights (seeded: identical on every rank and world size)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        cfg = read_mapping(args.model_config, "--model-config")
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

def check_model(args, model: nn.Module, foundation: Optional[FoundationFeatures]) -> Optional[tuple]:
    """Refuse a model that does not fit the flags; returns the latent grid (h, w) of a
    --resolution image (None for rae, whose encoder resizes every input to its own size)."""
    kind = args.tokenizer
    if kind == "vavae" and model.linear_proj.out_channels != foundation.embed_dim:
        raise SystemExit(f"--model-config projects latents to {model.linear_proj.out_channels} channels but --vf-model "
                         f"{args.vf_model} gives {foundation.embed_dim}-d features; use the matching use_vf / --vf-model")
    latent_grid = None
    if kind in ("kl", "vavae", "vqgan"):
        f = model.downsample_factor
        if args.resolution % f:
            raise SystemExit(f"--resolution {args.resolution} is not a multiple of the model's downsampling factor {f}")
        latent_grid = (args.resolution // f, args.resolution // f)
    elif args.resolution != model.image_size:
        raise SystemExit(f"--resolution {args.resolution}: the RAE decodes {model.image_size}px images "
                         f"(decoder patch {model.decoder.patch_size} x {model.grid} tokens)")
    return latent_grid


def trainable_parameters(args, model: nn.Module) -> list:
    """What the generator optimizer updates: the whole tokenizer, but the RAE's decoder only (its
    representation encoder is frozen) and never an EMA codebook (updated by its own averages)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.tokenizer == "rae":
        model.encoder.requires_grad_(False)
        trainable = list(model.decoder.parameters())
    if args.tokenizer == "vqgan" and args.quantizer == "ema":
        assert not any(p.requires_grad for p in model.quantize.parameters())  # EMA codebook: no gradient
    return trainable


def make_ema(args, model: nn.Module, ckpt: Optional[dict], source) -> Optional[nn.Module]:
    """The tokenizer's EMA (None with --ema-decay 0): a frozen copy of `model` on its device, or
    the resumed checkpoint's `ckpt['ema']`; refuses a checkpoint's EMA the flags switch off."""
    state = None if ckpt is None else ckpt.get("ema")
    if args.ema_decay <= 0:
        if state is not None:
            raise SystemExit(f"{source} holds an EMA but --ema-decay is 0; resume with the same --ema-decay")
        return None
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if state is not None:
        utils.load_state_dict_strict(ema, state, f"{source}['ema']")
    return ema


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
        from models.vae_loading import vae_state_dict_from_checkpoint

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


def codebook_size(model: nn.Module) -> int:
    """How many code ids a VQModel emits (with taming's index remap: its re_embed)."""
    return getattr(model.quantize, "re_embed", model.n_embed)


@torch.no_grad()
def codebook_counts(net: nn.Module, ds, idx, batch_size: int, device) -> torch.Tensor:
    """Histogram [K] (float64) of the code ids of the images `ds[i]` (uint8), i in `idx` (this
    rank's shard: summed over ranks it is the whole set's)."""
    K = codebook_size(net)
    counts = torch.zeros(K, dtype=torch.float64, device=device)
    for s in range(0, len(idx), batch_size):
        x = torch.stack([ds[i][0] for i in idx[s:s + batch_size]]).to(device)
        ids = net.encode(x.float() / 127.5 - 1)[2][2].reshape(-1)  # info = (.., .., indices)
        counts += torch.bincount(ids, minlength=K).double()
    return counts


def codebook_stats(counts: torch.Tensor) -> dict:
    """Fraction of codes used and perplexity exp(H(p)) of the usage histogram `counts` [K], as
    0-d tensors on counts' device (no host sync in the training step)."""
    p = counts.double() / counts.sum().clamp_min(1)
    return {"codebook_usage": (counts > 0).double().mean(), "perplexity": torch.exp(-(p * torch.log(p + 1e-10)).sum())}


class GrayTokenizer(nn.Module):
    """Evaluation adapter for 1-channel tokenizers: takes the RGB view of a grey image (channel
    0 is the image), reconstructs it and repeats the result to 3 channels."""

    def __init__(self, tok: nn.Module):
        super().__init__()
        self.tok = tok

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.tok.reconstruct(images[:, :1].contiguous()).expand(-1, 3, -1, -1)
