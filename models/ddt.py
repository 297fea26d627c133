"""DiT^DH: a DiT encoder with a wide, shallow DDT head (RAE stage 2, `src/stage2/models/DDT.py`,
class `DiTwDDTHead`).

The encoder (width De, Ne blocks) reads the noisy latent with a sin-cos position table and a
global condition c = SiLU(t_emb + y_emb); its tokens, bridged by s = SiLU(t_emb + s) and projected
to the head width Dd, become a PER-TOKEN condition for the head (Nd blocks of width Dd) that
re-embeds the noisy latent and predicts the velocity. Blocks, norms, SwiGLU and RoPE are the
LightningDiT ones (`models.lightningdit`), with separate RoPE tables for encoder and head widths.

State-dict keys are the original's: s_embedder.proj.*, x_embedder.proj.*, pos_embed,
t_embedder.{W,mlp.0,mlp.2}.*, y_embedder.embedding_table.weight, s_projector.* (absent when
De == Dd), enc_feat_rope/dec_feat_rope.freqs_{cos,sin}, blocks.0..Ne+Nd-1.*, final_layer.*.

Deliberate fixes of options that crash in the original: `patch_size > 1` (the original feeds
C*p*p channels to a patch conv), `wo_shift=True` and `use_rope=False` all work here.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from models.layers import (GaussianFourierEmbedder, LabelEmbedder, PatchEmbed, RotaryEmbedding2D, sincos_2d,
                           unpatchify)
from models.lightningdit import FinalLayer, LightningDiTBlock, init_adaln_zero


def _pair(v, name: str) -> Tuple[int, int]:
    if isinstance(v, (int, float)):
        return int(v), int(v)
    v = list(v)
    if len(v) != 2:
        raise ValueError(f"DiTwDDTHead: {name} must be one value or [encoder, head], got {v!r}")
    return int(v[0]), int(v[1])


class DiTwDDTHead(nn.Module):
    """DiT^DH on a [C, G, G] latent: hidden_size / depth / num_heads are [encoder, head] pairs."""

    def __init__(self, input_size: int = 16, patch_size=1, in_channels: int = 768, hidden_size=(1152, 2048),
                 depth=(28, 2), num_heads=(16, 16), mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, use_qknorm: bool = False, use_swiglu: bool = True, use_rope: bool = True,
                 use_rmsnorm: bool = True, wo_shift: bool = False, use_pos_embed: bool = True,
                 use_checkpoint: bool = False):
        super().__init__()
        p_s, p_x = _pair(patch_size, "patch_size")
        if p_s != p_x:
            raise ValueError(f"DiTwDDTHead: encoder and head patch sizes must match (token-wise conditioning), got {patch_size!r}")
        if input_size % p_s:
            raise ValueError(f"DiTwDDTHead: input_size {input_size} is not divisible by patch_size {p_s}")
        enc_dim, dec_dim = _pair(hidden_size, "hidden_size")
        n_enc, n_dec = _pair(depth, "depth")
        enc_heads, dec_heads = _pair(num_heads, "num_heads")
        for dim, heads in ((enc_dim, enc_heads), (dec_dim, dec_heads)):
            if dim % heads:
                raise ValueError(f"DiTwDDTHead: hidden size {dim} is not divisible by {heads} heads")
        self.in_channels = self.out_channels = in_channels
        self.patch_size = p_s
        self.num_classes = num_classes
        self.num_encoder_blocks, self.num_decoder_blocks = n_enc, n_dec
        self.use_pos_embed = use_pos_embed
        self.use_checkpoint = use_checkpoint

        self.s_embedder = PatchEmbed(input_size, p_s, in_channels, enc_dim)  # encoder tokens
        self.x_embedder = PatchEmbed(input_size, p_x, in_channels, dec_dim)  # head tokens
        self.s_projector = nn.Linear(enc_dim, dec_dim) if enc_dim != dec_dim else nn.Identity()
        self.t_embedder = GaussianFourierEmbedder(enc_dim)
        self.y_embedder = LabelEmbedder(num_classes, enc_dim, class_dropout_prob)
        grid = self.s_embedder.grid_size
        if use_pos_embed:
            self.register_buffer("pos_embed", sincos_2d(enc_dim, grid).float().unsqueeze(0))  # [1, T, De]
        else:
            self.pos_embed = None
        if use_rope:
            self.enc_feat_rope = RotaryEmbedding2D(enc_dim // enc_heads, grid)
            self.dec_feat_rope = RotaryEmbedding2D(dec_dim // dec_heads, self.x_embedder.grid_size)
        else:
            self.enc_feat_rope = self.dec_feat_rope = None
        block = lambda dim, heads: LightningDiTBlock(dim, heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
        self.blocks = nn.ModuleList([block(enc_dim, enc_heads) for _ in range(n_enc)]
                                    + [block(dec_dim, dec_heads) for _ in range(n_dec)])
        self.final_layer = FinalLayer(dec_dim, p_x, in_channels, use_rmsnorm)
        # the original does NOT xavier-initialise its Linears (default nn.Linear init)
        init_adaln_zero(self, self.blocks, self.final_layer, [self.x_embedder, self.s_embedder], xavier_linears=False)

    def _run(self, block: nn.Module, h: torch.Tensor, cond: torch.Tensor, rope) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, h, cond, rope, use_reentrant=False)
        return block(h, cond, rope=rope)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, C, G, G], t [B] (1 = noise), y [B] int64 (num_classes = null) -> velocity [B, C, G, G];
        force_drop_ids [B] (bool or 1 = drop) replaces the training label-dropout draw."""
        te = self.t_embedder(t)  # [B, De]
        c = F.silu(te + self.y_embedder(y, self.training, force_drop_ids))  # global condition of the encoder
        s = self.s_embedder(x)  # [B, T, De]
        if self.pos_embed is not None:
            s = s + self.pos_embed.to(s.dtype)
        for block in self.blocks[: self.num_encoder_blocks]:
            s = self._run(block, s, c, self.enc_feat_rope)
        s = self.s_projector(F.silu(te.unsqueeze(1) + s))  # per-token condition of the head [B, T, Dd]
        h = self.x_embedder(x)  # [B, T, Dd], no absolute position (RoPE only)
        for block in self.blocks[self.num_encoder_blocks:]:
            h = self._run(block, h, s, self.dec_feat_rope)
        h = self.final_layer(h, s)  # [B, T, p*p*C]
        return unpatchify(h, self.patch_size, self.out_channels)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         cfg_interval: Tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Classifier-free guidance on a [cond; uncond] batch of 2n rows (the uncond half carries the
        null label) -> [2n, C, G, G]. Per sample i < n: u + cfg_scale * (c - u) where
        t_min <= t_i <= t_max (inclusive), else c; written to both halves. Both halves use x[:n]."""
        if x.shape[0] % 2:
            raise ValueError(f"DiTwDDTHead.forward_with_cfg: batch must be [cond; uncond] halves, got {x.shape[0]}")
        t_min, t_max = (float(v) for v in cfg_interval)
        n = x.shape[0] // 2
        half = x[:n]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        cond, uncond = out[:n], out[n:]
        inside = ((t[:n] >= t_min) & (t[:n] <= t_max)).view(n, *([1] * (out.dim() - 1)))
        guided = torch.where(inside, uncond + cfg_scale * (cond - uncond), cond)
        return torch.cat([guided, guided], dim=0)

    def forward_with_autoguidance(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                                  guide_forward: Callable[..., torch.Tensor],
                                  cfg_interval: Tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Autoguidance: g + cfg_scale * (m - g) with m = this model and g = `guide_forward` (a smaller
        or earlier model) on the same batch, per sample where t_min <= t <= t_max, else m."""
        t_min, t_max = (float(v) for v in cfg_interval)
        m = self.forward(x, t, y)
        g = guide_forward(x, t, y)
        inside = ((t >= t_min) & (t <= t_max)).view(-1, *([1] * (m.dim() - 1)))
        return torch.where(inside, g + cfg_scale * (m - g), m)


