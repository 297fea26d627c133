"""The built-in default job: build the procedural dataset, train REPA-E end to end, report.

  python demo.py            tiny preset on CPU (configs/repae/demo_cpu.yaml), a few minutes
  python demo.py --gpu      bigger preset on a GPU (configs/repae/demo_gpu.yaml)
  python demo.py --resume latest     continue a stopped demo from its last checkpoint

The training runs as its own process (`train_repae.py` with the preset's flags, its output shown
as it comes); the report is read from the `summary.json` the trainer writes.

Prints what was achieved: the VAE's reconstruction PSNR on fixed images before and after
end-to-end tuning, a summary of every loss curve, throughput, and where the sample grids and
checkpoints are. Nothing is downloaded: encoders, VAE and LPIPS start from random weights (the
configs say so explicitly), so the figures measure the training machinery, not a paper result.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import utils

ROOT = Path(__file__).resolve().parent
TRAINER = ROOT / "train_repae.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="run the bigger GPU preset")
    p.add_argument("--out", type=str, default="demo_out", help="folder for data and the experiment")
    p.add_argument("--resume", type=str, default=None,
                   help="continue the previous demo experiment from this checkpoint ('latest' or a path; passed to "
                        "train_repae.py --resume) instead of restarting")
    p.add_argument("--with-photos", action="store_true", help="mix scikit-image's public-domain photos into the data")
    p.add_argument("--max-train-steps", type=utils.positive_int, default=None,
                   help="override the preset's number of training steps (e.g. 4 for a smoke run)")
    return p


def _file_stamp(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def run_trainer(flags: list, summary_path: Path) -> dict:
    """Run train_repae.py with `flags` as a child process, its output streamed to this terminal,
    and return the summary.json it writes. A non-zero exit (an error, or a stop by a signal after
    saving a checkpoint) raises SystemExit naming the exit code."""
    before = _file_stamp(summary_path)
    cmd = [sys.executable, str(TRAINER), *flags]
    proc = subprocess.Popen(cmd)
    # Ctrl-C reaches the trainer itself (same process group), which saves a checkpoint and stops:
    # the demo waits for it instead of dying first; a SIGTERM sent to the demo alone is passed on.
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    if code != 0:
        raise SystemExit(f"[demo] {TRAINER.name} exited with code {code} (its output is above); "
                         f"command: {' '.join(cmd)}")
    if _file_stamp(summary_path) in (None, before):
        raise SystemExit(f"[demo] {TRAINER.name} finished but did not write {summary_path}")
    return json.loads(summary_path.read_text())


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # inherited by the trainer
    import torch
    import yaml

    from datasources import make_procedural_dataset

    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu given but no CUDA device is visible")
    preset = ROOT / "configs" / "repae" / ("demo_gpu.yaml" if args.gpu else "demo_cpu.yaml")
    cfg = yaml.safe_load(preset.read_text())
    out = Path(args.out)
    data_dir = make_procedural_dataset(out / f"data_{cfg['resolution']}px", num_classes=cfg["num_classes"],
                                       per_class=400 if args.gpu else 48, resolution=cfg["resolution"],
                                       seed=0, photos_per_class=2 if args.with_photos else 0)
    exp_name = "repae_gpu" if args.gpu else "repae_cpu"
    if not args.resume and (out / exp_name).exists():
        shutil.rmtree(out / exp_name)
    flags = ["--config", str(preset), "--data-dir", str(data_dir), "--output-dir", str(out), "--exp-name", exp_name]
    if args.resume:
        flags += ["--resume", args.resume]
    if args.max_train_steps:
        flags += ["--max-train-steps", str(args.max_train_steps)]
    print(f"[demo] data: {data_dir} | preset: {preset.relative_to(ROOT)} | experiment: {out / exp_name}", flush=True)
    t0 = time.time()
    summary = run_trainer(flags, out / exp_name / "summary.json")
    wall = time.time() - t0

    print("\n" + "=" * 72)
    print(f"REPA-E demo ({'GPU' if args.gpu else 'CPU'} preset) finished in {wall / 60:.1f} min, "
          f"steps {summary['start_step']} -> {summary['end_step']}, {summary['images_per_sec']:.1f} images/s")
    print(f"VAE reconstruction PSNR on 8 fixed images: {summary['psnr_start']:.2f} dB -> {summary['psnr_end']:.2f} dB")
    if summary["losses"]:
        print(f"{'loss':<18}{'first':>10}{'last':>10}{'min':>10}{'last 10%':>10}")
        for k, v in summary["losses"].items():
            print(f"{k:<18}{v['first']:>10.4f}{v['last']:>10.4f}{v['min']:>10.4f}{v['mean_last_10%']:>10.4f}")
    if summary["samples"]:
        print(f"sample grids: {summary['samples'][-1]} (and {len(summary['samples']) - 1} earlier)")
    if summary["checkpoints"]:
        print(f"checkpoint:   {summary['checkpoints'][-1]}")
    print(f"summary:      {out / exp_name / 'summary.json'}")
    print("=" * 72)
    return summary


if __name__ == "__main__":
    main()
