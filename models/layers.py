"""Layers shared by the diffusion transformers (SiT, LightningDiT, DiT^DH) and the ViT decoders.

Parameter names follow the DiT / timm naming the released checkpoints use, so state_dicts of the
originals load without renaming.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens x [N, T, D] by per-sample shift/scale [N, D]."""
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Position embeddings
# --------------------------------------------------------------------------------------------
def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos table [len(pos), embed_dim] in float64: [sin(q w_k)] ++ [cos(q w_k)]."""
    assert embed_dim % 2 == 0, "sin-cos embedding needs an even width"
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """2-D sin-cos table [(1+)H*W, D] in float64, tokens row-major.

    First D/2 channels encode the column, the last D/2 the row (the MAE/DiT convention).
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb


# --------------------------------------------------------------------------------------------
# Conditioning embedders
# --------------------------------------------------------------------------------------------
def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [N, dim] of t [N]: [cos(t f_k)] ++ [sin(t f_k)] (cos first, as DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t [N] -> [N, D]: sinusoidal features then Linear, SiLU, Linear (keys mlp.0, mlp.2)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_features(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> [N, D]; with dropout_prob > 0 an extra null row (id = num_classes) exists
    for classifier-free guidance. Label dropout is applied here in training mode."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Labels with the dropped ones set to the null id; `force_drop_ids` (1 or True = drop) replaces
        the random draw (a boolean mask is used as is: `draw_drop_mask` draws the trainer's outside a
        compiled step)."""
        if force_drop_ids is None:
            drop = self.draw_drop_mask(labels)
        else:
            drop = force_drop_ids if force_drop_ids.dtype == torch.bool else force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def draw_drop_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """The training-mode dropout draw [N] bool (one uniform per label, from the global generator)."""
        return torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# --------------------------------------------------------------------------------------------
# Transformer pieces (timm naming: attn.qkv, attn.proj, mlp.fc1, mlp.fc2)
# --------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Conv patchify [N, C, H, W] -> tokens [N, (H/p)(W/p), D], row-major (key proj.*)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention through SDPA (flash / memory-efficient kernels on GPU).

    qk_norm adds per-head LayerNorms `q_norm`/`k_norm` (timm's layout)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False, norm_layer=nn.LayerNorm):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: nn.Module | None = None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, T, head_dim]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            # LightningDiT / DiT^DH: rotary embedding AFTER qk-norm; the float32 tables may promote
            # q, k under autocast, so cast back to v's dtype for SDPA.
            q, k = rope(q).to(v.dtype), rope(k).to(v.dtype)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    """fc1, GELU (tanh approximation by default, as DiT/SiT), fc2."""

    def __init__(self, in_features: int, hidden_features: int, approximate: str = "tanh"):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """[N, T, p*p*C] -> [N, C, H, W]; feature (a*p+b)*C+ch of token (i, j) is pixel (i*p+a, j*p+b)."""
    N, T, _ = x.shape
    p = patch_size
    if grid is None:
        h = w = int(math.isqrt(T))
        assert h * w == T, f"cannot unpatchify {T} tokens into a square grid"
    else:
        h, w = grid
    x = x.reshape(N, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, channels, h * p, w * p)


# --------------------------------------------------------------------------------------------
# LightningDiT / DiT^DH pieces: RMSNorm, SwiGLU, 2-D RoPE (EVA style), Gaussian-Fourier timesteps
# --------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm over the last dim (key `weight`): computed in float32, cast back, then scaled.

    y = (x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight, as LightningDiT / RAE compute it (the
    float32 statistics keep bf16 training stable)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.type_as(x) * self.weight


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (keys w12, w3): w3(silu(a) * b) with [a, b] = w12(x).chunk(2)."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True):
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the interleaved-pair rotation of EVA RoPE."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rope_2d_tables(head_dim: int, grid_size: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [G*G, head_dim] of EVA's "fast" 2-D RoPE, bit-exact with the originals.

    Half of the head dim per axis; per axis frequencies theta^(-2k/dim) (float32), each angle
    repeated twice in place (a0, a0, a1, a1, ...); token (r, c) gets [angles(r), angles(c)]
    (ROW first), tokens in row-major order."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4 (got {head_dim}): hidden_size / num_heads")
    dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    # positions computed as the original does (arange / G * G), so the float32 table is bit-exact
    pos = torch.arange(grid_size) / grid_size * grid_size
    ang = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)  # [G, dim]
    G = grid_size
    table = torch.cat([ang[:, None, :].expand(G, G, dim), ang[None, :, :].expand(G, G, dim)], dim=-1)
    table = table.reshape(G * G, 2 * dim)
    return table.cos(), table.sin()


class RotaryEmbedding2D(nn.Module):
    """EVA-style 2-D rotary embedding for a G x G token grid (persistent buffers freqs_cos/sin
    [G*G, head_dim], as in the released checkpoints). Applied to q, k [B, H, G*G, head_dim]."""

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        cos, sin = rope_2d_tables(head_dim, grid_size, theta)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.freqs_cos.shape[0]:
            raise ValueError(f"RoPE table has {self.freqs_cos.shape[0]} positions but got {x.shape[-2]} tokens")
        return x * self.freqs_cos + rotate_pairs(x) * self.freqs_sin


class GaussianFourierEmbedder(nn.Module):
    """t [N] -> [N, D] through fixed random Fourier features (RAE's stage-2 timestep embedder).

    f = t * W * 2 pi with W ~ N(0, scale^2) [embedding_size] (a frozen buffer `W` saved in the
    state_dict), features [sin f, cos f] -> mlp.0 Linear(2E, D) -> SiLU -> mlp.2 Linear(D, D)."""

    def __init__(self, hidden_size: int, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.register_buffer("W", torch.randn(embedding_size) * scale)
        self.mlp = nn.Sequential(
            nn.Linear(2 * embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = t.float()[:, None] * self.W.float()[None, :] * 2 * math.pi  # the original's float32 order
        emb = torch.cat([torch.sin(f), torch.cos(f)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


# --------------------------------------------------------------------------------------------
# Representation alignment (REPA): the SiT's training forward returns this loss with its features
# --------------------------------------------------------------------------------------------
def projection_loss(zs: Sequence[torch.Tensor], zs_tilde: Sequence[torch.Tensor]) -> torch.Tensor:
    """REPA loss: mean over encoders, samples and tokens of -cos(z_enc, z_proj).

    zs[j], zs_tilde[j]: [N, T, D_j]. Normalisation along features with eps 1e-12 (F.normalize),
    as the original; one fused reduction per encoder instead of a loop over samples.
    """
    if len(zs) != len(zs_tilde):
        raise ValueError(f"projection_loss: {len(zs)} encoder feature sets but {len(zs_tilde)} projector outputs")
    total = zs_tilde[0].new_zeros(())
    for z, z_tilde in zip(zs, zs_tilde):
        if z.shape != z_tilde.shape:
            raise ValueError(f"projection_loss: encoder features {tuple(z.shape)} vs projector output {tuple(z_tilde.shape)}")
        cos = (F.normalize(z.to(z_tilde.dtype), dim=-1) * F.normalize(z_tilde, dim=-1)).sum(dim=-1)  # [N, T]
        total = total - cos.mean(dim=-1).sum()
    return total / (len(zs) * zs_tilde[0].shape[0])
