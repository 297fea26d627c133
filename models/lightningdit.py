"""LightningDiT: a DiT with RMSNorm, SwiGLU, 2-D RoPE and optional qk-norm, trained on VA-VAE (hustvl)
or RAE (bytetriper) latents.

One class serves both originals; the maths is shared and selected by config flags:
* hustvl/LightningDiT `models/lightningdit.py`: sinusoidal timestep features of t in [0, 1]
  (`use_gembed=False`, the default); CFG through `forward_with_cfg` (interval decided by t[0] >=
  `cfg_interval_start`).
* bytetriper/RAE `src/stage2/models/lightningDiT.py`: Gaussian-Fourier timestep features
  (`use_gembed=True`, buffer `t_embedder.W`); CFG through `forward_with_interval_cfg` (RAE's list of
  half-open (a, b) pairs, again decided by t[0]).

State-dict keys are the originals' (pos_embed, x_embedder.proj.*, t_embedder.{W,mlp.0,mlp.2},
y_embedder.embedding_table.weight, feat_rope.freqs_{cos,sin}, blocks.i.{norm1,norm2,attn.qkv,
attn.q_norm,attn.k_norm,attn.proj,mlp.w12,mlp.w3,mlp.fc1,mlp.fc2,adaLN_modulation.1}.*,
final_layer.{norm_final,linear,adaLN_modulation.1}.*), so released checkpoints load strictly.

Facts of the originals kept here (the fixture README lists them): the sin-cos pos_embed puts the
column in the first half of the channels while RoPE puts the row first; qk-norm comes before RoPE;
the final layer always has a shift, even with `wo_shift`; with `learn_sigma` the forward returns
only the first C channels. hustvl's CFG guides only channels 0..2 (a DiT legacy its published FIDs
depend on); here that is the explicit option `cfg_channels=LEGACY_CFG_CHANNELS`, and the default
guides every channel.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint

from models.layers import (Attention, GaussianFourierEmbedder, LabelEmbedder, Mlp, PatchEmbed, RMSNorm,
                           RotaryEmbedding2D, SwiGLU, TimestepEmbedder, sincos_2d, unpatchify)

# hustvl's forward_with_cfg guides only the first 3 latent channels (inherited from DiT, where the
# model predicted 3 image channels + variance). Pass cfg_channels=LEGACY_CFG_CHANNELS to reproduce it.
LEGACY_CFG_CHANNELS = 3


def modulate_tokens(x: torch.Tensor, shift: Optional[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] * (1 + scale) + shift, with shift/scale [B, 1, D] (per sample) or [B, T, D] (per token)."""
    x = x * (1 + scale)
    return x if shift is None else x + shift


