"""KL autoencoders with the Latent-Diffusion (LDM) conv blocks: SD-VAE, REPA-E's E2E-VAE, IN-VAE
f16d32 and VA-VAE (the KL-VAE plus a projection for vision-foundation alignment).

The same `Encoder` / `Decoder` also serve taming's VQGAN (`models/vqgan.py`, `double_z=False`).
Module and parameter names are the originals' so released checkpoints load strictly:

    encoder.conv_in, encoder.down.{level}.block.{i}.{norm1,conv1,norm2,conv2,nin_shortcut},
    encoder.down.{level}.attn.{i}.{norm,q,k,v,proj_out}, encoder.down.{level}.downsample.conv,
    encoder.mid.{block_1,attn_1,block_2}, encoder.norm_out, encoder.conv_out,
    decoder.conv_in, decoder.mid.*, decoder.up.{level}.{block,attn}.{i}, decoder.up.{level}.upsample.conv,
    decoder.norm_out, decoder.conv_out, quant_conv, post_quant_conv, [linear_proj].

`decoder.up.{level}` is indexed by level (up.0 is the full-resolution level) although the decoder
runs the levels last to first. Attention is placed by the CONFIG `resolution` (halved per level),
not by the size of the image actually fed in.

Two ways to build an `AutoencoderKL`:
* REPA-E style: `AutoencoderKL(embed_dim, ch_mult, use_variational=True, **ddconfig_overrides)`;
  every Encoder/Decoder kwarg not given takes the LDM default (ch 128, 2 res blocks, attention at
  16, resolution 256, RGB, double_z) and z_channels = embed_dim.
* LDM / VA-VAE style: `AutoencoderKL.from_ldm_config({"ddconfig": ..., "embed_dim": ...,
  "use_vf": "dinov2", "reverse_proj": True, ...})`.
Named configurations live in `VAE_PRESETS`; `models.vae_loading.load_vae` builds one, loads a
checkpoint strictly and reads the latent statistics file that travels with it.

Deliberate differences from the originals: attention runs through SDPA (same maths), `decode`
returns the image tensor (REPA-E wraps it in an object with `.sample`), `forward` returns
(posterior, z, recon) as REPA-E's does, optional activation checkpointing, and loading never
falls back to `strict=False`.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


# --------------------------------------------------------------------------------------------
# Building blocks (LDM `diffusionmodules/model.py` maths, written with SDPA)
# --------------------------------------------------------------------------------------------


def Normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32 groups, eps 1e-6, affine): every LDM conv channel count must divide by 32."""
    if channels % 32 != 0:
        raise ValueError(f"LDM blocks use GroupNorm(32): channel count {channels} is not a multiple of 32 "
                         f"(choose ch / ch_mult so that every ch * mult divides by 32)")
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x) (F.silu is the same function, fused)."""
    return F.silu(x)


class ResnetBlock(nn.Module):
    """norm1-swish-conv1-norm2-swish-dropout-conv2 plus a residual; the residual goes through a 1x1
    `nin_shortcut` when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, Cin, H, W] -> [B, Cout, H, W]
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1 conv q/k/v/proj_out on the
    GroupNorm'd input, residual. SDPA's default scale 1/sqrt(head dim) is the original's C^-0.5."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, 1 head, H*W, C]
        q, k, v = (t.reshape(B, 1, C, H * W).transpose(-1, -2) for t in (self.q(h), self.k(h), self.v(h)))
        h = F.scaled_dot_product_attention(q, k, v)  # [B, 1, H*W, C]
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right/bottom by one then 3x3 stride-2 conv (or 2x2 average pool)."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            # No padding in the conv: the asymmetric (0, 1, 0, 1) pad happens in forward.
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then (optionally) a 3x3 conv."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


def _run(module: nn.Module, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """Call a block, through activation checkpointing when asked and gradients are being taken."""
    if checkpointing and torch.is_grad_enabled() and x.requires_grad:
        return torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)
    return module(x)


