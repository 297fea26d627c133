"""Fully sharded training (`--fsdp`): each process holds 1/N of the trained network's parameters,
gradients and AdamW moments, and of its EMA, instead of a full replica (DDP, the default).

FSDP2 (`torch.distributed.fsdp.fully_shard`) is applied here directly rather than through
Accelerate's FSDP plugin: Accelerate only enters its FSDP mode on GPU-like devices, so the plugin
cannot run the 2-process CPU/gloo tests, while `fully_shard` works on any backend. The training
loop stays the DDP one (`accelerator.accumulate`, `accelerator.backward`, the prepared optimizer,
`accelerator.clip_grad_norm_`); only the model is not given to `accelerator.prepare`, which would
wrap it in DDP.

Layout: one FSDP unit per transformer block (`module.blocks`) plus the root (embeddings, final
layer, projectors); parameters are split along dim 0 (DTensor `Shard(0)`); buffers stay
replicated. Where only part of a network trains (train_stage1.py's RAE: the ViT decoder, beside a
frozen encoder), that part is the root and the rest stays replicated. Checkpoints hold full state
dicts in exactly the DDP layout (`full_state_dict`), so a run resumes DDP <-> FSDP and
generate.py / the exports read them unchanged."""
from __future__ import annotations

import copy
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from utils.distributed import broadcast_from_main, is_sharded, local


def add_fsdp_flag(g) -> None:
    """--fsdp (off: DDP)."""
    g.add_argument("--fsdp", action="store_true",
                   help="shard the network, its gradients, AdamW moments and EMA over the processes (FSDP2, per "
                        "transformer block) instead of replicating them (DDP), for a training state that outgrows "
                        "one GPU; checkpoints keep the DDP format; on a GPU it implies bf16 (not fp16) and no --compile")


def finish_args_with_fsdp(args, default_exp_name: str, mixed_precision_default: str):
    """`utils.finish_args`, with the defaults --fsdp needs when the flags were not given: bf16 for
    the script's fp16 default and no compile (both refused when given explicitly, see below), each
    said in a notice, so `--fsdp` alone runs on a GPU."""
    from utils.config import _notice, finish_args

    compile_off = args.fsdp and args.compile is None
    if compile_off:
        args.compile = False
    if args.fsdp and mixed_precision_default == "fp16" and torch.cuda.is_available():
        mixed_precision_default = "bf16"
    args = finish_args(args, default_exp_name, mixed_precision_default)
    if compile_off and torch.cuda.is_available():
        _notice("--fsdp: --compile off (not supported with --fsdp; no --compile flag given)")
    return args


def check_fsdp_args(args) -> None:
    """Refuse the combinations --fsdp does not support, naming the flags."""
    if not getattr(args, "fsdp", False):
        return
    if args.compile:
        raise SystemExit("--fsdp with --compile is not supported (torch.compile of the sharded network is untested "
                         "here); pass --no-compile")
    if args.mixed_precision == "fp16":
        raise SystemExit("--fsdp with --mixed-precision fp16 is not supported: the fp16 loss scaler would check each "
                         "process's gradient shard for overflow on its own and the processes could disagree on "
                         "skipping a step; pass --mixed-precision bf16 (or no)")


def shard_blocks(module: nn.Module, mesh, mp_policy=None, blocks: str = "blocks") -> nn.Module:
    """`fully_shard` every transformer block of `module` (its ModuleList `blocks`), then the root (in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    units = getattr(module, blocks, None)
    if not isinstance(units, nn.ModuleList) or len(units) == 0:
        raise SystemExit(f"--fsdp: {type(module).__name__} has no transformer blocks (`.{blocks}`) to shard by; "
                         f"train it without --fsdp")
    kw = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    for block in units:
        fully_shard(block, **kw)
    fully_shard(module, **kw)
    return module


def mixed_precision_policy(mixed_precision: str):
    """bf16: the blocks' parameters are all-gathered in bf16 (half the traffic), gradients are
    reduced in fp32. Inputs are not cast (`cast_forward_inputs=False`): autocast decides the
    precision of each op as under DDP, so the losses computed around the network stay in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    param_dtype = torch.bfloat16 if mixed_precision == "bf16" else None
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard_for_training(net: nn.Module, ema: Optional[nn.Module], accelerator, mixed_precision: str, fresh: bool,
                       part: str = "", blocks: str = "blocks") -> nn.Module:
    """Shard `net` and `ema` (unsharded, identical on every rank after a resume; None: no EMA) in
    place: their submodule `part` ("" = the whole network) by its ModuleList `blocks`; returns a
    meta-device template of the network for `full_copy`. A fresh start first copies the main
    process's weights to every rank and the EMA from them, as DDP's start does."""
    from torch.distributed.device_mesh import init_device_mesh

    if accelerator.num_processes == 1:
        raise SystemExit("--fsdp shards over processes: launch several (accelerate launch --num_processes N / "
                         "torchrun), or train without --fsdp")
    device = accelerator.device
    template = copy.deepcopy(ema if ema is not None else net).to("meta")
    net.to(device)
    if fresh:
        broadcast_from_main(list(net.parameters()) + list(net.buffers()), accelerator)
    mesh = init_device_mesh(device.type, (accelerator.num_processes,))
    if ema is not None:
        ema.to(device)
        if fresh:
            ema.load_state_dict(net.state_dict())
        # never runs forward: the layout only, so its shards line up with the model's
        shard_blocks(ema.get_submodule(part), mesh, blocks=blocks)
    shard_blocks(net.get_submodule(part), mesh, mixed_precision_policy(mixed_precision), blocks)
    return template