def make_norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    """RMSNorm (learnable weight, eps 1e-6) or LayerNorm without affine (eps 1e-6)."""
    return RMSNorm(dim, eps=1e-6) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class LightningDiTBlock(nn.Module):
    """adaLN-Zero block with RMSNorm/LayerNorm, qk-norm + RoPE attention and SwiGLU/GELU MLP.

    Shared by LightningDiT and DiT^DH. The condition c is [B, D] (one per sample) or [B, T, D]
    (per token: the DiT^DH head). Modulation chunks: shift_msa, scale_msa, gate_msa, shift_mlp,
    scale_mlp, gate_mlp (`wo_shift`: the four without shifts)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, use_qknorm: bool = False,
                 use_swiglu: bool = True, use_rmsnorm: bool = True, wo_shift: bool = False):
        super().__init__()
        self.norm1 = make_norm(hidden_size, use_rmsnorm)
        self.norm2 = make_norm(hidden_size, use_rmsnorm)
        # qk-norm over the head dim: RMSNorm(eps 1e-6) or an affine LayerNorm (eps 1e-5), as the originals
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=use_qknorm,
                              norm_layer=RMSNorm if use_rmsnorm else nn.LayerNorm)
        mlp_hidden = int(hidden_size * mlp_ratio)
        # SwiGLU keeps the parameter count of a 4x GELU MLP with a 2/3-width hidden layer
        self.mlp = SwiGLU(hidden_size, int(2 / 3 * mlp_hidden)) if use_swiglu else Mlp(hidden_size, mlp_hidden)
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (4 if wo_shift else 6) * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Optional[nn.Module] = None) -> torch.Tensor:
        # x: [B, T, D]; c: [B, D] or [B, T, D]
        if c.dim() == 2:
            c = c.unsqueeze(1)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=-1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate_tokens(self.norm1(x), shift_msa, scale_msa), rope=rope)
        x = x + gate_mlp * self.mlp(modulate_tokens(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale; always with shift) + norm, then Linear(D, p*p*C_out) per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = True):
        super().__init__()
        self.norm_final = make_norm(hidden_size, use_rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if c.dim() == 2:
            c = c.unsqueeze(1)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate_tokens(self.norm_final(x), shift, scale))


def init_adaln_zero(model: nn.Module, blocks: Sequence[nn.Module], final_layer: FinalLayer,
                    embedders: Sequence[PatchEmbed], xavier_linears: bool = True) -> None:
    """DiT initialisation: xavier Linears, patch convs as Linears, N(0, 0.02) label table and
    timestep MLP, zeroed adaLN and output layers (so every block starts as the identity).
    Skipped for a model built on the meta device (shapes only, e.g. before loading a checkpoint)."""
    if next(model.parameters()).is_meta:
        return
    if xavier_linears:
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    for emb in embedders:
        w = emb.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(emb.proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for blk in blocks:
        nn.init.zeros_(blk.adaLN_modulation[-1].weight)
        nn.init.zeros_(blk.adaLN_modulation[-1].bias)
    for lin in (final_layer.adaLN_modulation[-1], final_layer.linear):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)


def _check_cfg_batch(x: torch.Tensor, where: str) -> int:
    if x.shape[0] % 2:
        raise ValueError(f"{where}: the CFG batch must be [conditional; unconditional] halves, got batch {x.shape[0]}")
    return x.shape[0] // 2


class LightningDiT(nn.Module):
    """LightningDiT on a [C, S, S] latent: patch embed + frozen sin-cos pos_embed, `depth`
    LightningDiT blocks conditioned on c = t_emb + y_emb, adaLN final layer, unpatchify.

    `use_gembed` selects RAE's Gaussian-Fourier timestep embedder instead of hustvl's sinusoidal
    one; `use_checkpoint` recomputes block activations in the backward pass (training memory)."""

    def __init__(self, input_size: int = 16, patch_size: int = 1, in_channels: int = 32, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = False, use_qknorm: bool = False,
                 use_swiglu: bool = True, use_rope: bool = True, use_rmsnorm: bool = True, wo_shift: bool = False,
                 use_checkpoint: bool = False, use_gembed: bool = False):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = GaussianFourierEmbedder(hidden_size) if use_gembed else TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = self.x_embedder.grid_size
        # frozen 2-D sin-cos table (column first), kept as a buffer under the original key
        self.register_buffer("pos_embed", sincos_2d(hidden_size, grid).float().unsqueeze(0))  # [1, T, D]
        self.feat_rope = RotaryEmbedding2D(hidden_size // num_heads, grid) if use_rope else None
        self.blocks = nn.ModuleList([
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm)
        init_adaln_zero(self, self.blocks, self.final_layer, [self.x_embedder])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, C, S, S], t [B] in [0, 1], y [B] int64 (num_classes = null) -> [B, C, S, S];
        force_drop_ids [B] (bool or 1 = drop) replaces the training label-dropout draw."""
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # [B, T, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # [B, D]
        for block in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, c, self.feat_rope, use_reentrant=False)
            else:
                h = block(h, c, rope=self.feat_rope)
        h = self.final_layer(h, c)  # [B, T, p*p*C_out]
        out = unpatchify(h, self.patch_size, self.out_channels)  # [B, C_out, S, S]
        return out[:, : self.in_channels] if self.learn_sigma else out

    def _cond_uncond(self, x, t, y, where):
        # The conditional and unconditional rows share the FIRST half of x (the originals' convention).
        n = _check_cfg_batch(x, where)
        half = x[:n]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        return n, out

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         cfg_interval: Optional[bool] = False, cfg_interval_start: float = 0.0,
                         cfg_channels: Optional[int] = None) -> torch.Tensor:
        """hustvl classifier-free guidance on a [cond; uncond] batch of 2n rows -> [2n, C, S, S].

        guided = uncond + cfg_scale * (cond - uncond), written to both halves. With `cfg_interval`
        True and t[0] < cfg_interval_start the conditional output is used instead (t[0] alone
        decides: the sampler passes one time for the whole batch). `cfg_channels=None` guides every
        channel; `cfg_channels=LEGACY_CFG_CHANNELS` (3) reproduces the original, which guides only
        channels 0..2 and returns the other channels unguided (cond rows cond, uncond rows uncond)."""
        cfg_interval = False if cfg_interval is None else cfg_interval  # the original's default is None
        if not isinstance(cfg_interval, bool):
            raise TypeError(
                f"LightningDiT.forward_with_cfg: cfg_interval is a bool (guide only where t[0] >= "
                f"cfg_interval_start), got {cfg_interval!r}; for RAE's list of (a, b) pairs use "
                "forward_with_interval_cfg, for a per-sample [t_min, t_max] window transport.cfg_velocity")
        n, out = self._cond_uncond(x, t, y, "LightningDiT.forward_with_cfg")
        k = out.shape[1] if cfg_channels is None else int(cfg_channels)
        eps, rest = out[:, :k], out[:, k:]
        cond, uncond = eps[:n], eps[n:]
        guided = uncond + cfg_scale * (cond - uncond)
        if cfg_interval:
            # tensor condition: no host sync inside a compiled sampling loop
            guided = torch.where(t[0] < cfg_interval_start, cond, guided)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)

    def forward_with_interval_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                                  cfg_interval: Sequence[Sequence[float]], interval_cfg: float = 0.0) -> torch.Tensor:
        """RAE's LightningDiT guidance (its `forward_with_cfg`) on a [cond; uncond] batch -> [2n, C, S, S].

        `cfg_interval` is a list of half-open (a, b) pairs. If a <= t[0] < b for some pair, guided =
        u + interval_cfg * (c - u) when interval_cfg > 1, else c; if no pair holds t[0], guided =
        u + cfg_scale * (c - u). Guides all channels; the result is written to both halves."""
        pairs = _interval_pairs(cfg_interval)
        n, out = self._cond_uncond(x, t, y, "LightningDiT.forward_with_interval_cfg")
        cond, uncond = out[:n], out[n:]
        t0 = t[0]
        inside = torch.zeros((), dtype=torch.bool, device=t.device)
        for a, b in pairs:  # a handful of pairs, not a batch loop
            inside = inside | ((t0 >= a) & (t0 < b))
        in_val = uncond + interval_cfg * (cond - uncond) if interval_cfg > 1.0 else cond
        guided = torch.where(inside, in_val, uncond + cfg_scale * (cond - uncond))
        return torch.cat([guided, guided], dim=0)


