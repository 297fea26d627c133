"""Sampling throughput through generate.py's code path (`generate.sample_batch`: index-keyed noise,
guidance wrapper, sampler, denormalisation and decode): samples/s of a stage-2 model at 256 px with
its tokenizer's decoder, and decode images/s.

  python bench/sample.py [--model SiT-XL/2 | LightningDiT-XL/1 | DiTDH-XL] [--batch-size 64]
                         [--mixed-precision bf16] [--compile]

Models and latents (random weights: throughput does not depend on the values):
  SiT-XL/2           REPA-E SiT, f8d4 VAE latents [4, 32, 32]; Euler 50 + CFG on t <= 0.75, SDE 250
  LightningDiT-XL/1  hustvl, VA-VAE f16d32 latents [32, 16, 16]; Euler 250, shift 1/0.3, CFG on t <= 0.875
  DiTDH-XL           RAE, DINOv2-B latents [768, 16, 16], ViT-XL pixel decoder; RAE grid of 50 points
                     with the dimension shift, CFG and autoguidance (DiTDH-S guide)
On CPU a tiny configuration of the same family runs (N sizes, 32 px) so the script still
exercises everything. CFG doubling is restricted to the guidance interval, so the interval
matters and is part of each setting.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generate import LatentDecoder, sample_batch  # noqa: E402
from models.autoencoder import build_vae  # noqa: E402
from models.diffusion import VelocityModel, build_diffusion_model  # noqa: E402
from models.rae import RAEDecoder  # noqa: E402
from transport import shift_from_dims  # noqa: E402

# name -> (CUDA: latents, tokenizer, CPU stand-in: model, latents, tokenizer)
MODELS = {
    "SiT-XL/2": dict(latents=(4, 32, 32), vae="f8d4", cpu_model="SiT-N/2", cpu_latents=(4, 8, 8), cpu_vae="tiny-f4d4"),
    "LightningDiT-XL/1": dict(latents=(32, 16, 16), vae="vavae-f16d32", cpu_model="LightningDiT-N/1",
                              cpu_latents=(32, 2, 2), cpu_vae="tiny-f16d32"),
    "DiTDH-XL": dict(latents=(768, 16, 16), vae="rae-vit-xl", cpu_model="DiTDH-N", cpu_latents=(32, 4, 4),
                     cpu_vae="rae-tiny", guide="DiTDH-S", cpu_guide="DiTDH-N"),
}


class _RAEPixelDecoder(nn.Module):
    """The RAE pixel decoder alone (the frozen encoder plays no part in sampling), latents
    [B, C, h, w] -> [-1, 1]: the cost of `Tokenizer.decode` for kind rae."""

    def __init__(self, channels: int, grid: int, xl: bool):
        super().__init__()
        size = dict(hidden_size=1152, depth=28, num_heads=16, mlp_dim=4096) if xl else \
            dict(hidden_size=32, depth=1, num_heads=2, mlp_dim=64)
        self.decoder = RAEDecoder(grid * grid, channels, 16 if xl else 8, **size)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        tokens = z.flatten(2).transpose(1, 2)  # [B, N, C]
        return self.decoder(tokens) * 2 - 1


def timed(fn, warmup: int, iters: int, device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.time()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.time() - t) / iters


def build_velocity(name: str, latents, num_classes: int, device) -> VelocityModel:
    opts = dict(z_dims=[768], encoder_depth=8 if name.endswith("XL/2") else 2) if name.startswith("SiT") else {}
    net = build_diffusion_model(name, latents, num_classes, 0.1, **opts)
    return VelocityModel(net.to(device).eval(), data_at_one=name.startswith("LightningDiT"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="SiT-XL/2", choices=list(MODELS))
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                   help="default: bf16 on CUDA, no on CPU (CPU autocast is slower than float32)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--iters", type=int, default=2)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    spec = MODELS[args.model]
    model_name = args.model if cuda else spec["cpu_model"]
    latents = spec["latents"] if cuda else spec["cpu_latents"]
    vae_name = spec["vae"] if cuda else spec["cpu_vae"]
    classes, bs = (1000, args.batch_size or 64) if cuda else (10, args.batch_size or 8)
    args.mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    amp = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]

    c = latents[0]
    if vae_name.startswith("rae"):
        tok = _RAEPixelDecoder(c, latents[1], xl=cuda)
    else:
        tok = build_vae(vae_name)
    decoder = LatentDecoder(tok.to(device).eval(), torch.zeros(c, 1, 1), torch.ones(c, 1, 1)).to(device)
    model = build_velocity(model_name, latents, classes, device)
    field = model
    if args.compile:
        compiled = torch.compile(model)

        class _Field:  # the samplers call .inference; route it through the compiled module
            num_classes = model.num_classes

            @staticmethod
            def inference(x, t, y):
                return compiled(x, t, y)

        field = _Field()
    idx = torch.arange(bs)
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'} | {model_name} on latents {list(latents)}, "
          f"decoder {vae_name}, batch {bs}, mixed precision {args.mixed_precision}, compile {args.compile}")
    if args.model == "SiT-XL/2":
        settings = {
            "ODE Euler 50 steps, CFG 4.0 on t<=0.75": dict(mode="ode", solver="euler", num_steps=50, cfg_scale=4.0,
                                                         guidance_low=0.0, guidance_high=0.75),
            "SDE 250 steps, CFG 2.5 on t<=0.75": dict(mode="sde", num_steps=250, cfg_scale=2.5, guidance_low=0.0,
                                                     guidance_high=0.75),
        }
    elif args.model == "LightningDiT-XL/1":
        settings = {
            "ODE Euler 250 steps, shift 1/0.3, CFG 6.7 on t<=0.875": dict(
                mode="ode", solver="euler", num_steps=250, shift=1 / 0.3, cfg_scale=6.7, guidance_high=0.875),
        }
    else:
        rae = dict(mode="ode", solver="euler", num_steps=50, time_grid="rae", shift=shift_from_dims(c * latents[1] * latents[2]))
        guide = build_velocity(spec["guide"] if cuda else spec["cpu_guide"], latents, classes, device)
        settings = {
            "RAE grid 50 points, unguided": dict(rae, cfg_scale=1.0),
            "RAE grid 50 points, CFG 4.0 on all t": dict(rae, cfg_scale=4.0),
            "RAE grid 50 points, autoguidance 1.42 (DiTDH-S guide)": dict(rae, cfg_scale=1.42, guide=guide),
        }
    for name, kw in settings.items():
        dt = timed(lambda: sample_batch(field, decoder, latents, classes, idx, 0, kw, device, "random", amp),
                   1, args.iters, device)
        print(f"{name}: {bs / dt:.2f} samples/s ({dt:.2f} s per batch of {bs}, decode included)")
    z = torch.randn(bs, *latents, device=device)
    with torch.no_grad():
        dt = timed(lambda: decoder(z), 1, max(3, args.iters), device)
    print(f"decode ({vae_name}, fp32): {bs / dt:.1f} images/s")
    if cuda:
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
