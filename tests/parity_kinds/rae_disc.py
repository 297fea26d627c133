"""Parity runner for kind `rae_dino_disc` (RAE's DINO discriminator, `src/disc/dinodisc.py: DinoDisc`).

Maps the original constructor kwargs in `meta.config` onto our `build_dino_discriminator` config
(random backbone), loads the original's `dino.*` into the frozen ViT and its `heads.*` through
`load_heads` (strict, the original's key names), and returns the logits plus the feature maps the
heads read ([B, C, L], in the original's order).
"""
import torch

from models.discriminators import build_dino_discriminator
from tests.parity_kinds import f32, register
from utils import load_state_dict_strict

# Original kwarg -> our config key (same meaning).
_RENAMED = {"depth": "depth", "key_depths": "feature_blocks", "patch_size": "patch_size", "embed_dim": "embed_dim",
            "num_heads": "num_heads", "mlp_ratio": "mlp_ratio", "norm_eps": "norm_eps", "ks": "kernel_size",
            "using_spec_norm": "spectral_norm", "img_size": "img_size"}


@register("rae_dino_disc")
def run_rae_dino_disc(meta, sd, inputs):
    cfg = dict(meta["config"])
    norm_type = cfg.pop("norm_type", "bn")
    if norm_type != "bn":
        raise ValueError(f"rae_dino_disc config norm_type {norm_type!r}: only 'bn' (BatchNormLocal) is implemented")
    unknown = sorted(set(cfg) - set(_RENAMED))
    if unknown:
        raise ValueError(f"rae_dino_disc config: unmapped keys {unknown}")
    ours = {_RENAMED[k]: v for k, v in cfg.items()}
    ours["feature_blocks"] = tuple(ours.get("feature_blocks", ()))
    disc = build_dino_discriminator({"pretrained": "random", **ours})
    backbone = {k[len("dino."):]: v for k, v in sd.items() if k.startswith("dino.")}
    load_state_dict_strict(disc.backbone.vit, backbone, "fixture state_dict dino.*")
    disc.load_heads(sd)  # drops dino.*, strict on heads.*
    disc.eval()
    x = f32(inputs["x"])
    with torch.no_grad():
        feats = disc.backbone(x)
        out = {"logits": disc(x)}
    out.update({f"feature_{i}": f.transpose(1, 2) for i, f in enumerate(feats)})
    return {k: v for k, v in out.items() if k in meta["outputs"]}
