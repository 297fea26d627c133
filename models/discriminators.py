"""Discriminators: the PatchGAN (pix2pix / taming-transformers `NLayerDiscriminator`) with
ActNorm, and RAE's DINO discriminator (frozen DINO ViT-S/8 features + spectral-norm conv heads,
see the section at the end).

The same network serves every tokenizer family here: REPA-E's `loss/discriminator.py`, taming's
VQGAN loss and VA-VAE (which imports taming). Its layers live in one `nn.Sequential` called
`main`, so the state-dict keys are the original ones (`main.0.weight`, `main.3.running_mean`, ...)
and the released discriminator checkpoints load without renaming.

Layout for (ndf, n_layers) = (64, 3), BatchNorm, 256x256 input -> 30x30 logits:

    main.0  Conv 3->64   k4 s2 p1 (+bias)   main.1  LeakyReLU(0.2)
    main.2  Conv 64->128 k4 s2 p1           main.3  Norm   main.4  LeakyReLU
    main.5  Conv 128->256 k4 s2 p1          main.6  Norm   main.7  LeakyReLU
    main.8  Conv 256->512 k4 s1 p1          main.9  Norm   main.10 LeakyReLU
    main.11 Conv 512->1  k4 s1 p1 (+bias)

Convs followed by a norm carry a bias only with ActNorm (BatchNorm's shift makes it redundant).
"""
from __future__ import annotations

import math as _math
import os
from functools import partial
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.encoders import IMAGENET_MEAN, IMAGENET_STD
from utils import load_checkpoint_file, load_state_dict_strict


class ActNorm(nn.Module):
    """Per-channel affine y = scale * (x + loc) with data-dependent initialisation (Glow).

    The first forward in train mode while `initialized == 0` sets loc = -mean and
    scale = 1 / (std + 1e-6) from that very batch (per channel over N, H, W; unbiased std), so the
    output starts normalised; eval mode never initialises. `initialized` is a uint8 buffer so the
    state survives checkpoints exactly as in the original.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        # x: [N, C, H, W] -> statistics per channel over (N, H, W)
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # [C, N*H*W]
        mean = flat.mean(dim=1)
        std = flat.std(dim=1)  # unbiased, as the original
        self.loc.copy_(-mean.view(1, -1, 1, 1))
        self.scale.copy_((1.0 / (std + 1e-6)).view(1, -1, 1, 1))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, H, W]
        if self.training and int(self.initialized) == 0:
            self.initialize(x)
        return self.scale * (x + self.loc)


def weights_init(m: nn.Module) -> None:
    """The original initialisation: conv weights N(0, 0.02) (conv biases keep PyTorch's default),
    BatchNorm weight N(1, 0.02) and bias 0. Use with `module.apply(weights_init)`."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: `n_layers` stride-2 convs then a stride-1 conv and a 1-channel stride-1 conv.

    Every k4 p1 conv maps H to floor(H/2) (stride 2) or H - 1 (stride 1), so the logits are
    [N, 1, H / 2^n_layers - 2, W / 2^n_layers - 2] for sizes divisible by 2^n_layers.
    Channel widths: ndf * min(2^n, 8) at depth n.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"NLayerDiscriminator: n_layers must be >= 1, got {n_layers}")
        self.config = dict(input_nc=input_nc, ndf=ndf, n_layers=n_layers, use_actnorm=use_actnorm)
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm's affine shift makes a conv bias redundant

        layers = [nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            # depths 1..n_layers-1 halve the resolution; the last one (n == n_layers) keeps stride 1
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=stride, padding=1, bias=use_bias),
                norm(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, input_nc, H, W] -> patch logits [N, 1, h, w]
        return self.main(x)


