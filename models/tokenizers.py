"""One interface for every image tokenizer: KL-VAE, VA-VAE, VQGAN and RAE.

`Tokenizer` wraps (composition, not inheritance) one of `models/autoencoder.AutoencoderKL`,
`models/vqgan.VQModel` or `models/rae.RAE` and gives every consumer — `cache_latents.py`, the
latent-diffusion trainers, `generate.py`, `evaluation.reconstruction_metrics` — the same calls:

    encode_moments(images uint8 [B, C, H, W]) -> (mean [B, C', h, w] float32, std or None)
    decode(latents [B, C', h, w])             -> images [B, C, H', W'] in about [-1, 1]
    reconstruct(images uint8)                 -> decode(mode of the encoding)

Each tokenizer does its own input conversion, so callers only ever pass uint8 pixels:
* KL / VA-VAE: x / 127.5 - 1; posterior mean and std (std None for REPA-E's non-variational AE).
* VQ: x / 127.5 - 1; the QUANTISED latent (after quant_conv + quantize); std None.
* RAE: x / 255 -> the RAE's own bicubic resize + processor normalisation, frozen encoder, noise
  OFF; the raw tokens reshaped to [B, C, h, w] (NOT normalised by the latent statistics: the
  cache computes those statistics from these very latents).

Latents are always the tokenizer's raw latent space; the statistics that normalise them for the
diffusion model are per channel (KL, VA-VAE, VQ: `stats_mode` "channel") or per position (RAE:
"position"), computed by `cache_latents.py`.

`fingerprint()` hashes the weights so a latent folder written by one tokenizer is refused when
training with another (`identity()` is what `cache_latents.py` stores in `tokenizer.json`).
`build_tokenizer` builds any kind from a preset name / config, a checkpoint or random weights.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

TOKENIZER_KINDS = ("kl", "vavae", "vq", "rae")

# Tiny and real RAE configurations: the `stage_1.params` of a released RAE config plus, inline,
# the encoder config (random init), the decoder config and the processor mean/std, so a preset
# needs no config files. The tiny one is what the tests and the CPU demo use.
RAE_PRESETS: Dict[str, dict] = {
    # DINOv2-with-registers, 1 layer, width 32, patch 14; input 56 -> 4x4 tokens; decoder patch 8
    # -> 32px reconstructions.
    "tiny-dinov2": dict(
        params=dict(encoder_cls="Dinov2withNorm", encoder_input_size=56, encoder_params=dict(normalize=True),
                    decoder_patch_size=8, noise_tau=0.0, reshape_to_2d=True, eps=1e-5),
        encoder_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14,
                            num_register_tokens=4),
        decoder_config=dict(decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                            decoder_intermediate_size=64, hidden_act="gelu", layer_norm_eps=1e-12, qkv_bias=True),
    ),
    # The released DINOv2-B (with registers) + ViT-XL decoder: 224 input -> [768, 16, 16];
    # pass the decoder weights (`model.pt`) as the checkpoint and the stats file as stats.
    "dinov2-b-xl": dict(
        params=dict(encoder_cls="Dinov2withNorm", encoder_input_size=224,
                    encoder_params=dict(dinov2_path="facebook/dinov2-with-registers-base", normalize=True),
                    decoder_patch_size=16, noise_tau=0.0, reshape_to_2d=True, eps=1e-5),
        decoder_config=dict(decoder_hidden_size=1152, decoder_num_hidden_layers=28, decoder_num_attention_heads=16,
                            decoder_intermediate_size=4096, hidden_act="gelu", layer_norm_eps=1e-12, qkv_bias=True),
    ),
}


class Tokenizer(nn.Module):
    """A tokenizer behind the common interface (see the module docstring).

    `model` is the wrapped network (AutoencoderKL / VQModel / RAE), `stats` the latent statistics
    that travel with it (KL: {latents_scale, latents_bias}; RAE: {mean, var}) or None. The wrapper
    never trains: it is used in eval mode under no_grad.
    """

    def __init__(self, kind: str, model: nn.Module, name: str, stats: Optional[dict] = None):
        super().__init__()
        if kind not in TOKENIZER_KINDS:
            raise ValueError(f"tokenizer kind '{kind}' unknown; valid: {', '.join(TOKENIZER_KINDS)}")
        self.kind, self.name, self.model, self.stats = kind, name, model, stats
        self._fingerprint: Optional[str] = None

    # ---- description ------------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        if self.kind == "rae":
            return 3  # the representation encoders are RGB models
        return int(self.model.ddconfig.get("in_channels", 3))

    @property
    def stats_mode(self) -> str:
        """How the diffusion model's latent normalisation is shaped: per channel or per position."""
        return "position" if self.kind == "rae" else "channel"

    @property
    def deterministic(self) -> bool:
        """True when encode_moments returns no std (VQ, RAE, non-variational AE)."""
        return self.kind in ("vq", "rae") or not getattr(self.model, "use_variational", True)

    @property
    def downsample_factor(self) -> int:
        return int(self.model.downsample_factor)

    def latent_shape(self, resolution: int) -> Tuple[int, int, int]:
        """(C, h, w) of the latents of a `resolution` x `resolution` image."""
        if self.kind == "rae":
            return tuple(self.model.latent_shape)  # the encoder resizes every input to its own size
        f = self.downsample_factor
        if resolution % f:
            raise ValueError(f"resolution {resolution} is not a multiple of the {self.name} downsampling factor {f}")
        return (int(self.model.latent_channels), resolution // f, resolution // f)

    # ---- encode / decode --------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8:
            raise TypeError(f"Tokenizer.encode_moments expects uint8 images, got {images.dtype}")
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"Tokenizer '{self.name}' expects images [B, {self.in_channels}, H, W], "
                             f"got {tuple(images.shape)}")

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """uint8 [B, C, H, W] -> (mean [B, C', h, w] float32, std [B, C', h, w] float32 or None)."""
        self._check_images(images)
        if self.kind == "rae":
            tokens = self.model.encode_tokens(images.float() / 255.0)  # [B, N, C'], no noise, no stats
            B, N, C = tokens.shape
            g = self.model.grid
            # token n -> row n // g, column n % g (the RAE's own reshape)
            return tokens.float().transpose(1, 2).reshape(B, C, g, g), None
        x = images.float() / 127.5 - 1.0  # [-1, 1]
        if self.kind == "vq":
            quant, _, _ = self.model.encode(x)  # after quant_conv + quantize
            return quant.float(), None
        posterior = self.model.encode(x)
        if self.deterministic:
            return posterior.mean.float(), None
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents [B, C', h, w] (as encode_moments returns them) -> images in about [-1, 1]."""
        if self.kind == "rae":
            B, C = latents.shape[:2]
            tokens = latents.reshape(B, C, -1).transpose(1, 2)  # [B, N, C']
            x = self.model.decoder(tokens.to(self.model.image_mean.dtype))  # the encoder's normalised space
            x = x * self.model.image_std + self.model.image_mean  # [0, 1]
            return x * 2.0 - 1.0
        return self.model.decode(latents)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> reconstruction in [-1, 1] from the posterior mode (no noise)."""
        mean, _ = self.encode_moments(images)
        return self.decode(mean)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(images)

    # ---- identity -----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """First 16 hex digits of sha256 over (key, dtype, shape, bytes) of every state_dict
        tensor in key order. Cached: a tokenizer does not change while it encodes a dataset."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for key, t in self.model.state_dict().items():
                t = t.detach().cpu().contiguous()
                h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def identity(self, resolution: int) -> dict:
        """What a latent folder records about the tokenizer that wrote it."""
        return {"kind": self.kind, "name": self.name, "fingerprint": self.fingerprint(),
                "latent_shape": list(self.latent_shape(resolution)), "in_channels": self.in_channels}

    def extra_repr(self) -> str:
        return f"kind={self.kind}, name={self.name}"


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------
def _read_config(config: Union[None, str, os.PathLike, Mapping], what: str) -> Optional[dict]:
    """A dict, or a YAML / JSON file read into one (errors name the file)."""
    if config is None or isinstance(config, Mapping):
        return None if config is None else dict(config)
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.suffix in (".yaml", ".yml"):
        from utils import load_yaml

        return load_yaml(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is neither YAML (.yaml/.yml) nor valid JSON: {e}") from e


def _seeded(build, random_init: bool, seed: int):
    """Run `build()` under a private RNG seeded with `seed` (random init), so two processes get
    identical weights and the caller's global RNG is left untouched."""
    if not random_init:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def load_vq_checkpoint(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Load a taming VQGAN checkpoint (Lightning `{'state_dict': ...}` or a plain state_dict)
    STRICTLY, dropping the training-only `loss.*` entries (LPIPS, discriminator)."""
    from models.autoencoder import _resolve_file
    from utils import check_state_dict, load_checkpoint_file

    path = _resolve_file(path, "VQGAN checkpoint")
    obj = load_checkpoint_file(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state_dict, got {type(obj).__name__}")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    sd = {k: v for k, v in obj.items() if not k.startswith("loss.")}
    check_state_dict(model, sd, f"VQGAN checkpoint {path}")
    model.load_state_dict(sd, strict=True)


def rae_spec(name: Optional[str], config) -> Tuple[str, dict]:
    """(name, spec) with spec = {params, [encoder_config], [decoder_config], [image_processor]}
    from a preset name or a config (dict / file; a released `stage_1: {target, params}` config
    or bare params are accepted)."""
    if config is None:
        if name is None or name not in RAE_PRESETS:
            raise KeyError(f"RAE needs a preset name (known: {sorted(RAE_PRESETS)}) or a config (--rae-config)")
        return name, json.loads(json.dumps(RAE_PRESETS[name]))
    if isinstance(config, (str, os.PathLike)) and str(config) in RAE_PRESETS:
        return str(config), json.loads(json.dumps(RAE_PRESETS[str(config)]))
    source = config if isinstance(config, (str, os.PathLike)) else None
    cfg = _read_config(config, "RAE config")
    if "stage_1" in cfg:
        cfg = dict(cfg["stage_1"])
    extras = {k: cfg.pop(k) for k in ("encoder_config", "decoder_config", "image_processor") if k in cfg}
    params = dict(cfg["params"]) if "params" in cfg else {k: v for k, v in cfg.items() if k != "target"}
    if "encoder_cls" not in params:
        raise KeyError(f"RAE config {source or ''} has no 'encoder_cls' (expected stage_1.params of a RAE config)")
    return name or (Path(source).stem if source else "rae"), dict(params=params, **extras)


def build_tokenizer(kind: str, name: Optional[str] = None, ckpt: Optional[Union[str, os.PathLike]] = None,
                    stats: Optional[Union[str, os.PathLike, Mapping]] = None, config=None, random_init: bool = False,
                    seed: int = 0) -> Tokenizer:
    """Build a Tokenizer in eval mode, gradients off.

    kind "kl" / "vavae": `name` a `VAE_PRESETS` entry (or `config` an LDM / kwargs config);
        `ckpt` the weights (local file or hub `owner/repo/file`), `stats` the latents-stats file.
    kind "vq": `name` a `VQ_PRESETS` entry (or `config` a taming config); `ckpt` a taming checkpoint.
    kind "rae": `name` an `RAE_PRESETS` entry or `config` a RAE config (YAML / JSON / dict);
        `ckpt` overrides the decoder weights, `stats` the {mean, var} statistics file.
    Exactly one of `ckpt` (or, for RAE, weights named in the config) and `random_init`: a
    tokenizer is never silently random. `random_init` seeds a private RNG with `seed`.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"--tokenizer '{kind}' unknown; valid: {', '.join(TOKENIZER_KINDS)}")
    if random_init and ckpt is not None:
        raise ValueError("random_init (--random-init) and a checkpoint (--vae-ckpt) exclude each other")
    if kind in ("kl", "vavae", "vq") and ckpt is None and not random_init:
        raise ValueError(f"tokenizer '{kind}' needs a checkpoint (--vae-ckpt) or --random-init")
    cfg = _read_config(config, f"{kind} tokenizer config") if kind != "rae" else None
    if kind in ("kl", "vavae", "vq") and cfg is None and name is None:
        raise ValueError(f"tokenizer '{kind}' needs a preset name (--vae) or a config")
    if cfg is not None and "model" in cfg and "ddconfig" not in cfg:  # a whole LDM / taming YAML
        cfg = dict(cfg["model"])
    label = name or (Path(config).stem if isinstance(config, (str, os.PathLike)) else kind)

    if kind in ("kl", "vavae"):
        from models.autoencoder import load_vae

        model, stats_dict = _seeded(lambda: load_vae(cfg if cfg is not None else name, ckpt, stats), random_init, seed)
        if kind == "vavae" and not hasattr(model, "linear_proj"):
            raise ValueError(f"tokenizer 'vavae' {label}: the model has no VF projection (linear_proj); use 'kl'")
    elif kind == "vq":
        from models.vqgan import build_vqgan

        model = _seeded(lambda: build_vqgan(cfg if cfg is not None else name), random_init, seed)
        if ckpt is not None:
            load_vq_checkpoint(model, ckpt)
        stats_dict = None
        if stats is not None:
            from models.autoencoder import load_latents_stats

            stats_dict = load_latents_stats(stats, channels=model.latent_channels)
    else:
        label, spec = rae_spec(name, config)
        params = dict(spec["params"])
        if ckpt is not None:
            params["pretrained_decoder_path"] = str(ckpt)
        if isinstance(stats, (str, os.PathLike)):
            params["normalization_stat_path"] = str(stats)
        if not random_init and not params.get("pretrained_decoder_path"):
            raise ValueError(f"RAE tokenizer {label} needs decoder weights (--vae-ckpt or pretrained_decoder_path "
                             f"in the config) or --random-init")
        from models.rae import build_rae  # imports transformers: only once the arguments are valid

        model = _seeded(lambda: build_rae(params, encoder_config=spec.get("encoder_config"),
                                          image_processor=spec.get("image_processor"),
                                          decoder_config=spec.get("decoder_config"),
                                          stats=dict(stats) if isinstance(stats, Mapping) else None,
                                          random_init=random_init), random_init, seed)
        stats_dict = model.latent_stats()
    model.eval().requires_grad_(False)
    return Tokenizer(kind, model, label, stats_dict).eval()


__all__ = ["TOKENIZER_KINDS", "RAE_PRESETS", "Tokenizer", "build_tokenizer", "load_vq_checkpoint"]
