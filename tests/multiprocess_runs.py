"""Runs one trainer several times inside ONE `accelerate launch` (the 2-process gloo tests): the
process group and the imports are paid once, and each run is a fresh `main(parse_args(argv))`,
as a new command would be (a resumed run reads everything from its checkpoint).

  accelerate launch --multi_gpu --num_processes 2 tests/multiprocess_runs.py TRAINER RUNS.json

RUNS.json: a list of argv lists, run in order."""
import importlib
import json
import sys
from pathlib import Path


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
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
