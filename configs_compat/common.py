"""What every original's translator shares: the result (`ConfigTranslation`), the error
(`OriginalConfigError`), the reader that makes sure every leaf key of a file is accounted for
(`_Reader`), and the pieces several originals use (Adam betas, released weights to start from,
Lightning's trainer and data sections). The per-original translators are `rae.py`,
`lightningdit.py` (LightningDiT and its VA-VAE tokenizer) and `taming.py`; `originals.py` detects
which original wrote a file and dispatches. Names with a leading underscore are internal to the
configs_compat package.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

_MISSING = object()
# The originals stop by epochs: our step limit must not stop them first.
UNLIMITED_STEPS = 10 ** 9


class OriginalConfigError(ValueError):
    """An original's config holds keys (or values) the target script does not understand."""


@dataclass
class ConfigTranslation:
    original: str
    values: Dict[str, Any] = field(default_factory=dict)  # {dest: value}
    epochs: Dict[str, float] = field(default_factory=dict)  # {dest: value in epochs}
    yields: Dict[str, Set[str]] = field(default_factory=dict)  # {dest: explicit dests that drop it}
    needs_explicit: Dict[str, str] = field(default_factory=dict)  # {dest: why the file's value cannot be used}
    unused: List[str] = field(default_factory=list)  # "key (why)" for keys without effect on this script

    def defaults(self, explicit: Iterable[str] = ()) -> Dict[str, Any]:
        """{dest: default} for argparse, given the dests the user set explicitly on the command line."""
        explicit = set(explicit)
        for dest, why in self.needs_explicit.items():
            if dest not in explicit:
                raise OriginalConfigError(why)
        out = {d: v for d, v in self.values.items() if not (self.yields.get(d, set()) & explicit)}
        epochs = {d: v for d, v in self.epochs.items() if d not in explicit}
        if epochs:
            out["config_epochs"] = epochs
        return out


def _flatten(node, prefix=""):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    return a == b


class _Reader:
    """Walks one config: every leaf key must be consumed by flag / fixed / unused / subtree."""

    def __init__(self, cfg: dict, path, prog: str, original: str):
        self.cfg, self.path, self.prog = cfg, Path(path), prog
        self.leaves = dict(_flatten(cfg))
        self.used: Set[str] = set()
        self.out = ConfigTranslation(original)

    # ---- access ---------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.leaves or any(k.startswith(key + ".") for k in self.leaves)

    def get(self, key: str, default=_MISSING):
        if key in self.leaves:
            self.used.add(key)
            return self.leaves[key]
        if default is _MISSING:
            self.error(key, "is required here")
        return default

    def subtree(self, key: str) -> dict:
        """The mapping under `key`, every leaf marked consumed (its reader checks the keys)."""
        node = self.cfg
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        self.used.update(k for k in self.leaves if k == key or k.startswith(key + "."))
        return dict(node) if isinstance(node, dict) else {}

    def error(self, key: str, message: str):
        raise OriginalConfigError(f"{self.path}: key '{key}' {message} "
                                  f"({self.out.original} config read by {self.prog})")

    def path_value(self, value) -> str:
        """A path from the file: as given when it exists from here, else under the folders above
        the YAML (the original repository's root), else as given (the reader will name it)."""
        p = Path(str(value)).expanduser()
        if p.is_absolute() or p.exists():
            return str(p)
        for parent in self.path.resolve().parents:
            if (parent / p).exists():
                return str(parent / p)
        return str(value)

    # ---- consumers ------------------------------------------------------------------------
    def flag(self, key: str, dest: str, convert: Optional[Callable] = None, epochs: bool = False):
        """Map `key` onto the flag `dest` (converted); returns the value or _MISSING when absent."""
        if key not in self.leaves:
            return _MISSING
        value = self.get(key)
        if value is None:
            self.error(key, f"has no value (it sets --{dest.replace('_', '-')})")
        value = convert(value) if convert is not None else value
        (self.out.epochs if epochs else self.out.values)[dest] = value
        return value

    def set(self, dest: str, value, yields: Iterable[str] = ()):
        self.out.values[dest] = value
        if yields:
            self.out.yields[dest] = set(yields)

    def fixed(self, key: str, allowed: tuple, why: str):
        """A setting we implement with exactly the values `allowed`."""
        if key not in self.leaves:
            return
        value = self.get(key)
        if not any(_same(value, a) for a in allowed):
            self.error(key, f"= {value!r} is not supported ({why}; accepted: {', '.join(map(repr, allowed))})")

    def unused(self, key: str, why: str):
        """Understood, no effect on this script (whole subtrees allowed)."""
        hit = [k for k in self.leaves if k == key or k.startswith(key + ".")]
        if hit:
            self.used.update(hit)
            self.out.unused.append(f"{key} ({why})")

    def first(self, *keys: str) -> Optional[str]:
        return next((k for k in keys if k in self.leaves), None)

    def finish(self) -> ConfigTranslation:
        left = sorted(set(self.leaves) - self.used)
        if left:
            raise OriginalConfigError(
                f"{self.path}: {self.prog} does not understand key{'s' if len(left) > 1 else ''} "
                f"{', '.join(repr(k) for k in left)} ({self.out.original} config); remove "
                f"{'them' if len(left) > 1 else 'it'} or give the equivalent flags")
        return self.out


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------
def _betas(r: _Reader, key: str):
    value = r.get(key, None)
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        r.error(key, f"= {value!r}: expected [beta1, beta2]")
    r.set("adam_beta1", float(value[0]))
    r.set("adam_beta2", float(value[1]))


