"""Small helpers shared by every script: strict weight loading, atomic files, config merging,
experiment folders, seeding and logging."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn


class StateDictMismatch(RuntimeError):
    """Raised when a checkpoint does not fit a module: lists missing, unexpected and misshaped keys."""


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state_dict") -> None:
    """Raise `StateDictMismatch` naming every missing/unexpected key and every shape mismatch."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or misshaped:
        lines = [f"{source} does not fit {type(module).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:40]) + (" ..." if len(missing) > 40 else ""))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:40]) + (" ..." if len(unexpected) > 40 else ""))
        if misshaped:
            lines.append("  shape mismatches: " + "; ".join(misshaped[:40]))
        raise StateDictMismatch("\n".join(lines))


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state_dict") -> nn.Module:
    """Copy `state_dict` into `module` (casting to each parameter's dtype) after a strict check."""
    check_state_dict(module, state_dict, source)
    module.load_state_dict(state_dict, strict=True)
    return module


def load_checkpoint_file(path: str | os.PathLike, key: str | None = None) -> dict:
    """Load a `.pt`/`.pth`/`.safetensors` file on CPU; optionally return `ckpt[key]`.

    Errors name the file: a missing file, an unreadable one, or a missing key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise RuntimeError(f"could not read checkpoint {path}: {e}") from e
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            have = list(obj.keys()) if isinstance(obj, Mapping) else type(obj).__name__
            raise KeyError(f"{path} has no entry '{key}' (has: {have})")
        obj = obj[key]
    return obj


def atomic_write(path: str | os.PathLike, write, mode: str) -> None:
    """Write through `write(file)` into a temp file in the same folder, fsync, then rename over
    `path`: readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda f: f.write(text), "w")


def atomic_save_png(array, path: str | os.PathLike) -> None:
    """Write a uint8 [H, W, C] (or [H, W]) array as PNG atomically."""
    from PIL import Image

    image = Image.fromarray(array)
    atomic_write(path, lambda f: image.save(f, format="PNG"), "wb")


def load_yaml(path: str | os.PathLike) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_args_with_config(parser, argv=None):
    """argparse with `--config FILE.yaml`: the file's keys are defaults, explicit flags win.

    Keys may be written with hyphens or underscores; an unknown key is an error naming the file.
    """
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None, help='YAML file of flag values')
    known, _ = pre.parse_known_args(argv)
    if known.config:
        cfg = load_yaml(known.config)
        dests = {a.dest for a in parser._actions}
        defaults = {}
        for k, v in cfg.items():
            dest = k.replace("-", "_")
            if dest not in dests:
                raise ValueError(f"{known.config}: unknown key '{k}' (not a flag of {parser.prog})")
            defaults[dest] = v
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def write_args_json(args, path: str | os.PathLike) -> None:
    atomic_write_text(json.dumps(vars(args), indent=2, sort_keys=True, default=str) + "\n", path)


def requires_grad(module: nn.Module, flag: bool = True) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """EMA over parameters and floating buffers (BatchNorm statistics); other buffers are copied.
    Each kind of update is one foreach op over all tensors (a few kernel launches on CUDA instead
    of two per tensor) with the per-tensor arithmetic unchanged: ema * decay, then + (1 - decay) * p."""
    ema_params, ema_bufs = dict(ema.named_parameters()), dict(ema.named_buffers())
    averaged, new, copied, source = [], [], [], []
    for name, p in model.named_parameters():
        averaged.append(ema_params[name])
        new.append(p.detach().to(ema_params[name].dtype))
    for name, b in model.named_buffers():
        if b.dtype.is_floating_point:
            averaged.append(ema_bufs[name])
            new.append(b.to(ema_bufs[name].dtype))
        else:
            copied.append(ema_bufs[name])
            source.append(b)
    if averaged:
        torch._foreach_mul_(averaged, decay)
        torch._foreach_add_(averaged, new, alpha=1 - decay)
    if copied:
        torch._foreach_copy_(copied, source)


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP / torch.compile wrappers."""
    while True:
        if hasattr(module, "module"):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


# --------------------------------------------------------------------------------------------
# Training infrastructure shared by the trainers: experiment folder, logging, checkpoints with
# full state (RNG of every rank, data position), resume, stop signals and non-finite guards.
# --------------------------------------------------------------------------------------------
CKPT_RE = re.compile(r"^(\d{7})\.pt$")


def create_logger(log_dir: str | os.PathLike | None, is_main: bool, name: str = "toolkit") -> logging.Logger:
    """Main process: INFO to stdout and `<log_dir>/log.txt`; other ranks: warnings only."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    if is_main:
        logger.setLevel(logging.INFO)
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        logger.addHandler(sh)
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(Path(log_dir) / "log.txt")
            fh.setFormatter(fmt)
            logger.addHandler(fh)
    else:
        logger.setLevel(logging.WARNING)
        logger.addHandler(logging.NullHandler())
    return logger


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[int]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir() if (m := CKPT_RE.match(p.name)))


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"{step:07d}.pt"


