"""RAE stage 1: a Representation AutoEncoder (frozen pretrained ViT encoder + trainable ViT decoder).

Encode: bicubic resize to the encoder's input size, normalise with the encoder's processor
mean/std, frozen encoder -> patch tokens [B, N, C], (training only) noise augmentation, reshape to
a square grid [B, C, h, w] and normalise per position with the latent statistics {mean, var}
[C, h, w]. Decode: undo the statistics, MAE-style ViT decoder to pixels in the encoder's
normalised space, de-normalise. The decoder's parameter names are those of the released RAE
decoder checkpoints; the encoder's those of the hub checkpoints (see `models/encoders.py`).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.encoders import (RAE_ENCODER_HUB_IDS, RAE_ENCODERS, build_rae_encoder, read_json_config)
from models.layers import sincos_2d

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf), the released decoder's
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


# --------------------------------------------------------------------------------------------
# Decoder (MAE-style ViT; key names of the released `model.pt`)
# --------------------------------------------------------------------------------------------
class _Dense(nn.Module):
    """A Linear held under `.dense` (the Hugging Face ViT naming the checkpoints use)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.dense = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x):
        return self.dense(x)


class _QKV(nn.Module):
    """Separate query / key / value projections and multi-head SDPA attention."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder_hidden_size {dim} is not divisible by decoder_num_attention_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key = nn.Linear(dim, dim, bias=qkv_bias)
        self.value = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (proj(x).view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))  # [B, H, T, Dh]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(Dh)) v
        return out.transpose(1, 2).reshape(B, T, D)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.attention = _QKV(dim, num_heads, qkv_bias)
        self.output = _Dense(dim, dim)

    def forward(self, x):
        return self.output(self.attention(x))


class DecoderLayer(nn.Module):
    """Pre-LN transformer layer: h += attn(LN(h)); h += fc2(act(fc1(LN(h))))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float, qkv_bias: bool, act: str):
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"decoder hidden_act '{act}' unsupported; valid: {', '.join(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[act]
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.attention = _Attention(dim, num_heads, qkv_bias)
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)
        self.intermediate = _Dense(dim, mlp_dim)
        self.output = _Dense(mlp_dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.layernorm_before(h))
        return h + self.output(self.act(self.intermediate(self.layernorm_after(h))))


