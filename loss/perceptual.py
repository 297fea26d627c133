"""LPIPS perceptual distance (VGG16 trunk, linear heads v0.1) for tokenizer training and eval.

A thin wrapper over the `lpips` package, which is exactly the LPIPS of taming-transformers,
REPA-E and VA-VAE (same v0.1 `vgg.pth` linear heads, md5 d507d7349b931f0638a25a48a722f98a,
shipped inside the package, and torchvision's VGG16 IMAGENET1K_V1 trunk).

Nothing here downloads implicitly:
* the linear heads always come from the installed package;
* the VGG trunk comes from `vgg_weights`: "imagenet" (torchvision's file, taken from the torch hub
  cache and downloaded there only when HF_HUB_OFFLINE / TORCH_HUB_OFFLINE is not set), a local
  path to a torchvision VGG16 state dict, or "random" (offline tests; not a meaningful metric).
  "random" is one fixed pseudo-random trunk (seed 0, drawn without touching the global RNG), so
  every LPIPS("random") is the same network in every process and across resumes.

Building lpips' VGG16 also builds (and throws away) its 120M-parameter classifier, about 2 s on a
CPU; the network is therefore built once per process and copied for every further instance.

Input convention: images in [-1, 1] (`input_range="[-1,1]"`, the correct default). REPA-E's loss
documents [0, 1] inputs but train_repae.py passes [-1, 1] images, which its LPIPS then maps with
2x - 1, so the VGG sees values in [-3, 1]. `input_range="repae_quirk"` reproduces that (needed to
match the published REPA-E numbers); `"[0,1]"` is the same mapping for genuinely [0, 1] inputs.

The network is frozen and always in eval mode (its heads contain dropout). Its weights are
constants that are never trained, so they are kept out of `state_dict()` (checkpoints stay small)
and a loaded state dict does not need them.

Memory of the backward (what autograd keeps between the loss and its gradient), three options with
the same loss and the same gradient w.r.t. the images (the first two exactly, the head to fp rounding):
* `lean_head` (default on, free): each layer's "normalise, diff, square, 1x1 lin, spatial mean"
  is one autograd node (`_LayerDistance`) that keeps only the two VGG feature maps and recomputes
  the rest in backward, instead of the diff and its square (two feature-sized float32 tensors per
  layer, ~40% of what lpips keeps). Its forward runs lpips' own ops, so the loss is bit-identical.
* `grad_checkpointing` (default off: it recomputes): the VGG slices of an input that needs a
  gradient run under non-reentrant activation checkpointing, so only the five slice boundaries are
  kept instead of every conv input and max-pool index (the trunk's ~60%), for one more VGG forward
  of that input in backward.
* `lean_trunk` (default on, free): for an input that needs a gradient, each frozen conv + ReLU of
  the VGG is one node (`_FrozenConvReLU`) keeping a 1-bit "output <= 0" mask (the weights are
  constants, so the conv's input-gradient needs no activation; aten's convolution keeps its input
  even when the weight needs no gradient), and each 2x2/2 max-pool (`_MaxPool2x2`) keeps a uint8
  window position instead of its input and int64 indices. Forward: the same ops; backward: the
  ops autograd runs (threshold, aten.convolution_backward, the pool's scatter), so the loss and
  the gradient are bit-identical. Composes with `grad_checkpointing` (it then shrinks what the
  recomputed slices hold during their backward).
`set_memory_options` / `add_lpips_memory_flags` give them to every LPIPS inside a loss.
"""
from __future__ import annotations

import copy
import functools
import os
import warnings
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from utils import load_checkpoint_file, load_state_dict_strict

INPUT_RANGES = ("[-1,1]", "[0,1]", "repae_quirk")
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TORCH_HUB_OFFLINE")


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in OFFLINE_ENV)


