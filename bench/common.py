"""Measurement shared by every bench script: one JSON line per measurement, taken the same way.

A bench runs a sequence of real steps under a `StepProbe`: warm-up steps, >= 10 timed steps
(median seconds per step, synchronised on CUDA, peak memory), then one step under each counter:

* flops: `torch.utils.flop_counter.FlopCounterMode` over the whole step (forward and backward);
* ops: a TorchDispatchMode counting the aten ops that reach a kernel (views, `detach`, bare
  allocations and scalar reads excluded; a `_foreach_*` op counts once, as its one CPU dispatch),
  the stand-in for kernel launches that does not depend on the machine; plus host
  synchronisations: the ops that make a CUDA host wait for the device (`_local_scalar_dense`,
  i.e. `.item()`/`float()`/`bool()`, data-dependent shapes such as `nonzero`, boolean-mask
  indexing) and host reads of whole tensors (`.tolist()`, `.numpy()`; a CPU run cannot tell a
  device tensor from a host one, so a read of a host-side tensor counts too); on CUDA, kernels and synchronising runtime calls from torch.profiler as well;
* saved: bytes of the distinct storages autograd saves for backward (saved_tensors_hooks;
  parameters excluded); non-reentrant activation checkpointing saves its inputs through the same
  hooks, so checkpointed regions count what they really keep.

A trainer bench wraps the trainer's batch iterator (`StepProbe.wrap`): the work from handing
out batch i to handing out batch i+1 is step i, so the final checkpoint and evaluation after the
last step never enter a figure.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import statistics
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten

# Dense bf16 tensor-core peak (FLOP/s, no sparsity) by substring of the device name.
DENSE_BF16_PEAK = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12),
                   ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("A10G", 70e12), ("4090", 165e12),
                   ("A6000", 155e12)]

# Ops that return without launching a kernel (metadata only or an uninitialised allocation).
_NO_KERNEL = {aten.detach.default, aten._unsafe_view.default, aten.empty.memory_format, aten.empty_strided.default,
              aten.new_empty.default, aten.new_empty_strided.default, aten.empty_like.default, aten.lift_fresh.default,
              aten.set_.source_Storage_storage_offset, aten.resize_.default}
# Ops whose result the host must wait for on CUDA (a scalar read or a data-dependent output shape).
_SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
             aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default, aten.equal.default,
             aten.repeat_interleave.Tensor}
_HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in (indices or ()) if i is not None)


class OpCounter(TorchDispatchMode):
    """Counts kernel-launching aten ops and host synchronisations of everything run inside."""

    def __init__(self):
        super().__init__()
        self.kernels, self.syncs, self.by_op, self.sync_ops = 0, 0, Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNC_OPS or (func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default)
                                 and _has_bool_index(args)):
            self.syncs += 1
            self.sync_ops[func.overloadpacket.__name__] += 1
        if not (func.is_view or func in _NO_KERNEL or func is aten._local_scalar_dense.default):
            self.kernels += 1
            self.by_op[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class HostReadCounter(TorchFunctionMode):
    """Whole-tensor reads to the host (`.tolist()`, `.numpy()`): a device-to-host copy on CUDA that
    never reaches the dispatcher on CPU."""

    def __init__(self):
        super().__init__()
        self.reads, self.ops = 0, Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            self.reads += 1
            self.ops[func.__name__] += 1
        return func(*args, **(kwargs or {}))


class SavedBytes:
    """Bytes of the distinct non-parameter storages autograd keeps for backward."""

    def __init__(self):
        self.params = set()
        self.storages = {}
        self._stack = contextlib.ExitStack()

    def _note(self, t: torch.Tensor) -> None:
        if not torch.is_tensor(t) or t.layout != torch.strided:
            return
        s = t.untyped_storage()
        if s.data_ptr() not in self.params and s.data_ptr() not in self.storages:
            # held until the end of the step: a storage freed by an earlier backward must not
            # hand its address to a new one, which would then go uncounted
            self.storages[s.data_ptr()] = (s.nbytes(), t)

    def _pack(self, t):
        self._note(t)
        return t

    def __enter__(self):
        # type() rather than isinstance: Parameter's instance check trips deprecation warnings on
        # unrelated objects of the heap
        self.params = {o.untyped_storage().data_ptr() for o in gc.get_objects() if type(o) is torch.nn.Parameter}
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        self.storages = {k: (n, None) for k, (n, _) in self.storages.items()}

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.storages.values())


@contextlib.contextmanager
def cuda_optimizer_path(utils_module):
    """Within: `utils.adamw` builds the fused AdamW on CPU as well, the implementation the trainers
    use on CUDA. PyTorch's CPU default (single-tensor) reads every parameter's step counter with
    `.item()` and launches ~7 ops per parameter, which the CUDA step never does: counted as is, that
    fallback would swamp the figures meant to stand for the GPU step."""
    original = utils_module.adamw

    def adamw(*args, **kwargs):
        opt = original(*args, **kwargs)
        for group in opt.param_groups:
            group.update(fused=True, foreach=False)
        return opt

    utils_module.adamw = adamw
    try:
        yield
    finally:
        utils_module.adamw = original


@contextlib.contextmanager
def probed_trainer(utils_module, probe):
    """Within: a trainer's batches pass through `probe` (which times and counts the work between
    two batches) and its AdamW is the fused one (`cuda_optimizer_path`)."""
    original = utils_module.infinite_epochs
    utils_module.infinite_epochs = lambda *a, **k: probe.wrap(original(*a, **k))
    try:
        with cuda_optimizer_path(utils_module):
            yield
    finally:
        utils_module.infinite_epochs = original


def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


class StepProbe:
    """Runs the measurement plan over consecutive steps: `warmup` untouched steps, `timed` timed
    steps, then one step per counter (flops, ops, saved[, profile on CUDA])."""

    def __init__(self, warmup: int = 3, timed: int = 10):
        counters = ["flops", "ops", "saved"] + (["profile"] if _cuda() else [])
        self.plan = ["warmup"] * warmup + ["time"] * timed + counters
        self.step = 0
        self.starts: list = []
        self.results: dict = {}
        self._stack: Optional[contextlib.ExitStack] = None
        self._open = None

    @property
    def steps_needed(self) -> int:
        return len(self.plan)

    def _phase(self, i: int) -> Optional[str]:
        return self.plan[i] if i < len(self.plan) else None

    def begin(self) -> None:
        _sync()
        self.starts.append(time.perf_counter())
        phase = self._phase(self.step)
        if phase == "time" and self._phase(self.step - 1) != "time" and _cuda():
            torch.cuda.reset_peak_memory_stats()
        stack = contextlib.ExitStack()
        if phase == "flops":
            self._open = stack.enter_context(FlopCounterMode(display=False))
        elif phase == "ops":
            self._open = (stack.enter_context(OpCounter()), stack.enter_context(HostReadCounter()))
        elif phase == "saved":
            self._open = stack.enter_context(SavedBytes())
        elif phase == "profile":
            from torch.profiler import ProfilerActivity, profile

            self._open = stack.enter_context(profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]))
        self._stack = stack

    def end(self) -> None:
        phase = self._phase(self.step)
        if phase == "time" and self._phase(self.step + 1) != "time" and _cuda():
            _sync()
            self.results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self._stack.close()
        if phase == "flops":
            self.results["flops_per_step"] = self._open.get_total_flops()
        elif phase == "ops":
            ops, reads = self._open
            self.results.update(kernels_per_step=ops.kernels, syncs_per_step=ops.syncs + reads.reads,
                                top_ops=dict(ops.by_op.most_common(8)), sync_ops=dict(ops.sync_ops + reads.ops))
        elif phase == "saved":
            self.results["saved_activation_bytes"] = self._open.total
        elif phase == "profile":
            events = self._open.events()
            self.results["cuda_kernels_per_step"] = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
            self.results["cuda_syncs_per_step"] = sum(1 for e in events if e.name in (
                "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"))
        self._open, self._stack = None, None
        self.step += 1

    def run(self, step_fn: Callable[[], None]) -> None:
        """The whole plan over calls of `step_fn` (benches that own their loop)."""
        for _ in self.plan:
            self.begin()
            step_fn()
            self.end()
        _sync()
        self.starts.append(time.perf_counter())

    def wrap(self, batches: Iterable) -> Iterator:
        """A trainer's batch iterator with the plan applied; the trainer must run
        `steps_needed + 1` steps (the last one, with its final checkpoint, is not measured)."""
        batches = iter(batches)
        while True:
            if self._stack is not None:  # closed before the fetch: an epoch's new loader iterator is no step's work
                self.end()
            try:
                batch = next(batches)
            except StopIteration:
                return
            if self.step < len(self.plan):
                self.begin()
            else:
                self.starts.append(time.perf_counter())
            yield batch

    def seconds_per_step(self) -> list:
        return [self.starts[i + 1] - self.starts[i] for i, p in enumerate(self.plan)
                if p == "time" and i + 1 < len(self.starts)]


def git_commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except OSError:
        return "unknown"


def device_name() -> str:
    return torch.cuda.get_device_name() if _cuda() else "cpu"


def dense_bf16_peak() -> Optional[float]:
    if not _cuda():
        return None
    name = device_name()
    return next((peak for key, peak in DENSE_BF16_PEAK if key in name), None)


def emit(bench: str, config: str, **figures) -> dict:
    """Print (and return) one measurement as a JSON line, with the machine, commit and date."""
    line = {"bench": bench, "config": config, "device": device_name(), "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, **figures}
    print(json.dumps(line), flush=True)
    return line


def record(bench: str, config: str, batch: int, probe: StepProbe, **extra) -> dict:
    """The JSON line of one measurement (printed and returned). images/s and MFU come from the
    median step time; counts are per step and per image as named."""
    times = probe.seconds_per_step()
    median = statistics.median(times) if times else None
    r = probe.results
    flops = r.get("flops_per_step")
    peak = dense_bf16_peak()
    line = {
        "batch": batch, "steps_timed": len(times),
        "s_per_step_median": median, "images_per_s": batch / median if median else None,
        "peak_memory_gib": r.get("peak_memory_gib"),
        "flops_per_image": flops / batch if flops is not None else None,
        "mfu": flops / median / peak if (flops and median and peak) else None,
        "kernels_per_step": r.get("kernels_per_step"), "syncs_per_step": r.get("syncs_per_step"),
        "saved_activation_bytes": r.get("saved_activation_bytes"),
        "cuda_kernels_per_step": r.get("cuda_kernels_per_step"), "cuda_syncs_per_step": r.get("cuda_syncs_per_step"),
        "top_ops": r.get("top_ops"), "sync_ops": r.get("sync_ops"),
    }
    line.update(extra)
    return emit(bench, config, **line)


def add_probe_flags(p, timed_default: int = 10) -> None:
    """--warmup / --steps of every bench."""
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--steps", type=int, default=timed_default, help="timed steps (the median is reported; use >= 10)")
