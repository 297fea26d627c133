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

Self-describing exports: `save_vae_weights.py` writes, beside the weights `NAME.pt` (kept in the
original's layout, so the original code still loads it), a sidecar `NAME.json` saying what
rebuilds them: kind, the network's constructor config (channels, ddconfig, VF width, codebook,
RAE spec) and the latent statistics file. `Tokenizer.load(path_or_preset)` (= `load_tokenizer`)
is the one entry point: an export rebuilds from its sidecar; preset names and the originals'
layouts (a bare state_dict plus `--vae PRESET` / a config) are adapters into `build_tokenizer`,
which reads the sidecar whenever the weights have one and no config overrides it.
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
# train_stage1.py names the VQ family "vqgan"; tokenizers call it "vq".
KIND_ALIASES = {"vqgan": "vq"}
EXPORT_FORMAT = 1

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

    @classmethod
    def load(cls, path_or_preset: Union[str, os.PathLike], **kwargs) -> "Tokenizer":
        """An export (weights + `NAME.json`) or a preset name; see `load_tokenizer`."""
        return load_tokenizer(path_or_preset, **kwargs)

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
# Self-describing exports
# --------------------------------------------------------------------------------------------
def description_path(weights: Union[str, os.PathLike]) -> Path:
    """`<dir>/NAME.pt` (or `.safetensors`, `.ckpt`) -> `<dir>/NAME.json`, the export's sidecar."""
    p = Path(weights)
    return p.with_suffix(".json") if p.suffix else p.with_name(p.name + ".json")


def describe_model(kind: str, model: nn.Module) -> dict:
    """What rebuilds `model` (random weights, right shapes): the JSON-safe description of a
    tokenizer network, stored in training checkpoints and written beside exports.

    kl / vavae: AutoencoderKL kwargs (embed_dim, ch_mult, ddconfig incl. in_channels / out_ch,
    vf_dim = the VF projection width, reverse_proj, use_variational); vq: VQModel kwargs
    (ddconfig, n_embed, embed_dim, quantizer); rae: the RAE spec `build_rae` recorded."""
    kind = KIND_ALIASES.get(kind, kind)
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind '{kind}' unknown; valid: {', '.join(TOKENIZER_KINDS)}")
    if kind in ("kl", "vavae"):
        ddconfig = dict(model.ddconfig)
        config = dict(embed_dim=int(model.embed_dim), ch_mult=list(ddconfig.pop("ch_mult")),
                      use_variational=bool(model.use_variational), vf_dim=model.vf_dim,
                      reverse_proj=bool(model.reverse_proj), **ddconfig)
    elif kind == "vq":
        from models.vqgan import EMAVectorQuantizer

        config = dict(ddconfig=dict(model.ddconfig), n_embed=int(model.n_embed), embed_dim=int(model.embed_dim),
                      quantizer="ema" if isinstance(model.quantize, EMAVectorQuantizer) else "vq2")
    else:
        if getattr(model, "spec", None) is None:
            raise ValueError("this RAE was not built by models.rae.build_rae: it carries no spec to describe")
        config = dict(model.spec)
    in_channels = 3 if kind == "rae" else int(model.ddconfig.get("in_channels", 3))
    return json.loads(json.dumps({"format": EXPORT_FORMAT, "kind": kind, "model": config, "in_channels": in_channels,
                                  "latent_channels": int(model.latent_channels)}))


def write_export_description(weights: Union[str, os.PathLike], description: Optional[Mapping],
                             stats: Optional[Union[str, os.PathLike]] = None, **extra) -> Optional[Path]:
    """Write the sidecar `NAME.json` of the exported `weights` (atomically); `stats` is the
    latent statistics file exported with them (stored relative to the weights' folder).
    Returns its path, or None (with a notice) when there is no description to write: a
    checkpoint of an older version, whose export needs --vae / --vae-config to be rebuilt."""
    weights = Path(weights)
    if description is None:
        print(f"note: {weights} is written without a description (the training checkpoint has none): "
              f"consumers need --tokenizer and --vae / --vae-config to rebuild it")
        return None
    from utils import atomic_write_text

    out = dict(description, name=weights.stem, weights=weights.name,
               stats=None if stats is None else os.path.relpath(stats, weights.parent), **extra)
    path = description_path(weights)
    atomic_write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", path)
    return path


