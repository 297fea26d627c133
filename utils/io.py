"""Files that must not be half-written or unsafe to read: strict state-dict loading, `torch.load`
restricted to inert data, atomic writes (temp file + fsync + rename) and the cleanup of the temp
files an interrupted write leaves."""
from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

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
