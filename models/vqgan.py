"""taming-transformers VQGAN: the vector quantizers and `VQModel`.

Quantizers (state-dict keys as the originals, so released checkpoints load strictly):
* `VectorQuantizer2` — taming's default: nearest code, straight-through estimator, codebook +
  commitment loss (`legacy` picks which term beta weighs), optional index remap to a table of
  used codes (buffer `used`). Keys: `embedding.weight` [+ `used`].
* `VectorQuantizer` — the first version ("buggy beta" = legacy formula); also returns the
  perplexity and the one-hot encodings. Keys: `embedding.weight`.
* `EMAVectorQuantizer` — codebook learned by exponential moving averages instead of gradients.
  Keys: `embedding.{weight,cluster_size,embed_avg}` (Parameters without gradient). Fixed relative
  to the original: it constructs (the original reads undefined names), all-reduces the EMA
  statistics across ranks when torch.distributed is initialised (the original lets ranks drift
  apart), and can optionally restart dead codes (off by default = the original's behaviour).
* `VQModel` — encoder -> quant_conv -> quantize -> post_quant_conv -> decoder with the LDM blocks
  of `models/autoencoder.py` (double_z False); `forward` returns (dec, qloss); `decode_code`
  works (the original calls a method VectorQuantizer2 lacks).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models.autoencoder import build_encoder_decoder


def _squared_distances(z_flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """|z|^2 + |e|^2 - 2 z.e for rows z_flat [N, D] and codes [K, D] -> [N, K] (taming's order)."""
    return (z_flat.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1)
            - 2 * torch.einsum("bd,kd->bk", z_flat, codebook))