def _imagenet_vgg16_state_dict() -> Mapping[str, torch.Tensor]:
    """torchvision's VGG16 IMAGENET1K_V1 weights from the torch hub cache (download only online)."""
    from torchvision.models import VGG16_Weights

    url = VGG16_Weights.IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not cached.is_file() and _offline():
        raise FileNotFoundError(
            f"LPIPS: VGG16 ImageNet weights are not cached at {cached} and downloads are disabled "
            f"(HF_HUB_OFFLINE/TORCH_HUB_OFFLINE). Give `--lpips-weights PATH` (train_repae.py, train_stage1.py) "
            f"a local torchvision VGG16 state dict (vgg16-397923af.pth), or `--lpips-weights random` for "
            f"offline tests; loss configs take `perceptual_vgg_weights: PATH`.")
    return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True, weights_only=True)


_TEMPLATE: dict = {}


def _lpips_network() -> nn.Module:
    """A fresh copy of lpips' VGG LPIPS with the package's v0.1 heads and the fixed random trunk."""
    if "net" not in _TEMPLATE:
        import lpips

        # on the CPU whatever the caller's default device: a template built under `torch.device("meta")`
        # would hand weightless copies to every later caller
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), torch.device("cpu"):
            # lpips calls torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            torch.manual_seed(0)
            # pnet_rand=True builds the VGG trunk without torchvision's download; pretrained=True
            # keeps the package's own v0.1 linear heads (a file inside the package).
            _TEMPLATE["net"] = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    return copy.deepcopy(_TEMPLATE["net"])