def resolve_resume(ckpt_dir: str | os.PathLike, resume, flag: str = "--resume") -> Path | None:
    """`resume` is None/0 (start fresh), 'latest' (newest if any) or a step number (must exist);
    `flag` names the option in the error."""
    if resume in (None, 0, "0", "", "none"):
        return None
    steps = list_checkpoints(ckpt_dir)
    if str(resume) == "latest":
        return checkpoint_path(ckpt_dir, steps[-1]) if steps else None
    step = int(resume)
    if step not in steps:
        raise FileNotFoundError(f"{flag} {step}: no checkpoint for step {step} in {ckpt_dir} "
                                f"(available steps: {steps or 'none'})")
    return checkpoint_path(ckpt_dir, step)


class StopRequest:
    """SIGTERM / SIGINT set a flag; the training loop saves a checkpoint and exits at the end of
    the current step instead of dying mid-write."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()


class NonFiniteLossError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# The trainers' shared plumbing (train_repae.py, train_ldm_only.py, train_stage1.py): one place for
# the experiment folder, checkpoints, resume, the per-step all-reduce and the run summary, so every
# trainer resumes and fails the same way.
# --------------------------------------------------------------------------------------------
@dataclass
class TrainRun:
    """What every trainer needs after start-up: the accelerator, the experiment folder, the
    checkpoint to resume (if any), the logger and the per-process micro-batch size."""

    args: Any
    accelerator: Any
    exp_dir: Path
    ckpt_dir: Path
    resume_path: Optional[Path]
    logger: logging.Logger
    local_batch_size: int

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def start_run(args, name: str) -> TrainRun:
    """Accelerator (CPU/gloo when there is no GPU), experiment folder with args.json and log.txt,
    resume resolution (a fresh run refuses a folder that already has checkpoints), TF32, the
    micro-batch size (`--batch-size` is global) and a per-rank seed.

    Expects the common flags: output_dir, exp_name, continue_train_exp_dir, logging_dir, report_to,
    resume, gradient_accumulation_steps, mixed_precision, allow_tf32, batch_size, seed."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    exp_dir = Path(getattr(args, "continue_train_exp_dir", None) or Path(args.output_dir) / args.exp_name)
    ckpt_dir = exp_dir / "checkpoints"
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(exp_dir), logging_dir=str(exp_dir / args.logging_dir)),
        cpu=not torch.cuda.is_available(),
    )
    resume_path = resolve_resume(ckpt_dir, args.resume)
    if accelerator.is_main_process:
        if resume_path is None and list_checkpoints(ckpt_dir):
            raise SystemExit(f"{ckpt_dir} already holds checkpoints {list_checkpoints(ckpt_dir)}; "
                             f"pass --resume latest to continue or choose another --exp-name")
        exp_dir.mkdir(parents=True, exist_ok=True)
        write_args_json(args, exp_dir / "args.json")
    accelerator.wait_for_everyone()
    logger = create_logger(exp_dir, accelerator.is_main_process, name)
    world = accelerator.num_processes
    logger.info(f"experiment {exp_dir} | {world} process(es) on {accelerator.device} | "
                f"mixed precision {args.mixed_precision}")
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    denom = world * args.gradient_accumulation_steps
    if args.batch_size % denom:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by processes x accumulation = {denom}")
    seed_everything(args.seed * world + accelerator.process_index)
    if accelerator.is_main_process:
        accelerator.init_trackers(name, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                for k, v in vars(args).items()})
    return TrainRun(args, accelerator, exp_dir, ckpt_dir, resume_path, logger, args.batch_size // denom)


def load_resume_checkpoint(run: TrainRun) -> Optional[dict]:
    """The checkpoint to resume from, loaded on the CPU (never onto the GPU: no OOM at resume)."""
    if run.resume_path is None:
        return None
    return torch.load(run.resume_path, map_location="cpu", weights_only=False)


def resume_position(run: TrainRun, ckpt: dict) -> tuple:
    """(step, epoch, batch) where the checkpoint stopped: the loop continues with the next micro-batch."""
    step, epoch, batch = int(ckpt["steps"]), int(ckpt["data"]["epoch"]), int(ckpt["data"]["batch"])
    run.logger.info(f"resumed from {run.resume_path} at step {step} (epoch {epoch}, batch {batch})")
    return step, epoch, batch


def restore_rng(run: TrainRun, ckpt: dict) -> None:
    """Continue every rank's RNG stream where it stopped; a different world size restarts the
    streams from a step-dependent seed (the data order itself stays exact: it is index-keyed)."""
    states = ckpt["rng"]
    if len(states) != run.world:
        run.logger.info(f"checkpoint was written by {len(states)} processes, now {run.world}: RNG streams restart")
        seed_everything(run.args.seed * run.world + run.rank + int(ckpt["steps"]))
    else:
        set_rng_state(states[run.rank])


def save_training_checkpoint(run: TrainRun, step: int, data_position: dict, make_state: Callable[[], dict],
                             keep: int = 0) -> None:
    """Collective. Gathers every rank's RNG state; the main process writes `make_state()` plus
    args, step, RNG and data position atomically, then prunes to the newest `keep` (0: keep all)."""
    from accelerate.utils import gather_object

    rngs = gather_object([rng_state()])
    if run.is_main:
        scaler = run.accelerator.scaler
        state = dict(make_state(), args=vars(run.args), steps=step, rng=rngs, data=dict(data_position),
                     scaler=scaler.state_dict() if scaler is not None else None)
        path = checkpoint_path(run.ckpt_dir, step)
        atomic_save(state, path)
        if keep > 0:
            for old in list_checkpoints(run.ckpt_dir)[:-keep]:
                checkpoint_path(run.ckpt_dir, old).unlink(missing_ok=True)
        run.logger.info(f"saved checkpoint {path}")
    run.accelerator.wait_for_everyone()


def restore_scaler(run: TrainRun, ckpt: dict) -> None:
    if run.accelerator.scaler is not None and ckpt.get("scaler") is not None:
        run.accelerator.scaler.load_state_dict(ckpt["scaler"])


def infinite_epochs(loader, sampler, epoch: int, batch: int) -> Iterator:
    """Yield (epoch, batch_index, data) forever from a data position; datasets with a per-epoch
    deterministic choice (e.g. latent flips) get `set_epoch`."""
    while True:
        sampler.set_position(epoch, batch)
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        for data in loader:
            yield epoch, batch, data
            batch += 1
        epoch, batch = epoch + 1, 0


def training_loader(dataset, batch_size: int, sampler, args, collate_fn=None) -> "torch.utils.data.DataLoader":
    """The trainers' DataLoader: pinned memory on CUDA (asynchronous copies), a deeper prefetch,
    and workers kept alive across epochs (no restart stall each epoch) unless the dataset makes a
    per-epoch choice through `set_epoch` (crops, flips), which the workers' copies would not see."""
    from torch.utils.data import DataLoader

    workers = args.num_workers
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=torch.cuda.is_available(), drop_last=True,
                      persistent_workers=workers > 0 and not hasattr(dataset, "set_epoch"),
                      prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(args.seed))


