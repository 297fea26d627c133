"""Runs one trainer several times inside ONE `accelerate launch` (the 2-process gloo tests): the
process group and the imports are paid once, and each run is a fresh `main(parse_args(argv))`,
as a new command would be (a resumed run reads everything from its checkpoint).

  accelerate launch --multi_gpu --num_processes 2 tests/multiprocess_runs.py TRAINER RUNS.json

RUNS.json: a list of argv lists, run in order. The tests call `launch_two_processes` and compare
checkpoints with `differing_tensors`."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch_two_processes(trainer: str, runs: list, tmp_path: Path) -> None:
    """Run `trainer` once per argv of `runs`, in order, inside one 2-process gloo launch."""
    from tests.cli import free_port

    spec = Path(tmp_path) / "runs.json"
    spec.write_text(json.dumps([[str(a) for a in argv] for argv in runs]))
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
           str(ROOT / "tests/multiprocess_runs.py"), trainer, str(spec)]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


def differing_tensors(a: dict, b: dict, parts, optimizers) -> list:
    """Names of every tensor that differs between two checkpoints (models and optimizer states)."""
    import torch

    bad = [f"{part}.{k}" for part in parts for k, v in a[part].items() if not torch.equal(v, b[part][k])]
    for name in optimizers:
        for pid, st in a[name]["state"].items():
            bad += [f"{name}.{pid}.{k}" for k, v in st.items() if not torch.equal(v, b[name]["state"][pid][k])]
    return bad


def main() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch.distributed as dist
    from accelerate.state import PartialState

    # Each run's end_training() would close the process group; keep the one group for all runs
    # (re-opening one on the same port can race) and close it once at the end.
    PartialState.destroy_process_group = lambda self, group=None: None
    trainer = importlib.import_module(sys.argv[1])
    for argv in json.loads(Path(sys.argv[2]).read_text()):
        trainer.main(trainer.parse_args(argv))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