class LPIPS(nn.Module):
    """d(x, y) per sample [B, 1, 1, 1]: LPIPS v0.1 with a VGG16 trunk.

    Args:
        vgg_weights: "imagenet" (default, real use), "random" (offline tests) or a path to a
            torchvision VGG16 state dict (`features.*` keys; `classifier.*` ignored).
        input_range: "[-1,1]" (default), "[0,1]" or "repae_quirk" (see the module docstring).
    """

    def __init__(self, vgg_weights: str = "imagenet", input_range: str = "[-1,1]", lean_head: bool = True,
                 grad_checkpointing: bool = False, lean_trunk: bool = True):
        super().__init__()
        self.lean_head, self.grad_checkpointing, self.lean_trunk = lean_head, grad_checkpointing, lean_trunk
        if input_range not in INPUT_RANGES:
            raise ValueError(f"LPIPS: input_range must be one of {INPUT_RANGES}, got {input_range!r}")
        self.input_range = input_range
        self.net = _lpips_network()
        if vgg_weights == "imagenet":
            self._load_vgg(_imagenet_vgg16_state_dict(), "torchvision VGG16_Weights.IMAGENET1K_V1")
        elif vgg_weights != "random":
            self._load_vgg(load_checkpoint_file(vgg_weights), str(vgg_weights))
        self.vgg_weights = vgg_weights
        self.requires_grad_(False)
        self.eval()
        # Frozen constants: not written to state dicts, and filled in when a state dict lacks them.
        self.register_state_dict_post_hook(_drop_own_keys)
        self.register_load_state_dict_pre_hook(_fill_own_keys)

    def _load_vgg(self, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
        """Load torchvision `features.<i>.*` weights (strictly) into lpips' five slices, which hold
        torchvision's feature layers 0..29 under their original indices."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{source}: expected a VGG16 state dict, got {type(state_dict).__name__}")
        features = {k[len("features."):]: v for k, v in state_dict.items() if k.startswith("features.")}
        if not features:
            raise KeyError(f"{source}: no 'features.*' keys: not a torchvision VGG16 state dict")
        trunk = self.net.net
        layers = [m for i in range(1, trunk.N_slices + 1) for m in getattr(trunk, f"slice{i}")]
        load_state_dict_strict(nn.Sequential(*layers), features, source)  # the same module objects

    def train(self, mode: bool = True) -> "LPIPS":
        # Always eval: the linear heads hold dropout layers that must stay off.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x, y: [B, 3, H, W] in the configured range -> [B, 1, 1, 1]
        if self.input_range != "[-1,1]":
            x, y = 2 * x - 1, 2 * y - 1
        if not (self.lean_head or self.grad_checkpointing or self.lean_trunk):
            return self.net(x, y)  # the lpips package's graph
        net = self.net
        feats_x, feats_y = self._features(x), self._features(y)
        val = 0  # summed in lpips' order, so the forward is bit-identical to it
        for fx, fy, lin in zip(feats_x, feats_y, net.lins):
            weight = lin.model[-1].weight  # the 1x1 conv after an (eval-mode, identity) dropout
            if self.lean_head:
                val = val + _LayerDistance.apply(fx, fy, weight)
            else:
                val = val + _layer_distance(fx, fy, weight)
        return val

    def _features(self, x: torch.Tensor) -> list:
        """The five VGG feature maps of `x`; checkpointed slice by slice and/or through the lean trunk
        nodes when asked and `x` needs a gradient (a target without one saves nothing either way)."""
        h = self.net.scaling_layer(x)
        trunk = self.net.net
        slices = [getattr(trunk, f"slice{i}") for i in range(1, trunk.N_slices + 1)]
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        recompute = self.grad_checkpointing and needs_grad
        run = functools.partial(_lean_slice, lean=self.lean_trunk and needs_grad)
        feats = []
        for s in slices:
            h = checkpoint(run, s, h, use_reentrant=False) if recompute else run(s, h)
            feats.append(h)
        return feats

    def set_memory_options(self, lean_head: Optional[bool] = None, grad_checkpointing: Optional[bool] = None,
                           lean_trunk: Optional[bool] = None) -> None:
        """Switch the backward-memory options (module docstring); None leaves one unchanged."""
        if lean_head is not None:
            self.lean_head = bool(lean_head)
        if grad_checkpointing is not None:
            self.grad_checkpointing = bool(grad_checkpointing)
        if lean_trunk is not None:
            self.lean_trunk = bool(lean_trunk)


_EPS = 1e-10  # lpips.normalize_tensor's


def _layer_distance(fa: torch.Tensor, fb: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One LPIPS layer with lpips' own ops: spatial mean of lin((n(fa) - n(fb))^2), n = division by
    the channel norm (+eps); [B, 1, 1, 1]."""
    import lpips

    d = lpips.normalize_tensor(fa, _EPS) - lpips.normalize_tensor(fb, _EPS)
    return F.conv2d(d ** 2, weight).mean([2, 3], keepdim=True)


def _unit_backward(grad_u: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. f of u = f / (|f| + eps) (|.| over channels) given dL/du, in f's precision:
    grad_u / s - f * <grad_u, f> / (s^2 |f|), s = |f| + eps."""
    norm = f.pow(2).sum(1, keepdim=True).sqrt()
    s = norm + _EPS
    # a position whose features are all zero has <grad_u, f> = 0: its second term is 0 (lpips'
    # sqrt backward gives 0/0 = NaN there)
    return grad_u / s - f * ((grad_u * f).sum(1, keepdim=True) / (s * s * norm.clamp_min(torch.finfo(f.dtype).tiny)))


class _LayerDistance(torch.autograd.Function):
    """`_layer_distance` as one autograd node that saves only its inputs (the two feature maps,
    which the trunk keeps anyway for an input with a gradient) and recomputes the normalised
    difference in float32 in backward."""

    @staticmethod
    def forward(ctx, fa, fb, weight):
        ctx.save_for_backward(fa, fb, weight)
        return _layer_distance(fa, fb, weight)

    @staticmethod
    def backward(ctx, grad_out):
        fa, fb, weight = ctx.saved_tensors
        fa32, fb32 = fa.float(), fb.float()
        d = fa32 / (fa32.pow(2).sum(1, keepdim=True).sqrt() + _EPS) - fb32 / (fb32.pow(2).sum(1, keepdim=True).sqrt() + _EPS)
        # out = sum_c w_c mean_hw d_c^2  ->  dL/dd = 2 w d grad_out / (H W)
        scale = grad_out.float() / (d.shape[2] * d.shape[3])
        grad_d = (2 * scale) * weight.float().view(1, -1, 1, 1) * d
        grad_fa = _unit_backward(grad_d, fa32).to(fa.dtype) if ctx.needs_input_grad[0] else None
        grad_fb = _unit_backward(-grad_d, fb32).to(fb.dtype) if ctx.needs_input_grad[1] else None
        grad_w = (scale * d * d).sum((0, 2, 3)).view_as(weight).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return grad_fa, grad_fb, grad_w


# ---------------------------------------------------------------------------------------------
# Lean trunk: the frozen VGG's conv + ReLU pairs and 2x2/2 max-pools as nodes that keep bits.

def _lean_slice(s: nn.Sequential, h: torch.Tensor, lean: bool) -> torch.Tensor:
    """One lpips VGG slice; with `lean`, each frozen conv followed by a ReLU runs as
    `_FrozenConvReLU` and each 2x2/2 max-pool as `_MaxPool2x2` (anything else, e.g. a conv whose
    weight was unfrozen, runs as its module)."""
    if not lean:
        return s(h)
    mods = list(s)
    i = 0
    while i < len(mods):
        m = mods[i]
        if _is_frozen_conv(m) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU):
            h = _FrozenConvReLU.apply(h, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
            i += 2
            continue
        h = _MaxPool2x2.apply(h) if _is_pool_2x2(m) else m(h)
        i += 1
    return h


def _is_frozen_conv(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
            and not m.weight.requires_grad and (m.bias is None or not m.bias.requires_grad))


def _is_pool_2x2(m: nn.Module) -> bool:
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    return (isinstance(m, nn.MaxPool2d) and pair(m.kernel_size) == (2, 2) and pair(m.stride) == (2, 2)
            and pair(m.padding) == (0, 0) and pair(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices)


def _storage_order(t: torch.Tensor) -> tuple:
    """(a view of `t` whose row-major order is its memory order where cheap, the permutation back):
    a channels_last map is packed without a layout copy."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1), (0, 3, 1, 2)
    return t, None


def _pack_bits(mask: torch.Tensor) -> tuple:
    """A bool tensor as (uint8 bitmask, 8 elements a byte, the layout `_unpack_bits` needs)."""
    dense, perm = _storage_order(mask)
    flat = dense.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = _bit_values(mask.device)
    return (flat.view(-1, 8).to(torch.uint8) * bits).sum(1, dtype=torch.uint8), (dense.shape, perm, mask.numel())


def _unpack_bits(packed: torch.Tensor, layout: tuple) -> torch.Tensor:
    shape, perm, n = layout
    mask = (packed.unsqueeze(1) & _bit_values(packed.device)).ne(0).view(-1)[:n].view(shape)
    return mask.permute(*perm) if perm is not None else mask


def _bit_values(device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


class _FrozenConvReLU(torch.autograd.Function):
    """relu(conv2d(x, w, b)) with constant w, b: keeps w (a parameter, no activation) and a bitmask
    of `out <= 0` instead of x and out. Backward is autograd's own: ReLU's threshold_backward
    (zero where out <= 0, so NaNs route as there) and aten.convolution_backward for the input only,
    which reads the input's shape, not its values."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        out = torch.relu_(F.conv2d(x, weight, bias, stride, padding, dilation, groups))
        bits, ctx.layout = _pack_bits(out <= 0)
        ctx.save_for_backward(weight, bits)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, bits = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad = torch.where(_unpack_bits(bits, ctx.layout), 0, grad_out)
        # under autocast the forward convolved weight.to(out dtype): the same cast again
        shape_only = grad.new_empty(1).expand(ctx.x_shape)
        grad_x = torch.ops.aten.convolution_backward(
            grad, shape_only, weight.to(grad.dtype), None, list(stride), list(padding), list(dilation), False,
            [0, 0], groups, [True, False, False])[0]
        return grad_x.to(ctx.x_dtype), None, None, None, None, None, None


class _MaxPool2x2(torch.autograd.Function):
    """max_pool2d(x, 2, 2) keeping the uint8 position (0..3, row-major) of each window's maximum
    instead of x and int64 indices. The position is the first maximum in the window, as torch's
    kernels pick it (`val > max` in row-major order; they route a window holding a NaN to its last
    NaN, here to its last element: the loss is NaN then anyway). Odd sizes: floor mode drops the
    last row / column, which get no gradient."""

    @staticmethod
    def forward(ctx, x):
        out = F.max_pool2d(x, 2, 2)
        ho, wo = out.shape[-2:]
        xs = x[..., :2 * ho, :2 * wo]

        def differs(dy, dx):
            return xs[..., dy::2, dx::2].ne(out).to(torch.uint8)

        # first match: 0 if (0,0) is the max, else 1 if (0,1), else 2 if (1,0), else 3
        pos = differs(0, 0) * (1 + differs(0, 1) * (1 + differs(1, 0)))
        ctx.save_for_backward(pos)
        ctx.x_shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        pos, = ctx.saved_tensors
        b, c, ho, wo = grad_out.shape
        window = torch.arange(4, dtype=torch.uint8, device=pos.device).view(2, 1, 2)  # [dy, ., dx] -> 2 dy + dx
        # + 0.0: torch's backward accumulates into zeros, turning a -0.0 gradient into +0.0
        grad = torch.where(pos[:, :, :, None, :, None] == window, grad_out[:, :, :, None, :, None] + 0.0, 0)
        grad = grad.reshape(b, c, 2 * ho, 2 * wo)
        h, w = ctx.x_shape[-2:]
        if (h, w) != (2 * ho, 2 * wo):
            grad = F.pad(grad, (0, w - 2 * wo, 0, h - 2 * ho))
        return grad


def _drop_own_keys(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _fill_own_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                   error_msgs) -> None:
    # Keep this module's own constants, whatever the state dict carries under its prefix (e.g. the
    # LPIPS weights an original loss checkpoint may hold under another layout).
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    for name, tensor in module.net.state_dict().items():
        state_dict[prefix + "net." + name] = tensor


def set_memory_options(module: nn.Module, lean_head: Optional[bool] = None,
                       grad_checkpointing: Optional[bool] = None, lean_trunk: Optional[bool] = None) -> None:
    """`LPIPS.set_memory_options` on every LPIPS inside `module` (a loss, a wrapper, an LPIPS)."""
    for m in module.modules():
        if isinstance(m, LPIPS):
            m.set_memory_options(lean_head=lean_head, grad_checkpointing=grad_checkpointing, lean_trunk=lean_trunk)


def add_lpips_memory_flags(group) -> None:
    """--lpips-lean-head / --lpips-lean-trunk / --lpips-grad-checkpointing of the tokenizer trainers."""
    import argparse

    group.add_argument("--lpips-lean-head", action=argparse.BooleanOptionalAction, default=True,
                       help="LPIPS's normalise/diff/lin head keeps only the two VGG feature maps for backward "
                            "(same loss and gradient, no recompute); --no-lpips-lean-head: the lpips package's graph")
    group.add_argument("--lpips-lean-trunk", action=argparse.BooleanOptionalAction, default=True,
                       help="LPIPS's frozen VGG keeps a 1-bit ReLU mask and a uint8 max-pool position per element for "
                            "backward instead of its activations and int64 indices (bit-identical, no recompute); "
                            "--no-lpips-lean-trunk: torch's conv/ReLU/max-pool graph")
    group.add_argument("--lpips-grad-checkpointing", action="store_true",
                       help="recompute LPIPS's VGG slices of the reconstruction in backward (memory, one more VGG forward)")


class ZeroPerceptual(nn.Module):
    """Stand-in perceptual distance returning zeros [B, 1, 1, 1] (what the parity fixtures use,
    and what a loss with perceptual_weight 0 needs: no VGG is built)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], 1, 1, 1)


class PerceptualLoss(nn.Module):
    """REPA-E's perceptual-loss container: a distance module `(x, y) -> [B, 1, 1, 1]` plus the
    constant ImageNet mean/std buffers its checkpoints carry (`perceptual_loss.imagenet_mean/std`;
    unused by LPIPS, kept so original state dicts load strictly)."""

    def __init__(self, distance: Optional[nn.Module] = None):
        super().__init__()
        self.lpips = distance if distance is not None else ZeroPerceptual()
        self.register_buffer("imagenet_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("imagenet_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x, y)


__all__ = ["LPIPS", "ZeroPerceptual", "PerceptualLoss", "INPUT_RANGES", "set_memory_options", "add_lpips_memory_flags"]
