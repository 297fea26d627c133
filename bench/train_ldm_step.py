"""Diffusion-transformer training step on cached latents, measured inside the real trainer
(`train_ldm_only.main`: data loader, forward + loss, backward, clip, AdamW, EMA, logging) with its
published configuration file, on a synthetic latent folder written by cache_latents' own writer
(random latents and weights: the cost of real ones).

  python bench/train_ldm_step.py                          # CUDA: SiT-XL/2 + REPA, batch 256
  python bench/train_ldm_step.py --model LightningDiT-XL/1
  python bench/train_ldm_step.py --model DiTDH-XL
  python bench/train_ldm_step.py --tiny                   # CPU: same configuration, tiny sizes (the CPU default)

Configurations (configs/ldm/, run unchanged but for the batch, one GPU's share):
  SiT-XL/2           sit_xl2_repa_sdvae.yaml: SD-VAE f8d4 latents [4, 32, 32] + DINOv2-B REPA at block 8, batch 256
  LightningDiT-XL/1  lightningdit_xl1_vavae_800ep.yaml: VA-VAE latents [32, 16, 16], batch 128 (1024 / 8 GPUs)
  DiTDH-XL           ddt_xl_rae_dinov2b.yaml: RAE DINOv2-B latents [768, 16, 16], batch 128 (1024 / 8 GPUs)
The tiny mode keeps the file but shrinks the model (N size), the latents and the batch, fp32.
Prints one JSON line (bench/common.py says what each figure counts).
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# name -> (config file, latents, per-GPU batch, tiny model, tiny latents)
CONFIGS = {
    "SiT-XL/2": ("sit_xl2_repa_sdvae.yaml", (4, 32, 32), 256, "SiT-N/4", (4, 8, 8)),
    "LightningDiT-XL/1": ("lightningdit_xl1_vavae_800ep.yaml", (32, 16, 16), 128, "LightningDiT-N/1", (32, 2, 2)),
    "DiTDH-XL": ("ddt_xl_rae_dinov2b.yaml", (768, 16, 16), 128, "DiTDH-N", (32, 4, 4)),
}


def main(argv=None):
    from common import StepProbe, add_probe_flags, probed_trainer, record
    from latent_loader import write_synthetic_folder

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="SiT-XL/2", choices=list(CONFIGS), help="published configuration to time")
    p.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                   help="tiny sizes, fp32 (default: on without CUDA)")
    p.add_argument("--batch-size", type=int, default=None, help="per-GPU batch (default: the configuration's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="pass --compile to the trainer")
    p.add_argument("--grad-checkpointing", action="store_true", help="pass --grad-checkpointing to the trainer")
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers")
    add_probe_flags(p)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import train_ldm_only
    import utils
    from datasources import make_procedural_dataset

    tiny = (not torch.cuda.is_available()) if args.tiny is None else args.tiny
    cfg_name, shape, bs, tiny_model, tiny_shape = CONFIGS[args.model]
    model, shape = (tiny_model, tiny_shape) if tiny else (args.model, shape)
    bs = args.batch_size or (4 if tiny else bs)
    probe = StepProbe(args.warmup, args.steps)
    num = max(2 * bs, 16)
    with tempfile.TemporaryDirectory() as tmp:
        latents = Path(tmp) / "latents"
        write_synthetic_folder(latents, num, shape, has_std=shape[0] == 4, flip=True, shard_size=max(bs, 8))
        flags = ["--config", str(ROOT / "configs/ldm" / cfg_name), "--latents-dir", str(latents),
                 "--output-dir", tmp, "--exp-name", "bench", "--batch-size", str(bs), "--model", model,
                 "--max-train-steps", str(probe.steps_needed + 1), "--checkpointing-steps", str(10**9),
                 "--sampling-steps", "0", "--report-to", "none", "--num-workers", str(args.num_workers),
                 "--compile" if args.compile else "--no-compile"]
        if args.model == "SiT-XL/2":  # REPA: the images the latents stand for, through the encoder
            res = 32 if tiny else 256  # SD-VAE f8 at 256 px; the tiny f4 latents stand for 32 px
            images = make_procedural_dataset(Path(tmp) / "images", num_classes=8, per_class=num // 8,
                                             resolution=res, seed=0)
            flags += ["--data-dir", str(images), "--random-init-encoders", "--resolution", str(res)]
            if tiny:
                flags += ["--enc-type", "dinov2-vit-tiny", "--encoder-depth", "2", "--projector-dim", "64"]
        if tiny:
            flags += ["--mixed-precision", "no"]
        if args.grad_checkpointing:
            flags.append("--grad-checkpointing")
        with probed_trainer(utils, probe):
            train_ldm_only.main(train_ldm_only.parse_args(flags))
    return record("train_ldm_step", f"{cfg_name} ({model} on {'x'.join(map(str, shape))})", bs, probe,
                  model=model, tiny=tiny, compile=args.compile, grad_checkpointing=args.grad_checkpointing)


if __name__ == "__main__":
    main()
