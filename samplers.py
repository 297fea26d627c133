"""Samplers for flow-matching models in the REPA-E / SiT convention: t = 1 is noise, t = 0 data,
x_t = alpha_t x + sigma_t eps, and the network predicts the velocity dx_t/dt.

* `euler_sampler`: Euler or Heun ODE on linspace(1, 0, K+1) in float64 (REPA-E's `euler_sampler`).
* `euler_maruyama_sampler`: the SDE sampler (diffusion w(t) = 2t, drift v - w/2 * score).
* `dopri5_sampler`: adaptive ODE through torchdiffeq.

Classifier-free guidance v_u + s (v_c - v_u) is applied only for t in [guidance_low,
guidance_high], and the batch is doubled only there. The null label is `model.num_classes` (the
original hard-codes 1000, which equals it for ImageNet models and breaks everything else).
`shift` warps the time grid, t' = s t / (1 + (s - 1) t) in noise time (s > 1 spends more steps
near noise; LightningDiT's data-time shift 0.3 is s = 1 / 0.3 here).

The model runs in the latents' dtype while the sampler state stays in float64, as the original.
Randomness of the SDE comes from `randn_like`, so a caller can key the noise by sample index.

The sampling code generate.py, the trainers (grids, periodic FID) and bench/sample.py share,
one code path for every family:
* index-keyed randomness (`index_normal`, `index_labels`, `IndexedSDENoise`): sample i's initial
  noise, label and SDE noise come from a counter-based generator (splitmix64 + Box-Muller) of
  (seed, i, stream, element), so images do not depend on the number of processes or the batch;
* guidance (`GuidedVelocity`: CFG on an interval, legacy-channel CFG, autoguidance) and the
  sampler call `run_sampler` (uniform grid or RAE's grid);
* `sample_batch` / `sample_for_eval`: uint8 images of sample indices, distributed over ranks.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from evaluation.metrics import broadcast_object, dist_info, images_to_uint8
from models.lightningdit import LEGACY_CFG_CHANNELS
from models.sit import interpolant


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Noise-time shift t' = s t / (1 + (s - 1) t) (s > 1 spends more steps near noise, t = 1)."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def _null_class(model, null_class: Optional[int]) -> int:
    if null_class is not None:
        return null_class
    if not hasattr(model, "num_classes"):
        raise ValueError("pass null_class: the model has no num_classes attribute")
    return int(model.num_classes)


class _Guided:
    """Velocity evaluation with interval-restricted classifier-free guidance.

    A model that guides itself (`GuidedVelocity` below: `is_guided(t)` and
    `guided_inference(x, t, y, guided)`) gets the sampler's decision passed in, so Heun's corrector
    at t_next is guided as t_cur's predictor was, whichever guidance the model implements."""

    def __init__(self, model, y, cfg_scale, guidance_low, guidance_high, null_class, model_dtype):
        self.model, self.y = model, y
        self.cfg_scale, self.low, self.high = cfg_scale, guidance_low, guidance_high
        self.self_guided = hasattr(model, "guided_inference") and hasattr(model, "is_guided")
        self.y_null = None if self.self_guided else torch.full_like(y, null_class)
        self.dtype = model_dtype

    def is_guided(self, t: float) -> bool:
        if self.self_guided:
            return self.model.is_guided(t)
        return self.cfg_scale > 1.0 and self.low <= t <= self.high

    def __call__(self, x: torch.Tensor, t: float, guided: bool) -> torch.Tensor:
        n = x.shape[0]
        if self.self_guided:
            tin = torch.full((n,), float(t), device=x.device, dtype=torch.float64).to(self.dtype)
            return self.model.guided_inference(x.to(self.dtype), tin, self.y, guided).to(torch.float64)
        if guided:
            xin, yin = torch.cat([x, x]), torch.cat([self.y, self.y_null])
        else:
            xin, yin = x, self.y
        tin = torch.full((xin.shape[0],), float(t), device=x.device, dtype=torch.float64).to(self.dtype)
        v = self.model.inference(xin.to(self.dtype), tin, yin).to(torch.float64)
        if guided:
            v_cond, v_uncond = v[:n], v[n:]
            v = v_uncond + self.cfg_scale * (v_cond - v_uncond)
        return v


