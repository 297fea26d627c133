"""LPIPS alone: what its backward keeps, per memory option (loss/perceptual.py), for one
reconstruction with a gradient against a target without one, as the tokenizer losses call it.

  python bench/lpips_memory.py                                   # 8x3x256x256, fp32, all four options
  python bench/lpips_memory.py --batch-size 2 --resolution 64 --autocast bf16

Configurations: the lpips package's graph; + lean head; + lean trunk (the defaults); + VGG
checkpointing. One JSON line each (bench/common.py's emit): saved bytes (SavedBytes over the
forward), FLOPs and kernel-reaching aten ops of forward + backward (FlopCounterMode, OpCounter),
and on CUDA the peak memory of a forward + backward above what was allocated before it. Random VGG
weights (nothing is downloaded; the cost of trained ones).
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# name -> (lean_head, lean_trunk, grad_checkpointing)
CONFIGS = {
    "lpips-graph": (False, False, False),
    "lean-head": (True, False, False),
    "lean-head+lean-trunk": (True, True, False),
    "lean-head+lean-trunk+checkpointing": (True, True, True),
}


def main(argv=None):
    from common import OpCounter, SavedBytes, emit

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=8, help="images per call")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels")
    p.add_argument("--autocast", choices=["no", "bf16", "fp16"], default="no", help="run LPIPS under this autocast")
    p.add_argument("--configs", type=str, default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    args = p.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    if set(names) - set(CONFIGS):
        p.error(f"--configs: unknown {sorted(set(names) - set(CONFIGS))} (choose from {', '.join(CONFIGS)})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from loss.perceptual import LPIPS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    net = LPIPS(vgg_weights="random").to(device)
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch_size, 3, args.resolution, args.resolution)
    target = torch.rand(shape, generator=g, device=device) * 2 - 1
    recon = (target + 0.2 * torch.randn(shape, generator=g, device=device)).clamp(-1, 1)

    def step(counter=None):
        x = recon.clone().requires_grad_(True)
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            if isinstance(counter, SavedBytes):
                with counter:
                    d = net(x, target)
            else:
                d = net(x, target)
        d.sum().backward()

    lines = []
    for name in names:
        lean_head, lean_trunk, ckpt = CONFIGS[name]
        net.set_memory_options(lean_head=lean_head, lean_trunk=lean_trunk, grad_checkpointing=ckpt)
        saved = SavedBytes()
        step(saved)
        with FlopCounterMode(display=False) as flops:
            step()
        with OpCounter() as ops:
            step()
        peak = None
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        lines.append(emit("lpips_memory", name, batch=args.batch_size, resolution=args.resolution,
                          autocast=args.autocast, lean_head=lean_head, lean_trunk=lean_trunk, grad_checkpointing=ckpt,
                          saved_bytes=saved.total, saved_mib=round(saved.total / 2**20, 2),
                          gflops=round(flops.get_total_flops() / 1e9, 3), kernels=ops.kernels,
                          peak_above_start_mib=peak))
    return lines


if __name__ == "__main__":
    main()
