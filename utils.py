"""Small helpers shared by every script: strict weight loading, atomic files, config merging,
experiment folders, seeding and logging."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import random
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
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


class UnsafeCheckpointError(RuntimeError):
    """A file that only loads through full Python unpickling, which can run arbitrary code."""


def _inert_data_globals() -> list:
    """Plain-data classes that released checkpoints carry beside their tensors (REPA / REPA-E /
    LightningDiT store `args` as an argparse.Namespace; Lightning files hold numpy scalars): they
    rebuild from values only and cannot call anything, so `weights_only` loading may accept them."""
    import argparse
    import pathlib

    from numpy import dtypes as np_dtypes

    multiarray = getattr(np, "_core", None) or np.core
    return ([argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, np.ndarray, np.dtype,
             multiarray.multiarray.scalar, multiarray.multiarray._reconstruct]
            + [c for c in vars(np_dtypes).values() if isinstance(c, type) and issubclass(c, np.dtype)])


def torch_load_safe(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """`torch.load` on the CPU with `weights_only=True`: tensors, numbers, strings, lists, tuples,
    dicts and inert data (`_inert_data_globals`) only, so a downloaded file can never run code. A
    file that needs more is refused (`UnsafeCheckpointError`) and a truncated or corrupt one is
    reported, both naming the file."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(_inert_data_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        detail = next((l.strip() for l in reason if "GLOBAL" in l or "Unsupported" in l), reason[0] if reason else "")
        raise UnsafeCheckpointError(
            f"refusing {what} {path}: it holds Python objects that only full unpickling rebuilds, and "
            f"unpickling can run arbitrary code ({detail}). If you trust its source, load it once with "
            f"torch.load(path, weights_only=False) and re-save only its tensors (the state dict) with "
            f"torch.save or safetensors.torch.save_file, then pass the converted file") from None
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        size = path.stat().st_size
        raise RuntimeError(f"could not read {what} {path} ({size} bytes; truncated or corrupt?): {e}") from e


def load_checkpoint_file(path: str | os.PathLike, key: str | None = None) -> dict:
    """Load a `.pt`/`.pth`/`.safetensors` file on CPU; optionally return `ckpt[key]`.

    Errors name the file: a missing file, an unreadable one, one that would need unpickling
    (refused, see `torch_load_safe`), or a missing key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise RuntimeError(f"could not read checkpoint {path}: {e}") from e
    else:
        obj = torch_load_safe(path)
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
    fd, tmp = reserve_temp_file(path)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if _is_disk_full(e):
            raise OSError(errno.ENOSPC, f"no space left on device (ENOSPC) while writing {path}; free space "
                                        f"in {path.parent} and rerun ({e})") from e
        raise
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def reserve_temp_file(path: str | os.PathLike) -> tuple:
    """(fd, name) of a new temp file beside `path` named `.NAME.XXXXXXXX.tmp` (the pattern
    `remove_stale_temp_files` cleans), with the mode the umask gives any new file: mkstemp's
    0600 would make checkpoints on a shared machine unreadable to the group."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, new_file_mode())
    return fd, tmp


def new_file_mode() -> int:
    """The permission bits open() gives a new file under the current umask (e.g. 0644)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    # Linux reports it without changing it; os.umask can only read it by setting it, which
    # would briefly affect files other threads create (tracker logs)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_disk_full(e: OSError) -> bool:
    """ENOSPC / EDQUOT, or numpy's short-write error ("N requested and M written") which carries
    no errno: on a regular file a short write means the device or the quota is full."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT) or bool(re.search(r"\d+ requested and \d+ written", str(e)))


TEMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temp_files(folder: str | os.PathLike) -> list:
    """Delete the temp files `atomic_write` leaves when a write is interrupted (`.NAME.XXXXXXXX.tmp`)
    in `folder`; returns them. Only that pattern is touched, never a user's file. Call it at the
    start of the script that writes `folder`, before any process writes there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if TEMP_RE.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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


def positive_int(text) -> int:
    """argparse type: an integer >= 1 (counts, sizes and periods where 0 means nothing happens)."""
    import argparse

    value = _strict_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text) -> int:
    """argparse type: an integer >= 0."""
    import argparse

    value = _strict_int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _strict_int(text) -> int:
    import argparse

    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


class OneDefaultHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` states each option's default once: options whose help already says what the
    default is (or whose default is None, i.e. resolved at run time) get no second '(default: X)'."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def config_value(action, value, key: str, source: str):
    """A config value checked as the flag itself would be: through the action's type (a YAML
    `2.5` for an integer flag is refused, a YAML `1e-4` string becomes a float) and its choices.
    Errors name `source` (the file), the key and the flag."""
    def bad(why):
        return ValueError(f"{source}: key '{key}' ({action.option_strings[0] if action.option_strings else action.dest}): {why}")

    if value is None:
        return None
    if action.nargs == 0:  # store_true / store_false / BooleanOptionalAction
        if not isinstance(value, bool):
            raise bad(f"expected true or false, got {value!r}")
        return value
    if isinstance(value, list) and action.nargs not in (None, "?"):
        return [_config_value_one(action, v, bad) for v in value]
    return _config_value_one(action, value, bad)


def _config_value_one(action, value, bad):
    import argparse

    if isinstance(value, (dict, list)):
        if action.type in (None, str):
            return value  # structured values some scripts take as they are
        raise bad(f"expected one value, got {value!r}")
    if action.type in (int, positive_int, non_negative_int) and isinstance(value, (bool, float)):
        raise bad(f"expected an integer, got {value!r}")
    if action.type is float and isinstance(value, bool):
        raise bad(f"expected a number, got {value!r}")
    if action.type is not None:
        try:
            value = action.type(str(value))  # exactly what the same text on the command line gives
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise bad(str(e) or f"invalid value {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise bad(f"{value!r} is not one of {list(action.choices)}")
    return value


def parse_args_with_config(parser, argv=None):
    """argparse with `--config FILE.yaml`: the file's keys are defaults, explicit flags win.

    Keys may be written with hyphens or underscores; an unknown key or a value its flag would
    refuse is an error naming the file and the key.
    """
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None, help='YAML file of flag values')
    known, _ = pre.parse_known_args(argv)
    if known.config:
        cfg = load_yaml(known.config)
        original = original_config_defaults(cfg, known.config, parser, argv)
        if original is not None:
            parser.set_defaults(**original)
            return parser.parse_args(argv)
        actions = {a.dest: a for a in parser._actions}
        defaults = {}
        for k, v in cfg.items():
            dest = k.replace("-", "_")
            if dest not in actions:
                raise ValueError(f"{known.config}: unknown key '{k}' (not a flag of {parser.prog})")
            defaults[dest] = config_value(actions[dest], v, k, known.config)
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def explicit_dests(parser, argv=None) -> set:
    """The dests of the flags written on the command line `argv` (argparse's unique prefixes too)."""
    argv = sys.argv[1:] if argv is None else argv
    options = parser._option_string_actions
    out = set()
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        hits = {options[name].dest} if name in options else \
            {a.dest for o, a in options.items() if parser.allow_abbrev and o.startswith(name)}
        if len(hits) == 1:
            out |= hits
    return out


def original_config_defaults(cfg: dict, path, parser, argv=None):
    """When `cfg` is one of the originals' own YAML files (RAE, LightningDiT / VA-VAE, taming), its
    translation for this script (configs_compat) as argparse defaults; None for our own
    {flag: value} files. Explicit flags win over every value the file gives."""
    from configs_compat import translate_original

    translation = translate_original(cfg, path, parser.prog)
    if translation is None:
        return None
    defaults = translation.defaults(explicit_dests(parser, argv))
    actions = {}
    for action in parser._actions:  # of several flags of one dest, check with the one taking a value
        if action.dest not in actions or (actions[action.dest].nargs == 0 and action.nargs != 0):
            actions[action.dest] = action
    lacking = sorted(set(defaults) - set(actions) - {"config_epochs"})
    if lacking:  # a translator written for flags this script does not have
        raise ValueError(f"{path}: the {translation.original} config sets {lacking}, which {parser.prog} has no flag for")
    for dest in set(defaults) & set(actions):  # checked as the flag itself would check them (choices)
        defaults[dest] = config_value(actions[dest], defaults[dest], f"-> --{dest.replace('_', '-')}", path)
    if translation.unused and os.environ.get("RANK", "0") == "0":
        print(f"{path}: read as the original's {translation.original} config; without effect on {parser.prog}: "
              f"{'; '.join(translation.unused)}", file=sys.stderr)
    return defaults


def apply_config_epochs(args, steps_per_epoch: int, logger=None) -> None:
    """Turn the settings an original's config counts in epochs (RAE: checkpoint interval, LR
    schedule; `args.config_epochs`) into steps, once the trainer knows the epoch length."""
    for dest, epochs in (getattr(args, "config_epochs", None) or {}).items():
        steps = round(float(epochs) * steps_per_epoch)
        setattr(args, dest, max(steps, 1) if dest == "checkpointing_steps" else steps)
        if logger is not None:
            logger.info(f"--{dest.replace('_', '-')} {getattr(args, dest)} ({epochs:g} epochs of {steps_per_epoch} steps, "
                        f"from --config)")


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


@torch.no_grad()
def check_ranks_identical(accelerator, named: Mapping[str, torch.Tensor], step: int) -> None:
    """Collective. Raise on every rank, naming the tensors, unless every rank holds bit-identical
    `named` tensors (model and EMA weights, buffers, optimiser moments...). A debugging check of
    multi-process runs (`--check-ranks-every`); one all-gather of 16 bytes per tensor."""
    if accelerator.num_processes == 1:
        return
    names = list(named)
    local = tensor_fingerprints([named[k] for k in names]).to(accelerator.device)
    every = accelerator.gather(local.unsqueeze(0)).view(accelerator.num_processes, len(names), 2).cpu()
    differ = [names[i] for i in range(len(names)) if not bool((every[:, i] == every[0, i]).all())]
    if differ:
        raise RuntimeError(f"step {step}: ranks hold different values of {len(differ)} of {len(names)} tensors: "
                           + ", ".join(differ[:20]) + (" ..." if len(differ) > 20 else ""))


def training_state_tensors(**parts) -> Dict[str, torch.Tensor]:
    """{'<part>.<key>': tensor} over modules (state_dict: parameters and buffers) and optimizers
    (per-parameter state), for `check_ranks_identical`."""
    out: Dict[str, torch.Tensor] = {}
    for part, obj in parts.items():
        if isinstance(obj, nn.Module):
            out.update({f"{part}.{k}": v for k, v in obj.state_dict().items() if torch.is_tensor(v)})
        else:  # an optimizer (or accelerate's wrapper of one)
            opt = getattr(obj, "optimizer", obj)
            for i, group in enumerate(opt.param_groups):
                for j, p in enumerate(group["params"]):
                    for k, v in opt.state.get(p, {}).items():
                        if torch.is_tensor(v):
                            out[f"{part}.{i}.{j}.{k}"] = v
    return out


def broadcast_buffers_from_main(accelerator, module: nn.Module) -> None:
    """Collective. Copy the main process's buffers of `module` to every rank. DDP does this before
    each forward of a wrapped module; calling it at the end of a step makes every rank hold the
    same state between steps too (e.g. a discriminator's BatchNorm statistics, which each rank
    updates from its own batch)."""
    broadcast_from_main(list(module.buffers()), accelerator)


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


class StopRequest:
    """SIGTERM / SIGINT set a flag; the training loop saves a checkpoint and exits at the end of
    the current step instead of dying mid-write (then with 128 + the signal number, as a shell
    reports a killed job, so a scheduler requeues it)."""

    def __init__(self):
        self.requested = False
        self.signum: Optional[int] = None
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
        self.signum = self.signum or signum

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()


class NonFiniteLossError(RuntimeError):
    pass


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker init: SIGTERM / SIGINT reach the whole process group (scancel, timeout,
    Kubernetes, Ctrl-C); the workers ignore them so the main process saves and ends them itself
    instead of dying on "DataLoader worker ... is killed by signal"."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _WorkerInit:
    """A worker_init_fn that ignores stop signals, then runs the loader's own (picklable, for
    spawn-started workers)."""

    def __init__(self, inner: Optional[Callable[[int], None]]):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals(worker_id)
        if self.inner is not None:
            self.inner(worker_id)


def shield_workers(loader) -> None:
    """Make `loader`'s worker processes ignore SIGTERM / SIGINT (see `ignore_stop_signals`)."""
    if getattr(loader, "num_workers", 0) > 0 and not isinstance(loader.worker_init_fn, _WorkerInit):
        loader.worker_init_fn = _WorkerInit(loader.worker_init_fn)


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
    args_written: bool = False
    start_step: int = 0
    started: float = field(default_factory=time.time)

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


def limit_cpu_threads(num_workers: int, logger=None) -> int:
    """CPU runs: share the cores between this machine's processes and their DataLoader workers
    (each worker runs one thread: torch sets that in its worker loop), so the compute threads
    do not oversubscribe. Only ever lowers the thread count; OMP_NUM_THREADS, when set, decides."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    budget = max(1, (os.cpu_count() or 1) // max(local, 1) - max(num_workers, 0))
    threads = min(torch.get_num_threads(), budget)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        if logger is not None:
            logger.info(f"CPU threads: {threads} per process ({os.cpu_count()} cores, {local} process(es) here, "
                        f"{num_workers} loader worker(s) each; OMP_NUM_THREADS overrides)")
    return threads


def start_run(args, name: str) -> TrainRun:
    """Accelerator (CPU/gloo when there is no GPU), experiment folder with args.json and log.txt,
    resume resolution (a fresh run refuses a folder that already has checkpoints), TF32, the
    micro-batch size (`--batch-size` is global) and a per-rank seed.

    Expects the common flags: output_dir, exp_name, continue_train_exp_dir, logging_dir, report_to,
    resume, gradient_accumulation_steps, mixed_precision, allow_tf32, batch_size, seed."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if args.mixed_precision is None or getattr(args, "compile", False) is None:
        resolve_precision_defaults(args, "no")  # callers that built args without finish_args
    exp_dir = Path(args.output_dir) / args.exp_name
    ckpt_dir = exp_dir / "checkpoints"
    # REPA-E's --continue-train-exp-dir names the folder the resume checkpoint is read from.
    source_dir = Path(getattr(args, "continue_train_exp_dir", None) or exp_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(exp_dir), logging_dir=str(exp_dir / args.logging_dir)),
        cpu=not torch.cuda.is_available(),
    )
    if getattr(args, "continue_train_exp_dir", None) and args.resume is None:
        raise SystemExit(f"--continue-train-exp-dir {source_dir} needs --resume-step N or --resume latest "
                         f"(which of its checkpoints to continue from)")
    notes: list = []
    resume_path = resolve_resume(source_dir / "checkpoints", args.resume, notes=notes)
    existed = exp_dir.is_dir()
    if accelerator.is_main_process:
        if (resume_path is None or resume_path.parent.resolve() != ckpt_dir.resolve()) and list_checkpoints(ckpt_dir):
            raise SystemExit(f"{ckpt_dir} already holds checkpoints {list_checkpoints(ckpt_dir)}; "
                             f"pass --resume latest to continue or choose another --exp-name")
        exp_dir.mkdir(parents=True, exist_ok=True)
        # args.json is written with the first checkpoint of this start (save_training_checkpoint):
        # a start that fails to resume leaves the experiment as it was.
        stale = [p for d in (exp_dir, ckpt_dir, exp_dir / "samples") for p in remove_stale_temp_files(d)]
    accelerator.wait_for_everyone()
    logger = create_logger(exp_dir, accelerator.is_main_process, name)
    for note in notes:
        logger.warning(note)
    if accelerator.is_main_process and stale:
        logger.info(f"removed {len(stale)} temp file(s) of interrupted writes: {', '.join(p.name for p in stale[:5])}"
                    f"{' ...' if len(stale) > 5 else ''}")
    world = accelerator.num_processes
    logger.info(f"experiment {exp_dir} | {world} process(es) on {accelerator.device} | "
                f"mixed precision {args.mixed_precision} | compile {getattr(args, 'compile', None)} | "
                f"TF32 {bool(args.allow_tf32 and torch.cuda.is_available())}")
    init_kwargs = {}
    if accelerator.is_main_process and args.report_to == "wandb":
        init_kwargs["wandb"] = wandb_init_kwargs(args, exp_dir)
    elif accelerator.is_main_process and getattr(args, "wandb_history_path", None):
        _notice(f"--wandb-history-path ignored (--report-to {args.report_to})")
    for text in DEFAULT_NOTICES:
        logger.info(f"notice: {text}")
    DEFAULT_NOTICES.clear()
    if accelerator.device.type == "cpu":
        limit_cpu_threads(getattr(args, "num_workers", 0), logger)
    if resume_path is None and str(args.resume) == "latest":
        logger.warning(no_checkpoint_to_resume(exp_dir, existed))
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    denom = world * args.gradient_accumulation_steps
    if args.batch_size % denom:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by processes x accumulation = {denom}")
    seed_everything(args.seed * world + accelerator.process_index)
    if accelerator.is_main_process:
        accelerator.init_trackers(name, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                for k, v in vars(args).items()}, init_kwargs=init_kwargs)
    return TrainRun(args, accelerator, exp_dir, ckpt_dir, resume_path, logger, args.batch_size // denom)


def no_checkpoint_to_resume(exp_dir: Path, existed: bool) -> str:
    """What `--resume latest` says when there is nothing to resume: which folder it looked in, and
    experiments with checkpoints beside it whose names are close (a misspelled --exp-name)."""
    import difflib

    why = "the experiment folder did not exist" if not existed else "it holds no checkpoint yet"
    msg = f"--resume latest: nothing to resume in {exp_dir / 'checkpoints'} ({why}); starting from step 0"
    parent = exp_dir.parent
    if parent.is_dir():
        others = [p.name for p in parent.iterdir() if p.is_dir() and p != exp_dir and list_checkpoints(p / "checkpoints")]
        close = difflib.get_close_matches(exp_dir.name, others, n=3, cutoff=0.6)
        if close:
            msg += f". Experiments with checkpoints under {parent} with similar names: {', '.join(close)}"
    return msg


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


def infinite_epochs(loader, sampler, epoch: int, batch: int) -> Iterator:
    """Yield (epoch, batch_index, data) forever from a data position; datasets with a per-epoch
    deterministic choice (e.g. latent flips) get `set_epoch`. Workers ignore stop signals
    (`shield_workers`): the main process handles them at the end of the step."""
    shield_workers(loader)
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
        self.stopped_at: Optional[int] = None  # the step after which a signal (on any rank) stopped the run

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
        if packed[2 * n] > 0:
            self.stopped_at = step
        return means, packed[2 * n] > 0

    def exit_code(self) -> int:
        """0 for a completed run; 128 + signal number for a stopped one (143 SIGTERM, 130 SIGINT;
        a rank the signal did not reach reports SIGTERM's)."""
        if self.stopped_at is None:
            return 0
        return 128 + int(self.stop.signum or signal.SIGTERM)

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
    """Images [N, C, H, W] in [0, 1] -> one PNG grid, written atomically; 1-channel images give
    a 1-channel (greyscale) PNG."""
    from torchvision.utils import make_grid

    grid = make_grid(images.float().cpu(), nrow=int(math.ceil(math.sqrt(len(images)))), padding=2)
    # A diverged model gives NaN pixels: show them black rather than cast garbage.
    arr = (grid.nan_to_num(0.0).permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8")
    atomic_save_png(arr[..., 0] if images.shape[1] == 1 else arr, path)  # make_grid repeats a grey channel


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
    g.add_argument("--report-to", type=str, default="tensorboard", choices=["tensorboard", "wandb", "none"], help="experiment tracker (wandb: run folder <exp>/wandb, run name = --exp-name; offline without a wandb login)")
    g.add_argument("--wandb-history-path", type=str, default=None, help="an earlier run's wandb run folder (or a file holding its run id): this run continues that wandb history")
    g.add_argument("--sampling-steps", type=non_negative_int, default=10000, help="write a sample / reconstruction grid every N steps (0: never)")
    g.add_argument("--log-every", type=positive_int, default=1, help="log losses every N steps (0: never)")
    g.add_argument("--resume-step", type=int, default=0, help="continue from checkpoints/NNNNNNN.pt (0: fresh)")
    g.add_argument("--resume", type=str, default=None, help="'latest' or a step; overrides --resume-step")
    g.add_argument("--continue-train-exp-dir", type=str, default=None, help="experiment folder whose checkpoint --resume-step / --resume loads (REPA-E's meaning; default <output-dir>/<exp-name>); new checkpoints go to <output-dir>/<exp-name>")
    g.add_argument("--keep-checkpoints", type=non_negative_int, default=0, help="keep only the newest N checkpoints (0: all)")
    g.add_argument("--check-ranks-every", type=non_negative_int, default=0,
                   help="debugging: every N steps verify that all processes hold bit-identical models, EMA, "
                        "discriminator and optimizer states, and stop naming those that differ (0: off)")
    g = p.add_argument_group("precision and speed")
    g.add_argument("--allow-tf32", action=argparse.BooleanOptionalAction, default=True, help="allow TF32 matmuls and convolutions on Ampere+ GPUs (on by default, as REPA-E)")
    # None = not given: the launcher's setting, then the script's default (REPA-E: fp16) applies.
    g.add_argument("--mixed-precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="autocast precision; when not given, `accelerate launch --mixed_precision` wins, else the "
                        "script's default (REPA-E trainers: fp16; off on CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the trained network (default: on with a GPU, as REPA-E; off on CPU)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=1400, help="stop after this many epochs")
    g.add_argument("--max-train-steps", type=positive_int, default=400000, help="stop after this many optimisation steps")
    g.add_argument("--checkpointing-steps", type=positive_int, default=50000, help="write a checkpoint every N steps (and at the end)")
    g.add_argument("--gradient-accumulation-steps", type=positive_int, default=1, help="micro-batches accumulated per optimisation step")
    g.add_argument("--batch-size", type=positive_int, default=256, help="global batch (split over processes and accumulation)")
    g.add_argument("--num-workers", type=non_negative_int, default=4, help="data loader worker processes per rank")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam-weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--adam-epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0: off)")
    g.add_argument("--seed", type=int, default=0, help="global seed (each rank derives its own stream)")


# One-line notices about defaults switched at parse time; start_run writes them to the log.
DEFAULT_NOTICES: list = []


def _notice(text: str, echo: bool = True) -> None:
    DEFAULT_NOTICES.append(text)
    if echo and int(os.environ.get("RANK", "0")) == 0:
        print(f"[notice] {text}", flush=True)


def resolve_precision_defaults(args, mixed_precision_default: str = "fp16") -> None:
    """Fill `--mixed-precision` and `--compile` when they were not given (None).

    Precision: a launcher setting (`accelerate launch --mixed_precision X`, exported as
    ACCELERATE_MIXED_PRECISION) wins over the script default. The launcher exports 'no' also when
    nothing was set, so 'no' from it cannot be told apart from its own default and the script
    default stands (pass --mixed-precision no for full precision). fp16 autocast needs a GPU and
    torch.compile on CPU mostly costs compile time, so without CUDA both are switched off with a
    notice (never silently)."""
    cuda = torch.cuda.is_available()
    DEFAULT_NOTICES.clear()  # only this parse's notices reach the run's log
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if getattr(args, "mixed_precision", "no") is not None and launcher not in ("", "no", args.mixed_precision):
        _notice(f"--mixed-precision {args.mixed_precision} given: accelerate launch's {launcher} is overridden")
    if getattr(args, "mixed_precision", "no") is None:
        if launcher and launcher != "no":
            args.mixed_precision = launcher
            _notice(f"mixed precision {launcher} from `accelerate launch --mixed_precision` (no --mixed-precision flag given)")
        else:
            args.mixed_precision = mixed_precision_default
            said = f"'{launcher}', also its default when nothing is set" if launcher else "nothing"
            _notice(f"mixed precision {mixed_precision_default}: the script default (no --mixed-precision flag; "
                    f"accelerate launch said {said})", echo=False)
    if args.mixed_precision == "fp16" and not cuda:
        _notice("no GPU: --mixed-precision fp16 switched off (full precision on CPU)")
        args.mixed_precision = "no"
    if getattr(args, "compile", False) is None:
        args.compile = cuda
        if not cuda:
            _notice("no GPU: --compile switched off (pass --compile to force torch.compile on CPU)")


def finish_args(args, default_exp_name: str, mixed_precision_default: str = "no"):
    """Post-parse fix-ups shared by the trainers; `mixed_precision_default` is the script's own
    default when neither the flag nor the launcher sets one."""
    if args.resume is None and args.resume_step:
        args.resume = str(args.resume_step)
    if args.exp_name is None:
        args.exp_name = default_exp_name
    resolve_precision_defaults(args, mixed_precision_default)
    return args


def wandb_run_id(path: str | os.PathLike) -> str:
    """The run id of a wandb run folder (`.../wandb/[offline-]run-YYYYMMDD_HHMMSS-ID`, its `files`
    subfolder, or a `wandb-metadata.json` in it) or of a text file holding just the id."""
    p = Path(path)
    if p.is_file() and p.suffix != ".json":
        run_id = p.read_text().strip()
        if not re.fullmatch(r"[A-Za-z0-9_-]+", run_id or "-/"):
            raise SystemExit(f"--wandb-history-path {p}: expected a wandb run id in the file, found {run_id[:40]!r}")
        return run_id
    for part in [p] + list(p.parents):
        m = re.fullmatch(r"(?:offline-)?run-\d{8}_\d{6}-([A-Za-z0-9]+)", part.name)
        if m:
            return m.group(1)
    raise SystemExit(f"--wandb-history-path {p}: not a wandb run folder (run-YYYYMMDD_HHMMSS-ID) nor a file holding a run id")


def wandb_init_kwargs(args, exp_dir: Path) -> dict:
    """wandb.init arguments as REPA-E (run name = --exp-name) with the run folder under the
    experiment folder; without a wandb login (no WANDB_API_KEY, no ~/.netrc entry) wandb logs
    offline instead of stopping at a login prompt."""
    kwargs = {"name": args.exp_name, "dir": str(exp_dir)}
    if getattr(args, "wandb_history_path", None):
        kwargs.update(id=wandb_run_id(args.wandb_history_path), resume="allow")
    if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
        import netrc

        try:
            logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            logged_in = False
        if not logged_in:
            os.environ["WANDB_MODE"] = "offline"
            _notice(f"no wandb login: wandb logs offline under {exp_dir / 'wandb'} (`wandb sync` uploads it later)")
    return kwargs


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
    code = monitor.exit_code()
    if code and step >= getattr(run.args, "max_train_steps", float("inf")):
        code = 0  # the signal came with the last step: the run is complete, nothing to requeue
    stopped = None if code == 0 else {"signal": signal.Signals(code - 128).name, "step": step, "exit_code": code}
    summary.update(end_step=step, losses=monitor.summary(), stopped=stopped,
                   checkpoints=[str(checkpoint_path(run.ckpt_dir, s)) for s in list_checkpoints(run.ckpt_dir)],
                   samples=sorted(str(p) for p in (run.exp_dir / "samples").glob("*.png")), **speed.summary())
    if run.is_main:
        atomic_write_text(json.dumps(summary, indent=2) + "\n", run.exp_dir / "summary.json")
        if stopped:
            run.logger.info(f"stopped by {stopped['signal']} at step {step} (checkpoint saved; resume with "
                            f"--resume latest){message}; summary in {run.exp_dir / 'summary.json'}; exit code {code}")
        else:
            run.logger.info(f"done at step {step}{message}; summary in {run.exp_dir / 'summary.json'}")
    run.accelerator.end_training()
    if stopped:
        # non-zero so a scheduler (Slurm requeue, Kubernetes restart policy) sees an unfinished job
        raise SystemExit(code)
    return summary


def broadcast_from_main(tensors, accelerator) -> None:
    """Overwrite every tensor of `tensors` in place with the main process's values (one broadcast
    per dtype). For state that DDP does not manage: the discriminator, which is not wrapped."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    groups: Dict[torch.dtype, list] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for ts in groups.values():
            flat = torch.cat([t.detach().reshape(-1) for t in ts])
            dist.broadcast(flat, src=0)
            offset = 0
            for t in ts:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def tensor_fingerprints(tensors) -> torch.Tensor:
    """[N, 2] int64: per tensor, the sum and the position-weighted sum of its raw bits (wrapping),
    so any bit that differs changes the row (barring a collision)."""
    rows = []
    for t in tensors:
        x = t.detach().reshape(-1).contiguous()
        if x.is_floating_point():
            x = x.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[x.element_size()])
        x = x.long()
        pos = torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.int64)
        rows.append(torch.stack([x.sum(), (x * pos).sum()]))
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.int64)