class RAEDecoder(nn.Module):
    """RAE `GeneralDecoder`: tokens [B, N, C] -> image [B, 3, p*h, p*w] (h = w = sqrt(N)).

    decoder_embed Linear(C -> Dd); prepend a trainable CLS token; add a frozen 2-D sin-cos table
    with a zero CLS row; pre-LN layers; decoder_norm; decoder_pred Linear(Dd -> p*p*3); drop the
    CLS row; unpatchify.

    grad_checkpointing: recompute each decoder layer in the backward pass instead of storing its
    activations (torch.utils.checkpoint, non-reentrant): same outputs and gradients, much less
    memory for the XL decoder at large batches. Only active while gradients are being taken.
    """

    def __init__(self, num_tokens: int, in_dim: int, patch_size: int, hidden_size: int, depth: int,
                 num_heads: int, mlp_dim: int, layer_norm_eps: float = 1e-12, qkv_bias: bool = True,
                 hidden_act: str = "gelu", out_channels: int = 3, grad_checkpointing: bool = False):
        super().__init__()
        self.grad_checkpointing = bool(grad_checkpointing)
        grid = math.isqrt(num_tokens)
        if grid * grid != num_tokens:
            raise ValueError(f"RAE decoder needs a square token grid, got {num_tokens} tokens")
        self.grid, self.patch_size, self.out_channels = grid, patch_size, out_channels
        self.decoder_embed = nn.Linear(in_dim, hidden_size)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        # Frozen table, saved in the checkpoints (so a buffer, not recomputed on load).
        self.register_buffer("decoder_pos_embed",
                             sincos_2d(hidden_size, grid, cls_token=True).float().unsqueeze(0))  # [1, N+1, Dd]
        self.decoder_layers = nn.ModuleList(
            [DecoderLayer(hidden_size, num_heads, mlp_dim, layer_norm_eps, qkv_bias, hidden_act) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.decoder_pred = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def get_last_layer(self) -> torch.Tensor:
        """decoder_pred.weight: the layer at which the adaptive GAN weight balances the losses."""
        return self.decoder_pred.weight

    @classmethod
    def from_config(cls, cfg: dict, in_dim: int, patch_size: int, num_tokens: int,
                    grad_checkpointing: bool = False) -> "RAEDecoder":
        """From a ViT-MAE style config dict; RAE overrides hidden_size / patch_size / image_size,
        so only the `decoder_*` sizes, hidden_act, layer_norm_eps and qkv_bias are read."""
        missing = [k for k in ("decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads",
                               "decoder_intermediate_size") if k not in cfg]
        if missing:
            raise KeyError(f"RAE decoder config lacks {', '.join(missing)}")
        return cls(num_tokens, in_dim, patch_size, cfg["decoder_hidden_size"], cfg["decoder_num_hidden_layers"],
                   cfg["decoder_num_attention_heads"], cfg["decoder_intermediate_size"],
                   float(cfg.get("layer_norm_eps", 1e-12)), bool(cfg.get("qkv_bias", True)),
                   cfg.get("hidden_act", "gelu"), int(cfg.get("num_channels", 3)), grad_checkpointing)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B = tokens.shape[0]
        h = self.decoder_embed(tokens)  # [B, N, Dd]
        h = torch.cat([self.trainable_cls_token.expand(B, -1, -1).to(h.dtype), h], dim=1)
        h = h + self.decoder_pos_embed.to(h.dtype)  # [B, N+1, Dd]
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        for layer in self.decoder_layers:
            h = checkpoint(layer, h, use_reentrant=False) if checkpointing else layer(h)
        x = self.decoder_pred(self.decoder_norm(h))[:, 1:]  # [B, N, p*p*3]
        g, p, c = self.grid, self.patch_size, self.out_channels
        x = x.reshape(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [B, 3, h, p, w, p]
        return x.reshape(B, c, g * p, g * p)


# --------------------------------------------------------------------------------------------
# RAE
# --------------------------------------------------------------------------------------------
class RAE(nn.Module):
    """Frozen encoder + ViT decoder + per-position latent statistics.

    Latent statistics are non-persistent buffers (not in the state_dict, as in the released
    checkpoints): set them with `set_latent_stats` or `build_rae(..., stats=...)`; without
    them the latents are the raw tokens.
    """

    def __init__(self, encoder: nn.Module, decoder: RAEDecoder, encoder_input_size: int,
                 image_mean, image_std, noise_tau: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.encoder_input_size = int(encoder_input_size)
        self.noise_tau, self.eps = float(noise_tau), float(eps)
        self.grid = self.encoder_input_size // encoder.patch_size  # latent h = w
        self.latent_channels = encoder.hidden_size  # latent C
        # Decoded images are [B, 3, p*h, p*w]: one latent position per p x p output pixels.
        self.downsample_factor = decoder.patch_size
        self.image_size = decoder.patch_size * self.grid
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("latent_mean", None, persistent=False)
        self.register_buffer("latent_var", None, persistent=False)

    @property
    def latent_shape(self) -> tuple:
        return (self.latent_channels, self.grid, self.grid)

    def set_latent_stats(self, mean: Optional[torch.Tensor], var: Optional[torch.Tensor]) -> None:
        """Per-position statistics [C, h, w] (None, None to switch normalisation off)."""
        if (mean is None) != (var is None):
            raise ValueError("RAE latent stats: give both mean and var, or neither")
        if mean is not None:
            for n, t in (("mean", mean), ("var", var)):
                if tuple(t.shape) != self.latent_shape:
                    raise ValueError(f"RAE latent stats '{n}' has shape {tuple(t.shape)}, expected {self.latent_shape}")
            mean, var = mean.float().to(self.image_mean.device), var.float().to(self.image_mean.device)
        self.latent_mean, self.latent_var = mean, var

    def latent_stats(self) -> Optional[dict]:
        return None if self.latent_mean is None else {"mean": self.latent_mean.cpu(), "var": self.latent_var.cpu()}

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout in the features, whatever the RAE's mode
        return self

    @torch.no_grad()
    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> encoder tokens [B, N, C] (no noise, no statistics)."""
        S = self.encoder_input_size
        if x.shape[-2:] != (S, S):
            x = F.interpolate(x.float(), size=(S, S), mode="bicubic", align_corners=False)  # no antialias
        x = (x - self.image_mean) / self.image_std
        return self.encoder(x)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, noise_u: Optional[torch.Tensor] = None,
               noise_eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> normalised latents [B, C, h, w].

        In training mode with noise_tau > 0: tokens += (noise_tau * u) * eps, u ~ U[0, 1) per
        sample [B, 1, 1], eps ~ N(0, I) [B, N, C]; `noise_u` / `noise_eps` replace the draws.
        """
        tokens = self.encode_tokens(x)  # [B, N, C]
        B, N, C = tokens.shape
        if self.training and self.noise_tau > 0:
            u = torch.rand(B, 1, 1, device=tokens.device, dtype=tokens.dtype) if noise_u is None else noise_u
            eps = torch.randn_like(tokens) if noise_eps is None else noise_eps
            tokens = tokens + (self.noise_tau * u) * eps
        g = math.isqrt(N)
        z = tokens.transpose(1, 2).reshape(B, C, g, g)  # token n -> row n // g, column n % g
        if self.latent_mean is not None:
            z = (z - self.latent_mean) / torch.sqrt(self.latent_var + self.eps)
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, h, w] -> images [B, 3, p*h, p*w] (about [0, 1], no clamp)."""
        if self.latent_mean is not None:
            z = z * torch.sqrt(self.latent_var + self.eps) + self.latent_mean
        B, C = z.shape[:2]
        x = self.decoder(z.reshape(B, C, -1).transpose(1, 2))  # tokens [B, N, C] -> [B, 3, H, W]
        return x * self.image_std + self.image_mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _resolve_placeholder(value):
    return None if value is None or (isinstance(value, str) and value.startswith("<") and value.endswith(">")) else value


def build_rae(params: dict, encoder_config: Optional[dict] = None, image_processor: Optional[dict] = None,
              decoder_config: Optional[dict] = None, stats: Optional[dict] = None,
              random_init: bool = False) -> RAE:
    """Build an RAE from the released config's `stage_1.params` (the `RAE(...)` kwargs).

    Encoder: random weights from `encoder_config` (a transformers config dict, or else the
    `config.json` in `encoder_config_path`) when `random_init`, otherwise pretrained from the
    path / hub id in `encoder_params` (`dinov2_path` or `model_name`).
    Mean/std: `image_processor`, else `preprocessor_config.json` in a local encoder folder, else
    the released processor's values. Decoder: `decoder_config` or `<decoder_config_path>/config.json`;
    weights from `pretrained_decoder_path` unless `random_init`. Statistics: `stats` ({mean, var})
    or the file `normalization_stat_path`.
    """
    from utils import load_checkpoint_file, load_state_dict_strict

    encoder_cls = params.get("encoder_cls")
    if encoder_cls not in RAE_ENCODERS:
        raise ValueError(f"RAE config encoder_cls '{encoder_cls}' unknown; valid: {', '.join(RAE_ENCODERS)}")
    enc_params = dict(params.get("encoder_params") or {})
    enc_path = _resolve_placeholder(enc_params.get("dinov2_path", enc_params.get("model_name")))
    cfg_path = _resolve_placeholder(params.get("encoder_config_path")) or enc_path
    normalize = bool(enc_params.get("normalize", True))
    if random_init:
        if encoder_config is None:
            if cfg_path is None:
                raise ValueError("RAE random init needs encoder_config or an encoder_config_path folder")
            encoder_config = read_json_config(cfg_path)
        encoder = build_rae_encoder(encoder_cls, config=encoder_config, normalize=normalize)
    else:
        encoder = build_rae_encoder(encoder_cls, path=enc_path or RAE_ENCODER_HUB_IDS[encoder_cls], normalize=normalize)

    if image_processor is None and cfg_path is not None and os.path.isdir(cfg_path):
        try:
            image_processor = read_json_config(cfg_path, "preprocessor_config.json")
        except FileNotFoundError:
            image_processor = None
    cls = RAE_ENCODERS[encoder_cls]
    mean = (image_processor or {}).get("image_mean", cls.default_mean)
    std = (image_processor or {}).get("image_std", cls.default_std)

    if params.get("reshape_to_2d", True) is not True:
        raise ValueError("RAE config reshape_to_2d=False is not supported (latents are [B, C, h, w])")
    S = int(params["encoder_input_size"])
    if S % encoder.patch_size:
        raise ValueError(f"RAE encoder_input_size {S} is not a multiple of the encoder patch {encoder.patch_size}")
    num_tokens = (S // encoder.patch_size) ** 2
    if decoder_config is None:
        dec_path = _resolve_placeholder(params.get("decoder_config_path"))
        if dec_path is None:
            raise ValueError("RAE needs decoder_config or decoder_config_path")
        decoder_config = read_json_config(dec_path)
    decoder = RAEDecoder.from_config(decoder_config, encoder.hidden_size, int(params.get("decoder_patch_size", 16)),
                                     num_tokens)
    dec_weights = _resolve_placeholder(params.get("pretrained_decoder_path"))
    if dec_weights and not random_init:
        load_state_dict_strict(decoder, load_checkpoint_file(dec_weights), f"RAE decoder {dec_weights}")

    rae = RAE(encoder, decoder, S, mean, std, noise_tau=float(params.get("noise_tau", 0.0)),
              eps=float(params.get("eps", 1e-5)))
    stat_path = _resolve_placeholder(params.get("normalization_stat_path"))
    if stats is None and stat_path:
        stats = load_checkpoint_file(stat_path)
    if stats is not None:
        if "mean" not in stats or "var" not in stats:
            raise KeyError(f"RAE statistics {stat_path or 'dict'} need keys 'mean' and 'var' (has {list(stats)})")
        rae.set_latent_stats(stats["mean"], stats["var"])
    # What rebuilds this RAE (models.tokenizers.describe_model): the weights and statistics files
    # travel separately, and a random encoder is recorded because no export can hold it.
    rae.spec = dict(params={k: v for k, v in params.items()
                            if k not in ("pretrained_decoder_path", "normalization_stat_path")},
                    decoder_config=decoder_config, image_processor=image_processor, random_encoder=bool(random_init))
    return rae