def _interval_pairs(cfg_interval) -> list:
    """Validate RAE LightningDiT's `cfg_interval`: a list of (a, b) pairs, never a bare (t_min, t_max)."""
    try:
        pairs = [tuple(float(v) for v in p) for p in cfg_interval]
    except TypeError:
        raise TypeError(
            f"LightningDiT interval CFG: cfg_interval must be a list of (a, b) pairs, got {cfg_interval!r}; "
            "a bare (t_min, t_max) pair of floats is the DiT^DH convention (DiTwDDTHead.forward_with_cfg)") from None
    if any(len(p) != 2 for p in pairs):
        raise TypeError(f"LightningDiT interval CFG: every cfg_interval entry must be an (a, b) pair, got {cfg_interval!r}")
    return pairs


# --------------------------------------------------------------------------------------------
# Registry. hustvl's released model is LightningDiT-XL/1 on VA-VAE f16d32 latents (in_channels 32,
# 16x16 tokens at 256px); RAE trains LightningDiT-XL/1 on 768-channel DINOv2 latents
# (pass in_channels=768, use_gembed=True).
# --------------------------------------------------------------------------------------------
_FLAGS = dict(use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False)


def _maker(depth: int, hidden_size: int, num_heads: int, patch_size: int) -> Callable[..., LightningDiT]:
    def make(**kwargs) -> LightningDiT:
        cfg = dict(_FLAGS, depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size)
        cfg.update(kwargs)
        return LightningDiT(**cfg)

    make.__doc__ = f"LightningDiT depth {depth}, width {hidden_size}, {num_heads} heads, patch {patch_size}"
    return make


LightningDiT_models = {
    "LightningDiT-XL/1": _maker(28, 1152, 16, 1), "LightningDiT-XL/2": _maker(28, 1152, 16, 2),
    "LightningDiT-L/1": _maker(24, 1024, 16, 1), "LightningDiT-L/2": _maker(24, 1024, 16, 2),
    "LightningDiT-B/1": _maker(12, 768, 12, 1), "LightningDiT-B/2": _maker(12, 768, 12, 2),
    "LightningDiT-S/1": _maker(12, 384, 6, 1), "LightningDiT-S/2": _maker(12, 384, 6, 2),
    # Toolkit addition (not in the papers): a tiny size for CPU tests and demos.
    "LightningDiT-N/1": _maker(2, 64, 2, 1), "LightningDiT-N/2": _maker(2, 64, 2, 2),
}
