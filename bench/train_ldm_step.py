"""Throughput and peak memory of diffusion-transformer training steps on latents, the step of
`train_ldm_only.py` (forward + loss, backward, clip, fused AdamW, EMA) on random latents.

  python bench/train_ldm_step.py                          # CUDA: SiT-XL/2 on 4x32x32 latents, batch 256, bf16
  python bench/train_ldm_step.py --model DiTDH-XL         # DiT^DH-XL on 768x16x16 RAE latents, batch 128
  python bench/train_ldm_step.py --model LightningDiT-XL/1 --batch-size 256
  python bench/train_ldm_step.py --compile --grad-checkpointing
On a machine without CUDA the tiny sizes run instead (the figures then only show the script works).
Prints images/s after warm-up and peak GPU memory. Weights are random (same cost as trained ones).
"""
import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# model -> (latent shape, default batch): the reference points
REFERENCE = {
    "SiT-XL/2": ((4, 32, 32), 256),
    "LightningDiT-XL/1": ((32, 16, 16), 256),
    "DiTDH-XL": ((768, 16, 16), 128),
}
TINY = {"SiT-XL/2": "SiT-N/2", "LightningDiT-XL/1": "LightningDiT-N/1", "DiTDH-XL": "DiTDH-N"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="SiT-XL/2", help="any name of models.diffusion.DIFFUSION_MODELS")
    p.add_argument("--latent-shape", type=int, nargs=3, default=None, help="C h w (default: the model's reference latents)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad-checkpointing", action="store_true")
    args = p.parse_args()
    import torch

    import utils
    from models.diffusion import VelocityModel, build_diffusion_model, flow_matching_loss, model_family

    cuda = torch.cuda.is_available()
    name = args.model if cuda else TINY.get(args.model, args.model)
    shape, bs = REFERENCE.get(args.model, ((4, 32, 32), 256))
    shape = tuple(args.latent_shape or shape)
    if not cuda:
        shape, bs = (shape[0] if shape[0] <= 32 else 64, 8, 8), 8
    bs = args.batch_size or bs
    precision = args.mixed_precision or ("bf16" if cuda else "no")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    family = model_family(name)
    options = {"grad_checkpointing": args.grad_checkpointing} if family == "sit" else {"use_checkpoint": args.grad_checkpointing}
    net = build_diffusion_model(name, shape, 1000, 0.1, **options).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    model = torch.compile(net) if args.compile else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=cuda or None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    vmodel = VelocityModel(model)
    x = torch.randn(bs, *shape, device=device)
    y = torch.randint(0, 1000, (bs,), device=device)

    def step():
        with autocast:
            if family == "sit":
                loss = model(x, y, loss_kwargs={"weighting": "uniform"})["denoising_loss"].mean()
            else:
                t = torch.sigmoid(torch.randn(bs, device=device))
                loss = flow_matching_loss(vmodel, x, y, t, torch.randn_like(x))[0].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        utils.update_ema(ema, net, 0.9999)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    params = sum(p.numel() for p in net.parameters()) / 1e6
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else "n/a"
    dev = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"[bench] train_ldm step | {name} ({params:.0f}M) on {'x'.join(map(str, shape))} | {dev} | batch {bs} | "
          f"{precision}{' compile' if args.compile else ''}{' ckpt' if args.grad_checkpointing else ''} | "
          f"{bs * args.steps / dt:.1f} images/s ({args.steps / dt:.2f} it/s) | peak memory {mem}")


if __name__ == "__main__":
    main()