def discriminator_state_dict_from_checkpoint(obj: Mapping, source: str = "checkpoint") -> Mapping[str, torch.Tensor]:
    """The discriminator's own `main.*` entries from what a file holds: a plain discriminator
    state dict (REPA-E's `*-discriminator-ckpt.pt`), a training checkpoint with a `discriminator`
    entry, or a loss-module / Lightning state dict whose keys carry a `discriminator.` prefix
    (`discriminator.main.*`, `loss.discriminator.main.*`, possibly under `state_dict`)."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"{source}: expected a state dict, got {type(obj).__name__}")
    for key in ("discriminator", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            return discriminator_state_dict_from_checkpoint(obj[key], f"{source}[{key!r}]")
    if any(k.startswith("main.") for k in obj):
        return obj
    marker = "discriminator."
    prefixed = {k[k.index(marker) + len(marker):]: v for k, v in obj.items() if marker in k}
    if prefixed:
        return prefixed
    raise KeyError(f"{source}: no discriminator weights found (no 'main.*' or '*discriminator.main.*' keys; "
                   f"first keys: {list(obj)[:8]})")


def load_discriminator(path: Union[str, os.PathLike], **config) -> NLayerDiscriminator:
    """Build `NLayerDiscriminator(**config)` and load it strictly from `path`; a mismatch raises
    `StateDictMismatch` naming the file and every missing/unexpected/misshaped key."""
    model = NLayerDiscriminator(**config)
    sd = discriminator_state_dict_from_checkpoint(load_checkpoint_file(path), str(path))
    load_state_dict_strict(model, sd, str(path))
    return model


__all__ = ["ActNorm", "NLayerDiscriminator", "weights_init", "load_discriminator",
           "discriminator_state_dict_from_checkpoint", "DinoDiscriminator", "DinoBackbone", "DinoDiscHead",
           "SpectralConv1d", "TokenNorm", "DINO_DISC_DEFAULTS", "DINO_DISC_TINY", "build_dino_discriminator",
           "dino_heads_state_dict"]


# ============================================================================================
# DINO discriminator (RAE stage 1)
# ============================================================================================
# A projected discriminator in the style of StyleGAN-T: a FROZEN self-supervised ViT (DINO
# ViT-S/8 at 224 px) turns the image into token features at several depths, and one small
# trainable 1-D conv head per feature map scores every token. The backbone is never trained and
# never leaves eval mode; gradients still flow through it to the input image (the generator's
# adversarial term needs them).
#
# Shapes for the released setting (ViT-S/8, 224 px): each feature map is [B, 784, 384]
# (28 x 28 patch tokens, CLS dropped); five maps, in the original `DinoDisc`'s order: the last
# block's output (WITHOUT the final LayerNorm, which the original never applies), then blocks
# 2, 5, 8, 11 (so block 11 is scored twice) -> logits [B, 5 * 784]. Head i scores map i, so the
# original's released heads (`heads.{i}.0.0.weight_orig`, ...) load under their own names.
DINO_DISC_DEFAULTS = dict(
    pretrained="vit_small_patch8_224.dino",  # timm hub id, a local weights file, or "random"
    arch="vit_small_patch8_224",
    img_size=224, patch_size=8, embed_dim=384, depth=12, num_heads=6,
    mlp_ratio=4.0,
    act_layer="gelu_tanh",  # the original's DINO MLP uses the tanh GELU (timm's default is the exact one)
    feature_blocks=(2, 5, 8, 11),  # the original's key_depths: indices into the ViT's blocks (0-based)
    include_final=True,  # also score the last block's output (un-normed), as the FIRST map
    kernel_size=9,  # the original's ks: the residual conv's width over the tokens (circular padding)
    norm_eps=1e-6,  # the ViT's LayerNorms and the heads' token norms
    spectral_norm=True,  # the original's using_spec_norm
    resize_mode="bilinear",  # how the input is brought to img_size (the original: bilinear; "bicubic" allowed)
    heads_ckpt=None,  # optional file with trained head weights (see DinoDiscriminator.load_heads)
    key_mapping=None,  # prefix renames {old: new} applied to heads_ckpt keys
)

# A CPU-test size: 32 px, patch 8 -> 16 tokens; 4 blocks of width 32.
DINO_DISC_TINY = dict(pretrained="random", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                      feature_blocks=(1, 3))


class SpectralConv1d(nn.Conv1d):
    """Conv1d whose weight is divided by its spectral norm (one power iteration per training
    forward). Uses `torch.nn.utils.spectral_norm`, so the state dict holds `weight_orig`,
    `weight_u`, `weight_v` (the StyleGAN-T / projected-GAN key names)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        nn.utils.spectral_norm(self, name="weight", n_power_iterations=1, eps=1e-12, dim=0)


