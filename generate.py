"""Sample a trained latent diffusion transformer for FID: distributed, resumable, index-keyed.

  torchrun --nproc_per_node 8 generate.py --exp-dir exps/NAME --ckpt-step 400000 --recipe repae-sde-250 --eval --ref-batch VIRTUAL_imagenet256_labeled.npz
  accelerate launch --multi_gpu generate.py ...      |      python generate.py ...   (one process)
  REPA-E's own command works as is: its names (--exp-path, --train-steps, --pproc-batch-size, --tf32)
  are aliases of ours and its defaults hold (--cfg-scale 1.5, 128 per process, equal labels).

Model sources
* `--exp-dir` of `train_repae.py` (SiT + its tuned VAE and latent statistics) or of
  `train_ldm_only.py` (SiT / LightningDiT / DiT^DH: the checkpoint's `model_config` rebuilds the
  network, its `latent_stats` {mean, std} denormalise, its `tokenizer` record names the tokenizer,
  rebuilt from the run's flags or from --tokenizer/--vae/--vae-ckpt/--rae-config, and refused when
  its weight fingerprint differs from the recorded one). EMA weights unless --no-ema.
* `--ckpt FILE --model NAME`, the released checkpoints:
  - REPA-E SiT (`--vae f8d4 --vae-ckpt e2e-vae.pt`, statistics from the checkpoint, --vae-stats or
    the SiT's BatchNorm);
  - the ORIGINAL SiT / DiT-style releases (final layer with 2C outputs, `learn_sigma`: the first C
    are used; no projectors, no BatchNorm: give --vae-stats or --latent-scale 0.18215 for SD-VAE);
  - hustvl LightningDiT (`--model LightningDiT-XL/1 --tokenizer vavae --vae vavae-f16d32
    --vae-ckpt vavae.pt --vae-stats latents_stats.pt` with {mean, std} [1, 32, 1, 1];
    `--recipe lightningdit-euler-250`, `--cfg-legacy-channels` for the original's CFG on the
    first 3 channels only);
  - RAE DiT^DH / LightningDiT (`--model DiTDH-XL --tokenizer rae --rae-config cfg.yaml`,
    per-position {mean, var} statistics (std = sqrt(var + 1e-5)) from the config or --vae-stats;
    `--recipe rae-ddt-ode-50`).
  Network options (qk-norm, SwiGLU, RMSNorm, RoPE, Gaussian-Fourier time, learn_sigma, projector
  widths, label table size) are read off the state_dict, which is then loaded strictly.

Time convention. The samplers work in the toolkit's convention (t = 1 noise, v = eps - x);
networks trained with t = 1 as DATA (target x - eps) are evaluated as -net(x, 1 - t, y)
(`models.diffusion.VelocityModel(data_at_one=True)`), chosen by --time-convention (auto: data-at-1
for hustvl LightningDiT and for learn_sigma SiT releases, noise-at-1 otherwise).
Verified here: the adapter itself (an analytic field integrated both ways gives the same
endpoint, tests/test_generate.py) and hustvl LightningDiT's convention (its spec: x_t = t x1 +
(1 - t) eps). ASSUMED, not checked against released weights (no network here): that the original
SiT release was trained with SiT's default linear ICPlan, x_t = t x1 + (1 - t) x0 (t = 1 data),
target x1 - x0 — if samples of such a checkpoint are noise, try --time-convention noise-at-1.

Guidance: classifier-free (`--cfg-scale` inside [--guidance-low, --guidance-high] of noise time,
the batch doubled only there) or autoguidance (`--guidance autoguidance --guide-ckpt FILE
--guide-model NAME` or `--guide-exp-dir DIR`): v = g + s (m - g) with the main and the guide
model each run once per step on the conditional rows only (RAE's sampler runs both on a doubled
batch and discards half). `--time-grid rae` integrates on RAE's grid shift(1 - linspace(0, 0.999,
K)) (K = --num-steps points) with `--shift auto` = sqrt(C h w / 4096).

Randomness is keyed by sample index, never by rank: sample i's initial noise, label and SDE noise
come from a counter-based generator (splitmix64 + Box-Muller) of (seed, i, stream, element),
drawn for the whole batch at once. The images are therefore identical for any number of
processes, any batch size and on CPU or GPU (up to the model's floating point).

Output: `<sample-dir>/<folder>/{index:06d}.png` (written atomically; `<folder>` is REPA-E's
EXP_STEP_cfgS-LOW-HIGH-labelsampling-L for an experiment), the folder's `sampling_config.json` (a
folder holding samples of another configuration — sampler, model family, time convention, guide,
tokenizer fingerprint, uint8 conversion... — is refused), `labels.npy` / `labels.csv` (every
sample's class) and `<sample-dir>/<folder>.npz` with `arr_0` uint8 [N, H, W, 3] (1-channel
tokenizers: [N, H, W, 1]) for the ADM evaluator, exactly samples 0..N-1. Images are truncated to
uint8 as the originals (`--uint8-conversion round` rounds). A restarted run only generates the
missing indices. `--classes` / `--samples-per-class` choose the labels by class name or id. `--eval` computes FID/sFID/IS/KID/precision/recall in-process (evaluation.metrics, the
same code the trainers call). Trainers sample for periodic FID through `sample_for_eval`, the
function this script's loop runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import utils
from evaluation.metrics import ALL_METRICS, UINT8_CONVERSIONS, barrier, broadcast_object, dist_info, evaluate_samples, \
    images_to_uint8
from models.autoencoder import VAE_PRESETS, build_vae, denormalize_latents, load_latents_stats, load_vae, \
    vae_state_dict_from_checkpoint
from models.diffusion import DIFFUSION_MODELS, VelocityModel, build_diffusion_model, default_time_convention, \
    model_family
from models.lightningdit import LEGACY_CFG_CHANNELS
from models.sit import SIT_SIZES, SiT_models, bn_latent_stats
from samplers import sample

RECIPE_DIR = Path(__file__).resolve().parent / "configs" / "sampling"
PNG_RE = re.compile(r"^(\d{6,})\.png$")
RNG_VERSION = "splitmix64-boxmuller-v1"
# Keys of sampling_config.json that do not change the images (may differ between runs).
NON_IDENTITY_KEYS = {"num_fid_samples", "per_proc_batch_size", "world_size", "created"}


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
    model, both on the n conditional rows (no doubled batch). Guided velocities are float64."""

    def __init__(self, model, scale: float = 1.0, low: float = 0.0, high: float = 1.0, guide=None,
                 cfg_channels: Optional[int] = None):
        if guide is not None and int(guide.num_classes) != int(model.num_classes):
            raise ValueError(f"the guide model has {guide.num_classes} classes, the main model {model.num_classes}")
        if guide is not None and cfg_channels is not None:
            raise ValueError("--cfg-legacy-channels applies to classifier-free guidance, not to autoguidance")
        self.model, self.guide = model, guide
        self.scale, self.low, self.high = float(scale), float(low), float(high)
        self.cfg_channels = cfg_channels

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
        if not guided:
            return self.model.inference(x, t, y)
        if self.guide is not None:
            m = self.model.inference(x, t, y).double()  # [n, C, h, w]
            g = self.guide.inference(x, t, y).double()
            return g + self.scale * (m - g)
        n = x.shape[0]
        y_null = torch.full_like(y, self.num_classes)
        out = self.model.inference(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).double()  # [2n, ...]
        cond, uncond = out[:n], out[n:]
        guided = uncond + self.scale * (cond - uncond)
        if self.cfg_channels is not None:
            k = int(self.cfg_channels)
            guided = torch.cat([guided[:, :k], cond[:, k:]], dim=1)
        return guided


GUIDANCE_KEYS = ("cfg_scale", "guidance_low", "guidance_high", "guide", "cfg_channels", "time_grid")


