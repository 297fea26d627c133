"""Multi-process exactness of train_stage1.py (2 gloo processes): every rank holds identical
weights after every step (tokenizer, EMA, discriminator; checked in-run by --check-ranks-every 1),
and N steps in one go equal N/2 + resume + N/2 bit for bit."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datasources import make_procedural_dataset
from tests.cli import free_port, to_argv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_procedural_dataset(tmp_path_factory.mktemp("rel_stage1") / "data", num_classes=2, per_class=8,
                                   resolution=40, seed=1)


def launch2(argv, tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
           str(ROOT / "train_stage1.py")] + argv
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def assert_same(a, b, what):
    if isinstance(a, dict):
        assert set(a) == set(b), what
        for k in a:
            assert_same(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{what} differs"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"{what} differs"
    else:
        assert a == b, f"{what}: {a} vs {b}"


def test_two_processes_resume_bit_identical_and_ranks_in_sync(data_dir, tmp_path):
    # KL-VAE with its PatchGAN (BatchNorm, trained from step 0) and an EMA: the discriminator is
    # the part DDP does not synchronise.
    def argv(name, steps, **extra):
        opts = {"config": ROOT / "configs/stage1/tiny_kl.yaml", "data-dir": data_dir, "output-dir": tmp_path,
                "exp-name": name, "max-train-steps": steps, "checkpointing-steps": 2, "sampling-steps": 0,
                "eval-samples": 0, "seed": 5, "disc-start": 0, "ema-decay": 0.9, "perceptual-weight": 0,
                "lr-total-steps": 4}
        return to_argv(opts, extra, switches=["--check-ranks-every", "1"])

    launch2(argv("full", 4), tmp_path)
    # The interrupted run: the full run's folder as it was at step 2 (a launch saved less), resumed
    # in a new pair of processes.
    shutil.copytree(tmp_path / "full", tmp_path / "split")
    (tmp_path / "split/checkpoints/0000004.pt").unlink()
    launch2(argv("split", 4, resume="latest"), tmp_path)
    a = torch.load(tmp_path / "full/checkpoints/0000004.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "split/checkpoints/0000004.pt", map_location="cpu", weights_only=False)
    for part in ("model", "ema", "loss", "opt", "opt_disc", "sched", "sched_disc", "rng", "data"):
        assert_same(a[part], b[part], part)
    assert a["sched_disc"]["last_epoch"] == 4 and len(a["rng"]) == 2
    assert any(k.startswith("discriminator.") and "running_mean" in k for k in a["loss"])