def _init_from(r: _Reader, key: str):
    """Released weights to start from: they belong to the file's model, so an explicit --model
    (or --model-config) drops them too."""
    if r.flag(key, "init_from", r.path_value) is not _MISSING:
        r.out.yields["init_from"] = {"model", "model_config"}


def _precision(value) -> str:
    return {"32": "no", "16": "fp16", "16-mixed": "fp16", "bf16": "bf16", "bf16-mixed": "bf16"}.get(str(value), None)


# ------------------------------------------------------------------------------------------------
# Lightning-trained originals (VA-VAE's LDM autoencoder, taming VQGAN)
# ------------------------------------------------------------------------------------------------
def _model_params(r: _Reader, keys: Iterable[str]) -> dict:
    """`model.params` minus the loss config: the network config for --model-config."""
    params = {}
    for k in keys:
        if r.has(f"model.params.{k}"):
            params[k] = r.subtree(f"model.params.{k}") if isinstance(r.cfg["model"]["params"][k], dict) \
                else r.get(f"model.params.{k}")
    return params


def _lightning_data(r: _Reader):
    r.fixed("data.target", ("main.DataModuleFromConfig",), "one training and one validation set")
    devices = r.get("lightning.trainer.devices", 1) or 1
    nodes = r.get("lightning.trainer.num_nodes", 1) or 1
    devices = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
    accumulate = r.flag("lightning.trainer.accumulate_grad_batches", "gradient_accumulation_steps", int)
    accumulate = 1 if accumulate is _MISSING else accumulate
    # the original's batch_size is per GPU: keep its global batch (the optimisation it published)
    r.flag("data.params.batch_size", "batch_size", lambda v: int(v) * devices * int(nodes) * accumulate)
    r.flag("lightning.trainer.gradient_clip_val", "max_grad_norm", float)
    r.flag("data.params.num_workers", "num_workers", int)
    r.fixed("data.params.wrap", (True, False), "epoch wrapping of the dataset")
    r.unused("lightning.trainer.strategy", "DDP through Accelerate")
    r.fixed("lightning.trainer.accelerator", ("gpu", "cuda", "auto", "cpu"), "the device comes from accelerate")
    epochs = r.flag("lightning.trainer.max_epochs", "epochs", int)
    if epochs is not _MISSING:
        r.set("max_train_steps", UNLIMITED_STEPS)
    r.flag("lightning.trainer.precision", "mixed_precision", _precision)
    if r.out.values.get("mixed_precision", "no") is None:
        r.error("lightning.trainer.precision", "is not one of 32, 16, bf16")


def _disc_in_channels(r: _Reader, p: str, model: dict):
    k = f"{p}.disc_in_channels"
    if k in r.leaves:
        images = int(model.get("ddconfig", {}).get("in_channels", 3))
        r.fixed(k, (images,), "the discriminator sees the images (ddconfig.in_channels)")


def _sampler_keys(r: _Reader, mode_key: str, method_key: str, steps_key: str, tol_prefix: str) -> None:
    """The sampler settings both RAE and LightningDiT configs carry, under their own key names:
    ODE / SDE, the solver, the step count and the dopri5 tolerances."""
    mode = r.flag(mode_key, "mode", lambda v: str(v).lower())
    if mode is not _MISSING and mode not in ("ode", "sde"):
        r.error(mode_key, f"= {mode!r}: ODE or SDE")
    method = r.flag(method_key, "solver", lambda v: str(v).lower())
    if method is not _MISSING and method not in ("euler", "heun", "dopri5"):
        r.error(method_key, f"= {method!r}: known euler, heun, dopri5")
    r.flag(steps_key, "num_steps", int)
    r.flag(f"{tol_prefix}atol", "atol", float)
    r.flag(f"{tol_prefix}rtol", "rtol", float)