def _fsdp_modules(module: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def set_gradient_sync(module: nn.Module, sync: bool) -> None:
    """Whether the sharded parts of `module` reduce-scatter their gradients in this backward: off on
    accumulation micro-steps (the unsharded gradients accumulate), as DDP's no_sync. No-op unsharded."""
    for m in _fsdp_modules(module):
        m.set_requires_gradient_sync(sync, recurse=False)


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters of the sharded parts of `module`. Needed after a forward without
    gradients (e.g. a reconstruction for the discriminator): an FSDP root keeps its parameters
    gathered after its forward for the backward it expects, and meanwhile `named_parameters` would
    be the full tensors, not the shards the EMA and the optimizer update. No-op unsharded."""
    for m in _fsdp_modules(module):
        m.reshard()


def _gather(x: Any, keep: bool) -> Any:
    if is_sharded(x):
        full = x.full_tensor()  # collective: every rank takes part, one tensor at a time
        return full.cpu() if keep else None
    if isinstance(x, dict):
        return {k: _gather(v, keep) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_gather(v, keep) for v in x)
    return x


def full_state_dict(obj, keep: bool = True) -> dict:
    """`obj.state_dict()` of a module or optimizer with every shard gathered into a full CPU tensor
    (kept where `keep`, i.e. on the process that writes; None elsewhere). Collective when `obj` is
    sharded; the state dict itself otherwise. The keys are the unsharded ones (FSDP2 renames
    nothing; the optimizer's state stays keyed by parameter index), hence the DDP layout. Tensors
    are gathered one at a time, so the device never holds more than one full tensor extra."""
    return _gather(obj.state_dict(), keep)


def load_full_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a full (DDP-layout) optimizer state into an optimizer over sharded parameters: each
    rank keeps its slice of every per-parameter tensor of the parameter's shape (no communication:
    every rank read the checkpoint). Over unsharded parameters: `opt.load_state_dict(state)`."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in opt.param_groups for p in group["params"]]
    per_param = {}
    for idx, st in state["state"].items():
        p = params[int(idx)]
        per_param[idx] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                          if is_sharded(p) and torch.is_tensor(v) and v.shape == p.shape else v
                          for k, v in st.items()}
    opt.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})


@torch.no_grad()
def full_copy(sharded: nn.Module, template: nn.Module) -> nn.Module:
    """Collective: an unsharded copy of `sharded` on its device, on every rank (sample grids and
    evaluation run the plain network). Parameters are gathered; buffers, replicated, are copied."""
    params = dict(sharded.named_parameters())
    device = next(iter(params.values())).device
    full = copy.deepcopy(template).to_empty(device=device)
    for name, p in full.named_parameters():
        src = params[name]
        p.copy_(src.full_tensor() if is_sharded(src) else src)
    buffers = dict(sharded.named_buffers())
    for name, b in full.named_buffers():
        b.copy_(buffers[name])
    return full.eval()


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this process holds of `tensors` (the local shard of sharded ones)."""
    return sum(local(t).numel() * t.element_size() for t in tensors)


def state_bytes(model: nn.Module, ema: Optional[nn.Module], opt) -> dict:
    """Per-process bytes of the training state: parameters, EMA (None: none), optimizer moments."""
    inner = getattr(opt, "optimizer", opt)
    moments = [v for st in inner.state.values() for v in st.values() if torch.is_tensor(v)]
    return {"params": local_bytes(model.parameters()), "ema": local_bytes(ema.parameters()) if ema is not None else 0,
            "optimizer": local_bytes(moments)}


def state_bytes_line(model: nn.Module, ema: Optional[nn.Module], opt, sharded: bool) -> str:
    """The log line of `state_bytes` (after the first step, when the optimizer moments exist)."""
    return (f"per-process training state ({'sharded' if sharded else 'replicated'}): "
            + ", ".join(f"{k} {v / 2**20:.3f} MiB" for k, v in state_bytes(model, ema, opt).items()))