class TokenNorm(nn.Module):
    """Per-sample normalisation over the tokens: for each sample and channel, subtract the mean
    over the N tokens and divide by their (biased) std, then a per-channel affine. Unlike
    BatchNorm it never mixes samples, so real and fake batches can share one forward and the
    result does not depend on the batch size or the number of processes."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, N]
        mean = x.mean(dim=2, keepdim=True)
        var = x.var(dim=2, keepdim=True, unbiased=False)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight.view(1, -1, 1) + self.bias.view(1, -1, 1)


def _conv_block(channels: int, kernel_size: int, eps: float, spectral: bool = True) -> nn.Sequential:
    """(spectral-norm) Conv1d (circular padding keeps N) -> TokenNorm -> LeakyReLU(0.2)."""
    conv = SpectralConv1d if spectral else nn.Conv1d
    return nn.Sequential(
        conv(channels, channels, kernel_size=kernel_size, padding=kernel_size // 2, padding_mode="circular"),
        TokenNorm(channels, eps),
        nn.LeakyReLU(0.2),
    )


class _Residual(nn.Module):
    """(fn(x) + x) / sqrt(2): keeps the activation scale of a residual sum at one."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) * (1.0 / _math.sqrt(2.0))


class DinoDiscHead(nn.Sequential):
    """One feature map [B, N, C] -> one logit per token [B, N].

    0: k=1 conv block; 1: residual k=`kernel_size` conv block (`1.fn.*`); 2: spectral-norm
    Conv1d(C -> 1, k=1). The indices are the original's key names (`heads.{i}.0.0.weight_orig`).
    """

    def __init__(self, channels: int, kernel_size: int = 9, eps: float = 1e-6, spectral: bool = True):
        if kernel_size % 2 == 0:
            raise ValueError(f"DINO discriminator kernel_size must be odd (keeps the token count), got {kernel_size}")
        super().__init__(_conv_block(channels, 1, eps, spectral),
                         _Residual(_conv_block(channels, kernel_size, eps, spectral)),
                         (SpectralConv1d if spectral else nn.Conv1d)(channels, 1, kernel_size=1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return super().forward(feats.transpose(1, 2)).squeeze(1)  # [B, C, N] -> [B, N]


def _drop_backbone_keys(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _fill_backbone_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs) -> None:
    # The frozen backbone comes from `pretrained`, never from a discriminator checkpoint.
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    for name, tensor in module.vit.state_dict().items():
        state_dict[prefix + "vit." + name] = tensor


class DinoBackbone(nn.Module):
    """Frozen timm ViT: images [B, 3, H, W] in [-1, 1] -> list of token maps [B, N, C].

    Preprocessing: resize to `img_size` (bilinear / bicubic, no antialias) in [-1, 1], then
    x * 0.5 / std + (0.5 - mean) / std (ImageNet), the original's order of operations. Maps:
    (include_final) the last block's output, never the final norm's, then the outputs of
    `feature_blocks`; prefix (CLS) tokens dropped. Its weights are constants: kept out of
    `state_dict()` and not needed by `load_state_dict` (a discriminator checkpoint is the heads
    only).
    """

    def __init__(self, vit: nn.Module, img_size: int, feature_blocks: Sequence[int], include_final: bool,
                 resize_mode: str = "bilinear"):
        super().__init__()
        depth = len(vit.blocks)
        bad = [i for i in feature_blocks if not 0 <= int(i) < depth]
        if bad:
            raise ValueError(f"DINO discriminator feature_blocks {list(feature_blocks)}: indices {bad} are outside "
                             f"the backbone's {depth} blocks")
        if not feature_blocks and not include_final:
            raise ValueError("DINO discriminator: no feature map selected (empty feature_blocks, include_final False)")
        if resize_mode not in ("bicubic", "bilinear"):
            raise ValueError(f"DINO discriminator resize_mode must be 'bicubic' or 'bilinear', got {resize_mode!r}")
        self.vit = vit
        self.img_size, self.resize_mode = int(img_size), resize_mode
        self.feature_blocks = tuple(sorted(int(i) for i in feature_blocks))
        self.include_final = bool(include_final)
        self.embed_dim = vit.embed_dim
        self.num_tokens = int(vit.patch_embed.num_patches)
        self.num_maps = len(self.feature_blocks) + int(self.include_final)
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("scale", 0.5 / std, persistent=False)
        self.register_buffer("shift", (0.5 - mean) / std, persistent=False)
        self.requires_grad_(False)
        self.eval()
        self.register_state_dict_post_hook(_drop_backbone_keys)
        self.register_load_state_dict_pre_hook(_fill_backbone_keys)

    def train(self, mode: bool = True) -> "DinoBackbone":
        return super().train(False)  # frozen: no dropout / drop-path in the features, ever

    def forward(self, x: torch.Tensor) -> list:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"DINO discriminator expects images [B, 3, H, W], got {tuple(x.shape)}")
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode=self.resize_mode, align_corners=False)
        x = x * self.scale + self.shift
        m = self.vit
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))  # [B, P + N, C]
        p = m.num_prefix_tokens
        blocks = []
        last = self.feature_blocks[-1] if self.feature_blocks else -1
        n_run = len(m.blocks) if self.include_final else last + 1  # skip blocks nobody reads
        for i in range(n_run):
            h = m.blocks[i](h)
            if i in self.feature_blocks:
                blocks.append(h[:, p:])
        feats = ([h[:, p:]] if self.include_final else []) + blocks
        return feats  # num_maps x [B, N, C]