def scalars_to_host(logs: Mapping[str, Any]) -> Dict[str, float]:
    """The one-element tensors of `logs` as floats, read to the host in one transfer (one wait for
    the device instead of one per value)."""
    keys = [k for k, v in logs.items() if torch.is_tensor(v) and v.numel() == 1]
    if not keys:
        return {}
    return dict(zip(keys, torch.stack([logs[k].detach().float().reshape(()) for k in keys]).tolist()))


class StepMonitor:
    """Losses are checked for non-finite values on the device at every step but read to the host
    only on logged steps, before a checkpoint and at the last step: then ONE all-reduce carries the
    loss values, the non-finite counts gathered since the previous read and the stop flag, so the
    steps in between never wait for the device. A NaN on any rank stops every rank at that read,
    with the loss named, before a checkpoint could hold it; a signal on any rank stops all of
    them together (at the next read when several processes must agree)."""

    def __init__(self, run: TrainRun, stop: StopRequest):
        self.run, self.stop = run, stop
        self.history: Dict[str, list] = {}
        self._nonfinite: Optional[torch.Tensor] = None  # per loss, summed over the unread steps
        self._first_unread: Optional[int] = None

    def __call__(self, losses: Mapping[str, torch.Tensor], step: int, record: bool = True):
        """Returns ({name: mean over ranks} on read steps else {}, stop_requested); raises
        NonFiniteLossError."""
        values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
        nonfinite = (~torch.isfinite(values)).float()
        self._nonfinite = nonfinite if self._nonfinite is None else self._nonfinite + nonfinite
        self._first_unread = step if self._first_unread is None else self._first_unread
        args = self.run.args
        if not (record or should_run(step, args.checkpointing_steps, args.max_train_steps)
                or (self.run.world == 1 and self.stop.requested)):
            return {}, False
        flags = torch.cat([values, self._nonfinite, values.new_tensor([float(self.stop.requested)])])
        packed = self.run.accelerator.reduce(flags, reduction="sum").tolist()
        since, self._nonfinite, self._first_unread = self._first_unread, None, None
        n = len(losses)
        bad = [k for k, count in zip(losses, packed[n:2 * n]) if count > 0]
        if bad:
            where = f"step {step}" if since == step else f"steps {since}-{step}"
            msg = (f"non-finite {bad[0]} at {where}; stopping without saving "
                   f"(last good checkpoint: {list_checkpoints(self.run.ckpt_dir)[-1:] or 'none'})")
            self.run.logger.error(msg)
            raise NonFiniteLossError(msg)
        means = {k: v / self.run.world for k, v in zip(losses, packed[:n])}
        if record:
            for k, v in means.items():
                self.history.setdefault(k, []).append(v)
        return means, packed[2 * n] > 0

    def summary(self) -> dict:
        out = {}
        for k, v in self.history.items():
            tail = v[-max(1, len(v) // 10):]
            out[k] = {"first": v[0], "last": v[-1], "min": min(v), "mean_last_10%": sum(tail) / len(tail)}
        return out


class Throughput:
    """Images per second overall and after a warm-up (compilation, allocator, first batches)."""

    def __init__(self, start_step: int, max_steps: int):
        self.t0, self.seen = time.time(), 0
        self.warmup_at = start_step + min(5, max(1, (max_steps - start_step) // 2))
        self.t_warm, self.seen_warm = None, 0

    def update(self, images: int, step: int) -> None:
        self.seen += images
        if step == self.warmup_at and self.t_warm is None:
            self.t_warm, self.seen_warm = time.time(), self.seen

    def rate(self) -> float:
        return self.seen / max(time.time() - self.t0, 1e-9)

    def summary(self) -> dict:
        now = time.time()
        return {"seconds": now - self.t0, "images_per_sec": self.rate(),
                "images_per_sec_after_warmup": None if self.t_warm is None
                else (self.seen - self.seen_warm) / max(now - self.t_warm, 1e-9),
                "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


def should_run(step: int, every: int, max_steps: int, first: bool = False) -> bool:
    """Periodic work at multiples of `every`, at the last step (and at step 1 when `first`)."""
    if every <= 0:
        return False
    return step % every == 0 or step == max_steps or (first and step == 1)


def adamw(params, lr: float, args, betas=None) -> torch.optim.Optimizer:
    """AdamW from the common flags (fused on CUDA)."""
    return torch.optim.AdamW(params, lr=lr, betas=betas or (args.adam_beta1, args.adam_beta2),
                             weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                             fused=torch.cuda.is_available() or None)


def lr_multiplier(step: int, schedule: str, warmup_steps: int = 0, decay_start: int = 0, total_steps: int = 1,
                  final_ratio: float = 0.0) -> float:
    """LR / base LR at `step` (0-based count of optimizer steps already taken on THIS optimizer's
    own clock). constant; linear warmup from 0 over `warmup_steps`; then
    'cosine': cosine from 1 to `final_ratio` between warmup end and `total_steps`;
    'linear': constant until `decay_start`, then linear to `final_ratio` at `total_steps`."""
    if schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"unknown LR schedule '{schedule}' (constant, cosine, linear)")
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    start = warmup_steps if schedule == "cosine" else max(decay_start, warmup_steps)
    frac = min(max((step - start) / max(total_steps - start, 1), 0.0), 1.0)
    if schedule == "cosine":
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    return 1.0 - (1.0 - final_ratio) * frac


def lr_scheduler(optimizer, **kw) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_multiplier` (its state_dict goes in the checkpoint)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, **kw))


def save_image_grid(images: torch.Tensor, path: str | os.PathLike) -> None:
    """Images [N, C, H, W] in [0, 1] -> one PNG grid, written atomically."""
    from torchvision.utils import make_grid

    grid = make_grid(images.float().cpu(), nrow=int(math.ceil(math.sqrt(len(images)))), padding=2)
    # A diverged model gives NaN pixels: show them black rather than cast garbage.
    arr = (grid.nan_to_num(0.0).permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8")
    atomic_save_png(arr, path)


def log_images(accelerator, images: torch.Tensor, step: int, tag: str = "samples") -> None:
    """Send an image batch [N, C, H, W] in [0, 1] to the active trackers."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            from torchvision.utils import make_grid

            tracker.writer.add_image(tag, make_grid(images.float().cpu(), nrow=int(math.ceil(math.sqrt(len(images))))), step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(img) for img in images.float().cpu()]}, step=step)


def add_common_training_flags(p) -> None:
    """Experiment, resume, precision and optimiser flags every trainer shares (official REPA-E
    names); trainers add their own groups."""
    import argparse

    g = p.add_argument_group("experiment and logging")
    g.add_argument("--output-dir", type=str, default="exps", help="folder holding experiment folders")
    g.add_argument("--exp-name", type=str, required=False, default=None, help="experiment folder name under --output-dir")
    g.add_argument("--logging-dir", type=str, default="logs", help="tracker log folder inside the experiment folder")
    g.add_argument("--report-to", type=str, default="tensorboard", choices=["tensorboard", "wandb", "none"], help="experiment tracker (wandb honours WANDB_MODE=offline)")
    g.add_argument("--sampling-steps", type=int, default=10000, help="write a sample / reconstruction grid every N steps")
    g.add_argument("--log-every", type=int, default=1, help="log losses every N steps")
    g.add_argument("--resume-step", type=int, default=0, help="continue from checkpoints/NNNNNNN.pt (0: fresh)")
    g.add_argument("--resume", type=str, default=None, help="'latest' or a step; overrides --resume-step")
    g.add_argument("--continue-train-exp-dir", type=str, default=None, help="experiment folder to continue (default <output-dir>/<exp-name>)")
    g.add_argument("--keep-checkpoints", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    g = p.add_argument_group("precision and speed")
    g.add_argument("--allow-tf32", action="store_true", help="allow TF32 matmuls and convolutions on Ampere+ GPUs")
    g.add_argument("--mixed-precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="autocast precision (bf16 recommended on GPUs)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the trained network")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=1400, help="stop after this many epochs")
    g.add_argument("--max-train-steps", type=int, default=400000, help="stop after this many optimisation steps")
    g.add_argument("--checkpointing-steps", type=int, default=50000, help="write a checkpoint every N steps (and at the end)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches accumulated per optimisation step")
    g.add_argument("--batch-size", type=int, default=256, help="global batch (split over processes and accumulation)")
    g.add_argument("--num-workers", type=int, default=4, help="data loader worker processes per rank")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam-weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--adam-epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0: off)")
    g.add_argument("--seed", type=int, default=0, help="global seed (each rank derives its own stream)")


def finish_args(args, default_exp_name: str):
    """Post-parse fix-ups shared by the trainers."""
    if args.resume is None and args.resume_step:
        args.resume = str(args.resume_step)
    if args.exp_name is None:
        args.exp_name = default_exp_name
    return args


def checkpoint_or_stop(run: TrainRun, step: int, stop_requested: bool, save: Callable[[], None]) -> bool:
    """End of an optimisation step: checkpoint at multiples of --checkpointing-steps, at the last
    step, and when a stop was requested; returns True when the loop must end (the signal case)."""
    if should_run(step, run.args.checkpointing_steps, run.args.max_train_steps) or stop_requested:
        save()
    if stop_requested:
        run.logger.info(f"stop requested (signal): saved step {step}, exiting")
    return stop_requested


def finish_run(run: TrainRun, summary: dict, step: int, monitor: StepMonitor, speed: Throughput,
               message: str = "") -> dict:
    """Complete the run summary (losses, checkpoints, sample files, throughput), write
    summary.json atomically and close the trackers."""
    summary.update(end_step=step, losses=monitor.summary(),
                   checkpoints=[str(checkpoint_path(run.ckpt_dir, s)) for s in list_checkpoints(run.ckpt_dir)],
                   samples=sorted(str(p) for p in (run.exp_dir / "samples").glob("*.png")), **speed.summary())
    if run.is_main:
        atomic_write_text(json.dumps(summary, indent=2) + "\n", run.exp_dir / "summary.json")
        run.logger.info(f"done at step {step}{message}; summary in {run.exp_dir / 'summary.json'}")
    run.accelerator.end_training()
    return summary