def _maker(enc_dim: int, enc_depth: int, enc_heads: int, dec_dim: int = 2048, dec_depth: int = 2,
           dec_heads: int = 16) -> Callable[..., DiTwDDTHead]:
    def make(**kwargs) -> DiTwDDTHead:
        cfg = dict(hidden_size=[enc_dim, dec_dim], depth=[enc_depth, dec_depth], num_heads=[enc_heads, dec_heads])
        cfg.update(kwargs)
        return DiTwDDTHead(**cfg)

    make.__doc__ = f"DiT^DH: encoder {enc_depth}x{enc_dim} ({enc_heads} heads), head {dec_depth}x{dec_dim} ({dec_heads} heads)"
    return make


# RAE's sizes: the head is always 2 blocks of width 2048 (16 heads); defaults are the 256px
# DINOv2-B latent [768, 16, 16], patch 1, with RMSNorm, SwiGLU, RoPE and the sin-cos table.
# Sizes as (hidden_size, depth, num_heads) pairs [encoder, head], the released configs' keys
# (configs_compat maps an RAE `stage_2.params` onto a name through this table).
DDT_SIZES = {
    "DiTDH-S": ((384, 2048), (12, 2), (6, 16)),
    "DiTDH-B": ((768, 2048), (12, 2), (12, 16)),
    "DiTDH-L": ((1024, 2048), (24, 2), (16, 16)),
    "DiTDH-XL": ((1152, 2048), (28, 2), (16, 16)),
    # Toolkit addition (not in the paper): a tiny size for CPU tests and demos.
    "DiTDH-N": ((64, 96), (2, 1), (2, 2)),
}
DDT_models = {name: _maker(w[0], d[0], h[0], dec_dim=w[1], dec_depth=d[1], dec_heads=h[1])
              for name, (w, d, h) in DDT_SIZES.items()}
