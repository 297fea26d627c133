"""The worker of tests/test_repae_semantics.py's 2-process BatchNorm test, in a module of its own
so that the spawned processes import only torch and the SiT's BatchNorm."""
import os
from pathlib import Path

import torch


def batch(world: int) -> torch.Tensor:
    """The global batch [2 * world, 4, 3, 3], per-channel means and scales far from (0, 1)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(2 * world, 4, 3, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1) + 1.5


def loss_weights(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32)


def run(rank: int, world: int, port: str, out_dir: str) -> None:
    import torch.distributed as dist

    from models.sit import LatentBatchNorm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mine = batch(world)[2 * rank: 2 * rank + 2].clone().requires_grad_(True)
    bn = LatentBatchNorm(4, eps=1e-4, momentum=0.1, affine=False)
    bn.sync = True
    for _ in range(2):  # two updates of the running statistics
        y = bn(mine)
    (y * loss_weights(y.numel()).view_as(y)).sum().backward()
    torch.save({"y": y.detach(), "grad": mine.grad, "mean": bn.running_mean, "var": bn.running_var,
                "n": bn.num_batches_tracked}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()