def read_export_description(weights: Union[str, os.PathLike]) -> Optional[dict]:
    """The sidecar of `weights` (None when it has none); the statistics path made absolute.
    Hub weights (`owner/repo/NAME.pt`) look for `owner/repo/NAME.json` on the hub (the cache
    only with HF_HUB_OFFLINE=1); a repository without one is an original's release: None."""
    path = description_path(weights)
    base = str(path.parent)  # where the statistics file named in the description lives
    if not Path(weights).exists() and len(str(weights).split("/")) >= 3 and not str(weights).startswith(("/", ".")):
        from models.vae_loading import resolve_file

        try:
            path = resolve_file(path, "tokenizer description")
        except FileNotFoundError:
            return None
    elif not Path(weights).is_file() or not path.is_file():
        return None
    try:
        desc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer description {path} is not valid JSON: {e}") from e
    missing = [k for k in ("format", "kind", "model") if k not in desc]
    if missing or desc["format"] != EXPORT_FORMAT:
        raise ValueError(f"tokenizer description {path}: missing {missing} or format {desc.get('format')!r} "
                         f"is not {EXPORT_FORMAT}")
    if desc["kind"] not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer description {path}: kind {desc['kind']!r} unknown")
    if desc.get("stats"):
        desc["stats"] = f"{base}/{desc['stats']}"
    desc["source"] = str(path)
    return desc


def preset_kind(name: str) -> Optional[str]:
    """The tokenizer kind of a preset name (None when it names no preset)."""
    from models.autoencoder import VAE_PRESETS
    from models.vqgan import VQ_PRESETS

    if name in VAE_PRESETS:
        return "vavae" if VAE_PRESETS[name].get("vf_dim") else "kl"
    if name in VQ_PRESETS:
        return "vq"
    return "rae" if name in RAE_PRESETS else None


def load_tokenizer(path_or_preset: Union[str, os.PathLike], kind: Optional[str] = None,
                   stats: Optional[Union[str, os.PathLike]] = None, random_init: bool = False,
                   seed: int = 0) -> Tokenizer:
    """THE entry point: an export (weights with their `NAME.json` sidecar) rebuilds from its
    description; a preset name builds that preset (with `random_init`, or the RAE preset's own
    weights). `kind` may narrow a VA-VAE export to 'kl' (the VF projection is then unused)."""
    p = Path(path_or_preset)
    if p.is_file() or p.suffix in (".pt", ".pth", ".ckpt", ".safetensors", ".bin"):
        return build_tokenizer(kind, ckpt=p, stats=stats)
    name = str(path_or_preset)
    found = preset_kind(name)
    if found is None:
        raise FileNotFoundError(f"tokenizer {name}: neither a weights file nor a preset name")
    return build_tokenizer(kind or found, name=name, stats=stats, random_init=random_init, seed=seed)


def _kind_of_export(kind: Optional[str], desc: dict) -> str:
    """The kind to build an export as: its own, or 'kl' for a VA-VAE (the projection unused)."""
    kind = KIND_ALIASES.get(kind, kind)
    if kind is None or kind == desc["kind"] or (kind == "kl" and desc["kind"] == "vavae"):
        return kind or desc["kind"]
    raise ValueError(f"--tokenizer {kind}: {desc['source']} describes a '{desc['kind']}' tokenizer; "
                     f"pass --tokenizer {desc['kind']} (or leave --tokenizer out)")


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
    from models.vae_loading import resolve_file
    from utils import check_state_dict, load_checkpoint_file

    path = resolve_file(path, "VQGAN checkpoint")
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


def build_tokenizer(kind: Optional[str], name: Optional[str] = None, ckpt: Optional[Union[str, os.PathLike]] = None,
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
    Weights with a sidecar description (`NAME.json`, see `write_export_description`) rebuild
    from it unless `config` is given: `kind` may then be None, `name` is only the label, and
    the described statistics file is used unless `stats` is given.
    """
    desc = read_export_description(ckpt) if ckpt is not None and config is None else None
    if desc is not None:
        kind = _kind_of_export(kind, desc)
        if desc["kind"] == "rae" and desc["model"].get("random_encoder"):
            raise ValueError(f"{desc['source']}: this RAE was trained with a random-weight encoder "
                             f"(--random-init-encoders), which the export does not hold; it cannot be rebuilt")
        config, name = desc["model"], name or desc.get("name")
        stats = stats if stats is not None else desc.get("stats")
    elif kind is None:
        raise ValueError(f"no tokenizer kind (--tokenizer) given and {ckpt or 'no checkpoint'} has no description "
                         f"(NAME.json beside the weights): pass --tokenizer and --vae / --vae-config")
    kind = KIND_ALIASES.get(kind, kind)
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
        from models.vae_loading import load_vae

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
            from models.vae_loading import load_latents_stats

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


__all__ = ["TOKENIZER_KINDS", "RAE_PRESETS", "Tokenizer", "build_tokenizer", "load_tokenizer", "load_vq_checkpoint",
           "describe_model", "write_export_description", "read_export_description", "description_path"]