def _build_dino_vit(cfg: dict) -> nn.Module:
    """The timm ViT from `cfg`: random (`pretrained` None / "random"), a local weights file, or a
    timm hub id (HF_HUB_OFFLINE honoured; fails loudly, never a silent random fallback)."""
    import timm

    arch_kwargs = dict(img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"],
                       depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=float(cfg["mlp_ratio"]),
                       act_layer=cfg["act_layer"], norm_layer=partial(nn.LayerNorm, eps=float(cfg["norm_eps"])),
                       num_classes=0)
    pretrained = cfg["pretrained"]
    if pretrained in (None, "", "random", False):
        return timm.create_model(cfg["arch"], pretrained=False, **arch_kwargs)
    if os.path.exists(str(pretrained)):
        from models.encoders import load_timm_weights

        vit = timm.create_model(cfg["arch"], pretrained=False, **arch_kwargs)
        load_timm_weights(vit, Path(pretrained), "DINO discriminator backbone")  # strict, names the file
        return vit
    name = str(pretrained)
    name = name[len("timm/"):] if name.startswith("timm/") else name
    try:
        return timm.create_model(name, pretrained=True, **arch_kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised naming the source
        offline = " (HF_HUB_OFFLINE is set: the weights must already be in the hub cache)" \
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise RuntimeError(f"DINO discriminator: could not load backbone weights '{pretrained}' (not a local file; "
                           f"tried as a timm hub id){offline}: {e}") from e


def dino_heads_state_dict(obj: Mapping, key_mapping: Union[None, Mapping[str, str], Callable] = None,
                          source: str = "checkpoint") -> dict:
    """The heads' entries from what a file holds: a plain heads state dict, or a training
    checkpoint holding it under `disc` / `discriminator` / `state_dict` / `model`; a
    `module.` / `discriminator.` prefix is stripped, and the original `DinoDisc`'s frozen backbone
    (`dino.*`, which we rebuild from `pretrained`) is dropped. `key_mapping` then renames keys: a
    mapping of prefixes {old: new} (first match wins) or a callable key -> new key (None drops it)."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"{source}: expected a state dict, got {type(obj).__name__}")
    for key in ("disc", "discriminator", "state_dict", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            return dino_heads_state_dict(obj[key], key_mapping, f"{source}[{key!r}]")
    sd = dict(obj)
    for prefix in ("module.", "discriminator."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("dino.")}
    if key_mapping is None:
        return sd
    out = {}
    for k, v in sd.items():
        if callable(key_mapping):
            new = key_mapping(k)
        else:
            new = next((new_p + k[len(old_p):] for old_p, new_p in key_mapping.items() if k.startswith(old_p)), k)
        if new is not None:
            out[new] = v
    return out


class DinoDiscriminator(nn.Module):
    """Frozen DINO ViT features + one trainable `DinoDiscHead` per feature map.

    forward: images [B, 3, H, W] in [-1, 1] -> logits [B, num_maps * N] (heads concatenated in
    the order last block, feature_blocks..., as the original). `state_dict()` holds only
    `heads.*` (the backbone is rebuilt from `pretrained`). `train()` never puts the backbone in training mode.
    """

    def __init__(self, backbone: DinoBackbone, kernel_size: int = 9, norm_eps: float = 1e-6, config: Optional[dict] = None,
                 spectral_norm: bool = True):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList([DinoDiscHead(backbone.embed_dim, kernel_size, norm_eps, spectral_norm)
                                    for _ in range(backbone.num_maps)])
        self.config = dict(config or {})

    @property
    def num_logits(self) -> int:
        return self.backbone.num_maps * self.backbone.num_tokens

    def train(self, mode: bool = True) -> "DinoDiscriminator":
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)  # num_maps x [B, N, C]
        return torch.cat([head(f) for head, f in zip(self.heads, feats)], dim=1)  # [B, num_maps * N]

    def load_heads(self, obj: Union[Mapping, str, os.PathLike],
                   key_mapping: Union[None, Mapping[str, str], Callable] = None) -> "DinoDiscriminator":
        """Load trained heads strictly from a state dict or a file (see `dino_heads_state_dict`);
        a mismatch raises `StateDictMismatch` naming the source and every bad key."""
        source = "DINO discriminator heads"
        if not isinstance(obj, Mapping):
            source = str(obj)
            obj = load_checkpoint_file(obj)
        load_state_dict_strict(self, dino_heads_state_dict(obj, key_mapping, source), source)
        return self


def build_dino_discriminator(cfg: Optional[Mapping] = None) -> DinoDiscriminator:
    """A `DinoDiscriminator` from a config dict (keys of DINO_DISC_DEFAULTS; missing keys take
    those defaults, unknown keys raise). `{"pretrained": "random"}` builds it offline;
    `DINO_DISC_TINY` is the CPU-test size."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DINO_DISC_DEFAULTS))
    if unknown:
        raise ValueError(f"DINO discriminator config: unknown keys {unknown} (known: {sorted(DINO_DISC_DEFAULTS)})")
    cfg = {**DINO_DISC_DEFAULTS, **cfg}
    backbone = DinoBackbone(_build_dino_vit(cfg), cfg["img_size"], cfg["feature_blocks"], cfg["include_final"],
                            cfg["resize_mode"])
    disc = DinoDiscriminator(backbone, int(cfg["kernel_size"]), float(cfg["norm_eps"]), config=cfg,
                             spectral_norm=bool(cfg["spectral_norm"]))
    if cfg["heads_ckpt"]:
        disc.load_heads(cfg["heads_ckpt"], cfg["key_mapping"])
    return disc
