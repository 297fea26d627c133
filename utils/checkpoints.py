"""Training checkpoints with the full state (RNG of every rank, data position, scaler): paths,
resume resolution (skipping truncated files), saving and restoring."""
from __future__ import annotations

import random
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from utils.config import write_args_json
from utils.io import atomic_save, torch_load_safe

if TYPE_CHECKING:
    from utils.run import TrainRun


CKPT_RE = re.compile(r"^(\d{7})\.pt$")


def rng_state() -> dict:
    """Every RNG of this process as tensors, numbers and strings only, so a checkpoint holding it
    loads with `weights_only=True`; `set_rng_state` restores the exact streams."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]  # tuples in checkpoints written before the tensor form
    if isinstance(py, dict):
        py = (py["version"], tuple(int(v) for v in py["mt"].tolist()), py["gauss_next"])
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    random.setstate(py)
    np.random.set_state(npy)
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


def checkpoint_problem(path: str | os.PathLike) -> Optional[str]:
    """Why `path` is not a complete torch checkpoint (None when it is). torch.save writes a zip whose
    directory sits at the end, so a truncated copy fails here without reading the whole file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            zf.namelist()
        return None
    except (zipfile.BadZipFile, OSError) as e:
        return f"{e} ({Path(path).stat().st_size if Path(path).exists() else 0} bytes; truncated?)"


def resolve_resume(ckpt_dir: str | os.PathLike, resume, flag: str = "--resume",
                   notes: Optional[list] = None) -> Path | None:
    """`resume` is None/0 (start fresh), 'latest' (newest complete checkpoint if any) or a step
    number (must exist); `flag` names the option in the error. 'latest' passes over truncated
    checkpoints, saying which in `notes` (a list the caller logs) or else as a warning."""
    if resume in (None, 0, "0", "", "none"):
        return None
    steps = list_checkpoints(ckpt_dir)
    if str(resume) == "latest":
        for step in reversed(steps):
            path = checkpoint_path(ckpt_dir, step)
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            note = f"{flag} latest: skipping incomplete checkpoint {path} ({problem}); falling back to the previous one"
            if notes is None:
                import warnings

                warnings.warn(note)
            else:
                notes.append(note)
        if steps:
            raise RuntimeError(f"{flag} latest: no complete checkpoint in {ckpt_dir} (all of {steps} are truncated)")
        return None
    step = int(resume)
    if step not in steps:
        raise FileNotFoundError(f"{flag} {step}: no checkpoint for step {step} in {ckpt_dir} "
                                f"(available steps: {steps or 'none'})")
    return checkpoint_path(ckpt_dir, step)


def load_resume_checkpoint(run: TrainRun) -> Optional[dict]:
    """The checkpoint to resume from, loaded on the CPU (never onto the GPU: no OOM at resume) and
    with `weights_only=True` (`torch_load_safe`)."""
    if run.resume_path is None:
        return None
    return torch_load_safe(run.resume_path)


def write_run_args(run: TrainRun, start_step: int) -> None:
    """args.json (what generate.py --exp-dir reads) plus one `args-<UTC time>.json` per start, so
    the history of a resumed experiment's settings is kept."""
    history = run.exp_dir / f"args-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(run.started))}-from-{start_step:07d}.json"
    write_args_json(run.args, history)
    write_args_json(run.args, run.exp_dir / "args.json")
    run.args_written = True


def resume_position(run: TrainRun, ckpt: dict) -> tuple:
    """(step, epoch, batch) where the checkpoint stopped: the loop continues with the next micro-batch.

    The data position counts micro-batches of the checkpoint's global micro-batch (--batch-size /
    --gradient-accumulation-steps images over all processes). Another --batch-size is refused (the
    step count, the data position and the optimiser's trajectory all belong to the old size);
    another accumulation split of the same batch converts the position when it falls on a whole
    new micro-batch and is refused otherwise. Another number of processes with the same split
    needs nothing (the data order is index-keyed)."""
    step, epoch, batch = int(ckpt["steps"]), int(ckpt["data"]["epoch"]), int(ckpt["data"]["batch"])
    old = ckpt.get("args") or {}
    args = run.args
    if "batch_size" in old and int(old["batch_size"]) != int(args.batch_size):
        raise SystemExit(f"--batch-size {args.batch_size}: {run.resume_path} was trained with --batch-size "
                         f"{old['batch_size']} (its step count and data position are in batches of that size); "
                         f"resume with --batch-size {old['batch_size']}, or start a new experiment from its "
                         f"weights")
    old_micro = int(old.get("batch_size", args.batch_size)) // int(old.get("gradient_accumulation_steps", 1) or 1)
    new_micro = int(args.batch_size) // int(args.gradient_accumulation_steps)
    if "batch_size" in old and old_micro != new_micro:
        seen = batch * old_micro  # images of this epoch already used, over all processes
        if seen % new_micro:
            raise SystemExit(
                f"--gradient-accumulation-steps {args.gradient_accumulation_steps}: {run.resume_path} stopped "
                f"{seen} images into epoch {epoch} with --gradient-accumulation-steps "
                f"{old.get('gradient_accumulation_steps', 1)}, which is not a whole number of the new micro-batches "
                f"of {new_micro} images; resume with --gradient-accumulation-steps "
                f"{old.get('gradient_accumulation_steps', 1)}")
        run.logger.info(f"data position converted from micro-batches of {old_micro} to {new_micro} images: "
                        f"batch {batch} -> {seen // new_micro}")
        batch = seen // new_micro
    run.start_step = step
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
        if not run.args_written:
            write_run_args(run, run.start_step)
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
