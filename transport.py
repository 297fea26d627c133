"""Flow-matching transport of RAE stage 2: the training loss and the Euler ODE sampler.

Convention (RAE): t = 1 is noise, t = 0 data; x_t = (1 - t) x1 + t x0 with x1 the clean latent and
x0 ~ N(0, I); the model predicts the velocity u = x0 - x1. Times are drawn uniformly or
logit-normally on [0, 0.999] and then pushed towards the noise end by the dimension shift
t' = s t / (1 + (s - 1) t), s = sqrt(time_dist_shift_dim / time_dist_shift_base) (C*H*W of the
256px latent over 4096; NOT the size of whatever latent is being trained on).

Sampling integrates dx/dt = v(x, t) from t = 1 down to shift(0.001) (never 0) on the grid
t_k = shift(1 - linspace(0, 0.999, K)); K counts time points, so K - 1 model evaluations.
Guidance follows RAE's `sample_ddp.py`: classifier-free guidance on a doubled [cond; null] batch
with a per-sample inclusive [t_min, t_max] window, or autoguidance by a smaller guide model.

Public API: `create_transport(...) -> Transport` (`.sample_time`, `.training_losses`),
`Sampler(transport).sample_ode(...) -> sample_fn(x, model_fn, **model_kwargs) -> trajectory`, and
`cfg_velocity` / `autoguidance_velocity` (guided velocity functions for any stage-2 model), and
`sample_guided(...)` which builds the guided velocity and the batch as RAE's sampler does.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from samplers import shift_time

# t' = s t / (1 + (s - 1) t): with s > 1 more time is spent near the noise end (t = 1); the
# samplers' noise-time shift, under RAE's name.
time_shift = shift_time


def shift_from_dims(shift_dim: int, shift_base: int = 4096) -> float:
    """RAE's dimension-dependent shift s = sqrt(shift_dim / shift_base) (768*16*16 / 4096 -> 6.93)."""
    return math.sqrt(shift_dim / shift_base)


class Transport:
    """Linear-path, velocity-predicting flow matching with shifted uniform / logit-normal time."""

    def __init__(self, path_type: str = "Linear", prediction: str = "velocity", loss_weight: Optional[str] = None,
                 time_dist_type: str = "uniform", time_dist_shift: float = 1.0, t_max: float = 1 - 1 / 1000):
        if path_type.lower() != "linear":
            raise NotImplementedError(f"transport: path_type {path_type!r} is not supported (RAE trains with 'Linear')")
        if prediction.lower() != "velocity":
            raise NotImplementedError(f"transport: prediction {prediction!r} is not supported (RAE uses 'velocity')")
        if loss_weight not in (None, "None", "none"):
            raise NotImplementedError(f"transport: loss_weight {loss_weight!r} is not supported with velocity prediction")
        self.time_dist_type = time_dist_type
        self.time_dist_shift = float(time_dist_shift)
        self.t_max = t_max
        if time_dist_type == "uniform":
            self._logit_normal = None
        elif time_dist_type.startswith("logit-normal"):
            parts = time_dist_type.split("_")
            try:
                mu, sigma = (float(parts[1]), float(parts[2])) if len(parts) == 3 else (0.0, 1.0)
            except ValueError:
                raise ValueError(f"transport: time_dist_type {time_dist_type!r} must read logit-normal_<mu>_<sigma>") from None
            self._logit_normal = (mu, sigma)
        else:
            raise ValueError(f"transport: unknown time_dist_type {time_dist_type!r} (uniform, logit-normal_<mu>_<sigma>)")

    def sample_time(self, u: torch.Tensor) -> torch.Tensor:
        """Training times [B] from uniform draws u [B] in [0, 1): the distribution on [0, t_max], then the shift."""
        if self._logit_normal is None:
            t0 = u * self.t_max
        else:
            # inverse-CDF sampling of a logit-normal truncated to [0, t_max]: the lower bound is
            # logit(0) = -inf (CDF 0), the upper one Phi(beta)
            mu, sigma = self._logit_normal
            beta = (math.log(self.t_max / (1 - self.t_max)) - mu) / sigma
            cdf_hi = 0.5 * (1 + math.erf(beta / math.sqrt(2)))
            z = torch.special.ndtri(u * cdf_hi)
            t0 = torch.sigmoid(mu + sigma * z).clamp(0.0, self.t_max)
        return time_shift(t0, self.time_dist_shift)

    def training_losses(self, model: Callable, x1: torch.Tensor, model_kwargs: Optional[dict] = None,
                        noise: Optional[torch.Tensor] = None, u: Optional[torch.Tensor] = None) -> dict:
        """Per-sample flow-matching loss. x1 [B, ...] clean latents; `noise` and `u` replace the two
        random draws (for reproducible tests). Returns {loss [B], pred, t [B], xt, target}."""
        model_kwargs = model_kwargs or {}
        B = x1.shape[0]
        x0 = torch.randn_like(x1) if noise is None else noise
        if u is None:
            u = torch.rand((B,), device=x1.device)
        t = self.sample_time(u.to(x1.device, torch.float32))
        tb = t.view(B, *([1] * (x1.dim() - 1))).to(x1.dtype)
        xt = (1 - tb) * x1 + tb * x0
        target = x0 - x1
        pred = model(xt, t, **model_kwargs)
        loss = (pred.float() - target.float()).square().mean(dim=tuple(range(1, x1.dim())))
        return {"loss": loss, "pred": pred, "t": t, "xt": xt, "target": target}


