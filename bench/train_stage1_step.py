"""Throughput and peak memory of full stage-1 training steps (tokenizer update + discriminator
update, both every step), measured by running the real trainer (train_stage1.py) on generated
data with random weights (same cost as trained ones; nothing is downloaded).

  python bench/train_stage1_step.py                          # CUDA: the three published recipes
  python bench/train_stage1_step.py --recipe rae-xl --batch-size 64 --steps 30
  python bench/train_stage1_step.py --recipe tiny-rae        # CPU-sized (the default without CUDA)
Recipes: rae-xl (DINOv2-B + ViT-XL decoder, 256px, per-GPU batch 64, bf16), vavae-f16d32 (VA-VAE
with DINOv2-L VF loss, batch 32, fp32 as published), vqgan-f16 (taming ImageNet f16-1024, batch
12), and tiny-{kl,vavae,vqgan,rae} for CPU. Prints one JSON line per recipe, measured inside the
trainer (bench/common.py says what each figure counts).
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# The released RAE encoder's architecture (DINOv2-B with 4 registers) for a random-weight build.
DINOV2_B_REG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    image_size=224, patch_size=14, num_register_tokens=4)

# name -> (recipe YAML, default per-GPU batch, load size of the generated images, extra flags)
RECIPES = {
    "rae-xl": ("rae_dinov2b_vitxl_256.yaml", 64, 384, ["--disc-config", "RANDOM_DINO"]),
    "vavae-f16d32": ("vavae_f16d32_stage1.yaml", 32, 256, []),
    "vqgan-f16": ("vqgan_f16_imagenet.yaml", 12, 256, []),
    "tiny-kl": ("tiny_kl.yaml", 8, 40, []),
    "tiny-vavae": ("tiny_vavae.yaml", 8, 32, []),
    "tiny-vqgan": ("tiny_vqgan.yaml", 8, 32, []),
    "tiny-rae": ("tiny_rae.yaml", 8, 32, []),
}
GPU_RECIPES = ("rae-xl", "vavae-f16d32", "vqgan-f16")
CPU_RECIPES = ("tiny-kl", "tiny-vavae", "tiny-vqgan", "tiny-rae")


def bench(name: str, batch_size: int, probe, mixed_precision, memory_flags: list, tmp: Path,
          num_workers: int) -> dict:
    import train_stage1
    import utils
    from common import probed_trainer
    from datasources import make_procedural_dataset

    cfg_name, default_bs, load_size, extra = RECIPES[name]
    cfg_path = ROOT / "configs/stage1" / cfg_name
    cfg = yaml.safe_load(cfg_path.read_text())
    bs = batch_size or default_bs
    data = make_procedural_dataset(tmp / f"data{load_size}", num_classes=8, per_class=max(4, 2 * bs // 8 + 1),
                                   resolution=load_size, seed=0)
    flags = ["--config", str(cfg_path), "--data-dir", str(data), "--output-dir", str(tmp), "--exp-name", name,
             "--batch-size", str(bs), "--max-train-steps", str(probe.steps_needed + 1), "--checkpointing-steps", str(10**9),
             "--sampling-steps", "0", "--eval-samples", "0", "--report-to", "none",
             "--num-workers", str(num_workers), "--lpips-weights", "random", "--random-init-encoders", "--epochs", "1000000",
             # both updates from the first step: the cost being measured is generator + discriminator
             "--disc-start", "0", "--disc-every", "1", "--disc-start-epoch", "0", "--disc-update-start-epoch", "0"]
    if cfg.get("tokenizer") == "rae" and "encoder_config" not in cfg.get("model_config", {}):
        spec = dict(cfg["model_config"], encoder_config=DINOV2_B_REG)
        (tmp / f"{name}_model.yaml").write_text(yaml.safe_dump(spec))
        flags += ["--model-config", str(tmp / f"{name}_model.yaml")]
    for f in extra:
        if f == "RANDOM_DINO":
            (tmp / "dino_random.yaml").write_text(yaml.safe_dump({"pretrained": "random"}))
            f = str(tmp / "dino_random.yaml")
        flags.append(f)
    if mixed_precision:
        flags += ["--mixed-precision", mixed_precision]
    flags += memory_flags
    import torch

    if torch.cuda.is_available():
        flags.append("--allow-tf32")
        torch.cuda.reset_peak_memory_stats()
    with probed_trainer(utils, probe):
        train_stage1.main(train_stage1.parse_args(flags))
    return dict(batch=bs, mixed_precision=mixed_precision or cfg.get("mixed_precision", "no"))


def main(argv=None):
    from common import StepProbe, add_probe_flags, record

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES) + ["all"], default=None,
                   help="default: the three published recipes on CUDA, the tiny ones on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="per-GPU batch (default per recipe)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None, help="default: the recipe's")
    p.add_argument("--grad-checkpointing", action="store_true", help="pass --grad-checkpointing to the trainer")
    p.add_argument("--lpips-grad-checkpointing", action="store_true", help="pass --lpips-grad-checkpointing to the trainer")
    p.add_argument("--lpips-lean-head", action=argparse.BooleanOptionalAction, default=True,
                   help="the trainer's --lpips-lean-head (its default: on)")
    p.add_argument("--lpips-lean-trunk", action=argparse.BooleanOptionalAction, default=True,
                   help="the trainer's --lpips-lean-trunk (its default: on)")
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers")
    add_probe_flags(p)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(1)  # tiny convolutions: one thread beats oversubscribed ones
    names = ([args.recipe] if args.recipe not in (None, "all") else
             list(GPU_RECIPES if cuda else CPU_RECIPES) if args.recipe is None else list(RECIPES))
    memory_flags = (["--grad-checkpointing"] * args.grad_checkpointing
                    + ["--lpips-grad-checkpointing"] * args.lpips_grad_checkpointing
                    + ["--lpips-lean-head" if args.lpips_lean_head else "--no-lpips-lean-head"]
                    + ["--lpips-lean-trunk" if args.lpips_lean_trunk else "--no-lpips-lean-trunk"])
    lines = []
    for name in names:
        probe = StepProbe(args.warmup, args.steps)
        with tempfile.TemporaryDirectory() as tmp:
            s = bench(name, args.batch_size, probe, args.mixed_precision, memory_flags, Path(tmp),
                      args.num_workers)
        lines.append(record("train_stage1_step", f"{name} ({RECIPES[name][0]})", s["batch"], probe, recipe=name,
                            mixed_precision=s["mixed_precision"], grad_checkpointing=args.grad_checkpointing,
                            lpips_grad_checkpointing=args.lpips_grad_checkpointing, lpips_lean_head=args.lpips_lean_head,
                            lpips_lean_trunk=args.lpips_lean_trunk))
    return lines


if __name__ == "__main__":
    main()
