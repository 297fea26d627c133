"""SiT as trained by REPA-E: a DiT-style adaLN-Zero transformer on VAE latents, with an input
BatchNorm that learns the latent normalisation, REPA projectors after block `encoder_depth`, and
the flow-matching loss computed inside `forward` (as the original, so released checkpoints and the
training step order carry over unchanged).

State-dict keys are the original's (x_embedder.proj.*, t_embedder.mlp.{0,2}.*,
y_embedder.embedding_table.weight, pos_embed, blocks.i.{attn.qkv,attn.proj,mlp.fc1,mlp.fc2,
adaLN_modulation.1}.*, projectors.j.{0,2,4}.*, final_layer.{linear,adaLN_modulation.1}.*,
bn.{running_mean,running_var,num_batches_tracked}).

`pos_embed` starts as the 2-D sin-cos table and is a parameter built frozen; as in the original,
REPA-E training (train_repae.py) trains it, LDM-only training (train_ldm_only.py) keeps it fixed.

Differences from the original, all deliberate:
* every registry size works (the original S sizes crash: decoder_hidden_size now follows hidden);
* attention always goes through SDPA; `fused_attn` is accepted for config compatibility;
* the REPA loss is one fused reduction per encoder, no Python loop over samples;
* optional activation checkpointing of the blocks (`grad_checkpointing`);
* the input BatchNorm synchronises its batch statistics across processes itself
  (`set_bn_sync`), over any backend: the original converts it to `torch.nn.SyncBatchNorm`, which
  needs GPUs;
* `learn_sigma=True` loads the ORIGINAL SiT / DiT-style releases, whose final layer predicts 2C
  channels (velocity + an unused variance head): the network returns only the first C, as the
  original SiT's forward does. Those releases have no REPA projectors (z_dims=()) and no input
  BatchNorm in their state_dict (generate.py fills it from the latent statistics).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.checkpoint

from models.layers import (Attention, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, modulate,
                           projection_loss, sincos_2d, unpatchify)


SIT_BN_EPS = 1e-4  # eps of the SiT's input BatchNorm


def bn_latent_stats(running_mean: torch.Tensor, running_var: torch.Tensor, eps: float = SIT_BN_EPS) -> Dict[str, torch.Tensor]:
    """(scale, bias) [1, C, 1, 1] with x_norm = (x - bias) * scale, plus `bn_eps`.

    With eps = the BatchNorm's eps this is exactly eval-mode BN (the toolkit's convention, also
    used by `init_bn(..., eps_included)`); eps = 0 gives the original `extract_latents_stats`."""
    var = running_var.detach().float() + eps
    return {
        "latents_scale": var.rsqrt().view(1, -1, 1, 1).clone(),
        "latents_bias": running_mean.detach().float().view(1, -1, 1, 1).clone(),
        "bn_eps": torch.tensor(float(eps)),
    }


class LatentBatchNorm(nn.BatchNorm2d):
    """The SiT's input BatchNorm2d, optionally synchronised across processes.

    With `sync` off, or in a single process, or in eval mode it is exactly `nn.BatchNorm2d`. With
    `sync` on in a multi-process training forward it normalises with the statistics of the GLOBAL
    batch (every rank's samples) and updates the running statistics from them, so every rank holds
    the same running statistics: what `torch.nn.SyncBatchNorm` does in the original, but over any
    process-group backend (gloo on CPU included). Two all-reduces of C + 1 numbers each (mean,
    then centred sum of squares); gradients flow through them when the input requires grad.
    """

    sync: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.sync and self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        return self._synced_forward(x)

    def _synced_forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, H, W] (this rank's share of the batch)
        reduce = _differentiable_all_reduce if x.requires_grad else _all_reduce
        xf = x.float()
        dims = (0, 2, 3)
        local = torch.cat([xf.sum(dims), xf.new_tensor([x.numel() // x.shape[1]])])
        total = reduce(local)  # [C + 1]: global per-channel sums and the global count
        count = total[-1]
        mean = total[:-1] / count  # [C]
        centred = xf - mean.view(1, -1, 1, 1)
        var = reduce(centred.square().sum(dims)) / count  # biased, [C]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                unbiased = var.detach() * (count / (count - 1).clamp_min(1))
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(x.dtype)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def _differentiable_all_reduce(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA projector: Linear-SiLU-Linear-SiLU-Linear applied per token (keys 0, 2, 4)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


class SiTBlock(nn.Module):
    """adaLN-Zero transformer block: modulation chunks (shift, scale, gate) for attention then MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: [N, T, D], c: [N, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to p*p*C values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def interpolant(path_type: str, t: torch.Tensor):
    """(alpha, sigma, d_alpha, d_sigma) at t for x_t = alpha x + sigma eps; t = 1 is noise."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type == "cosine":
        half_pi = math.pi / 2
        return (torch.cos(t * half_pi), torch.sin(t * half_pi),
                -half_pi * torch.sin(t * half_pi), half_pi * torch.cos(t * half_pi))
    raise ValueError(f"unknown path type '{path_type}' (expected 'linear' or 'cosine')")


def sample_time(n: int, weighting: str, path_type: str, device, dtype=torch.float32) -> torch.Tensor:
    """Training time t [n, 1, 1, 1]: uniform, or lognormal (sigma = exp(N(0,1)) mapped to [0, 1])."""
    if weighting == "uniform":
        return torch.rand((n, 1, 1, 1), device=device, dtype=dtype)
    if weighting == "lognormal":
        sigma = torch.randn((n, 1, 1, 1), device=device, dtype=dtype).exp()
        if path_type == "linear":
            return sigma / (1 + sigma)
        if path_type == "cosine":
            return 2 / math.pi * torch.atan(sigma)
        raise ValueError(f"unknown path type '{path_type}'")
    raise ValueError(f"unknown weighting '{weighting}' (expected 'uniform' or 'lognormal')")


class SiT(nn.Module):
    """REPA-E SiT. `forward` = BatchNorm + interpolant + network + losses; `inference` = network."""

    def __init__(
        self,
        path_type: str = "linear",
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        decoder_hidden_size: Optional[int] = None,
        encoder_depth: int = 8,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        use_cfg: bool = False,
        z_dims: Sequence[int] = (768,),
        projector_dim: int = 2048,
        bn_momentum: float = 0.1,
        fused_attn: bool = True,
        qk_norm: bool = False,
        grad_checkpointing: bool = False,
        learn_sigma: bool = False,
        freeze_bn: bool = False,
        **unused,
    ):
        super().__init__()
        if decoder_hidden_size is not None and decoder_hidden_size != hidden_size:
            raise ValueError(f"decoder_hidden_size ({decoder_hidden_size}) must equal hidden_size ({hidden_size})")
        if z_dims and not 1 <= encoder_depth <= depth:  # only the projectors read at encoder_depth
            raise ValueError(f"encoder_depth must be in [1, depth={depth}], got {encoder_depth}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.path_type = path_type
        self.in_channels = in_channels
        self.learn_sigma = bool(learn_sigma)
        self.out_channels = 2 * in_channels if learn_sigma else in_channels  # predicted channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.z_dims = list(z_dims)
        self.grad_checkpointing = grad_checkpointing
        # LDM-only training keeps the latent statistics fixed: the BatchNorm then always normalises
        # with its running statistics, whatever mode the rest of the model is in.
        self.freeze_bn = freeze_bn

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # 2-D sin-cos table at initialisation, a parameter built with requires_grad False (the
        # original's layout). It is NOT fixed in REPA-E training: the original's
        # requires_grad(model, True) before each SiT update turns it on and its optimizer holds it,
        # so train_repae.py trains it (from step 1, gradient averaged over processes); the
        # LDM-only trainer keeps it fixed, as REPA's SiT training does.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.projectors = nn.ModuleList([build_projector(hidden_size, projector_dim, z) for z in self.z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.bn = LatentBatchNorm(in_channels, eps=SIT_BN_EPS, momentum=bn_momentum, affine=False, track_running_stats=True)
        self.initialize_weights()

    # ------------------------------------------------------------------ init and latent stats
    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_bn:
            self.bn.eval()
        return self

    def set_bn_sync(self, flag: bool = True) -> "SiT":
        """Normalise with (and learn running statistics from) the global batch of all processes in
        training forwards, as the original's SyncBatchNorm; no effect in a single process."""
        self.bn.sync = bool(flag)
        return self

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], self.x_embedder.grid_size).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    @torch.no_grad()
    def init_bn(self, latents_bias: torch.Tensor, latents_scale: torch.Tensor, eps_included: float = 0.0):
        """Initialise the input BatchNorm from latent statistics (x_norm = (x - bias) * scale).

        Released REPA-E stats files hold scale = running_var^-1/2 (eps_included = 0); files written
        by this toolkit hold scale = (running_var + eps)^-1/2 and say so, which makes the round trip
        exact."""
        bias = latents_bias.reshape(-1).float()
        scale = latents_scale.reshape(-1).float()
        if bias.numel() != self.in_channels or scale.numel() != self.in_channels:
            raise ValueError(f"latent statistics have {bias.numel()} channels but the SiT has in_channels={self.in_channels}")
        self.bn.running_mean.copy_(bias)
        self.bn.running_var.copy_(1.0 / scale.pow(2) - eps_included)

    @torch.no_grad()
    def latent_stats(self, include_eps: bool = True) -> Dict[str, torch.Tensor]:
        """Latent statistics of the input BatchNorm (see `bn_latent_stats`)."""
        return bn_latent_stats(self.bn.running_mean, self.bn.running_var, self.bn.eps if include_eps else 0.0)

    # ------------------------------------------------------------------ network
    def _embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None):
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # [N, T, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # [N, D]
        return x, c

    def _run_block(self, block: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
        return block(x, c)

    def _network(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, align_only: bool = False,
                 project: bool = True, force_drop_ids: Optional[torch.Tensor] = None):
        """Returns (output [N, C, H, W], zs_tilde list of [N, T, z_dim]; empty unless `project`)."""
        x, c = self._embed(x, t, y, force_drop_ids)
        zs_tilde: List[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = self._run_block(block, x, c)
            if i + 1 == self.encoder_depth and project:
                zs_tilde = [proj(x) for proj in self.projectors]
                if align_only:
                    break
        x = self.final_layer(x, c)
        out = unpatchify(x, self.patch_size, self.out_channels)  # [N, C or 2C, H, W]
        if self.learn_sigma:  # the variance head of the original releases is never used
            out = out[:, : self.in_channels]
        return out, zs_tilde

    def inference(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Velocity on already-normalised latents x [N, C, H, W] at times t [N] for labels y [N]
        (the REPA projectors, training-only, are skipped)."""
        return self._network(x, t, y, project=False)[0]

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        zs: Sequence[torch.Tensor] = (),
        loss_kwargs: Optional[dict] = None,
        time_input: Optional[torch.Tensor] = None,
        noises: Optional[torch.Tensor] = None,
        force_drop_ids: Optional[torch.Tensor] = None,
    ) -> Dict[str, object]:
        """Flow-matching and REPA losses on raw latents x [N, C, H, W].

        loss_kwargs: weighting (uniform|lognormal), path_type (linear|cosine), prediction ('v'),
        align_only (stop after block encoder_depth; no denoising loss). time_input [N,1,1,1] and
        noises [N,C,H,W] are drawn here unless given; they are returned so a second pass (the SiT
        update after the VAE update in REPA-E) can reuse them. force_drop_ids [N] (bool or 1 = drop)
        replaces the label-dropout draw (a compiled step draws every random number outside the graph).
        """
        kw = {"weighting": "uniform", "path_type": self.path_type, "prediction": "v", "align_only": False}
        kw.update(loss_kwargs or {})
        if kw["prediction"] != "v":
            raise NotImplementedError(f"prediction '{kw['prediction']}' is not supported; only 'v'")
        x = self.bn(x)
        n = x.shape[0]
        if time_input is None:
            time_input = sample_time(n, kw["weighting"], kw["path_type"], x.device, x.dtype)
        if noises is None:
            noises = torch.randn_like(x)
        time_input = time_input.to(device=x.device, dtype=x.dtype)
        noises = noises.to(device=x.device, dtype=x.dtype)

        alpha, sigma, d_alpha, d_sigma = interpolant(kw["path_type"], time_input)
        model_input = alpha * x + sigma * noises
        target = d_alpha * x + d_sigma * noises

        model_output, zs_tilde = self._network(model_input, time_input.flatten(), y, align_only=kw["align_only"],
                                                  force_drop_ids=force_drop_ids)
        denoising_loss = None
        if not kw["align_only"]:
            denoising_loss = (model_output.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # [N]
        proj_loss = projection_loss(zs, [z.float() for z in zs_tilde]) if len(zs) else x.new_zeros(())
        return {
            "zs_tilde": zs_tilde,
            "model_output": model_output,
            "denoising_loss": denoising_loss,
            "proj_loss": proj_loss,
            "time_input": time_input,
            "noises": noises,
        }


# --------------------------------------------------------------------------------------------
# Registry: SiT-{S,B,L,XL}/{1,2,4,8} as published, plus tiny sizes (T, N) for CPU tests and demos.
# --------------------------------------------------------------------------------------------
SIT_SIZES = {
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    # Toolkit additions (not in the paper): small enough for a 2-core CPU.
    "T": dict(depth=6, hidden_size=192, num_heads=3),
    "N": dict(depth=4, hidden_size=64, num_heads=2),
}


def _make(size: str, patch: int):
    def ctor(**kwargs):
        cfg = dict(SIT_SIZES[size], patch_size=patch)
        cfg.update(kwargs)
        cfg["decoder_hidden_size"] = cfg["hidden_size"]
        return SiT(**cfg)

    ctor.__name__ = f"SiT_{size}_{patch}"
    return ctor


SiT_models = {f"SiT-{size}/{p}": _make(size, p) for size in SIT_SIZES for p in (1, 2, 4, 8)}


def build_sit(name: str, **kwargs) -> SiT:
    if name not in SiT_models:
        raise KeyError(f"unknown model '{name}'; choose one of: {', '.join(SiT_models)}")
    return SiT_models[name](**kwargs)
