"""Loading a KL autoencoder and the latent statistics that travel with it: `load_vae` (a preset or
LDM config, a checkpoint loaded strictly from a local file or the hub), the `-latents-stats.pt`
files (read, write, the default name beside a checkpoint) and the (de)normalisation they define.
The networks themselves are in `models/autoencoder.py`; experiment folders and released
diffusion checkpoints in `models/loading.py`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from models.autoencoder import AutoencoderKL, build_vae
from utils import check_state_dict, load_checkpoint_file


def resolve_file(path_or_hub: Union[str, os.PathLike], what: str) -> Path:
    """A local file, or `owner/repo/path/in/repo` on the Hugging Face hub (cache only when
    HF_HUB_OFFLINE=1). Errors name the argument."""
    p = Path(path_or_hub)
    if p.is_file():
        return p
    parts = str(path_or_hub).split("/")
    if not p.exists() and len(parts) >= 3 and not str(path_or_hub).startswith(("/", ".")):
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:])))
        except Exception as e:  # noqa: BLE001 - re-raised naming the file
            raise FileNotFoundError(f"{what} not found: {path_or_hub} (no such local file; as a hub file "
                                    f"'{'/'.join(parts[:2])}' / '{'/'.join(parts[2:])}' it failed too, "
                                    f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}: {type(e).__name__})") from e
    raise FileNotFoundError(f"{what} not found: {path_or_hub}")


def vae_state_dict_from_checkpoint(obj: Mapping, model: nn.Module) -> Dict[str, torch.Tensor]:
    """The autoencoder weights in a checkpoint object.

    Accepts a plain state_dict (REPA-E / SD-VAE exports), `{'state_dict': ...}` (LDM / VA-VAE
    Lightning checkpoints) or `{'vae': ...}` (REPA-E training checkpoints). Drops what belongs
    to training rather than the network, exactly as VA-VAE's loader does: keys containing 'loss'
    (LPIPS, discriminator, logvar) and `foundation_model.*`; keeps `linear_proj.*` only when the
    model has a `linear_proj`."""
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    elif "vae" in obj and isinstance(obj["vae"], Mapping):
        obj = obj["vae"]
    has_proj = hasattr(model, "linear_proj")
    out = {}
    for k, v in obj.items():
        if "loss" in k or k.startswith("foundation_model."):
            continue
        if k.startswith("linear_proj.") and not has_proj:
            continue
        out[k] = v
    return out


def load_latents_stats(path: Union[str, os.PathLike], channels: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Read `<name>-latents-stats.pt`: {'latents_scale', 'latents_bias'} shaped [1, C, 1, 1] or [C]
    (returned as [1, C, 1, 1] float32); normalised latents are (z - bias) * scale. LightningDiT's
    {'mean', 'std'} files are accepted too (scale = 1 / std). Other tensor entries (e.g. REPA-E's
    `bn_eps`) pass through. Errors name the file."""
    path = resolve_file(path, "latent statistics file")
    obj = load_checkpoint_file(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict with latents_scale/latents_bias, got {type(obj).__name__}")
    if "latents_scale" in obj and "latents_bias" in obj:
        scale, bias = obj["latents_scale"], obj["latents_bias"]
    elif "mean" in obj and "std" in obj:
        scale, bias = 1.0 / torch.as_tensor(obj["std"]), obj["mean"]
    else:
        raise KeyError(f"{path}: needs 'latents_scale' and 'latents_bias' (has {sorted(obj)})")
    stats = {k: v for k, v in obj.items() if torch.is_tensor(v) and k not in ("latents_scale", "latents_bias", "mean", "std")}
    for name, t in (("latents_scale", scale), ("latents_bias", bias)):
        t = torch.as_tensor(t).float()
        if t.ndim == 1:
            t = t.view(1, -1, 1, 1)
        if t.ndim != 4 or t.shape[0] != 1 or t.shape[2:] != (1, 1):
            raise ValueError(f"{path}: '{name}' has shape {tuple(t.shape)}, expected [1, C, 1, 1] or [C]")
        if channels is not None and t.shape[1] != channels:
            raise ValueError(f"{path}: '{name}' has {t.shape[1]} channels but the VAE has {channels} latent channels")
        stats[name] = t
    if stats["latents_scale"].shape != stats["latents_bias"].shape:
        raise ValueError(f"{path}: latents_scale {tuple(stats['latents_scale'].shape)} and latents_bias "
                         f"{tuple(stats['latents_bias'].shape)} differ in shape")
    return stats


def save_latents_stats(path: Union[str, os.PathLike], latents_scale: torch.Tensor, latents_bias: torch.Tensor, **extra) -> None:
    """Write a `-latents-stats.pt` file (atomically) with tensors shaped [1, C, 1, 1]."""
    from utils import atomic_save

    atomic_save({"latents_scale": latents_scale.detach().float().cpu().reshape(1, -1, 1, 1),
                 "latents_bias": latents_bias.detach().float().cpu().reshape(1, -1, 1, 1),
                 **{k: torch.as_tensor(v) for k, v in extra.items()}}, path)


def default_stats_path(ckpt_path: Union[str, os.PathLike]) -> Path:
    """`<dir>/<name>.pt` -> `<dir>/<name>-latents-stats.pt` (REPA-E's naming)."""
    p = Path(ckpt_path)
    return p.with_name(p.name[: -len(p.suffix)] + "-latents-stats.pt" if p.suffix else p.name + "-latents-stats.pt")


def normalize_latents(z: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(z - bias) * scale: the latent the diffusion model sees."""
    return (z - stats["latents_bias"].to(z)) * stats["latents_scale"].to(z)


def denormalize_latents(z: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """z / scale + bias: back to the VAE's latent space before decoding."""
    return z / stats["latents_scale"].to(z) + stats["latents_bias"].to(z)


def load_vae(preset_or_config: Union[str, Mapping], ckpt_path: Optional[Union[str, os.PathLike]] = None,
             stats_path: Optional[Union[str, os.PathLike]] = None, **overrides
             ) -> Tuple[AutoencoderKL, Optional[Dict[str, torch.Tensor]]]:
    """Build a VAE (see `build_vae`), load `ckpt_path` STRICTLY (local file or hub
    `owner/repo/file`), and read `stats_path`. Returns (model, stats or None).

    Without `stats_path`, `<ckpt>-latents-stats.pt` beside the checkpoint is used when present.
    A checkpoint that does not fit raises `StateDictMismatch` listing missing / unexpected /
    misshaped keys and naming the file; an explicit stats file that is missing or has the wrong
    channel count raises naming the file."""
    model = build_vae(preset_or_config, **overrides)
    if ckpt_path is not None:
        path = resolve_file(ckpt_path, "VAE checkpoint")
        obj = load_checkpoint_file(path)
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path}: expected a state_dict, got {type(obj).__name__}")
        sd = vae_state_dict_from_checkpoint(obj, model)
        check_state_dict(model, sd, f"VAE checkpoint {path}")
        model.load_state_dict(sd, strict=True)
        if stats_path is None and default_stats_path(path).is_file():
            stats_path = default_stats_path(path)
    stats = load_latents_stats(stats_path, channels=model.latent_channels) if stats_path is not None else None
    return model, stats