def time_grid(num_steps: int, shift: float = 1.0, t_end: float = 0.0, device=None) -> torch.Tensor:
    t = torch.linspace(1.0, t_end, num_steps + 1, dtype=torch.float64, device=device)
    return shift_time(t, shift)


@torch.no_grad()
def euler_sampler(model, latents: torch.Tensor, y: torch.Tensor, num_steps: int = 20, heun: bool = False,
                  cfg_scale: float = 1.0, guidance_low: float = 0.0, guidance_high: float = 1.0,
                  path_type: str = "linear", shift: float = 1.0, null_class: Optional[int] = None) -> torch.Tensor:
    """Euler / Heun ODE from t = 1 to 0; returns float64 latents.

    Heun's correction reuses the guidance decision made at t_cur and is skipped on the last step
    (REPA-E's behaviour). `path_type` does not enter the ODE (the velocity is the ODE field).
    """
    v_fn = _Guided(model, y, cfg_scale, guidance_low, guidance_high, _null_class(model, null_class), latents.dtype)
    t_steps = time_grid(num_steps, shift).tolist()  # on the host: no device read per step
    x = latents.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        guided = v_fn.is_guided(t_cur)
        d_cur = v_fn(x, t_cur, guided)
        x_next = x + (t_next - t_cur) * d_cur
        if heun and i < num_steps - 1:
            d_prime = v_fn(x_next, t_next, guided)
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: float, path_type: str = "linear") -> torch.Tensor:
    """Score of p_t from the velocity field: (alpha/alpha' v - x) / (sigma^2 - alpha/alpha' sigma' sigma)."""
    tt = torch.tensor(t, dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = interpolant(path_type, tt)
    ratio = alpha / d_alpha
    var = sigma**2 - ratio * d_sigma * sigma
    return (ratio * v - x) / var


@torch.no_grad()
def euler_maruyama_sampler(model, latents: torch.Tensor, y: torch.Tensor, num_steps: int = 250,
                           cfg_scale: float = 1.0, guidance_low: float = 0.0, guidance_high: float = 1.0,
                           path_type: str = "linear", shift: float = 1.0, t_last: float = 0.04,
                           null_class: Optional[int] = None,
                           randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like) -> torch.Tensor:
    """Euler-Maruyama on linspace(1, t_last, num_steps), then one deterministic step to 0.

    dx = [v - w(t)/2 * score] dt + sqrt(w(t)) dW with w(t) = 2t (the REPA/SiT SDE). Guidance is
    applied to the velocity; the drift is affine in v with the x-term independent of the label, so
    this equals guiding the drift as the original does.
    """
    v_fn = _Guided(model, y, cfg_scale, guidance_low, guidance_high, _null_class(model, null_class), latents.dtype)
    t_steps = shift_time(torch.linspace(1.0, t_last, num_steps, dtype=torch.float64), shift)
    t_steps = t_steps.tolist() + [0.0]
    x = latents.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        dt = t_next - t_cur
        v = v_fn(x, t_cur, v_fn.is_guided(t_cur))
        diffusion = 2.0 * t_cur
        drift = v - 0.5 * diffusion * score_from_velocity(v, x, t_cur, path_type)
        if i < num_steps - 1:
            noise = randn_like(x).to(torch.float64)
            x = x + drift * dt + math.sqrt(diffusion) * math.sqrt(abs(dt)) * noise
        else:
            x = x + drift * dt  # final deterministic step to t = 0: the mean
    return x


@torch.no_grad()
def dopri5_sampler(model, latents: torch.Tensor, y: torch.Tensor, cfg_scale: float = 1.0,
                   guidance_low: float = 0.0, guidance_high: float = 1.0, rtol: float = 1e-5,
                   atol: float = 1e-5, shift: float = 1.0, null_class: Optional[int] = None) -> torch.Tensor:
    """Adaptive Dormand-Prince ODE from t = 1 to 0 through torchdiffeq (float64 state).

    With a shift the ODE is integrated in the warped time s, where t = shift_time(s)."""
    from torchdiffeq import odeint

    v_fn = _Guided(model, y, cfg_scale, guidance_low, guidance_high, _null_class(model, null_class), latents.dtype)

    def field(s, x):
        s = float(s)
        t = shift_time(torch.tensor(s, dtype=torch.float64), shift).item()
        # dt/ds of the shift map s -> k s / (1 + (k - 1) s)
        dtds = shift / (1 + (shift - 1) * s) ** 2
        return v_fn(x, t, v_fn.is_guided(t)) * dtds

    s_span = torch.tensor([1.0, 0.0], dtype=torch.float64, device=latents.device)
    return odeint(field, latents.to(torch.float64), s_span, rtol=rtol, atol=atol, method="dopri5")[-1]


SAMPLERS = {
    "euler": lambda model, z, y, **kw: euler_sampler(model, z, y, heun=False, **kw),
    "heun": lambda model, z, y, **kw: euler_sampler(model, z, y, heun=True, **kw),
    "sde": euler_maruyama_sampler,
    "dopri5": dopri5_sampler,
}


def sample(model, latents: torch.Tensor, y: torch.Tensor, mode: str = "ode", solver: str = "euler", **kwargs) -> torch.Tensor:
    """Dispatch: mode 'sde' -> Euler-Maruyama; mode 'ode' -> solver euler | heun | dopri5."""
    name = "sde" if mode == "sde" else solver
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler mode={mode} solver={solver}; solvers: euler, heun, dopri5; modes: ode, sde")
    if name == "dopri5":
        kwargs.pop("num_steps", None)
        kwargs.pop("path_type", None)
    if name in ("euler", "heun") or name == "dopri5":
        kwargs.pop("randn_like", None)
    return SAMPLERS[name](model, latents, y, **kwargs)


# ------------------------------------------------------------------------------------------------
# Index-keyed randomness: a counter-based generator, vectorised over the batch
# ------------------------------------------------------------------------------------------------
def _u64(v: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return v - (1 << 64) if v >= (1 << 63) else v


_M1, _M2, _GOLDEN = _u64(0xBF58476D1CE4E5B9), _u64(0x94D049BB133111EB), _u64(0x9E3779B97F4A7C15)
STREAM_NOISE, STREAM_LABEL, STREAM_SDE = 0, 1, 2  # SDE step k uses stream STREAM_SDE + k


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps mod 2^64)."""
    x = (x ^ _srl(x, 30)) * _M1
    x = (x ^ _srl(x, 27)) * _M2
    return x ^ _srl(x, 31)


def _keys(seed: int, indices: torch.Tensor, stream: int) -> torch.Tensor:
    """One 64-bit key per sample [B] from (seed, index, stream)."""
    k = _mix(torch.full_like(indices, _u64(seed % (1 << 64))) + _GOLDEN)
    k = _mix(k + indices * _GOLDEN)
    return _mix(k + _u64((stream * _GOLDEN) % (1 << 64)))


def index_bits(seed: int, indices: torch.Tensor, stream: int, numel: int) -> torch.Tensor:
    """Random int64 bits [B, numel]; element j of sample i depends only on (seed, i, stream, j)."""
    keys = _keys(seed, indices.to(torch.int64), stream)
    j = torch.arange(1, numel + 1, dtype=torch.int64, device=indices.device)
    return _mix(keys[:, None] + j[None, :] * _GOLDEN)


def index_uniform(seed: int, indices: torch.Tensor, stream: int, numel: int) -> torch.Tensor:
    """Uniform (0, 1) float64 [B, numel] from the top 53 bits."""
    bits = _srl(index_bits(seed, indices, stream, numel), 11)
    return (bits.double() + 0.5) * 2.0 ** -53


def index_normal(seed: int, indices: torch.Tensor, stream: int, shape: Sequence[int],
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal [B, *shape] (Box-Muller on the two 32-bit halves of each draw)."""
    numel = int(np.prod(shape))
    bits = index_bits(seed, indices, stream, numel)
    u1 = (_srl(bits, 32).double() + 0.5) * 2.0 ** -32
    u2 = ((bits & 0xFFFFFFFF).double() + 0.5) * 2.0 ** -32
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    return z.reshape(len(indices), *shape).to(dtype)


def index_labels(seed: int, indices: torch.Tensor, num_classes: int, mode: str = "random") -> torch.Tensor:
    """Class label per sample index: 'random' (uniform, keyed by (seed, i)) or 'equal'
    (i mod num_classes: exactly N / num_classes per class when num_classes divides N, whatever
    the world size, and a prefix of the same sequence for every N)."""
    if mode == "equal":
        return indices.to(torch.int64) % num_classes
    if mode == "random":
        u = index_uniform(seed, indices, STREAM_LABEL, 1)[:, 0]
        return (u * num_classes).floor().to(torch.int64).clamp_max(num_classes - 1)
    raise ValueError(f"--label-sampling must be 'random' or 'equal', got {mode!r}")


def class_label_table(classes: Sequence[int], n: int, per_class: Optional[int]) -> torch.Tensor:
    """The label of each sample index [n]: blocks of `per_class` per class, or the classes cycled."""
    c = torch.as_tensor(list(classes), dtype=torch.int64)
    idx = torch.arange(n)
    return c[idx // per_class] if per_class else c[idx % len(c)]


class IndexedSDENoise:
    """The SDE sampler's `randn_like` hook: call k returns the noise of step k for these indices."""

    def __init__(self, seed: int, indices: torch.Tensor):
        self.seed, self.indices, self.step = seed, indices, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        noise = index_normal(self.seed, self.indices, STREAM_SDE + self.step, x.shape[1:], torch.float64)
        self.step += 1
        return noise.to(device=x.device, dtype=x.dtype)


# ------------------------------------------------------------------------------------------------
# Guidance and the sampler call (one code path for every family, used by generate.py and trainers)
# ------------------------------------------------------------------------------------------------
class GuidedVelocity:
    """The sampled field: `model` (anything with `.inference(x, t, y)` and `.num_classes` in the
    toolkit's convention) with classifier-free guidance or autoguidance on [low, high] of noise time.

    CFG: u + s (c - u) from ONE call on the doubled [cond; null] batch, only inside the interval
    (outside, one call on the n conditional rows). `cfg_channels=k` guides channels 0..k-1 only and
    keeps the conditional velocity elsewhere (hustvl LightningDiT's legacy CFG, k = 3).
    Autoguidance (`guide` given): g + s (m - g) with ONE call of the main and ONE of the guide
    model, both on the n conditional rows (no doubled batch). Guided velocities are float64.
    `compile_mode` (see `compiled_guided_velocity`): the whole guided evaluation runs as one
    compiled graph; a `compile_backend` other than inductor serves tests."""

    def __init__(self, model, scale: float = 1.0, low: float = 0.0, high: float = 1.0, guide=None,
                 cfg_channels: Optional[int] = None, compile_mode: Optional[str] = None,
                 compile_backend: str = "inductor"):
        if guide is not None and int(guide.num_classes) != int(model.num_classes):
            raise ValueError(f"the guide model has {guide.num_classes} classes, the main model {model.num_classes}")
        if guide is not None and cfg_channels is not None:
            raise ValueError("--cfg-legacy-channels applies to classifier-free guidance, not to autoguidance")
        self.model, self.guide = model, guide
        self.scale, self.low, self.high = float(scale), float(low), float(high)
        self.cfg_channels = None if cfg_channels is None else int(cfg_channels)
        self._velocity = compiled_guided_velocity(compile_mode, compile_backend) if compile_mode else _guided_velocity
        self.cudagraphs = compile_mode == "reduce-overhead" and compile_backend == "inductor" \
            and torch.cuda.is_available()

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    def is_guided(self, t: float) -> bool:
        return self.scale > 1.0 and self.low <= t <= self.high

    def inference(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # every sampler passes one time for the whole batch: t[0] decides (as the originals)
        # unguided fields never read t to the host (a device wait per step on CUDA)
        return self.guided_inference(x, t, y, self.scale > 1.0 and self.is_guided(float(t[0])))

    def guided_inference(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, guided: bool) -> torch.Tensor:
        """The velocity with the guidance decision made by the caller: samplers.py decides once per
        step at t_cur and Heun's corrector at t_next reuses it (REPA-E's euler_sampler)."""
        if self.cudagraphs:  # each call may replay a graph: its output buffers are the graph's
            torch.compiler.cudagraph_mark_step_begin()
        out = self._velocity(self.model, self.guide, x, t, y, guided, self.scale, self.cfg_channels)
        # a later replay would overwrite the output, and Heun still needs the predictor's
        return out.clone() if self.cudagraphs else out


def _guided_velocity(model, guide, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, guided: bool, scale: float,
                     cfg_channels: Optional[int]) -> torch.Tensor:
    """One guided velocity evaluation (see `GuidedVelocity`); a function of its arguments alone, so
    torch.compile turns it (cat, network, guidance combine) into one graph per guided/unguided shape."""
    if not guided:
        return model.inference(x, t, y)
    if guide is not None:
        m = model.inference(x, t, y).double()  # [n, C, h, w]
        g = guide.inference(x, t, y).double()
        return g + scale * (m - g)
    n = x.shape[0]
    y_null = torch.full_like(y, int(model.num_classes))
    out = model.inference(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).double()  # [2n, ...]
    cond, uncond = out[:n], out[n:]
    v = uncond + scale * (cond - uncond)
    if cfg_channels is not None:
        v = torch.cat([v[:, :cfg_channels], cond[:, cfg_channels:]], dim=1)
    return v


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


@functools.lru_cache(maxsize=None)
def compiled_guided_velocity(mode: str = "default", backend: str = "inductor") -> Callable:
    """`_guided_velocity` under torch.compile, built once per (mode, backend): the guards (model
    identity, guided flag, shapes) pick the graph, so the fields of every batch share the compiled
    graphs. Fixed shapes (dynamic=False): sample_for_eval pads to full batches, and
    'reduce-overhead' records one CUDA graph per shape (guided [2n] and unguided [n] rows)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"--compile-mode must be one of {COMPILE_MODES}, got {mode!r}")
    return torch.compile(_guided_velocity, backend=backend, dynamic=False,
                         mode=mode if backend == "inductor" else None)


def run_sampler(model, z: torch.Tensor, y: torch.Tensor, sampler_kwargs: dict,
                randn_like: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Integrate from noise z [B, C, h, w] (float32) to normalised latents (float64).

    sampler_kwargs: those of `samplers.sample` (mode, solver, num_steps, shift, path_type, t_last,
    rtol, atol) plus cfg_scale, guidance_low, guidance_high, cfg_channels (int or None), guide (a
    VelocityModel or None), compile_mode (None: eager; see `compiled_guided_velocity`) and time_grid ("uniform": samplers.py's linspace(1, 0, steps + 1);
    "rae": transport.py's RAE grid of num_steps points, ODE only)."""
    kw = dict(sampler_kwargs)
    field = GuidedVelocity(model, kw.pop("cfg_scale", 1.0), kw.pop("guidance_low", 0.0), kw.pop("guidance_high", 1.0),
                           kw.pop("guide", None), kw.pop("cfg_channels", None), kw.pop("compile_mode", None),
                           kw.pop("compile_backend", "inductor"))
    grid = kw.pop("time_grid", "uniform")
    if grid == "rae":
        import transport

        if kw.get("mode", "ode") != "ode":
            raise ValueError("--time-grid rae is RAE's ODE grid: use --mode ode")
        sampler = transport.Sampler(transport.Transport(time_dist_shift=float(kw.get("shift", 1.0))))
        sample_fn = sampler.sample_ode(kw.get("solver", "euler"), int(kw.get("num_steps", 50)),
                                       atol=kw.get("atol", 1e-6), rtol=kw.get("rtol", 1e-3))

        def velocity(x, t, y, t_host):  # the model runs in z's dtype, the state stays float64
            # guidance decided on the host time the sampler passes: no device read per step
            guided = field.scale > 1.0 and field.is_guided(t_host)
            return field.guided_inference(x.to(z.dtype), t.to(z.dtype), y, guided).to(x.dtype)

        velocity.takes_host_time = True

        return sample_fn(z.double(), velocity, y=y)[-1]
    if grid != "uniform":
        raise ValueError(f"--time-grid must be 'uniform' or 'rae', got {grid!r}")
    if kw.get("mode") == "sde" and randn_like is not None:
        kw["randn_like"] = randn_like
    return sample(field, z, y, cfg_scale=1.0, **kw)  # the field guides itself


def sampler_kwargs_from_args(args) -> dict:
    """`run_sampler` kwargs from the flags (the guide model is added by the caller)."""
    kw = dict(mode=args.mode, solver=args.solver, num_steps=args.num_steps, cfg_scale=args.cfg_scale,
              guidance_low=args.guidance_low, guidance_high=args.guidance_high, path_type=args.path_type,
              shift=args.shift, time_grid=args.time_grid,
              cfg_channels=LEGACY_CFG_CHANNELS if args.cfg_legacy_channels else None,
              compile_mode=(getattr(args, "compile_mode", None) or "default") if getattr(args, "compile", False) else None)
    if args.mode == "sde":
        kw["t_last"] = args.t_last
    if args.mode == "ode" and args.solver == "dopri5":
        kw.update(rtol=args.rtol, atol=args.atol)
    return kw


# ------------------------------------------------------------------------------------------------
# Index-keyed batches of images (generate.py's loop, the trainers' grids and evaluation)
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_batch(model, decode_fn: Callable[[torch.Tensor], torch.Tensor], latent_shape: Sequence[int],
                 num_classes: int, indices: torch.Tensor, seed: int, sampler_kwargs: dict, device,
                 label_sampling: str = "random", autocast_dtype: Optional[torch.dtype] = None,
                 uint8_conversion: str = "truncate", labels: Optional[torch.Tensor] = None,
                 decode_precision: str = "fp32") -> torch.Tensor:
    """uint8 images [B, C, H, W] for sample indices [B]; depends only on (seed, indices, config).
    `uint8_conversion`: see evaluation.metrics.images_to_uint8 (truncate: the originals');
    `labels`: a label per sample index (e.g. `class_label_table`) instead of `label_sampling`;
    `decode_precision`: fp32 (the originals') or bf16 (the decoder under bf16 autocast)."""
    if decode_precision not in DECODE_PRECISIONS:
        raise ValueError(f"--decode-precision must be one of {DECODE_PRECISIONS}, got {decode_precision!r}")
    device = torch.device(device)
    indices = indices.to(device=device, dtype=torch.int64)
    z = index_normal(seed, indices, STREAM_NOISE, tuple(int(v) for v in latent_shape)).to(device)
    if labels is not None:
        y = labels.to(torch.int64)[indices.cpu()].to(device)
    else:
        y = index_labels(seed, indices, num_classes, label_sampling).to(device)
    noise = IndexedSDENoise(seed, indices) if sampler_kwargs.get("mode") == "sde" else None
    use_amp = autocast_dtype is not None
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=use_amp):
        latents = run_sampler(model, z, y, sampler_kwargs, noise)  # float64 [B, C, h, w], normalised
    latents = latents.float()
    if latents.is_cuda:  # cuDNN's NHWC convolutions (see prepare_decoder); the values are the same
        latents = latents.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=decode_precision == "bf16"):
        images = decode_fn(latents).float()  # [B, 3, H, W] in [-1, 1]
    return images_to_uint8(images, uint8_conversion)


DECODE_PRECISIONS = ("fp32", "bf16")


def prepare_decoder(decoder: torch.nn.Module, device) -> torch.nn.Module:
    """The decoder on `device`, channels_last on CUDA: the conv decoders (SD-VAE, VA-VAE, VQGAN)
    then run cuDNN's NHWC kernels, faster than NCHW under tensor cores; other layers ignore it."""
    decoder = decoder.to(device)
    return decoder.to(memory_format=torch.channels_last) if torch.device(device).type == "cuda" else decoder


@torch.no_grad()
def sample_for_eval(model, decode_fn: Callable[[torch.Tensor], torch.Tensor], latent_shape: Sequence[int],
                    num_classes: int, n: int, seed: int, batch_size: int, sampler_kwargs: dict, device,
                    label_sampling: str = "random", autocast_dtype: Optional[torch.dtype] = None,
                    indices: Optional[Sequence[int]] = None,
                    on_batch: Optional[Callable[[List[int], np.ndarray], None]] = None,
                    gather: bool = True, progress: bool = False, uint8_conversion: str = "truncate",
                    labels: Optional[torch.Tensor] = None, decode_precision: str = "fp32",
                    on_decoded: Optional[Callable[[List[int], torch.Tensor], None]] = None) -> Optional[np.ndarray]:
    """Samples 0..n-1 (or `indices`) as uint8 [n, H, W, 3] in index order, on every rank.

    `model`: a VelocityModel-like object (`.inference(x, t, y)`, `.num_classes`) in the toolkit's
    convention; `decode_fn`: normalised latents -> images in [-1, 1] (e.g. `LatentDecoder`);
    `sampler_kwargs`: see `run_sampler`. Distributed-aware (collective when gather=True): rank r
    makes indices[r::world] in full batches of `batch_size` (short batches padded with repeats
    and the padding discarded: kernels pick algorithms by batch size), then every rank gathers
    all of them. Noise, labels and SDE noise are keyed by sample index (see index_normal), so the
    result does not depend on the number of processes. `on_batch(chunk, images [b, H, W, 3])` is
    called after each local batch (generate.py hands its PNGs to a background writer there, with
    gather=False); `on_decoded(chunk, images uint8 [b, C, H, W] on the device)` before that, while
    the batch is still on the device (generate.py's streamed Inception features)."""
    rank, world = dist_info()
    todo = list(range(n)) if indices is None else [int(i) for i in indices]
    mine = todo[rank::world]
    parts = []
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="sampling", unit="img", dynamic_ncols=True)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        idx = torch.tensor(chunk + [chunk[-1]] * (batch_size - len(chunk)), dtype=torch.int64)
        images = sample_batch(model, decode_fn, latent_shape, num_classes, idx, seed, sampler_kwargs, device,
                              label_sampling, autocast_dtype, uint8_conversion, labels, decode_precision)
        if on_decoded is not None:
            on_decoded(chunk, images[:len(chunk)])
        if on_batch is not None or gather:  # else (streamed features only) the images stay on the device
            arr = images[:len(chunk)].permute(0, 2, 3, 1).contiguous().cpu()  # [b, H, W, 3]
            if on_batch is not None:
                on_batch(chunk, arr.numpy())
            if gather:
                parts.append(arr)
        if bar is not None:
            bar.update(min(len(chunk) * world, len(todo) - bar.n))
    if bar is not None:
        bar.close()
    if not gather:
        return None
    if not todo:
        return np.zeros((0, 0, 0, 3), np.uint8)
    if world == 1:
        return torch.cat(parts).numpy()
    from evaluation.metrics import _comm_device

    # rank 0 always holds the first index, hence the image shape
    shape = broadcast_object(tuple(parts[0].shape[1:]) if rank == 0 and parts else None)
    per_rank = -(-len(todo) // world)
    local = torch.cat(parts) if parts else torch.zeros((0, *shape), dtype=torch.uint8)
    padded = torch.zeros((per_rank, *shape), dtype=torch.uint8)
    padded[:len(local)] = local
    padded = padded.to(_comm_device(padded))
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    out = np.empty((len(todo), *shape), dtype=np.uint8)
    for r in range(world):  # a loop over ranks: rank r made positions r, r + world, ...
        count = len(todo[r::world])
        out[r::world] = gathered[r][:count].cpu().numpy()
    return out
