"""State shared across processes and models: EMA, gradient switches, wrapper stripping,
broadcasts from the main process and the bit-identity check of every rank's training state."""
from __future__ import annotations

from typing import Dict, Mapping

import torch
import torch.nn as nn


def requires_grad(module: nn.Module, flag: bool = True) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def is_sharded(t) -> bool:
    """A DTensor: under --fsdp (utils/fsdp.py) each process holds only a shard of it."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (a view: in-place ops update the parameter); other
    tensors as they are."""
    return t.to_local() if is_sharded(t) else t


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """EMA over parameters and floating buffers (BatchNorm statistics); other buffers are copied.
    Each kind of update is one foreach op over all tensors (a few kernel launches on CUDA instead
    of two per tensor) with the per-tensor arithmetic unchanged: ema * decay, then + (1 - decay) * p.
    Sharded models (--fsdp, EMA sharded alike) are averaged shard by shard, on each process's own."""
    ema_params, ema_bufs = dict(ema.named_parameters()), dict(ema.named_buffers())
    averaged, new, copied, source = [], [], [], []
    for name, p in model.named_parameters():
        averaged.append(local(ema_params[name]))
        new.append(local(p.detach()).to(averaged[-1].dtype))
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
    (per-parameter state), for `check_ranks_identical`. Sharded tensors (--fsdp) are left out:
    each element has one owner, so there is no copy to compare; what stays replicated (buffers,
    optimizer step counts) is compared."""
    out: Dict[str, torch.Tensor] = {}
    for part, obj in parts.items():
        if isinstance(obj, nn.Module):
            out.update({f"{part}.{k}": v for k, v in obj.state_dict().items() if torch.is_tensor(v) and not is_sharded(v)})
        else:  # an optimizer (or accelerate's wrapper of one)
            opt = getattr(obj, "optimizer", obj)
            for i, group in enumerate(opt.param_groups):
                for j, p in enumerate(group["params"]):
                    for k, v in opt.state.get(p, {}).items():
                        if torch.is_tensor(v) and not is_sharded(v):
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


def allreduce_grads(params, accelerator) -> None:
    """Average the gradients of `params` over ranks in one flat all-reduce (for a module not
    wrapped in DDP, e.g. train_stage1.py's discriminator, whose loss is a method call, not a forward)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


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
