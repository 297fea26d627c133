"""Frozen representation encoders.

Two families live here:

1. REPA / REPA-E alignment targets (`--enc-type`, a comma list): DINOv2 ViT-B/L/g, DINO ViT-B,
   MoCo-v3 ViT-B/L, CLIP ViT-L, I-JEPA ViT-H, MAE ViT-L, plus the tiny random `dinov2-vit-tiny`
   for tests and the CPU demo. Each is a timm `VisionTransformer` wrapped by
   `RepresentationEncoder`, which takes raw images (uint8 or float in [0, 255]), does the
   encoder's own preprocessing and returns patch tokens [B, N, D] (no CLS / register tokens).
   The token grid is always resolution // 16 per side, the grid of SiT-*/2 on f8 latents and of
   patch-1 models on f16 latents: patch-14 encoders see a bicubic resize to 14 * (H // 16) pixels
   (224 at 256px), patch-16 encoders the image at its own size.

2. RAE stage-1 encoders (`RAE_ENCODERS`, keyed by the class names of the released RAE configs):
   DINOv2-with-registers, MAE and SigLIP2 built with Hugging Face transformers. Their final
   LayerNorm loses its affine, and their state_dict keys use the hub / transformers-4.x spelling
   (what released RAE checkpoints and the parity fixtures contain) although transformers >= 5
   names the modules differently; `_LegacyKeys` translates in both directions.

Every encoder is frozen (eval mode, requires_grad False) and can be built with random weights
from its architecture config alone (tests, demo); real use loads a hub id or a local checkpoint
and raises, naming the encoder and the path, when that is impossible (never a silent random
fallback).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# Every REPA encoder yields one token per 16x16 pixel cell of the training image.
TOKEN_STRIDE = 16


# ============================================================================================
# REPA / REPA-E representation encoders (timm)
# ============================================================================================
@dataclass(frozen=True)
class EncoderSpec:
    """Architecture, preprocessing and weight sources of one `--enc-type` name.

    `timm_arch` + `timm_kwargs` is the exact architecture (built at the input size the
    resolution implies). `hub_id` is a timm pretrained tag (downloaded through the Hugging Face
    hub, so HF_HUB_OFFLINE is honoured) or None where only a local checkpoint exists.
    `weight_files` are file names looked up in `weights_dir` (the official file names first).
    """

    name: str
    timm_arch: str
    embed_dim: int
    patch_size: int
    depth: int
    num_heads: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    # REPA order of operations: CLIP resizes then normalises; DINOv2 / JEPA normalise then resize.
    resize_before_normalize: bool = False
    # CLIP tokens are taken before the final LayerNorm (ln_post is not applied in REPA).
    final_norm: bool = True
    timm_kwargs: dict = field(default_factory=dict)
    hub_id: Optional[str] = None
    weight_files: tuple = ()
    random_only: bool = False  # test encoder: there are no weights to load
    description: str = ""

    def input_size(self, resolution: int) -> int:
        """Pixel size fed to the encoder so that its grid is resolution // 16 per side."""
        return self.patch_size * (resolution // TOKEN_STRIDE)

    def num_tokens(self, resolution: int) -> int:
        return (resolution // TOKEN_STRIDE) ** 2


ENCODER_SPECS: Dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in [
        EncoderSpec("dinov2-vit-b", "vit_base_patch14_dinov2", 768, 14, 12, 12,
                    hub_id="vit_base_patch14_dinov2.lvd142m",
                    weight_files=("dinov2_vitb14_pretrain.pth",),
                    description="DINOv2 ViT-B/14 (LVD-142M), x_norm_patchtokens"),
        EncoderSpec("dinov2-vit-l", "vit_large_patch14_dinov2", 1024, 14, 24, 16,
                    hub_id="vit_large_patch14_dinov2.lvd142m",
                    weight_files=("dinov2_vitl14_pretrain.pth",),
                    description="DINOv2 ViT-L/14 (LVD-142M)"),
        EncoderSpec("dinov2-vit-g", "vit_giant_patch14_dinov2", 1536, 14, 40, 24,
                    hub_id="vit_giant_patch14_dinov2.lvd142m",
                    weight_files=("dinov2_vitg14_pretrain.pth",),
                    description="DINOv2 ViT-g/14 (LVD-142M, SwiGLU MLP)"),
        EncoderSpec("dinov1-vit-b", "vit_base_patch16_224", 768, 16, 12, 12,
                    hub_id="vit_base_patch16_224.dino",
                    weight_files=("dino_vitbase16_pretrain.pth",),
                    description="DINO ViT-B/16"),
        EncoderSpec("mocov3-vit-b", "vit_base_patch16_224", 768, 16, 12, 12,
                    weight_files=("mocov3_vitb.pth", "vit-b-300ep.pth.tar"),
                    description="MoCo-v3 ViT-B/16 (local checkpoint only)"),
        EncoderSpec("mocov3-vit-l", "vit_large_patch16_224", 1024, 16, 24, 16,
                    weight_files=("mocov3_vitl.pth", "vit-l-300ep.pth.tar"),
                    description="MoCo-v3 ViT-L/16 (local checkpoint only)"),
        EncoderSpec("clip-vit-L", "vit_large_patch14_clip_224", 1024, 14, 24, 16,
                    mean=CLIP_MEAN, std=CLIP_STD, resize_before_normalize=True, final_norm=False,
                    hub_id="vit_large_patch14_clip_224.openai",
                    weight_files=("clip_vitl14.pth",),
                    description="OpenAI CLIP ViT-L/14 image tower, tokens before ln_post"),
        EncoderSpec("jepa-vit-h", "vit_huge_patch14_224", 1280, 14, 32, 16,
                    timm_kwargs=dict(class_token=False, global_pool="avg"),
                    weight_files=("ijepa_vith.pth", "IN1K-vit.h.14-300e.pth.tar"),
                    description="I-JEPA ViT-H/14 (no CLS token; local checkpoint only)"),
        EncoderSpec("mae-vit-l", "vit_large_patch16_224", 1024, 16, 24, 16,
                    hub_id="vit_large_patch16_224.mae",
                    weight_files=("mae_vitl.pth", "mae_pretrain_vit_large.pth"),
                    description="MAE ViT-L/16"),
        EncoderSpec("dinov2-vit-tiny", "vit_small_patch14_dinov2", 32, 14, 2, 2,
                    timm_kwargs=dict(embed_dim=32, depth=2, num_heads=2),
                    random_only=True,
                    description="DINOv2-style ViT, width 32, depth 2, random weights (tests / CPU demo)"),
    ]
}


def _spec(name: str) -> EncoderSpec:
    if name not in ENCODER_SPECS:
        raise ValueError(f"--enc-type: unknown encoder '{name}'; valid names: {', '.join(ENCODER_SPECS)}")
    return ENCODER_SPECS[name]


def build_timm_vit(spec: EncoderSpec, resolution: int, pretrained: bool = False) -> nn.Module:
    """The timm ViT of `spec` at the input size of `resolution`, classifier head removed."""
    import timm

    kwargs = dict(img_size=spec.input_size(resolution), num_classes=0, **spec.timm_kwargs)
    name = spec.hub_id if pretrained else spec.timm_arch
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _find_weight_file(spec: EncoderSpec, weights_dir: str) -> Optional[Path]:
    root = Path(weights_dir)
    names = list(spec.weight_files) + [f"{spec.name}{ext}" for ext in (".pth", ".pt", ".safetensors", ".bin")]
    names += [f"{spec.name}/model.safetensors", f"{spec.name}/pytorch_model.bin"]
    for n in names:
        if (root / n).is_file():
            return root / n
    return None


def _unwrap_checkpoint(sd: dict) -> dict:
    """Official checkpoints come wrapped: MoCo-v3 {'state_dict': {'module.base_encoder.*'}},
    I-JEPA {'encoder': {'module.*'}}, MAE {'model': ...}. Return the bare encoder state_dict."""
    for key in ("state_dict", "model", "encoder", "target_encoder"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    for prefix in ("module.base_encoder.", "module.", "base_encoder."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    # Classification / projection heads and MAE decoders are not part of the feature extractor.
    return {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.", "decoder"))}


def load_timm_weights(model: nn.Module, path: Path, name: str) -> None:
    """Load an official checkpoint file into a timm ViT strictly (after timm's own conversion:
    DINOv2 / OpenAI-CLIP key layouts, position-table resampling to the model's grid)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    from utils import load_checkpoint_file, load_state_dict_strict

    sd = _unwrap_checkpoint(load_checkpoint_file(path))
    sd = checkpoint_filter_fn(sd, model)
    load_state_dict_strict(model, sd, f"encoder {name} weights {path}")


class RepresentationEncoder(nn.Module):
    """A frozen REPA alignment encoder: raw images [B, 3, H, W] in [0, 255] -> tokens [B, N, D].

    Preprocessing follows REPA: x / 255, per-channel mean/std, bicubic resize (no antialias) to
    the input size that gives a (resolution // 16)^2 token grid; CLS / register tokens dropped.
    """

    def __init__(self, spec: EncoderSpec, model: nn.Module, resolution: int):
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.embed_dim = spec.embed_dim
        self.resolution = resolution
        self.input_size = spec.input_size(resolution)
        self.model = model
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def num_tokens(self, resolution: int) -> int:
        return self.spec.num_tokens(resolution)

    def train(self, mode: bool = True):
        # Frozen: never switch to training mode (no dropout / drop-path in the target features).
        return super().train(False)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.input_size, self.input_size):
            return x
        return F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encoder {self.name}: expected images [B, 3, H, W], got {tuple(images.shape)}")
        x = images.float() / 255.0  # [B, 3, H, W] in [0, 1]
        if self.spec.resize_before_normalize:
            x = (self._resize(x) - self.mean) / self.std
        else:
            x = self._resize((x - self.mean) / self.std)
        x = x.to(self.model.patch_embed.proj.weight.dtype)
        m = self.model
        # timm VisionTransformer.forward_features, with the final norm optional (CLIP).
        t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))  # [B, P + N, D]
        t = m.blocks(t)
        if self.spec.final_norm:
            t = m.norm(t)
        return t[:, m.num_prefix_tokens:]  # [B, N, D]


def build_encoder(name: str, resolution: int = 256, random_init: bool = False,
                  weights_dir: Optional[str] = None) -> RepresentationEncoder:
    """One `--enc-type` encoder. Weights: `random_init` -> random; else `weights_dir/<file>` when
    `weights_dir` is given (an official checkpoint file, see `EncoderSpec.weight_files`); else the
    timm hub tag (HF_HUB_OFFLINE honoured). Anything missing raises naming the encoder and path."""
    spec = _spec(name)
    if resolution < TOKEN_STRIDE or resolution % TOKEN_STRIDE:
        raise ValueError(f"--resolution {resolution}: encoders need a multiple of {TOKEN_STRIDE}")
    if random_init or spec.random_only:
        # One fixed random network per name, drawn without touching the global RNG: every process
        # of a multi-process run (each seeded differently) aligns to the same encoder.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return RepresentationEncoder(spec, build_timm_vit(spec, resolution), resolution)
    if weights_dir is not None:
        path = _find_weight_file(spec, weights_dir)
        if path is None:
            raise FileNotFoundError(
                f"encoder {name}: no weights in --encoder-weights-dir {weights_dir} "
                f"(looked for {', '.join(spec.weight_files) or '-'}, {name}.pth/.pt/.safetensors/.bin)")
        model = build_timm_vit(spec, resolution)
        load_timm_weights(model, path, name)
        return RepresentationEncoder(spec, model, resolution)
    if spec.hub_id is None:
        raise FileNotFoundError(
            f"encoder {name} has no hub weights: pass --encoder-weights-dir holding one of "
            f"{', '.join(spec.weight_files)} (or --random-init-encoders: random weights, for tests only)")
    try:
        model = build_timm_vit(spec, resolution, pretrained=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the encoder and source named
        offline = " (HF_HUB_OFFLINE is set: the weights must already be in the hub cache)" \
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise RuntimeError(f"encoder {name}: could not load pretrained weights from hub id "
                           f"timm/{spec.hub_id}{offline}: {e}. Offline: pass --encoder-weights-dir DIR holding "
                           f"{' or '.join(spec.weight_files) or name + '.pth'}, or --random-init-encoders "
                           f"(random weights: the alignment then means nothing; for tests only)") from e
    return RepresentationEncoder(spec, model, resolution)


def load_encoders(enc_type: str, device="cpu", resolution: int = 256, random_init: bool = False,
                  weights_dir: Optional[str] = None) -> List[RepresentationEncoder]:
    """`--enc-type` comma list -> frozen encoders on `device`, in the order given."""
    names = [n.strip() for n in enc_type.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--enc-type '{enc_type}': no encoder named; valid names: {', '.join(ENCODER_SPECS)}")
    for n in names:
        _spec(n)  # fail on a typo before building anything heavy
    return [build_encoder(n, resolution, random_init, weights_dir).to(device) for n in names]


# ============================================================================================
# RAE stage-1 encoders (transformers)
# ============================================================================================
class _LegacyKeys:
    """Two-way renaming between the transformers-4.x / hub key spelling ("legacy") and the module
    names of the installed transformers ("native"), for keys relative to the HF model.

    `pairs` holds (legacy, native) templates where `{i}` is a layer index. Installed as state_dict
    hooks, so `state_dict()` speaks legacy names and `load_state_dict` accepts them.
    """

    def __init__(self, pairs):
        def rx(t):
            return re.compile("^" + re.escape(t).replace(r"\{i\}", r"(\d+)"))

        self.to_native_rules = [(rx(a), b.replace("{i}", r"\1")) for a, b in pairs]
        self.to_legacy_rules = [(rx(b), a.replace("{i}", r"\1")) for a, b in pairs]

    @staticmethod
    def _apply(rules, key: str) -> str:
        for pattern, repl in rules:
            if pattern.match(key):
                return pattern.sub(repl, key, count=1)
        return key

    def to_native(self, key: str) -> str:
        return self._apply(self.to_native_rules, key)

    def to_legacy(self, key: str) -> str:
        return self._apply(self.to_legacy_rules, key)

    def install(self, owner: nn.Module, attr: str) -> None:
        """Rename keys under `<prefix><attr>.` on state_dict() / load_state_dict() of `owner`."""
        def save_hook(module, state_dict, prefix, local_metadata):
            head = prefix + attr + "."
            for k in [k for k in state_dict if k.startswith(head)]:
                new = head + self.to_legacy(k[len(head):])
                if new != k:
                    state_dict[new] = state_dict.pop(k)

        def load_hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
            head = prefix + attr + "."
            for k in [k for k in state_dict if k.startswith(head)]:
                new = head + self.to_native(k[len(head):])
                if new != k:
                    state_dict[new] = state_dict.pop(k)

        owner.register_state_dict_post_hook(save_hook)
        owner.register_load_state_dict_pre_hook(load_hook)
        # A transformers release that renames modules again must fail here, not load wrongly.
        for k in getattr(owner, attr).state_dict():
            if self.to_native(self.to_legacy(k)) != k:
                raise RuntimeError(f"{type(owner).__name__}: key {k} does not round-trip through the legacy names")


def _drop_affine(ln: nn.LayerNorm) -> None:
    """RAE keeps the encoder's final LayerNorm as a pure normaliser (weight and bias removed)."""
    ln.elementwise_affine = False
    ln.weight = None
    ln.bias = None


def _from_pretrained(cls, name_or_path: str, what: str, **kwargs):
    """`cls.from_pretrained` that raises (naming the encoder and path) when the weights cannot be
    read or leave any parameter missing / misshaped (transformers would only warn and keep the
    random init). Unexpected keys are fine: MAE decoder, SigLIP text tower."""
    try:
        model, info = cls.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the encoder and path named
        raise RuntimeError(f"RAE encoder {what}: could not load weights from '{name_or_path}' "
                           f"(hub id or local folder; HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {e}. "
                           f"Offline: point the config's encoder path at a local folder holding the model "
                           f"(config.json + weights), or pass --random-init-encoders (tests only)") from e
    bad = list(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
    if bad:
        raise RuntimeError(f"RAE encoder {what}: weights in '{name_or_path}' do not cover the model; "
                           f"missing or misshaped: {', '.join(sorted(bad)[:40])}")
    return model


class RAEDinov2Encoder(nn.Module):
    """RAE `Dinov2withNorm`: DINOv2 with registers; tokens = last_hidden_state without CLS and
    registers [B, N, C]. Input: an image already resized to the encoder size and normalised.
    The HF model lives at `.encoder` (state_dict prefix `encoder.` inside the wrapper)."""

    default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
    legacy_keys = _LegacyKeys([
        ("encoder.layer.{i}.attention.attention.query.", "encoder.layer.{i}.attention.q_proj."),
        ("encoder.layer.{i}.attention.attention.key.", "encoder.layer.{i}.attention.k_proj."),
        ("encoder.layer.{i}.attention.attention.value.", "encoder.layer.{i}.attention.v_proj."),
        ("encoder.layer.{i}.attention.output.dense.", "encoder.layer.{i}.attention.o_proj."),
    ])

    def __init__(self, config: Optional[dict] = None, path: Optional[str] = None, normalize: bool = True):
        super().__init__()
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

        if path is not None:
            self.encoder = _from_pretrained(Dinov2WithRegistersModel, path, "Dinov2withNorm")
        else:
            self.encoder = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**config))
        if normalize:
            _drop_affine(self.encoder.layernorm)
        cfg = self.encoder.config
        self.patch_size, self.hidden_size = cfg.patch_size, cfg.hidden_size
        # CLS + registers (RAE hard-codes 5 = 1 + 4 for the released model).
        self.num_prefix_tokens = 1 + cfg.num_register_tokens
        self.legacy_keys.install(self, "encoder")
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The HF embeddings resize the learned position table to the input grid (bicubic,
        # antialias, float32), as the original does.
        h = self.encoder(pixel_values=x).last_hidden_state  # [B, 1 + R + N, C]
        return h[:, self.num_prefix_tokens:]


class RAEMAEEncoder(nn.Module):
    """RAE `MAEwNorm`: the MAE ViT encoder with mask ratio 0 and identity token order; tokens =
    last_hidden_state without CLS [B, N, C]; sin-cos table resized to the grid (bicubic).
    The HF model lives at `.model`."""

    default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
    legacy_keys = _LegacyKeys([
        ("encoder.layer.{i}.attention.attention.query.", "layers.{i}.attention.q_proj."),
        ("encoder.layer.{i}.attention.attention.key.", "layers.{i}.attention.k_proj."),
        ("encoder.layer.{i}.attention.attention.value.", "layers.{i}.attention.v_proj."),
        ("encoder.layer.{i}.attention.output.dense.", "layers.{i}.attention.o_proj."),
        ("encoder.layer.{i}.intermediate.dense.", "layers.{i}.mlp.fc1."),
        ("encoder.layer.{i}.output.dense.", "layers.{i}.mlp.fc2."),
        ("encoder.layer.{i}.layernorm_before.", "layers.{i}.layernorm_before."),
        ("encoder.layer.{i}.layernorm_after.", "layers.{i}.layernorm_after."),
    ])

    def __init__(self, config: Optional[dict] = None, path: Optional[str] = None, normalize: bool = True):
        super().__init__()
        from transformers import ViTMAEConfig, ViTMAEModel

        if path is not None:
            self.model = _from_pretrained(ViTMAEModel, path, "MAEwNorm", mask_ratio=0.0)
        else:
            cfg = {k: v for k, v in config.items() if not k.startswith("decoder_")}  # MAE decoder unused
            self.model = ViTMAEModel(ViTMAEConfig(**{**cfg, "mask_ratio": 0.0}))
        self.model.config.mask_ratio = 0.0
        if normalize:
            _drop_affine(self.model.layernorm)
        cfg = self.model.config
        self.patch_size, self.hidden_size = cfg.patch_size, cfg.hidden_size
        self.legacy_keys.install(self, "model")
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size)
        # noise = arange: argsort is the identity, so with mask ratio 0 nothing moves or drops.
        noise = torch.arange(n, device=x.device, dtype=torch.float32).expand(x.shape[0], n)
        h = self.model(pixel_values=x, noise=noise, interpolate_pos_encoding=True).last_hidden_state
        return h[:, 1:]  # [B, N, C]


class RAESigLIP2Encoder(nn.Module):
    """RAE `SigLIP2wNorm`: the SigLIP(2) vision tower (text tower never built); tokens = all of
    last_hidden_state [B, N, C] after the affine-free post-LayerNorm (the pooling head runs, its
    output unused). The HF vision tower lives at `.model`."""

    default_mean, default_std = SIGLIP_MEAN, SIGLIP_STD
    legacy_keys = _LegacyKeys([])  # SigLIP keys are unchanged in transformers 5

    def __init__(self, config: Optional[dict] = None, path: Optional[str] = None, normalize: bool = True):
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        if path is not None:
            self.model = _from_pretrained(SiglipVisionModel, path, "SigLIP2wNorm")
        else:
            vcfg = config.get("vision_config", config)
            vcfg = {k: v for k, v in vcfg.items() if k != "model_type"}
            self.model = SiglipVisionModel(SiglipVisionConfig(**vcfg))
        # transformers >= 5: SiglipVisionModel holds the tower directly (4.x: under .vision_model).
        self.model = getattr(self.model, "vision_model", self.model)
        if normalize:
            _drop_affine(self.model.post_layernorm)
        cfg = self.model.config
        self.patch_size, self.hidden_size = cfg.patch_size, cfg.hidden_size
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state  # [B, N, C]


# Keyed by the `encoder_cls` names of the released RAE configs.
RAE_ENCODERS: Dict[str, Callable[..., nn.Module]] = {
    "Dinov2withNorm": RAEDinov2Encoder,
    "MAEwNorm": RAEMAEEncoder,
    "SigLIP2wNorm": RAESigLIP2Encoder,
}

# Hub ids of the released RAE encoders (what `encoder_params` point at).
RAE_ENCODER_HUB_IDS = {
    "Dinov2withNorm": "facebook/dinov2-with-registers-base",
    "MAEwNorm": "facebook/vit-mae-base",
    "SigLIP2wNorm": "google/siglip2-base-patch16-256",
}


def build_rae_encoder(encoder_cls: str, config: Optional[dict] = None, path: Optional[str] = None,
                      normalize: bool = True) -> nn.Module:
    """An RAE encoder by its config class name: random weights from `config` (a transformers
    config dict), or pretrained from `path` (hub id or local folder)."""
    if encoder_cls not in RAE_ENCODERS:
        raise ValueError(f"RAE encoder_cls '{encoder_cls}' unknown; valid: {', '.join(RAE_ENCODERS)}")
    if (config is None) == (path is None):
        raise ValueError(f"RAE encoder {encoder_cls}: give exactly one of an architecture config (random "
                         f"weights) or a pretrained path/hub id")
    return RAE_ENCODERS[encoder_cls](config=config, path=path, normalize=normalize)


def read_json_config(folder_or_file: str, filename: str = "config.json") -> dict:
    """Read `<folder>/config.json` (or the file itself); errors name the path."""
    p = Path(folder_or_file)
    if p.is_dir():
        p = p / filename
    if not p.is_file():
        raise FileNotFoundError(f"config not found: {p}")
    with open(p) as f:
        return json.load(f)