def create_transport(path_type: str = "Linear", prediction: str = "velocity", loss_weight: Optional[str] = None,
                     train_eps=None, sample_eps=None, time_dist_type: str = "uniform",
                     time_dist_shift: float = 1.0) -> Transport:
    """RAE's factory signature (train_eps / sample_eps are accepted and unused: the linear path
    needs no clipping of t)."""
    return Transport(path_type, prediction, loss_weight, time_dist_type, time_dist_shift)


class Sampler:
    """ODE sampling of a Transport from noise (t = 1) to data on the shifted grid."""

    def __init__(self, transport: Transport):
        self.transport = transport

    def time_grid(self, num_steps: int, device=None) -> torch.Tensor:
        """[K] float32: shift(1 - linspace(0, 0.999, K)), from 1 down to shift(0.001) > 0."""
        if num_steps < 2:
            raise ValueError(f"sampler: num_steps counts time points and must be >= 2, got {num_steps}")
        u = 1 - torch.linspace(0, 1 - 1 / 1000, num_steps, device=device)
        return time_shift(u, self.transport.time_dist_shift)

    def sample_ode(self, sampling_method: str = "euler", num_steps: int = 50, atol: float = 1e-6,
                   rtol: float = 1e-3, reverse: bool = False) -> Callable:
        """Return sample_fn(x, model_fn, **model_kwargs) -> trajectory [K, *x.shape] (index 0 = x).

        `euler` and `heun` are fixed-grid steppers on the K time points; any other method name is
        handed to torchdiffeq's adaptive `odeint` (e.g. dopri5) with atol/rtol, returning the
        states at the same time points."""
        if reverse:
            raise NotImplementedError("sampler: reverse=True (data -> noise) is not supported")
        method = sampling_method.lower()

        def sample_fn(x: torch.Tensor, model_fn: Callable, **model_kwargs) -> torch.Tensor:
            ts = self.time_grid(num_steps, device=x.device)
            sample_fn.t = ts

            def velocity(x_, t_scalar):
                t_vec = torch.full((x_.shape[0],), float(t_scalar), device=x_.device, dtype=torch.float32)
                if getattr(model_fn, "takes_host_time", False):  # e.g. to decide guidance without a device read
                    return model_fn(x_, t_vec, t_host=float(t_scalar), **model_kwargs)
                return model_fn(x_, t_vec, **model_kwargs)

            if method in ("euler", "heun"):
                # times and steps read to the host once (the same float32 values), not once per step
                grid = self.time_grid(num_steps)
                t_host, dt_host = grid.tolist(), (grid[1:] - grid[:-1]).tolist()
                states = [x]
                for k in range(num_steps - 1):  # a loop over time steps, not over samples
                    dt = dt_host[k]
                    v = velocity(x, t_host[k])
                    if method == "heun":
                        v = 0.5 * (v + velocity(x + dt * v, t_host[k + 1]))
                    x = x + dt * v
                    states.append(x)
                return torch.stack(states)
            from torchdiffeq import odeint

            # torchdiffeq wants increasing time: integrate in s = -t
            return odeint(lambda s, x_: -velocity(x_, -s), x, -ts, method=method, atol=atol, rtol=rtol)

        sample_fn.t = self.time_grid(num_steps)
        return sample_fn