class Encoder(nn.Module):
    """LDM encoder: conv_in, per level `num_res_blocks` ResnetBlocks (+ AttnBlock each when the
    level's config resolution is in `attn_resolutions`) and a Downsample except after the last
    level; mid block_1 / attn_1 / block_2; norm_out, swish, conv_out to 2*z_channels (double_z)
    or z_channels. `out_ch` is accepted (the shared ddconfig holds it) and unused here."""

    def __init__(self, *, ch: int = 128, out_ch: int = 3, ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int = 3, resolution: int = 256, z_channels: int = 4, double_z: bool = True,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.ch, self.num_levels, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        self.grad_checkpointing = grad_checkpointing
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        in_ch_mult = (1,) + tuple(ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for level in range(self.num_levels):
            block_in, block_out = ch * in_ch_mult[level], ch * ch_mult[level]
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = blocks, attns
            if level != self.num_levels - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in_channels, H, W] -> [B, (2*)z_channels, H / 2^(L-1), W / 2^(L-1)]
        ckpt = self.grad_checkpointing and self.training
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for i, block in enumerate(down.block):
                h = _run(block, h, ckpt)
                if len(down.attn) > 0:
                    h = _run(down.attn[i], h, ckpt)
            if level != self.num_levels - 1:
                h = down.downsample(h)
        h = _run(self.mid.block_1, h, ckpt)
        h = _run(self.mid.attn_1, h, ckpt)
        h = _run(self.mid.block_2, h, ckpt)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """LDM decoder: conv_in(z_channels -> ch*ch_mult[-1]), mid, then levels from last to first with
    `num_res_blocks + 1` ResnetBlocks (+ AttnBlock by the same config-resolution rule, starting at
    resolution / 2^(L-1)) and an Upsample except at level 0; norm_out, swish, conv_out(-> out_ch).
    `give_pre_end` returns the features before norm_out; `tanh_out` squashes the output.
    `in_channels` and `double_z` are accepted (the shared ddconfig holds them) and unused here."""

    def __init__(self, *, ch: int = 128, out_ch: int = 3, ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int = 3, resolution: int = 256, z_channels: int = 4, double_z: bool = True,
                 give_pre_end: bool = False, tanh_out: bool = False, grad_checkpointing: bool = False):
        super().__init__()
        self.ch, self.num_levels, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out
        self.grad_checkpointing = grad_checkpointing

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_levels - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout)

        ups = []
        for level in reversed(range(self.num_levels)):
            block_out = ch * ch_mult[level]
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = blocks, attns
            if level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            ups.insert(0, up)  # state-dict index = level (up.0 is full resolution)
        self.up = nn.ModuleList(ups)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: [B, z_channels, h, w] -> [B, out_ch, h * 2^(L-1), w * 2^(L-1)]
        ckpt = self.grad_checkpointing and self.training
        h = self.conv_in(z)
        h = _run(self.mid.block_1, h, ckpt)
        h = _run(self.mid.attn_1, h, ckpt)
        h = _run(self.mid.block_2, h, ckpt)
        for level in reversed(range(self.num_levels)):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = _run(block, h, ckpt)
                if len(up.attn) > 0:
                    h = _run(up.attn[i], h, ckpt)
            if level != 0:
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(swish(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


# Encoder/Decoder keyword arguments an LDM `ddconfig` may hold.
DDCONFIG_KEYS = ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv",
                 "in_channels", "resolution", "z_channels", "double_z")
DECODER_ONLY_KEYS = ("give_pre_end", "tanh_out")


def check_ddconfig(ddconfig: Mapping, source: str = "ddconfig") -> None:
    """Reject unknown Encoder/Decoder kwargs by name instead of a TypeError deep in a constructor."""
    unknown = sorted(set(ddconfig) - set(DDCONFIG_KEYS) - set(DECODER_ONLY_KEYS) - {"grad_checkpointing"})
    if unknown:
        raise ValueError(f"{source}: unknown Encoder/Decoder keys {unknown} (known: {list(DDCONFIG_KEYS + DECODER_ONLY_KEYS)})")


def build_encoder_decoder(ddconfig: Mapping, source: str = "ddconfig") -> Tuple[Encoder, Decoder]:
    """Encoder and Decoder from one shared LDM ddconfig (decoder-only keys go to the decoder)."""
    check_ddconfig(ddconfig, source)
    enc_cfg = {k: v for k, v in ddconfig.items() if k not in DECODER_ONLY_KEYS}
    return Encoder(**enc_cfg), Decoder(**ddconfig)


# --------------------------------------------------------------------------------------------
# Posterior
# --------------------------------------------------------------------------------------------


class DiagonalGaussianDistribution:
    """Diagonal Gaussian posterior from moments [B, 2C, h, w]: mean = first C channels, logvar =
    the rest clamped to [-30, 20] (the clamp also bounds std and var)."""

    def __init__(self, moments: torch.Tensor, deterministic: bool = False):
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)

    def sample(self, generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mean + std * eps; eps = `noise` when given (reproducible streams), else randn."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        elif noise.shape != self.mean.shape:
            raise ValueError(f"posterior noise has shape {tuple(noise.shape)}, expected {tuple(self.mean.shape)}")
        return self.mean + self.std * noise.to(self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> torch.Tensor:
        """KL to N(0, I) (or to `other`) summed over (C, h, w): one value per sample [B]."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = list(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=dims)

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of `sample` summed over (C, h, w), per sample [B]."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        log_two_pi = 1.8378770664093453
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=list(range(1, sample.ndim)))


# --------------------------------------------------------------------------------------------
# AutoencoderKL
# --------------------------------------------------------------------------------------------

# Width of the vision-foundation features VA-VAE aligns to (`use_vf` in its configs).
VF_FEATURE_DIMS = {"dinov2": 1024, "mae": 768}
# LDM/VA-VAE model-config keys that describe training, not the network: accepted and not used here.
LDM_TRAINING_KEYS = {"lossconfig", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels", "monitor",
                     "base_learning_rate", "ema_decay", "learn_logvar"}


class AutoencoderKL(nn.Module):
    """encoder -> quant_conv (1x1, 2*z_channels -> 2*embed_dim) -> posterior; z ->
    post_quant_conv (1x1, embed_dim -> z_channels) -> decoder.

    `vf_dim` adds VA-VAE's `linear_proj` (1x1, no bias): embed_dim -> vf_dim with `reverse_proj`
    (the latent is projected to the foundation width; the released VA-VAE), else vf_dim -> embed_dim.
    `use_variational=False` reproduces REPA-E: the posterior's logvar is the constant 1 (not -inf),
    so sampling still adds noise with std e^0.5 — kept so such checkpoints behave as trained.
    """

    def __init__(self, embed_dim: int = 4, ch_mult: Sequence[int] = (1, 2, 4, 4), use_variational: bool = True,
                 vf_dim: Optional[int] = None, reverse_proj: bool = True, **ddconfig):
        super().__init__()
        ddconfig = dict(ddconfig)
        ddconfig["ch_mult"] = list(ch_mult)
        ddconfig.setdefault("z_channels", embed_dim)  # REPA-E passes z_channels = embed_dim
        check_ddconfig(ddconfig, "AutoencoderKL ddconfig")
        self.ddconfig = ddconfig
        self.embed_dim = embed_dim
        self.use_variational = use_variational
        z_channels = ddconfig["z_channels"]
        double_z = ddconfig.get("double_z", True)
        if not double_z:
            raise ValueError("AutoencoderKL needs double_z=True (mean and logvar); use models.vqgan for double_z=False")
        self.encoder, self.decoder = build_encoder_decoder(ddconfig, "AutoencoderKL ddconfig")
        mult = 2 if use_variational else 1
        self.quant_conv = nn.Conv2d(2 * z_channels, mult * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        self.vf_dim, self.reverse_proj = vf_dim, reverse_proj
        if vf_dim is not None:
            in_c, out_c = (embed_dim, vf_dim) if reverse_proj else (vf_dim, embed_dim)
            self.linear_proj = nn.Conv2d(in_c, out_c, kernel_size=1, bias=False)

    # ---- construction from an LDM / VA-VAE model config ----------------------------------
    @classmethod
    def from_ldm_config(cls, config: Mapping, vf_feature_dim: Optional[int] = None,
                        source: str = "model config") -> "AutoencoderKL":
        """Build from `{ddconfig, embed_dim, [use_vf, reverse_proj], [lossconfig, ...]}` (the
        `model.params` of an LDM / VA-VAE YAML). `use_vf` ("dinov2" 1024, "mae" 768) adds
        `linear_proj`; `vf_feature_dim` overrides its width (tiny test foundations). Training-only
        keys (lossconfig, ckpt_path, ...) are accepted and ignored: losses are built by the trainer."""
        config = dict(config)
        if "params" in config and "ddconfig" not in config:  # a whole `{target, params}` node
            config = dict(config["params"])
        for required in ("ddconfig", "embed_dim"):
            if required not in config:
                raise KeyError(f"{source}: missing '{required}'")
        known = {"ddconfig", "embed_dim", "use_vf", "reverse_proj", "use_variational"} | LDM_TRAINING_KEYS
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}")
        ddconfig = dict(config["ddconfig"])
        ch_mult = ddconfig.pop("ch_mult", (1, 2, 4, 4))
        use_vf = config.get("use_vf")
        vf_dim = None
        if use_vf is not None:
            if vf_feature_dim is None:
                if use_vf not in VF_FEATURE_DIMS:
                    raise ValueError(f"{source}: use_vf={use_vf!r}; known {sorted(VF_FEATURE_DIMS)} or pass vf_feature_dim")
                vf_feature_dim = VF_FEATURE_DIMS[use_vf]
            vf_dim = int(vf_feature_dim)
        return cls(embed_dim=int(config["embed_dim"]), ch_mult=ch_mult,
                   use_variational=config.get("use_variational", True), vf_dim=vf_dim,
                   reverse_proj=bool(config.get("reverse_proj", True)), **ddconfig)

    # ---- properties -------------------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    @property
    def in_channels(self) -> int:
        return self.ddconfig.get("in_channels", 3)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable
        self.decoder.grad_checkpointing = enable

    def get_last_layer(self) -> torch.Tensor:
        """Decoder's last conv weight (adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    def get_encoder_last_layer(self) -> torch.Tensor:
        """Encoder's last conv weight (VA-VAE's adaptive VF weight)."""
        return self.encoder.conv_out.weight

    # ---- encode / decode ----------------------------------------------------------------------
    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """quant_conv(encoder(x)): [B, 2*embed_dim, h, w] (REPA-E non-variational: [B, E, h, w])."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        # x: [B, in_channels, H, W] in [-1, 1] -> posterior over [B, embed_dim, H/f, W/f]
        moments = self.encode_moments(x)
        if not self.use_variational:
            moments = torch.cat([moments, torch.ones_like(moments)], dim=1)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # z: [B, embed_dim, h, w] -> image [B, out_ch, h*f, w*f]
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None):
        """Returns (posterior, z, recon); z = posterior sample (or mode) and recon = decode(z)."""
        posterior = self.encode(x)
        z = posterior.sample(generator=generator, noise=noise) if sample_posterior else posterior.mode()
        return posterior, z, self.decode(z)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
# name -> AutoencoderKL constructor kwargs. Real sizes first, then tiny ones for tests and demos
# (all channel counts multiples of 32 for GroupNorm; attention resolution set for the preset's
# native `resolution`, which only decides attention placement — any size divisible by f works).
VAE_PRESETS: Dict[str, dict] = {
    # SD-VAE layout (REPA-E's E2E-VAE, sd-vae-ft-ema weights): 256px -> [4, 32, 32], attention
    # only in the mid blocks (levels at 256..32 px are never 16).
    "f8d4": dict(embed_dim=4, ch_mult=(1, 2, 4, 4)),
    # IN-VAE f16d32 (REPA-E): 256px -> [32, 16, 16], attention at the 16-px level and mid.
    "f16d32": dict(embed_dim=32, ch_mult=(1, 1, 2, 2, 4)),
    # VA-VAE f16d32 with its DINOv2 projection (linear_proj 32 -> 1024) for VF-aligned training.
    "vavae-f16d32": dict(embed_dim=32, ch_mult=(1, 1, 2, 2, 4), vf_dim=1024, reverse_proj=True),
    # Tiny: f4, 4 channels; 32px -> [4, 8, 8]; attention at the 8-px level and mid (~1 M params).
    "tiny-f4d4": dict(embed_dim=4, ch_mult=(1, 2, 2), ch=32, num_res_blocks=1, attn_resolutions=(8,), resolution=32),
    # Tiny f8: 64px -> [4, 8, 8]; mid attention only, as f8d4.
    "tiny-f8d4": dict(embed_dim=4, ch_mult=(1, 1, 2, 2), ch=32, num_res_blocks=1, attn_resolutions=(), resolution=64),
    # Tiny f16d32 (IN-VAE / VA-VAE shape): 64px -> [32, 4, 4], attention at 4 px and mid.
    "tiny-f16d32": dict(embed_dim=32, ch_mult=(1, 1, 1, 1, 2), ch=32, num_res_blocks=1, attn_resolutions=(4,), resolution=64),
    # Tiny VA-VAE: tiny-f16d32 plus linear_proj 32 -> 64 (pair with a 64-wide tiny foundation model).
    "tiny-vavae-f16d32": dict(embed_dim=32, ch_mult=(1, 1, 1, 1, 2), ch=32, num_res_blocks=1, attn_resolutions=(4,),
                              resolution=64, vf_dim=64, reverse_proj=True),
}


def build_vae(preset_or_config: Union[str, Mapping], **overrides) -> AutoencoderKL:
    """A random-init AutoencoderKL from a preset name, a kwargs dict, or an LDM config
    (`{ddconfig, embed_dim, ...}`). `overrides` replace preset kwargs (e.g. in_channels=1)."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in VAE_PRESETS:
            raise KeyError(f"unknown VAE preset '{preset_or_config}' (known: {sorted(VAE_PRESETS)})")
        return AutoencoderKL(**{**VAE_PRESETS[preset_or_config], **overrides})
    config = dict(preset_or_config)
    if "ddconfig" in config or "params" in config:
        if overrides:
            config["ddconfig"] = {**config.get("ddconfig", {}), **overrides}
        return AutoencoderKL.from_ldm_config(config)
    return AutoencoderKL(**{**config, **overrides})


__all__ = [
    "Normalize", "swish", "ResnetBlock", "AttnBlock", "Downsample", "Upsample", "Encoder", "Decoder",
    "build_encoder_decoder", "DiagonalGaussianDistribution", "AutoencoderKL", "VAE_PRESETS", "build_vae",
]