def run_sampler(model, z: torch.Tensor, y: torch.Tensor, sampler_kwargs: dict,
                randn_like: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Integrate from noise z [B, C, h, w] (float32) to normalised latents (float64).

    sampler_kwargs: those of `samplers.sample` (mode, solver, num_steps, shift, path_type, t_last,
    rtol, atol) plus cfg_scale, guidance_low, guidance_high, cfg_channels (int or None), guide (a
    VelocityModel or None) and time_grid ("uniform": samplers.py's linspace(1, 0, steps + 1);
    "rae": transport.py's RAE grid of num_steps points, ODE only)."""
    kw = dict(sampler_kwargs)
    field = GuidedVelocity(model, kw.pop("cfg_scale", 1.0), kw.pop("guidance_low", 0.0), kw.pop("guidance_high", 1.0),
                           kw.pop("guide", None), kw.pop("cfg_channels", None))
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


def add_training_eval_flags(p) -> None:
    """The trainers' periodic FID flags (train_ldm_only.py, train_repae.py)."""
    g = p.add_argument_group("evaluation (FID of EMA samples, the code path of generate.py --eval)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps and at the end (0: off)")
    g.add_argument("--eval-samples", type=int, default=10000, help="samples per evaluation (index-keyed: the same noise and labels every time)")
    g.add_argument("--eval-reference", type=str, default=None, help="reference .npz: images (arr_0) and/or ADM statistics (mu, sigma)")
    g.add_argument("--eval-metrics", type=str, default="fid,is", help="comma list of fid, sfid, is, kid, prc")
    g.add_argument("--eval-batch-size", type=int, default=64, help="sampling batch per process")
    g.add_argument("--eval-num-steps", type=int, default=50, help="Euler steps of the evaluation sampler")
    g.add_argument("--eval-cfg-scale", type=float, default=1.0, help="guidance scale of the evaluation samples")
    g.add_argument("--eval-label-sampling", type=str, default="equal", choices=["random", "equal"], help="labels of the evaluation samples")
    g.add_argument("--inception-weights", type=str, default=None, help="local torch-fidelity Inception weights (offline)")
    g.add_argument("--random-init-inception", action="store_true", help="random Inception (offline tests; not a real FID)")
    g.add_argument("--inception-size", type=int, default=299, help="Inception input size (299 = protocol)")


def euler_kwargs(num_steps: int, cfg_scale: float, shift: float = 1.0) -> dict:
    """The trainers' sampler: Euler ODE with CFG over the whole time range."""
    return dict(mode="ode", solver="euler", num_steps=num_steps, cfg_scale=cfg_scale, shift=shift)


def grid_row_labels(n: int, num_classes: int) -> torch.Tensor:
    """Labels [n] that give each row of `utils.save_image_grid`'s layout (ceil(sqrt(n)) images per
    row) one class: row r shows class r (classes 0..rows-1 when there are more classes than rows)."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return (torch.arange(n) // cols) % max(1, int(num_classes))


def caption_rows(images: torch.Tensor, labels: torch.Tensor, names: Dict[int, str]) -> torch.Tensor:
    """Write each grid row's class name into the top-left corner of its first image (uint8
    [n, C, H, W], white text on a black box; PIL's built-in font, so it works offline)."""
    from PIL import Image, ImageDraw

    cols = max(1, math.ceil(math.sqrt(len(images))))
    out = images.clone()
    for first in range(0, len(images), cols):
        arr = out[first].permute(1, 2, 0).numpy()
        im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        draw = ImageDraw.Draw(im)
        text = str(names.get(int(labels[first]), int(labels[first])))
        box = draw.textbbox((1, 1), text)
        draw.rectangle(box, fill=0)
        draw.text((1, 1), text, fill=255 if im.mode == "L" else (255, 255, 255))
        a = np.array(im)
        out[first] = torch.from_numpy(a[..., None] if a.ndim == 2 else a).permute(2, 0, 1)
    return out


@torch.no_grad()
def training_sample_grid(field, decode_fn, latent_shape, num_classes: int, n: int, seed: int, num_steps: int,
                         cfg_scale: float, device, shift: float = 1.0,
                         class_names: Optional[Dict[int, str]] = None) -> torch.Tensor:
    """Samples 0..n-1 as images [n, C, H, W] in [0, 1] for the trainers' grids, one class per grid
    row (`grid_row_labels`), each row captioned with its class name when `class_names` {id: name}
    is given: index-keyed, so every grid of a run shows the same noise and labels."""
    labels = grid_row_labels(n, num_classes)
    images = sample_batch(field, decode_fn, latent_shape, num_classes, torch.arange(n), seed,
                          euler_kwargs(num_steps, cfg_scale, shift), device, labels=labels).cpu()
    if class_names:
        images = caption_rows(images, labels, class_names)
    return images.float() / 255


@torch.no_grad()
def evaluate_generation(field, decode_fn, latent_shape, num_classes: int, args, device, step: int, accelerator,
                        logger, shift: float = 1.0) -> Dict[str, float]:
    """Collective: FID etc. of `args.eval_samples` Euler samples of `field` (index-keyed, so every
    evaluation of a run sees the same noise and labels) against `args.eval_reference`, through the
    same `sample_for_eval` + `evaluate_samples` path as generate.py --eval. Logged to the trackers."""
    from evaluation.metrics import get_extractor

    extractor = get_extractor(weights_path=args.inception_weights, device=device, image_size=args.inception_size,
                              random_init=args.random_init_inception)
    kw = euler_kwargs(args.eval_num_steps, args.eval_cfg_scale, shift)
    images = sample_for_eval(field, decode_fn, latent_shape, num_classes, args.eval_samples, args.seed,
                             args.eval_batch_size, kw, device, label_sampling=args.eval_label_sampling,
                             progress=accelerator.is_main_process)
    metrics = [m.strip() for m in args.eval_metrics.split(",") if m.strip()]
    from evaluation.metrics import format_scores

    scores = evaluate_samples(images, args.eval_reference, inception=extractor, metrics=metrics, device=device)
    numbers = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    accelerator.log({f"eval/{k}": v for k, v in numbers.items()}, step=step)
    logger.info(f"eval at step {step}: " + format_scores(scores))
    # the random-Inception label travels into the trainers' summary.json with the figures
    return numbers | ({"inception": scores["inception"]} if "inception" in scores else {})


class LatentDecoder(nn.Module):
    """Normalised latents [B, C, h, w] -> images [B, 3, H, W] in about [-1, 1]: z * std + mean
    (statistics [C, 1, 1], [1, C, 1, 1] or [C, h, w]), then the tokenizer's / VAE's `decode`."""

    def __init__(self, tokenizer: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.tokenizer = tokenizer
        self.register_buffer("mean", torch.as_tensor(mean).float().clone())
        self.register_buffer("std", torch.as_tensor(std).float().clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(z * self.std + self.mean)


@torch.no_grad()
def sample_batch(model, decode_fn: Callable[[torch.Tensor], torch.Tensor], latent_shape: Sequence[int],
                 num_classes: int, indices: torch.Tensor, seed: int, sampler_kwargs: dict, device,
                 label_sampling: str = "random", autocast_dtype: Optional[torch.dtype] = None,
                 uint8_conversion: str = "truncate", labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 images [B, C, H, W] for sample indices [B]; depends only on (seed, indices, config).
    `uint8_conversion`: see evaluation.metrics.images_to_uint8 (truncate: the originals');
    `labels`: a label per sample index (e.g. `class_label_table`) instead of `label_sampling`."""
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
    images = decode_fn(latents.float()).float()  # [B, 3, H, W] in [-1, 1]
    return images_to_uint8(images, uint8_conversion)


@torch.no_grad()
def sample_for_eval(model, decode_fn: Callable[[torch.Tensor], torch.Tensor], latent_shape: Sequence[int],
                    num_classes: int, n: int, seed: int, batch_size: int, sampler_kwargs: dict, device,
                    label_sampling: str = "random", autocast_dtype: Optional[torch.dtype] = None,
                    indices: Optional[Sequence[int]] = None,
                    on_batch: Optional[Callable[[List[int], np.ndarray], None]] = None,
                    gather: bool = True, progress: bool = False, uint8_conversion: str = "truncate",
                    labels: Optional[torch.Tensor] = None) -> Optional[np.ndarray]:
    """Samples 0..n-1 (or `indices`) as uint8 [n, H, W, 3] in index order, on every rank.

    `model`: a VelocityModel-like object (`.inference(x, t, y)`, `.num_classes`) in the toolkit's
    convention; `decode_fn`: normalised latents -> images in [-1, 1] (e.g. `LatentDecoder`);
    `sampler_kwargs`: see `run_sampler`. Distributed-aware (collective when gather=True): rank r
    makes indices[r::world] in full batches of `batch_size` (short batches padded with repeats
    and the padding discarded: kernels pick algorithms by batch size), then every rank gathers
    all of them. Noise, labels and SDE noise are keyed by sample index (see index_normal), so the
    result does not depend on the number of processes. `on_batch(chunk, images [b, H, W, 3])` is
    called after each local batch (generate.py writes its PNGs there, with gather=False)."""
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
                              label_sampling, autocast_dtype, uint8_conversion, labels)
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


@torch.no_grad()
def generate_images(model, vae, latent_stats: Dict[str, torch.Tensor], indices: torch.Tensor, seed: int,
                    sampler_kwargs: dict, num_classes: int, label_sampling: str = "random",
                    autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """REPA-E SiT + VAE shortcut of `sample_batch` (latents denormalised with latents_scale/bias)."""
    device = next(model.parameters()).device
    side = int(round(math.sqrt(model.x_embedder.num_patches))) * model.patch_size
    decode = lambda z: vae.decode(denormalize_latents(z, latent_stats))
    return sample_batch(model, decode, (model.in_channels, side, side), num_classes, indices, seed, sampler_kwargs,
                        device, label_sampling, autocast_dtype)


# ------------------------------------------------------------------------------------------------
# Loading models: experiment folders and released checkpoints
# ------------------------------------------------------------------------------------------------
class SamplingSetup:
    """What sampling needs: the velocity field (main model, and the guide if any), the decoder of
    normalised latents, the latent shape, the label count, a default sampling shift and `info`
    (sources and identities recorded in sampling_config.json)."""

    def __init__(self, model: VelocityModel, decoder: LatentDecoder, latent_shape: Sequence[int], num_classes: int,
                 info: dict, default_shift: Optional[float] = None):
        self.model, self.decoder, self.guide = model, decoder, None
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.num_classes, self.info, self.default_shift = int(num_classes), info, default_shift


def _checkpoint_weights(obj, path, use_ema: bool) -> dict:
    """The network's state_dict from a released / trained checkpoint: obj['ema'] (or 'model'),
    or obj itself; a DDP 'module.' prefix is removed."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state_dict or a dict with 'ema'/'model', got {type(obj).__name__}")
    sd = None
    for key in (("ema", "model") if use_ema else ("model", "ema")):
        if key in obj and isinstance(obj[key], dict):
            sd = obj[key]
            break
    if sd is None:
        sd = obj
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not any(k.startswith(("x_embedder.", "s_embedder.")) for k in sd):
        raise KeyError(f"{path}: no diffusion-transformer weights (no 'ema'/'model' entry and no x_embedder.* keys; "
                       f"has {sorted(obj)[:10]})")
    return sd


def default_data_at_one(name: str, options: dict) -> bool:
    """t = 1 is data for hustvl LightningDiT (sinusoidal time) and for learn_sigma SiT releases
    (the original SiT); noise for REPA-E SiT, RAE LightningDiT (Gaussian-Fourier) and DiT^DH."""
    if model_family(name) == "sit":
        return bool(options.get("learn_sigma", False))
    return default_time_convention(name, options)


def resolve_time_convention(flag: Optional[str], default: bool) -> bool:
    if flag in (None, "auto"):
        return default
    if flag not in ("data-at-1", "noise-at-1"):
        raise ValueError(f"--time-convention must be auto, data-at-1 or noise-at-1, got {flag!r}")
    return flag == "data-at-1"


def build_net_from_state_dict(name: str, sd: dict, latent_shape: Sequence[int], num_classes: Optional[int],
                              source: str, encoder_depth: int = 8, path_type: str = "linear"):
    """(net, options, num_classes) for a released / trained state_dict. Options the weights decide
    (SiT projector widths, qk-norm and learn_sigma; LightningDiT / DiT^DH qk-norm, SwiGLU, RMSNorm,
    RoPE, shift-free adaLN, Gaussian-Fourier time, pos_embed) are read off the keys and shapes;
    the state_dict is then loaded strictly by the caller."""
    family = model_family(name)
    c, h, w = (int(v) for v in latent_shape)
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    if num_classes is None:
        num_classes = rows - 1  # released class-conditional models carry the null row
    if rows not in (num_classes, num_classes + 1):
        raise ValueError(f"{source}: label table has {rows} rows, not --num-classes {num_classes} (+1 null row)")
    dropout = 0.1 if rows == num_classes + 1 else 0.0
    embed = "s_embedder.proj.weight" if family == "ddt" else "x_embedder.proj.weight"
    in_ch, patch = sd[embed].shape[1], sd[embed].shape[-1]
    if in_ch != c:
        raise ValueError(f"{source}: {name} takes {in_ch} latent channels but the tokenizer gives {c}")
    out = sd["final_layer.linear.weight"].shape[0]
    learn_sigma = out == 2 * patch * patch * c
    qk_norm = "blocks.0.attn.q_norm.weight" in sd
    if family == "sit":
        z_dims, j = [], 0
        while f"projectors.{j}.4.weight" in sd:
            z_dims.append(sd[f"projectors.{j}.4.weight"].shape[0])
            j += 1
        depth = SIT_SIZES[name.split("-")[1].split("/")[0]]["depth"]
        options = dict(z_dims=z_dims, projector_dim=sd["projectors.0.0.weight"].shape[0] if z_dims else 2048,
                       encoder_depth=min(int(encoder_depth), depth), path_type=path_type, qk_norm=qk_norm,
                       learn_sigma=learn_sigma)
    else:
        hidden = sd["blocks.0.adaLN_modulation.1.weight"].shape[1]
        options = dict(use_qknorm=qk_norm, use_swiglu="blocks.0.mlp.w12.weight" in sd,
                       use_rmsnorm="blocks.0.norm1.weight" in sd,
                       wo_shift=sd["blocks.0.adaLN_modulation.1.weight"].shape[0] == 4 * hidden)
        if family == "lightningdit":
            options.update(use_rope="feat_rope.freqs_cos" in sd, use_gembed="t_embedder.W" in sd,
                           learn_sigma=learn_sigma)
        else:
            options.update(use_rope="enc_feat_rope.freqs_cos" in sd, use_pos_embed="pos_embed" in sd)
    net = build_diffusion_model(name, (c, h, w), num_classes, dropout, **options)
    return net, options, num_classes


def fill_sit_bn(sd: dict, model, stats: Optional[dict]) -> dict:
    """SiT / REPA checkpoints may have no input BatchNorm: fill it from the latent statistics (it is
    not used at sampling time, only loaded strictly)."""
    if "bn.running_mean" in sd or not hasattr(model, "bn"):
        return sd
    sd = dict(sd)
    c = model.in_channels
    bias = stats["latents_bias"].reshape(-1) if stats is not None else torch.zeros(c)
    scale = stats["latents_scale"].reshape(-1) if stats is not None else torch.ones(c)
    sd["bn.running_mean"] = bias.float()
    sd["bn.running_var"] = 1.0 / scale.float().pow(2)
    sd["bn.num_batches_tracked"] = torch.tensor(0)
    return sd


def stats_mean_std(stats: dict, eps: float, source: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) from {latents_scale, latents_bias} (REPA-E), {mean, std} (hustvl) or {mean, var}
    (RAE: std = sqrt(var + eps))."""
    if "latents_scale" in stats and "latents_bias" in stats:
        return stats["latents_bias"].float(), 1.0 / stats["latents_scale"].float()
    if "mean" in stats and "std" in stats:
        return torch.as_tensor(stats["mean"]).float(), torch.as_tensor(stats["std"]).float()
    if "mean" in stats and "var" in stats:
        return torch.as_tensor(stats["mean"]).float(), (torch.as_tensor(stats["var"]).float() + eps).sqrt()
    raise KeyError(f"{source}: latent statistics need latents_scale/latents_bias, mean/std or mean/var (has {sorted(stats)})")


def _build_tokenizer(kind, name, ckpt, stats, config, random_init, seed, what):
    from models.tokenizers import build_tokenizer

    if ckpt is None and config is None and not random_init:
        raise SystemExit(f"{what}: give the tokenizer weights (--vae-ckpt, or --rae-config for RAE)")
    return build_tokenizer(kind, name=name, ckpt=ckpt, stats=stats, config=config, random_init=bool(random_init),
                           seed=int(seed))


def _load_sit(args, obj, sd, ckpt_path, info, logger, exp_stats: Optional[str] = None) -> SamplingSetup:
    """REPA-E SiT (experiment or release) and the original learn_sigma SiT releases, with a VAE.
    `exp_stats`: the experiment's initial statistics file, used only when the checkpoint has none."""
    if args.vae not in VAE_PRESETS:
        raise KeyError(f"--vae {args.vae!r} unknown; choose one of {sorted(VAE_PRESETS)}")
    # Tokenizer: the checkpoint's own (REPA-E end-to-end) or --vae-ckpt.
    if isinstance(obj, dict) and isinstance(obj.get("vae"), dict) and not args.vae_ckpt_override:
        vae = build_vae(args.vae)
        utils.load_state_dict_strict(vae, vae_state_dict_from_checkpoint(obj["vae"], vae), f"{ckpt_path}['vae']")
        stats = None
        info["vae"] = f"{ckpt_path}['vae']"
    elif args.vae_ckpt:
        vae, stats = load_vae(args.vae, ckpt_path=args.vae_ckpt, stats_path=args.vae_stats or exp_stats)
        info["vae"] = str(args.vae_ckpt)
    elif args.random_init_vae:
        seed = int(args.tokenizer_seed or 0)
        with torch.random.fork_rng(devices=[]):  # seeded weights, the global RNG untouched
            torch.manual_seed(seed)
            vae = build_vae(args.vae)
        stats, info["vae"] = None, f"random-init seed {seed}"
    else:
        raise SystemExit(f"{ckpt_path} holds no VAE: pass --vae-ckpt (and --vae-stats)")

    # Latent statistics: explicit file > --latent-scale > the checkpoint's > the run's initial file or
    # the VAE's file > the SiT's BatchNorm.
    if args.vae_stats:
        stats = load_latents_stats(args.vae_stats, channels=vae.latent_channels)
        info["latent_stats"] = str(args.vae_stats)
    elif args.latent_scale is not None:
        c = vae.latent_channels
        stats = {"latents_scale": torch.full((1, c, 1, 1), float(args.latent_scale)), "latents_bias": torch.zeros(1, c, 1, 1)}
        info["latent_stats"] = f"scale {args.latent_scale:g}"
    elif isinstance(obj, dict) and isinstance(obj.get("latent_stats"), dict):
        stats = {k: torch.as_tensor(v).float() for k, v in obj["latent_stats"].items()}
        info["latent_stats"] = f"{ckpt_path}['latent_stats']"
    elif isinstance(obj, dict) and isinstance(obj.get("vae"), dict) and "bn.running_var" in sd:
        stats = bn_latent_stats(sd["bn.running_mean"], sd["bn.running_var"])  # REPA-E: the EMA SiT's BatchNorm
        info["latent_stats"] = "SiT BatchNorm"
    elif exp_stats:
        stats = load_latents_stats(exp_stats, channels=vae.latent_channels)
        info["latent_stats"] = str(exp_stats)
    elif stats is not None:
        info["latent_stats"] = "beside --vae-ckpt"
    elif "bn.running_var" in sd:
        stats = bn_latent_stats(sd["bn.running_mean"], sd["bn.running_var"])
        info["latent_stats"] = "SiT BatchNorm"
    else:
        raise SystemExit("no latent statistics: pass --vae-stats (a -latents-stats.pt file) or --latent-scale")

    if args.model not in SiT_models:
        raise KeyError(f"--model {args.model!r} unknown; choose one of {', '.join(DIFFUSION_MODELS)}")
    f = vae.downsample_factor
    latent_shape = (vae.latent_channels, args.resolution // f, args.resolution // f)
    sit, options, num_classes = build_net_from_state_dict(args.model, sd, latent_shape, args.num_classes, str(ckpt_path),
                                                          int(args.encoder_depth), args.path_type)
    utils.load_state_dict_strict(sit, fill_sit_bn(sd, sit, stats), f"{ckpt_path} (SiT weights)")
    data_at_one = resolve_time_convention(args.time_convention, default_data_at_one(args.model, options))
    info.update(family="sit", data_at_one=data_at_one, learn_sigma=options["learn_sigma"])
    args.num_classes = num_classes
    logger(f"SiT {args.model} from {ckpt_path} ({'EMA' if not args.no_ema else 'raw'} weights"
           f"{', learn_sigma: first C channels' if options['learn_sigma'] else ''}, t = 1 is "
           f"{'data' if data_at_one else 'noise'}), VAE {args.vae} from {info['vae']}, latent statistics from "
           f"{info['latent_stats']}")
    decoder = LatentDecoder(vae.eval(), stats["latents_bias"].float(), 1.0 / stats["latents_scale"].float())
    return SamplingSetup(VelocityModel(sit.eval(), data_at_one), decoder, latent_shape, num_classes, info)


def _load_release(args, sd, ckpt_path, info, logger) -> SamplingSetup:
    """A released LightningDiT (hustvl, RAE) or DiT^DH checkpoint with its tokenizer."""
    from models.tokenizers import read_export_description

    family = model_family(args.model)
    described = args.vae_ckpt is not None and read_export_description(args.vae_ckpt) is not None  # NAME.json says
    kind = args.tokenizer or (None if described else "rae" if family == "ddt" or "t_embedder.W" in sd else "vavae")
    name = args.vae or ("vavae-f16d32" if kind == "vavae" and not described else None)
    seed = int(args.tokenizer_seed or 0)
    tok = _build_tokenizer(kind, name, args.vae_ckpt, args.vae_stats, args.rae_config, args.random_init_vae,
                           seed, f"--model {args.model}")
    kind = tok.kind
    if tok.stats is None:
        raise SystemExit(f"tokenizer {kind}/{tok.name}: no latent statistics; pass --vae-stats "
                         f"({'{mean, var} per position' if kind == 'rae' else '{mean, std} [1, C, 1, 1]'})")
    mean, std = stats_mean_std(tok.stats, float(getattr(tok.model, "eps", 1e-5)), "--vae-stats")
    latent_shape = tok.latent_shape(args.resolution)
    net, options, num_classes = build_net_from_state_dict(args.model, sd, latent_shape, args.num_classes, str(ckpt_path))
    utils.load_state_dict_strict(net, sd, f"{ckpt_path} ({args.model} weights)")
    data_at_one = resolve_time_convention(args.time_convention, default_data_at_one(args.model, options))
    info.update(family=family, data_at_one=data_at_one, vae=f"{kind}:{tok.name}",
                tokenizer_fingerprint=tok.fingerprint(),
                latent_stats=str(args.vae_stats) if args.vae_stats else "tokenizer's statistics")
    info["vae_weights"] = str(args.vae_ckpt or args.rae_config or f"random-init seed {seed}")
    args.num_classes = num_classes
    logger(f"{args.model} from {ckpt_path} (options {options}, t = 1 is {'data' if data_at_one else 'noise'}), "
           f"tokenizer {kind}/{tok.name} ({tok.fingerprint()}), latents {list(latent_shape)}")
    return SamplingSetup(VelocityModel(net.eval(), data_at_one), LatentDecoder(tok.eval(), mean, std), latent_shape,
                         num_classes, info)


def _ldm_network(obj, ckpt_path, use_ema: bool):
    """(net, model_config) of a train_ldm_only.py checkpoint, loaded strictly."""
    mc = obj["model_config"]
    net = build_diffusion_model(mc["name"], mc["latent_shape"], mc["num_classes"], mc.get("class_dropout_prob", 0.1),
                                **mc.get("options", {}))
    key = "ema" if use_ema else "model"
    if key not in obj:
        raise KeyError(f"{ckpt_path}: no '{key}' weights")
    utils.load_state_dict_strict(net, obj[key], f"{ckpt_path}['{key}']")
    return net.eval(), mc


def _load_ldm_experiment(args, obj, ckpt_path, info, logger) -> SamplingSetup:
    """A train_ldm_only.py checkpoint: model_config, latent_stats, tokenizer record and run args."""
    mc = obj["model_config"]
    if args.model and args.model != mc["name"]:
        raise SystemExit(f"--model {args.model}: {ckpt_path} holds a {mc['name']}")
    net, mc = _ldm_network(obj, ckpt_path, not args.no_ema)
    record = dict(obj.get("tokenizer") or {})
    run = dict(obj.get("args") or {})
    kind = args.tokenizer or record.get("kind")
    ckpt = args.vae_ckpt or (None if args.random_init_vae else run.get("vae_ckpt"))
    config = args.rae_config or run.get("rae_config")
    random_init = args.random_init_vae or (ckpt is None and bool(run.get("random_init_vae")))
    seed = args.tokenizer_seed if args.tokenizer_seed is not None else run.get("seed", 0)
    tok = _build_tokenizer(kind, args.vae or record.get("name"), ckpt, args.vae_stats if kind == "rae" else None,
                           config if kind == "rae" else None, random_init, seed, f"--exp-dir {args.exp_dir}")
    want, have = record.get("fingerprint"), tok.fingerprint()
    if want and want != have:
        raise SystemExit(f"tokenizer fingerprint mismatch: {ckpt_path} was trained on latents of tokenizer "
                         f"{record.get('kind')}/{record.get('name')} with fingerprint {want}, but the tokenizer given "
                         f"(--tokenizer/--vae/--vae-ckpt/--rae-config/--random-init-vae: {kind}/{tok.name} from "
                         f"{ckpt or config or f'random init seed {seed}'}) has fingerprint {have}; its samples "
                         f"would decode to garbage")
    ls = obj.get("latent_stats")
    if not isinstance(ls, dict) or "mean" not in ls or "std" not in ls:
        raise KeyError(f"{ckpt_path}: no latent_stats {{mean, std}} (not a train_ldm_only.py checkpoint?)")
    data_at_one = resolve_time_convention(args.time_convention, bool(mc.get("data_at_one", False)))
    args.model, args.num_classes = mc["name"], int(mc["num_classes"])
    args.resolution = args.resolution or int(record.get("resolution", 0)) or None
    info.update(family=mc.get("family", model_family(mc["name"])), data_at_one=data_at_one, vae=f"{kind}:{tok.name}",
                vae_weights=str(ckpt or config or f"random-init seed {seed}"), tokenizer_fingerprint=have,
                latent_stats=f"{ckpt_path}['latent_stats'] ({ls.get('mode', 'channel')})")
    logger(f"{mc['name']} from {ckpt_path} ({'EMA' if not args.no_ema else 'raw'} weights, t = 1 is "
           f"{'data' if data_at_one else 'noise'}), tokenizer {kind}/{tok.name} ({have}), latents {mc['latent_shape']}")
    decoder = LatentDecoder(tok.eval(), ls["mean"], ls["std"])
    return SamplingSetup(VelocityModel(net, data_at_one), decoder, mc["latent_shape"], mc["num_classes"], info,
                         default_shift=mc.get("sample_shift"))


def _experiment_checkpoint(exp_dir, step, flag: str):
    exp = Path(exp_dir)
    args_file = exp / "args.json"
    if not args_file.is_file():
        raise FileNotFoundError(f"{flag} {exp}: no args.json")
    ckpt_path = utils.resolve_resume(exp / "checkpoints", step or "latest", f"{flag.replace('exp-dir', 'ckpt-step')}")
    if ckpt_path is None:
        raise FileNotFoundError(f"{flag} {exp}: no checkpoints in {exp / 'checkpoints'}")
    return json.loads(args_file.read_text()), ckpt_path


def load_models(args, logger) -> SamplingSetup:
    """The sampling setup from --exp-dir/--ckpt-step or --ckpt/--model (see the module docstring)."""
    info, exp_stats = {}, None
    if args.exp_dir:
        exp_args, ckpt_path = _experiment_checkpoint(args.exp_dir, args.ckpt_step, "--exp-dir")
        info["step"] = int(ckpt_path.stem)
        info["checkpoint"] = str(Path(ckpt_path).resolve())
        obj = utils.load_checkpoint_file(ckpt_path)
        if isinstance(obj, dict) and "model_config" in obj:
            return _load_ldm_experiment(args, obj, ckpt_path, info, logger)
        for k in ("model", "resolution", "num_classes", "path_type", "qk_norm", "encoder_depth", "vae"):
            if getattr(args, k) is None and k in exp_args:
                setattr(args, k, exp_args[k])
        if args.vae_ckpt is None:
            args.vae_ckpt = exp_args.get("vae_ckpt")
        # the run's --vae-stats file only initialised training: the checkpoint's trained (EMA
        # BatchNorm) statistics win over it, as in REPA-E's generate.py; an explicit flag wins over both
        exp_stats = exp_args.get("vae_stats")
    else:
        if not args.ckpt:
            raise SystemExit("give --exp-dir (with --ckpt-step) or --ckpt")
        ckpt_path = Path(args.ckpt)
        info["checkpoint"] = str(ckpt_path.resolve())
        obj = utils.load_checkpoint_file(ckpt_path)
        if isinstance(obj, dict) and "model_config" in obj:  # a train_ldm_only.py checkpoint given as a file
            return _load_ldm_experiment(args, obj, ckpt_path, info, logger)
    args.model = args.model or "SiT-XL/2"
    args.resolution = args.resolution or 256
    args.path_type = args.path_type or "linear"
    args.encoder_depth = args.encoder_depth or 8
    if args.model not in DIFFUSION_MODELS:
        raise KeyError(f"--model {args.model!r} unknown; choose one of: {', '.join(DIFFUSION_MODELS)}")
    sd = _checkpoint_weights(obj, ckpt_path, not args.no_ema)
    if model_family(args.model) != "sit":
        return _load_release(args, sd, ckpt_path, info, logger)
    args.vae = args.vae or "f8d4"
    return _load_sit(args, obj, sd, ckpt_path, info, logger, exp_stats)


def load_guide(args, setup: SamplingSetup, logger) -> Tuple[VelocityModel, dict]:
    """The autoguidance guide from --guide-exp-dir [--guide-ckpt-step] or --guide-ckpt --guide-model,
    in the toolkit's convention; it must share the main model's latents and labels."""
    if args.guide_exp_dir:
        _, path = _experiment_checkpoint(args.guide_exp_dir, args.guide_ckpt_step, "--guide-exp-dir")
    else:
        path = Path(args.guide_ckpt)
    obj = utils.load_checkpoint_file(path)
    if isinstance(obj, dict) and "model_config" in obj:
        net, mc = _ldm_network(obj, path, not args.no_ema)
        name, default = mc["name"], bool(mc.get("data_at_one", False))
        if tuple(mc["latent_shape"]) != setup.latent_shape:
            raise SystemExit(f"guide {path}: latents {mc['latent_shape']} differ from the main model's {list(setup.latent_shape)}")
    else:
        name = args.guide_model
        if not name:
            raise SystemExit(f"--guide-ckpt {path}: pass --guide-model (e.g. DiTDH-S)")
        sd = _checkpoint_weights(obj, path, not args.no_ema)
        net, options, _ = build_net_from_state_dict(name, sd, setup.latent_shape, setup.num_classes, f"guide {path}")
        utils.load_state_dict_strict(net, fill_sit_bn(sd, net, None), f"guide {path}")
        net, default = net.eval(), default_data_at_one(name, options)
    if int(net.num_classes) != setup.num_classes:
        raise SystemExit(f"guide {path}: {net.num_classes} classes, the main model {setup.num_classes}")
    data_at_one = resolve_time_convention(args.guide_time_convention, default)
    ident = {"checkpoint": str(Path(path).resolve()), "model": name, "use_ema": not args.no_ema,
             "time_convention": "data-at-1" if data_at_one else "noise-at-1"}
    logger(f"autoguidance guide {name} from {path} (t = 1 is {'data' if data_at_one else 'noise'})")
    return VelocityModel(net, data_at_one), ident


# ------------------------------------------------------------------------------------------------
# Output folder: identity check, resume scan, npz
# ------------------------------------------------------------------------------------------------
def sampling_identity(args, info) -> dict:
    """Everything that changes the images. Keys introduced after the first release (family, time
    convention, tokenizer fingerprint, time grid, legacy CFG channels, guidance) are written only
    when they differ from the REPA-E SiT defaults, so older folders still resume; a folder made
    with any of them set is refused by a run without it and vice versa."""
    cfg = {
        "checkpoint": info["checkpoint"], "use_ema": not args.no_ema, "model": args.model, "resolution": args.resolution,
        "num_classes": args.num_classes,
        "vae": info["vae"] if info.get("tokenizer_fingerprint") else args.vae, "vae_weights": info.get("vae_weights", info.get("vae")), "latent_stats": info["latent_stats"],
        "mode": args.mode, "solver": args.solver if args.mode == "ode" else "euler-maruyama", "num_steps": args.num_steps,
        "cfg_scale": args.cfg_scale, "guidance_low": args.guidance_low, "guidance_high": args.guidance_high,
        "shift": args.shift, "path_type": args.path_type, "label_sampling": args.label_sampling, "seed": args.global_seed,
        "mixed_precision": args.mixed_precision, "rng": RNG_VERSION,
        # always written: folders from before truncation became the default hold rounded images
        "uint8_conversion": args.uint8_conversion,
    }
    if args.mode == "sde":
        cfg["t_last"] = args.t_last
    if args.mode == "ode" and args.solver == "dopri5":
        cfg.update(rtol=args.rtol, atol=args.atol)
    if info.get("family", "sit") != "sit":
        cfg["family"] = info["family"]
    if info.get("data_at_one"):
        cfg["time_convention"] = "data-at-1"
    if info.get("tokenizer_fingerprint"):
        cfg["tokenizer_fingerprint"] = info["tokenizer_fingerprint"]
    if args.time_grid != "uniform":
        cfg["time_grid"] = args.time_grid
    if args.cfg_legacy_channels:
        cfg["cfg_channels"] = LEGACY_CFG_CHANNELS
    if info.get("guide"):
        cfg["guidance"] = "autoguidance"
        cfg["guide"] = info["guide"]
    if args.classes or args.samples_per_class:  # a label table replaces label_sampling
        cfg["classes"] = list(args.classes) if args.classes else "all"
        cfg["samples_per_class"] = args.samples_per_class
    return cfg


def default_folder_name(args, info) -> str:
    """REPA-E's name for an experiment folder (`--exp-path`), so the `.npz` lands where its users'
    scripts look; for a checkpoint file, a name that spells out the sampler."""
    labels = f"labelsampling-{args.label_sampling}"
    if args.classes or args.samples_per_class:
        chosen = list(args.classes) if args.classes else []
        ids = "-".join(str(c) for c in chosen) if len(chosen) <= 8 else f"{len(chosen)}"
        labels = f"classes-{ids or 'all'}" + (f"-per-class-{args.samples_per_class}" if args.samples_per_class else "")
    if args.exp_dir and "step" in info:
        return (f"{Path(args.exp_dir).resolve().name}_{info['step']:07d}_cfg{float(args.cfg_scale)}"
                f"-{float(args.guidance_low)}-{float(args.guidance_high)}-{labels}")
    ckpt = f"{info['step']:07d}" if "step" in info else Path(info["checkpoint"]).stem
    solver = args.solver if args.mode == "ode" else "sde"
    guide = f"-ag-{info['guide']['model']}" if info.get("guide") else ""
    name = (f"{args.model.replace('/', '-')}-{ckpt}-size-{args.resolution}-{solver}-{args.num_steps}"
            f"{'-raegrid' if args.time_grid == 'rae' else ''}"
            f"-cfg-{args.cfg_scale}-{args.guidance_low}-{args.guidance_high}{guide}-shift-{args.shift:g}"
            f"-{labels.replace('labelsampling-', '')}-seed-{args.global_seed}")
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def check_or_write_config(folder: Path, identity: dict, extra: dict) -> None:
    """Refuse a folder whose stored configuration differs; otherwise (re)write it. Rank 0 only."""
    cfg_file = folder / "sampling_config.json"
    if cfg_file.is_file():
        old = json.loads(cfg_file.read_text())
        diffs = [f"{k}: stored {old.get(k)!r} vs now {v!r}" for k, v in identity.items()
                 if k not in NON_IDENTITY_KEYS and old.get(k) != v]
        diffs += [f"{k}: stored {old[k]!r} vs now (absent)" for k in old if k not in identity and k not in NON_IDENTITY_KEYS]
        if diffs:
            raise SystemExit(f"{folder} holds samples from a different sampling configuration; refusing to mix them:\n  "
                             + "\n  ".join(diffs) + "\nchoose another --sample-dir/--folder-name or delete the folder")
    elif folder.is_dir() and any(PNG_RE.match(p.name) for p in folder.iterdir()):
        raise SystemExit(f"{folder} holds PNG samples but no sampling_config.json: cannot tell their configuration; "
                         f"refusing to mix them (choose another --sample-dir/--folder-name)")
    folder.mkdir(parents=True, exist_ok=True)
    utils.remove_stale_temp_files(folder)  # interrupted writes of an earlier run (rank 0, before any rank writes)
    utils.atomic_write_text(json.dumps(identity | extra, indent=2, sort_keys=True) + "\n", cfg_file)


def finished_indices(folder: Path, n: int) -> set:
    done = set()
    for p in folder.iterdir():
        m = PNG_RE.match(p.name)
        if m and int(m.group(1)) < n:
            done.add(int(m.group(1)))
    return done


def npz_image_count(path: Path) -> Optional[int]:
    """Number of images in an `.npz`'s arr_0, read from its header; None when there is no
    readable file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape = read(f)[0]
            return int(shape[0]) if shape else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def reference_for_eval(args, sample_file: Path):
    """--ref-batch as given, or --ref-dir read as a dataset at the resolution of the samples
    (`sample_file`) through the training readers (a folder of class folders, an archive)."""
    if args.ref_batch:
        return args.ref_batch
    from PIL import Image

    from datasources import build_image_dataset, image_channels_on_disk

    with Image.open(sample_file) as im:
        resolution = im.size[0]
    return build_image_dataset(args.ref_dir, resolution, channels=image_channels_on_disk(Path(args.ref_dir)) or 3)


def experiment_class_names(args, num_classes: int) -> Dict[int, str]:
    """{id: name} of the classes the model was trained on: --class-to-idx, else what the run's data
    records (latents' tokenizer.json, an archive's index.json, or the sorted class folders of an
    image folder, numbered as the dataset numbers them); ids without a name are named by their id."""
    from datasources import LATENT_INFO_FILE, is_archive, load_class_to_idx

    mapping = load_class_to_idx(args.class_to_idx, "--class-to-idx") if args.class_to_idx else None
    run = {}
    if mapping is None and args.exp_dir and (Path(args.exp_dir) / "args.json").is_file():
        run = json.loads((Path(args.exp_dir) / "args.json").read_text())
        if run.get("class_to_idx"):
            mapping = load_class_to_idx(run["class_to_idx"], f"{args.exp_dir}/args.json class_to_idx")
    roots = [run.get("latents_dir")]
    if run.get("data_dir") and run.get("vae_latents_name"):
        roots.append(str(Path(run["data_dir"]) / run["vae_latents_name"]))
    roots.append(run.get("data_dir"))
    for root in (Path(r) for r in roots if r and mapping is None):
        if (root / LATENT_INFO_FILE).is_file():
            mapping = json.loads((root / LATENT_INFO_FILE).read_text()).get("class_to_idx")
        elif is_archive(root):
            mapping = json.loads((root / "index.json").read_text()).get("class_to_idx")
        elif root.is_dir():
            dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            mapping = {d.name: i for i, d in enumerate(dirs)} or None
    names = {}
    for name, i in sorted((mapping or {}).items(), key=lambda kv: (int(kv[1]), kv[0])):
        names.setdefault(int(i), str(name))  # several names merged into one id: the first names it
    return {i: names.get(i, str(i)) for i in range(int(num_classes))}


def resolve_classes(spec: str, names: Dict[int, str], num_classes: int) -> List[int]:
    """--classes "user_03,user_17" or "3,17" -> ids; an unknown name is refused, listing the known ones."""
    by_name = {v: k for k, v in sorted(names.items(), reverse=True)}
    ids = []
    for token in (t.strip() for t in str(spec).split(",")):
        if not token:
            continue
        if token in by_name:
            ids.append(by_name[token])
        elif token.lstrip("-").isdigit() and 0 <= int(token) < num_classes:
            ids.append(int(token))
        else:
            known = ", ".join(names[i] for i in sorted(names)[:20]) + (" ..." if len(names) > 20 else "")
            raise SystemExit(f"--classes: unknown class {token!r} (the model has {num_classes} classes: {known}; "
                             f"--class-to-idx FILE names them)")
    if not ids:
        raise SystemExit(f"--classes {spec!r}: no class given")
    return ids


def class_label_table(classes: Sequence[int], n: int, per_class: Optional[int]) -> torch.Tensor:
    """The label of each sample index [n]: blocks of `per_class` per class, or the classes cycled."""
    c = torch.as_tensor(list(classes), dtype=torch.int64)
    idx = torch.arange(n)
    return c[idx // per_class] if per_class else c[idx % len(c)]


def write_labels(folder: Path, labels: np.ndarray, names: Dict[int, str]) -> None:
    """`labels.npy` (int64 [N]) and `labels.csv` (index, class id, class name, file) beside the
    PNGs, so the samples can serve as labelled training data."""
    import csv
    import io

    utils.atomic_write(folder / "labels.npy", lambda f: np.save(f, np.asarray(labels, dtype=np.int64)), "wb")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "class_id", "class_name", "file"])
    for i, y in enumerate(labels.tolist()):
        w.writerow([i, y, names.get(int(y), str(y)), f"{i:06d}.png"])
    utils.atomic_write_text(buf.getvalue(), folder / "labels.csv")


def write_npz(folder: Path, n: int) -> Path:
    """Stack {0..n-1}.png into `<folder>.npz` (arr_0 uint8 [N, H, W, C], C = 3, or 1 for
    1-channel tokenizers), atomically."""
    from PIL import Image
    from tqdm.auto import tqdm

    out = folder.with_name(folder.name + ".npz")
    arr = None
    for i in tqdm(range(n), desc="building .npz", dynamic_ncols=True):
        with Image.open(folder / f"{i:06d}.png") as im:
            a = np.asarray(im if im.mode in ("L", "RGB") else im.convert("RGB"))
        if a.ndim == 2:
            a = a[..., None]
        if arr is None:
            arr = np.empty((n, *a.shape), dtype=np.uint8)
        arr[i] = a
    tmp = out.with_name(f".{out.stem}.tmp.npz")
    with open(tmp, "wb") as f:
        np.savez(f, arr_0=arr)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
class OneDefaultHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` states each option's default once: options whose help already says what the
    default is (or whose default is None, i.e. resolved at run time) get no second '(default: X)'."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=OneDefaultHelpFormatter)
    p.add_argument("--config", type=str, default=None, help="YAML of flag values (explicit flags win)")
    p.add_argument("--recipe", type=str, default=None,
                   help=f"named sampling recipe: configs/sampling/NAME.yaml ({', '.join(list_recipes()) or 'none'})")
    g = p.add_argument_group("model source")
    g.add_argument("--exp-path", "--exp-dir", dest="exp_dir", type=str, default=None, metavar="DIR",
                   help="experiment folder (args.json + checkpoints/); --exp-path is REPA-E's name")
    g.add_argument("--train-steps", "--ckpt-step", dest="ckpt_step", type=str, default=None, metavar="STEP",
                   help="training step of the checkpoint in --exp-path (default: latest); --train-steps is REPA-E's name")
    g.add_argument("--ckpt", type=str, default=None, help="explicit checkpoint (state_dict or dict with ema/model) of --model")
    g.add_argument("--no-ema", action="store_true", help="use the raw 'model' weights instead of 'ema'")
    g.add_argument("--model", type=str, default=None,
                   help="SiT-XL/2, LightningDiT-XL/1, DiTDH-XL ... (default: from the experiment or SiT-XL/2)")
    g.add_argument("--resolution", type=int, default=None, help="image size (default: from the experiment or the checkpoint)")
    g.add_argument("--num-classes", type=int, default=None, help="default: from args.json or the label table")
    g.add_argument("--path-type", type=str, default=None, choices=["linear", "cosine"], help="REPA-E SiT interpolant (default: from the experiment; the SDE's score needs it)")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None, help="SiT qk-norm (default: read off the checkpoint)")
    g.add_argument("--encoder-depth", type=int, default=None, help="REPA-E SiT projector depth (default: from the experiment)")
    g.add_argument("--time-convention", type=str, default="auto", choices=["auto", "data-at-1", "noise-at-1"],
                   help="how the network reads t (auto: the experiment's; data-at-1 for hustvl LightningDiT and "
                        "learn_sigma SiT releases, noise-at-1 otherwise)")
    g.add_argument("--tokenizer", type=str, default=None, choices=["kl", "vavae", "vq", "rae"],
                   help="tokenizer kind (default: the experiment's; vavae for LightningDiT, rae for DiT^DH releases)")
    g.add_argument("--vae", type=str, default=None, help=f"VAE / tokenizer preset ({', '.join(sorted(VAE_PRESETS))})")
    g.add_argument("--vae-ckpt", type=str, default=None, help="tokenizer weights (default: the experiment's)")
    g.add_argument("--vae-stats", type=str, default=None,
                   help="latent statistics file: latents_scale/bias (REPA-E), mean/std (hustvl) or mean/var (RAE)")
    g.add_argument("--latent-scale", type=float, default=None, help="constant latent scale, no bias (SD-VAE: 0.18215)")
    g.add_argument("--rae-config", type=str, default=None, help="RAE config (tokenizer rae)")
    g.add_argument("--random-init-vae", "--random-init", dest="random_init_vae", action="store_true",
                   help="tokenizer with seeded random weights (tests; --random-init: cache_latents.py's name)")
    g.add_argument("--tokenizer-seed", type=int, default=None, help="seed of --random-init-vae (default: the run's seed)")
    g.add_argument("--vae-ckpt-override", action="store_true", help="use --vae-ckpt even if the checkpoint holds a VAE")
    g = p.add_argument_group("guidance")
    g.add_argument("--guidance", type=str, default="cfg", choices=["cfg", "autoguidance"],
                   help="what --cfg-scale scales: classifier-free guidance or autoguidance by --guide-*")
    g.add_argument("--guide-ckpt", type=str, default=None, help="autoguidance: guide checkpoint (with --guide-model)")
    g.add_argument("--guide-model", type=str, default=None, help="autoguidance: guide architecture, e.g. DiTDH-S")
    g.add_argument("--guide-exp-dir", type=str, default=None, help="autoguidance: guide experiment folder")
    g.add_argument("--guide-ckpt-step", type=str, default=None, help="step in --guide-exp-dir (default: latest)")
    g.add_argument("--guide-time-convention", type=str, default="auto", choices=["auto", "data-at-1", "noise-at-1"], help="how the guide network reads t (as --time-convention)")
    g.add_argument("--cfg-legacy-channels", action=argparse.BooleanOptionalAction, default=False,
                   help="hustvl LightningDiT's CFG on latent channels 0..2 only (reproduces its published FIDs)")
    g = p.add_argument_group("sampler")
    g.add_argument("--mode", type=str, default="ode", choices=["ode", "sde"], help="ode (probability flow) or sde (Euler-Maruyama)")
    g.add_argument("--solver", type=str, default="euler", choices=["euler", "heun", "dopri5"], help="ODE solver")
    g.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False,
                   help="same as --solver heun (REPA-E's flag; ODE only)")
    g.add_argument("--num-steps", type=utils.positive_int, default=50, help="sampler steps (time points for --time-grid rae)")
    g.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale, 1 for none (REPA-E's default 1.5)")
    g.add_argument("--guidance-low", type=float, default=0.0, help="guidance only for noise times t >= this")
    g.add_argument("--guidance-high", type=float, default=1.0, help="guidance only for noise times t <= this (REPA-E's recipe: 0.75)")
    g.add_argument("--shift", type=_shift_value, default=None,
                   help="noise-time shift: a number (LightningDiT's data-time 0.3 = 1/0.3 here) or 'auto' "
                        "(RAE: sqrt(C*h*w / 4096)); default: the experiment's sampling shift or 1")
    g.add_argument("--time-grid", type=str, default="uniform", choices=["uniform", "rae"],
                   help="uniform: linspace(1, 0, steps + 1); rae: RAE's shift(1 - linspace(0, 0.999, steps)) (ODE)")
    g.add_argument("--t-last", type=float, default=0.04, help="SDE: last stochastic time before the final mean step")
    g.add_argument("--rtol", type=float, default=1e-5, help="dopri5 relative tolerance")
    g.add_argument("--atol", type=float, default=1e-5, help="dopri5 absolute tolerance")
    g.add_argument("--label-sampling", type=str, default="equal", choices=["random", "equal"],
                   help="random labels, or equal (REPA-E's default): the same count per class, exact for any world size")
    g.add_argument("--per-class-sampling", dest="label_sampling", action="store_const", const="equal",
                   default=argparse.SUPPRESS, help="earlier REPA-E name of --label-sampling equal")
    g.add_argument("--no-per-class-sampling", dest="label_sampling", action="store_const", const="random",
                   default=argparse.SUPPRESS, help="earlier REPA-E name of --label-sampling random")
    g.add_argument("--classes", type=str, default=None,
                   help="comma list of classes to sample, by name (the training data's class folders) or id; "
                        "cycled over --num-fid-samples unless --samples-per-class is given")
    g.add_argument("--samples-per-class", type=utils.positive_int, default=None,
                   help="N samples of each class of --classes (or of every class), in class blocks; sets --num-fid-samples")
    g.add_argument("--class-to-idx", type=str, default=None,
                   help="JSON {class name: id} for --classes and labels.csv (default: the experiment's data, "
                        "archive or latents record)")
    g.add_argument("--global-seed", "--seed", dest="global_seed", type=int, default=0, help="seed of the index-keyed noise and labels")
    g = p.add_argument_group("output and speed")
    g.add_argument("--num-fid-samples", type=utils.positive_int, default=50000, help="number of samples to generate")
    g.add_argument("--pproc-batch-size", "--per-proc-batch-size", dest="per_proc_batch_size", type=utils.positive_int, default=128, metavar="N",
                   help="sampling batch per process (--pproc-batch-size is REPA-E's name)")
    g.add_argument("--sample-dir", type=str, default="samples", help="parent folder of the sample folder and its .npz")
    g.add_argument("--folder-name", type=str, default=None,
                   help="sample folder name (default: REPA-E's EXP_STEP_cfgS-LOW-HIGH-labelsampling-L for --exp-path, "
                        "else derived from the configuration)")
    g.add_argument("--no-npz", action="store_true", help="do not write the .npz of all samples")
    g.add_argument("--uint8-conversion", type=str, default="truncate", choices=list(UINT8_CONVERSIONS),
                   help="decoded [-1, 1] -> uint8: truncate as the originals (published FIDs) or round to the nearest level")
    g.add_argument("--mixed-precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="autocast precision of the network")
    g.add_argument("--allow-tf32", "--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="allow TF32 matmuls and convolutions on Ampere+ GPUs (--tf32 is REPA-E's name)")
    g.add_argument("--compile", action="store_true", help="torch.compile the SiT")
    g.add_argument("--device", type=str, default=None, help="default: cuda when available")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="compute metrics of the samples against --ref-batch")
    g.add_argument("--ref-batch", type=str, default=None, help="reference .npz (arr_0 images and/or mu, sigma)")
    g.add_argument("--ref-dir", type=str, default=None,
                   help="reference images for --eval: an image folder (class folders too) or a preprocessing.py "
                        "archive, read at the samples' resolution (instead of --ref-batch)")
    g.add_argument("--inception-weights", type=str, default=None, help="local torch-fidelity Inception weights (.pth)")
    g.add_argument("--random-init-inception", action="store_true",
                   help="random-weight Inception (offline tests): every figure is labelled not comparable")
    g.add_argument("--metrics", type=str, default=",".join(ALL_METRICS), help=f"comma list of {ALL_METRICS}")
    g.add_argument("--eval-batch-size", type=utils.positive_int, default=100, help="Inception batch for --eval")
    g.add_argument("--inception-image-size", "--inception-size", dest="inception_image_size", type=int, default=299, help="299 is the protocol (smaller: tests only)")
    g.add_argument("--inception-chunk", type=int, default=50, help="fixed Inception batch (figures depend on it at ~1e-6)")
    return p


def _shift_value(v):
    if str(v).lower() == "auto":
        return "auto"
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shift must be a number or 'auto', got {v!r}") from None


def list_recipes() -> List[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")) if RECIPE_DIR.is_dir() else []


def parse_args(argv=None):
    """Defaults < --recipe file < --config file < explicit flags."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", type=str, default=None, help="named sampling recipe from configs/sampling/")
    pre.add_argument("--config", type=str, default=None, help="YAML file of flag values (explicit flags win)")
    known, _ = pre.parse_known_args(argv)
    # config keys may use any of a flag's names (REPA-E's or ours), hyphens or underscores
    dests = {a.dest: a.dest for a in parser._actions}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and not opt.startswith("--no-"):
                dests[opt[2:].replace("-", "_")] = action.dest
    files = []
    if known.recipe:
        path = Path(known.recipe) if known.recipe.endswith(".yaml") else RECIPE_DIR / f"{known.recipe}.yaml"
        if not path.is_file():
            raise SystemExit(f"--recipe {known.recipe}: no {path} (known recipes: {', '.join(list_recipes())})")
        files.append(path)
    if known.config:
        files.append(Path(known.config))
    for path in files:
        cfg = utils.load_yaml(path)
        try:
            original = utils.original_config_defaults(cfg, path, parser, argv)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        if original is not None:
            parser.set_defaults(**original)
            continue
        defaults = {}
        for k, v in cfg.items():
            dest = dests.get(str(k).replace("-", "_"))
            if dest is None or dest in ("recipe", "config"):
                raise SystemExit(f"{path}: unknown key '{k}' (not a flag of generate.py)")
            defaults[dest] = v
        parser.set_defaults(**typed_file_values(parser, defaults, path))
    args = parser.parse_args(argv)
    check_args(args)
    if args.heun:
        args.solver = "heun"
    return args


def typed_file_values(parser, values: dict, path) -> dict:
    """{dest: value} of a --config / --recipe file checked as the flags themselves would be (a
    YAML 0 or 2.5 for a count is refused); errors name the file and the flag."""
    actions = {}
    for action in parser._actions:  # a dest's main flag comes first (aliases such as --per-class-sampling after it)
        if action.option_strings:
            actions.setdefault(action.dest, action)
    try:
        return {dest: utils.config_value(actions[dest], v, dest, path) for dest, v in values.items()}
    except ValueError as e:
        raise SystemExit(str(e)) from None


def check_args(args) -> None:
    """Refuse combinations the flags' types cannot (counts are `utils.positive_int`, on the command
    line and in --config / --recipe files alike)."""
    if args.heun and args.mode != "ode":
        raise SystemExit(f"--heun is an ODE solver: it cannot be combined with --mode {args.mode}")


def setup_distributed(device_arg: Optional[str]):
    """torchrun / accelerate launch set WORLD_SIZE, RANK, LOCAL_RANK; one process otherwise."""
    use_cpu = device_arg == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") \
        or not torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        if not use_cpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="gloo" if use_cpu else "nccl")
    if device_arg:
        device = torch.device(device_arg if device_arg != "cuda" else f"cuda:{local_rank}")
    else:
        device = torch.device("cpu") if use_cpu else torch.device("cuda", local_rank)
    return device


def sampler_kwargs_from_args(args) -> dict:
    """`run_sampler` kwargs from the flags (the guide model is added by the caller)."""
    kw = dict(mode=args.mode, solver=args.solver, num_steps=args.num_steps, cfg_scale=args.cfg_scale,
              guidance_low=args.guidance_low, guidance_high=args.guidance_high, path_type=args.path_type,
              shift=args.shift, time_grid=args.time_grid,
              cfg_channels=LEGACY_CFG_CHANNELS if args.cfg_legacy_channels else None)
    if args.mode == "sde":
        kw["t_last"] = args.t_last
    if args.mode == "ode" and args.solver == "dopri5":
        kw.update(rtol=args.rtol, atol=args.atol)
    return kw


class _CompiledField:
    """torch.compile of a VelocityModel, reachable through `.inference` as the samplers call it
    (calling `.inference` on torch.compile's wrapper would run the uncompiled method)."""

    def __init__(self, model: VelocityModel):
        self.compiled, self.num_classes = torch.compile(model), model.num_classes

    def inference(self, x, t, y):
        return self.compiled(x, t, y)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = setup_distributed(args.device)
    rank, world = dist_info()
    log = (lambda msg: print(f"[generate] {msg}", flush=True)) if rank == 0 else (lambda msg: None)
    if device.type == "cuda" and args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.eval and not (args.ref_batch or args.ref_dir):
        raise SystemExit("--eval needs --ref-batch (a reference .npz) or --ref-dir (an image folder or archive)")
    if args.ref_batch and args.ref_dir:
        raise SystemExit("give one reference: --ref-batch or --ref-dir, not both")
    for flag, path in (("--ref-batch", args.ref_batch), ("--ref-dir", args.ref_dir)):
        if path and not Path(path).exists():
            raise SystemExit(f"{flag} {path}: no such file or folder")
    has_guide = bool(args.guide_ckpt or args.guide_exp_dir)
    if args.guidance == "autoguidance" and not has_guide:
        raise SystemExit("--guidance autoguidance needs a guide: --guide-ckpt FILE --guide-model NAME or --guide-exp-dir DIR")
    if has_guide and args.guidance != "autoguidance":
        args.guidance = "autoguidance"  # a guide given means autoguidance (--cfg-scale is its scale)

    setup = load_models(args, log)
    guide = None
    if has_guide:
        guide, setup.info["guide"] = load_guide(args, setup, log)
    if args.shift is None:
        args.shift = float(setup.default_shift) if setup.default_shift is not None else 1.0
    elif args.shift == "auto":
        from transport import shift_from_dims

        args.shift = shift_from_dims(int(np.prod(setup.latent_shape)))
    args.path_type = args.path_type or "linear"
    class_names = experiment_class_names(args, setup.num_classes)
    label_table = None
    if args.classes or args.samples_per_class:
        chosen = resolve_classes(args.classes, class_names, setup.num_classes) if args.classes \
            else list(range(setup.num_classes))
        if args.samples_per_class:
            args.num_fid_samples = args.samples_per_class * len(chosen)
        label_table = class_label_table(chosen, args.num_fid_samples, args.samples_per_class)
        args.classes = chosen  # ids: part of the folder's identity
        log(f"classes {', '.join(f'{c} ({class_names.get(c, c)})' for c in chosen)}: "
            f"{args.num_fid_samples} samples" + (f", {args.samples_per_class} per class" if args.samples_per_class else ""))
    model, decoder = setup.model.to(device), setup.decoder.to(device)
    field = _CompiledField(model) if args.compile else model
    if guide is not None:
        guide = guide.to(device)
        guide = _CompiledField(guide) if args.compile else guide
    amp = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]

    # ---- output folder (rank 0 decides; everyone scans before anyone writes)
    sample_dir = Path(args.sample_dir)
    folder = sample_dir / (args.folder_name or default_folder_name(args, setup.info))
    identity = sampling_identity(args, setup.info)
    error = None
    if rank == 0:
        try:
            check_or_write_config(folder, identity, {"num_fid_samples": args.num_fid_samples, "world_size": world,
                                                     "per_proc_batch_size": args.per_proc_batch_size})
        except SystemExit as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise SystemExit(error)
    n = args.num_fid_samples
    done = finished_indices(folder, n)
    barrier()
    todo = [i for i in range(n) if i not in done]
    if label_table is None and args.label_sampling == "equal" and n % args.num_classes:
        log(f"note: {n} samples over {args.num_classes} classes: counts differ by one between classes")
    guidance = (f"autoguidance {args.cfg_scale}" if guide is not None else f"cfg {args.cfg_scale}") + \
        f" in [{args.guidance_low}, {args.guidance_high}]"
    log(f"{folder}: {len(done)} of {n} samples exist, {len(todo)} to generate on {world} process(es) "
        f"({args.mode}{'' if args.mode == 'sde' else '/' + args.solver}, {args.num_steps} steps, {args.time_grid} grid, "
        f"{guidance}, shift {args.shift:g}, device {device})")

    kw = sampler_kwargs_from_args(args)
    kw["guide"] = guide
    made = []

    def write_pngs(chunk, arr):  # [b, H, W, C] uint8, C = 3 or 1 (written as a grayscale PNG)
        for i, a in zip(chunk, arr):
            utils.atomic_save_png(a[..., 0] if a.shape[-1] == 1 else a, folder / f"{i:06d}.png")
        made.extend(chunk)

    t0 = time.time()
    sample_for_eval(field, decoder, setup.latent_shape, setup.num_classes, n, args.global_seed,
                    args.per_proc_batch_size, kw, device, label_sampling=args.label_sampling, autocast_dtype=amp,
                    labels=label_table,
                    indices=todo, on_batch=write_pngs, gather=False, progress=rank == 0,
                    uint8_conversion=args.uint8_conversion)
    elapsed = time.time() - t0
    barrier()
    result = {"folder": str(folder), "generated": len(todo), "existing": len(done), "seconds": elapsed,
              "samples_per_s": len(todo) / max(elapsed, 1e-9)}
    npz = folder.with_name(folder.name + ".npz")
    # a folder may hold more samples than asked for (an earlier, larger run): the .npz holds exactly
    # samples 0..n-1, rewritten whenever it holds another count
    if rank == 0 and not args.no_npz and (todo or npz_image_count(npz) != n):
        npz = write_npz(folder, n)
        log(f"wrote {npz} (arr_0 [{n}, H, W, C])")
    if rank == 0:
        labels = label_table[:n] if label_table is not None else \
            index_labels(args.global_seed, torch.arange(n), setup.num_classes, args.label_sampling)
        write_labels(folder, labels.numpy(), class_names)
        log(f"wrote {folder / 'labels.npy'} and {folder / 'labels.csv'} (class of every sample)")
    barrier()
    if not args.no_npz:
        result["npz"] = str(npz)
    if args.eval:
        from evaluation.inception import InceptionFeatures, build_inception
        from evaluation.metrics import format_scores

        extractor = InceptionFeatures(build_inception(args.inception_weights, random_init=args.random_init_inception),
                                      args.inception_image_size, args.inception_chunk).to(device)
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        images = str(npz) if not args.no_npz else [folder / f"{i:06d}.png" for i in range(n)]
        scores = evaluate_samples(images, reference_for_eval(args, folder / "000000.png"), inception=extractor, metrics=metrics,
                                  batch_size=args.eval_batch_size, device=device, progress=rank == 0)
        result["metrics"] = scores
        if rank == 0:
            ref = {"ref_batch": str(args.ref_batch)} if args.ref_batch else {"ref_dir": str(args.ref_dir)}
            utils.atomic_write_text(json.dumps({**ref, **scores}, indent=2) + "\n", folder / "metrics.json")
            log("metrics: " + format_scores(scores))
    log(f"done: {result['generated']} generated in {elapsed:.1f}s ({result['samples_per_s']:.2f} samples/s)")
    return result


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