def _perplexity(encodings: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the mean code usage over rows; encodings [N, K] one-hot."""
    p = encodings.mean(dim=0)
    return torch.exp(-torch.sum(p * torch.log(p + 1e-10)))


def _load_used_table(remap) -> torch.Tensor:
    """The used-code table of a remap: a path to .npy (taming's format) / .pt, or an array/tensor/list."""
    if isinstance(remap, (str, os.PathLike)):
        path = Path(remap)
        if not path.is_file():
            raise FileNotFoundError(f"VQ remap table not found: {path}")
        from utils import torch_load_safe

        table = torch_load_safe(path, "VQ remap table") if path.suffix in (".pt", ".pth") else np.load(path, allow_pickle=False)
    else:
        table = remap
    table = torch.as_tensor(np.asarray(table) if not torch.is_tensor(table) else table).long().reshape(-1)
    if table.numel() == 0:
        raise ValueError("VQ remap table is empty")
    return table


class VectorQuantizer2(nn.Module):
    """Nearest-code quantizer with straight-through gradients (taming's `VectorQuantizer2`).

    z [B, C, h, w] -> rows [B*h*w, C]; idx = argmin |z - e|^2; z_q = e[idx].
    legacy=True:  loss = mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)
    legacy=False: loss = beta * mean((sg[z_q] - z)^2) + mean((z_q - sg[z])^2)
    (same value, different gradients). Returns (z_q, loss, (None, None, indices)); indices are
    [B*h*w], [B*h*w, 1] with remap, [B, h, w] with sane_index_shape.

    remap: table of used code ids (path to .npy/.pt, array or tensor; stored as buffer `used`).
    Indices are reported as positions in that table; codes not in it become `unknown_index`
    ("extra" = len(used), an extra slot; an int; or "random", a non-reproducible randint).
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, remap=None, unknown_index: Union[str, int] = "random",
                 sane_index_shape: bool = False, legacy: bool = True):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.legacy = n_e, e_dim, beta, legacy
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        self.remap = remap is not None
        self.re_embed = n_e
        if self.remap:
            used = _load_used_table(remap)
            if used.min() < 0 or used.max() >= n_e:
                raise ValueError(f"VQ remap table holds code ids outside [0, {n_e}): {used.min().item()}..{used.max().item()}")
            self.register_buffer("used", used)
            self.re_embed = used.shape[0]
            if unknown_index == "extra":
                unknown_index = self.re_embed
                self.re_embed += 1
            elif unknown_index != "random" and not isinstance(unknown_index, int):
                raise ValueError(f"unknown_index must be 'extra', 'random' or an int, got {unknown_index!r}")
        self.unknown_index = unknown_index
        self.sane_index_shape = sane_index_shape

    # ---- remap -----------------------------------------------------------------------------
    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        """Code ids -> positions in `used` (first occurrence); ids not in `used` -> unknown_index."""
        used = self.used
        big = used.shape[0] + 1
        # Lookup table over all n_e codes: position of each code in `used` (amin = first match).
        lut = torch.full((self.n_e,), big, dtype=torch.long, device=inds.device)
        lut.scatter_reduce_(0, used, torch.arange(used.shape[0], device=inds.device), reduce="amin")
        new = lut[inds]
        unknown = new == big
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=(int(unknown.sum()),), device=inds.device)
        else:
            new[unknown] = self.unknown_index
        return new

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        """Positions in `used` -> code ids. Positions >= len(used) (the unknown slot) become code
        used[0]; as in the original they are zeroed IN PLACE in `inds`."""
        inds[inds >= self.used.shape[0]] = 0
        return self.used[inds]

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, z: torch.Tensor):
        # z: [B, C, h, w] -> [B, h, w, C] -> rows [B*h*w, C]
        B, C, h, w = z.shape
        if C != self.e_dim:
            raise ValueError(f"quantizer expects {self.e_dim} channels, got {C}")
        z = z.permute(0, 2, 3, 1).contiguous()
        z_flat = z.view(-1, self.e_dim)
        indices = torch.argmin(_squared_distances(z_flat, self.embedding.weight), dim=1)  # [B*h*w]
        z_q = self.embedding(indices).view(z.shape)
        if self.legacy:
            loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        else:
            loss = self.beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()  # straight-through
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        if self.remap:
            indices = self.remap_to_used(indices.reshape(B, -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(B, h, w)
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Codes for `indices`; with shape (B, h, w, C) returned as [B, C, h, w]. With remap,
        unknown positions in `indices` are overwritten with 0 in place (the original's quirk)."""
        if self.remap:
            if shape is None:
                raise ValueError("get_codebook_entry with remap needs shape (B, h, w, C)")
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


class VectorQuantizer(nn.Module):
    """taming's first quantizer (legacy loss: beta weighs the codebook term). Returns
    (z_q, loss, (perplexity, min_encodings [N, n_e] one-hot float, indices [N, 1]))."""

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25):
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z: torch.Tensor):
        z = z.permute(0, 2, 3, 1).contiguous()  # [B, h, w, C]
        z_flat = z.view(-1, self.e_dim)
        d = (z_flat.pow(2).sum(dim=1, keepdim=True) + self.embedding.weight.pow(2).sum(dim=1)
             - 2 * torch.matmul(z_flat, self.embedding.weight.t()))
        indices = torch.argmin(d, dim=1).unsqueeze(1)  # [N, 1]
        min_encodings = torch.zeros(indices.shape[0], self.n_e, device=z.device, dtype=z.dtype).scatter_(1, indices, 1)
        z_q = torch.matmul(min_encodings, self.embedding.weight).view(z.shape)
        loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()
        perplexity = _perplexity(min_encodings)
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, (perplexity, min_encodings, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        indices = indices.reshape(-1)
        one_hot = torch.zeros(indices.shape[0], self.n_e, device=indices.device, dtype=self.embedding.weight.dtype)
        z_q = torch.matmul(one_hot.scatter_(1, indices[:, None], 1), self.embedding.weight)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


class EmbeddingEMA(nn.Module):
    """Codebook whose entries are EMA cluster means: `weight` [K, D], `cluster_size` [K] (EMA of
    usage counts), `embed_avg` [K, D] (EMA of summed assigned vectors). All are Parameters without
    gradient (the original's layout, so checkpoints carry them); `update` switches the EMA off."""

    def __init__(self, num_tokens: int, codebook_dim: int, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.decay, self.eps, self.num_tokens = decay, eps, num_tokens
        weight = torch.randn(num_tokens, codebook_dim)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.cluster_size = nn.Parameter(torch.zeros(num_tokens), requires_grad=False)
        self.embed_avg = nn.Parameter(weight.clone(), requires_grad=False)
        self.update = True

    def forward(self, embed_id: torch.Tensor) -> torch.Tensor:
        return F.embedding(embed_id, self.weight)

    @torch.no_grad()
    def ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """cluster_size, embed_avg <- decay * old + (1 - decay) * new; then the Laplace-smoothed
        means W = embed_avg / ((N + eps) / (sum N + K eps) * sum N). Codes with N = 0 blow up to
        embed_avg * (n + K eps) / (eps n), as in the original (dead-code restart fixes them)."""
        self.cluster_size.data.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.data.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_tokens * self.eps) * n
        self.weight.data.copy_(self.embed_avg / smoothed.unsqueeze(1))


class EMAVectorQuantizer(nn.Module):
    """VQ with an EMA-learned codebook: loss = beta * mean((sg[z_q] - z)^2) (commitment only).
    Returns (z_q, loss, (perplexity, encodings [N, K], indices [N])).

    In training mode (and while `embedding.update`), each call updates the EMA statistics after
    quantising with the pre-update codebook. `sync_across_ranks` all-reduces the per-call counts
    and sums when torch.distributed is initialised (all ranks then hold the same codebook).
    `restart_dead_codes` replaces codes whose EMA usage fell below `dead_code_threshold` with
    random vectors of the current batch (broadcast from rank 0); off by default."""

    def __init__(self, n_embed: int, embedding_dim: int, beta: float = 0.25, decay: float = 0.99, eps: float = 1e-5,
                 sync_across_ranks: bool = True, restart_dead_codes: bool = False, dead_code_threshold: float = 1e-3):
        super().__init__()
        self.n_embed, self.embedding_dim, self.beta = n_embed, embedding_dim, beta
        self.embedding = EmbeddingEMA(n_embed, embedding_dim, decay, eps)
        self.sync_across_ranks = sync_across_ranks
        self.restart_dead_codes, self.dead_code_threshold = restart_dead_codes, dead_code_threshold

    @staticmethod
    def _distributed() -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @torch.no_grad()
    def _restart_dead(self, z_flat: torch.Tensor) -> None:
        emb = self.embedding
        dead = emb.cluster_size < self.dead_code_threshold  # identical on every rank after the all-reduce
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        pick = torch.randint(0, z_flat.shape[0], (n_dead,), device=z_flat.device)
        new = z_flat[pick].to(emb.weight.dtype)
        if self._distributed() and self.sync_across_ranks:
            dist.broadcast(new, src=0)
        emb.weight.data[dead] = new
        emb.embed_avg.data[dead] = new
        emb.cluster_size.data[dead] = 1.0  # so the next normalisation keeps W ~ new

    def forward(self, z: torch.Tensor):
        B, D, h, w = z.shape
        if D != self.embedding_dim:
            raise ValueError(f"EMA quantizer expects {self.embedding_dim} channels, got {D}")
        z = z.permute(0, 2, 3, 1).contiguous()  # [B, h, w, D]
        z_flat = z.reshape(-1, D)  # [N, D]
        indices = torch.argmin(_squared_distances(z_flat, self.embedding.weight), dim=1)  # [N]
        z_q = self.embedding(indices).view(z.shape)  # pre-update codebook
        encodings = F.one_hot(indices, self.n_embed).type(z.dtype)  # [N, K]
        perplexity = _perplexity(encodings)
        if self.training and self.embedding.update:
            with torch.no_grad():
                counts = encodings.sum(0)  # [K]
                sums = encodings.t() @ z_flat.detach()  # [K, D]
                if self.sync_across_ranks and self._distributed():
                    dist.all_reduce(counts)
                    dist.all_reduce(sums)
                self.embedding.ema_update(counts, sums)
                if self.restart_dead_codes:
                    self._restart_dead(z_flat.detach())
        loss = self.beta * F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, (perplexity, encodings, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        z_q = self.embedding(indices.reshape(-1))
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


# Model-config keys of taming's VQModel that describe training, not the network.
VQ_TRAINING_KEYS = {"lossconfig", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels", "monitor", "base_learning_rate"}


class VQModel(nn.Module):
    """VQGAN autoencoder: x -> encoder -> quant_conv (z_channels -> embed_dim) -> quantize ->
    post_quant_conv (embed_dim -> z_channels) -> decoder. `quantizer` "vq2" (taming's VQModel:
    VectorQuantizer2, legacy loss) or "ema" (taming's EMAVQ: EMAVectorQuantizer; keep
    `quantize.*` out of the optimizer — its parameters have no gradient)."""

    def __init__(self, ddconfig: Mapping, n_embed: int, embed_dim: int, remap=None, sane_index_shape: bool = False,
                 beta: float = 0.25, quantizer: str = "vq2", **quantizer_kwargs):
        super().__init__()
        ddconfig = dict(ddconfig)
        if ddconfig.get("double_z", False):
            raise ValueError("VQModel ddconfig must have double_z: false")
        ddconfig["double_z"] = False
        self.ddconfig, self.n_embed, self.embed_dim = ddconfig, n_embed, embed_dim
        self.encoder, self.decoder = build_encoder_decoder(ddconfig, "VQModel ddconfig")
        z_channels = ddconfig["z_channels"]
        if quantizer == "vq2":
            self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=beta, remap=remap,
                                             sane_index_shape=sane_index_shape, **quantizer_kwargs)
        elif quantizer == "ema":
            if remap is not None or sane_index_shape:
                raise ValueError("quantizer='ema' supports neither remap nor sane_index_shape")
            self.quantize = EMAVectorQuantizer(n_embed, embed_dim, beta=beta, **quantizer_kwargs)
        else:
            raise ValueError(f"quantizer must be 'vq2' or 'ema', got {quantizer!r}")
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)

    @classmethod
    def from_config(cls, config: Mapping, source: str = "VQModel config") -> "VQModel":
        """From taming's `model.params` ({ddconfig, n_embed, embed_dim, [remap, sane_index_shape],
        lossconfig, ...}); training-only keys are ignored (the trainer builds the loss)."""
        config = dict(config)
        if "params" in config and "ddconfig" not in config:
            config = dict(config["params"])
        for required in ("ddconfig", "n_embed", "embed_dim"):
            if required not in config:
                raise KeyError(f"{source}: missing '{required}'")
        return cls(**{k: v for k, v in config.items() if k not in VQ_TRAINING_KEYS})

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable
        self.decoder.grad_checkpointing = enable

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in_channels, H, W] -> [B, embed_dim, H/f, W/f]
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor):
        """(quant [B, embed_dim, h, w], qloss, info) — info as the quantizer returns it."""
        return self.quantize(self.encode_to_prequant(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, codes: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Image from code indices [B, h, w] (or [B, h*w] / [B*h*w] with `grid` = (h, w)); with a
        remap the indices are positions in the used table, as `encode` reports them. The
        caller's tensor is never modified."""
        codes = codes.clone()
        if codes.ndim == 3:
            B, h, w = codes.shape
        else:
            if grid is None:
                raise ValueError("decode_code: pass grid=(h, w) for flat code indices")
            h, w = grid
            B = codes.numel() // (h * w)
        quant = self.quantize.get_codebook_entry(codes.reshape(-1), (B, h, w, self.embed_dim))
        return self.decode(quant)

    def forward(self, x: torch.Tensor):
        """Returns (reconstruction, quantizer loss)."""
        quant, qloss, _ = self.encode(x)
        return self.decode(quant), qloss


# name -> VQModel kwargs. The ImageNet f16 models of taming, then a tiny one for tests/demos.
VQ_PRESETS: Dict[str, dict] = {
    "imagenet-f16-1024": dict(ddconfig=dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
                                            ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0),
                              n_embed=1024, embed_dim=256),
    "imagenet-f16-16384": dict(ddconfig=dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
                                             ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0),
                               n_embed=16384, embed_dim=256),
    # Tiny f4: 32px -> 8x8 codes from a 64-entry codebook of 8-d vectors.
    "tiny-f4": dict(ddconfig=dict(double_z=False, z_channels=8, resolution=32, in_channels=3, out_ch=3, ch=32,
                                  ch_mult=[1, 1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0),
                    n_embed=64, embed_dim=8),
}


def build_vqgan(preset_or_config: Union[str, Mapping], **overrides) -> VQModel:
    """A random-init VQModel from a `VQ_PRESETS` name or a taming config."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in VQ_PRESETS:
            raise KeyError(f"unknown VQGAN preset '{preset_or_config}' (known: {sorted(VQ_PRESETS)})")
        return VQModel(**{**VQ_PRESETS[preset_or_config], **overrides})
    return VQModel.from_config({**dict(preset_or_config), **overrides})


__all__ = ["VectorQuantizer2", "VectorQuantizer", "EmbeddingEMA", "EMAVectorQuantizer", "VQModel", "VQ_PRESETS",
           "build_vqgan"]
