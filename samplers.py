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
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

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

    A model that guides itself (generate.GuidedVelocity: `is_guided(t)` and
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