def _window(t: torch.Tensor, t_min: float, t_max: float, ndim: int) -> torch.Tensor:
    """Per-sample mask [B, 1, ...] of t_min <= t <= t_max (inclusive, as RAE's DiT^DH)."""
    return ((t >= t_min) & (t <= t_max)).view(-1, *([1] * (ndim - 1)))


def cfg_velocity(model: Callable, scale: float, t_min: float = 0.0, t_max: float = 1.0) -> Callable:
    """Velocity of classifier-free guidance on a [cond; null] batch of 2n rows, for any stage-2
    model's forward(x, t, y): u + scale * (c - u) per sample inside [t_min, t_max], else c, written
    to both halves (both halves evaluate x[:n], as DiTwDDTHead.forward_with_cfg)."""

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % 2:
            raise ValueError(f"cfg_velocity: batch must be [cond; null] halves, got {x.shape[0]}")
        n = x.shape[0] // 2
        out = model(torch.cat([x[:n], x[:n]]), t, y)
        c, u = out[:n], out[n:]
        guided = torch.where(_window(t[:n], t_min, t_max, out.dim()), u + scale * (c - u), c)
        return torch.cat([guided, guided])

    return fn


def autoguidance_velocity(model: Callable, guide: Callable, scale: float, t_min: float = 0.0,
                          t_max: float = 1.0) -> Callable:
    """Autoguidance g + scale * (m - g) per sample inside [t_min, t_max], else m (m = model, g = guide)."""

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m, g = model(x, t, y), guide(x, t, y)
        return torch.where(_window(t, t_min, t_max, m.dim()), g + scale * (m - g), m)

    return fn


def sample_guided(model, z: torch.Tensor, y: torch.Tensor, sample_fn: Callable, num_classes: int,
                  scale: float = 1.0, method: str = "cfg", t_min: float = 0.0, t_max: float = 1.0,
                  guide=None, double_autoguidance_batch: bool = False):
    """Sample as RAE's `sample_ddp.py` does, for any stage-2 model (DiT^DH, LightningDiT).
    Returns (samples [n, ...], trajectory [K, batch, ...]).

    scale <= 1: plain conditional velocity. method "cfg": the batch is [z; z] with labels
    [y; null] and guidance is applied per sample inside [t_min, t_max] (`cfg_velocity`).
    method "autoguidance": g + scale * (m - g) with the guide model. The original runs it on the
    doubled CFG batch and discards the null half (half its compute wasted); that is reproduced with
    `double_autoguidance_batch=True`, while the default runs the conditional batch only (same samples)."""
    n = z.shape[0]
    if scale <= 1.0:
        traj = sample_fn(z, model, y=y)
        return traj[-1], traj
    if method == "cfg":
        z2, y2 = torch.cat([z, z]), torch.cat([y, torch.full_like(y, num_classes)])
        traj = sample_fn(z2, cfg_velocity(model, scale, t_min, t_max), y=y2)
        return traj[-1][:n], traj
    if method == "autoguidance":
        if guide is None:
            raise ValueError("sampler: guidance method 'autoguidance' needs a guide model (guidance.guidance_model)")
        if double_autoguidance_batch:
            z, y = torch.cat([z, z]), torch.cat([y, torch.full_like(y, num_classes)])
        traj = sample_fn(z, autoguidance_velocity(model, guide, scale, t_min, t_max), y=y)
        return traj[-1][:n], traj
    raise ValueError(f"sampler: unknown guidance method {method!r} (cfg, autoguidance)")
