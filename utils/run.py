"""The trainers' shared plumbing (train_repae.py, train_ldm_only.py, train_stage1.py): one place for
the experiment folder, logging, the data loop, the per-step all-reduce with stop signals and
non-finite guards, optimisers and LR schedules, trackers and the run summary, so every trainer
resumes and fails the same way."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

import torch

from utils.checkpoints import checkpoint_path, list_checkpoints, resolve_resume, seed_everything
from utils.config import DEFAULT_NOTICES, _notice, resolve_precision_defaults
from utils.io import atomic_write_text, remove_stale_temp_files


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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_CHECK_EVERY = 5  # steps between the ranks' stop agreements when no log or checkpoint reads


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker init: SIGTERM / SIGINT reach the whole process group (scancel, timeout,
    Kubernetes, Ctrl-C); the workers ignore them so the main process saves and ends them itself
    instead of dying on "DataLoader worker ... is killed by signal"."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # inherited blocked from `start_workers`: a signal held
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # since the fork is now discarded


def start_workers(loader) -> Iterator:
    """`iter(loader)` with SIGTERM / SIGINT blocked while its worker processes are created: a
    signal to the process group that lands between a worker's fork and its `ignore_stop_signals`
    stays pending (the worker then ignores it) instead of killing it; the main process receives
    it as soon as the workers exist."""
    if getattr(loader, "num_workers", 0) == 0 or not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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


def infinite_epochs(loader, sampler, epoch: int, batch: int) -> Iterator:
    """Yield (epoch, batch_index, data) forever from a data position; datasets with a per-epoch
    deterministic choice (e.g. latent flips) get `set_epoch`. Workers ignore stop signals
    (`shield_workers`): the main process handles them at the end of the step."""
    shield_workers(loader)
    while True:
        sampler.set_position(epoch, batch)
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        for data in start_workers(loader):
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
        # Several processes agree on a stop only through this all-reduce: between logged steps it
        # still runs every STOP_CHECK_EVERY steps, so a scheduler's signal is acted on within a few
        # steps (a launcher kills ranks ~30 s after SIGTERM), not after --log-every steps.
        if not (record or should_run(step, args.checkpointing_steps, args.max_train_steps)
                or (self.run.world == 1 and self.stop.requested)
                or (self.run.world > 1 and step % STOP_CHECK_EVERY == 0)):
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
