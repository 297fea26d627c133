"""Read throughput of cached latents: `LatentShardDataset` + DataLoader, as a latent-diffusion
trainer uses them (workers, pin_memory, batch 256, shuffled, `collate_latents`), on CPU.

  python bench/latent_loader.py                      # ~1 min: f8d4 (4x32x32) and RAE (768x16x16)
  python bench/latent_loader.py --num-workers 8 --f8-samples 16384

Two synthetic folders are written with the real writer code of `cache_latents.py`
(`datasources.latent_writer`: shards, tokenizer.json, exact statistics) from random latents:
* SiT-XL/2 on SD-VAE f8d4 at 256 px: [4, 32, 32] float16 with std and flips (REPA-E's cache);
* RAE DINOv2-B at 256 px: [768, 16, 16] float16, flips, no std.
The figure needed (assumption): one H100 trains SiT-XL/2 at 256 px in bf16 at about 3 it/s with
batch 256, i.e. ~800 samples/s. Cross-check: SiT-XL/2 costs 118.6 GFLOPs per image forward,
~3x that (356 GFLOPs) per training sample; at ~30% of the H100's 989 dense bf16 TFLOPs that is
~830 samples/s. The loader must stay above it so the GPU never waits on data.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

NEEDED_SAMPLES_PER_S = 3 * 256  # ~3 it/s x batch 256 on one H100 (see the module docstring)


def write_synthetic_folder(root: Path, num: int, shape, has_std: bool, flip: bool, shard_size: int) -> None:
    """A latent folder from random latents, through cache_latents' own shard / info / stats code."""
    import torch

    from datasources import (compute_folder_stats, latent_moments, latent_shard_range, num_latent_shards, save_shard,
                             write_info)

    info = dict(kind="synthetic", name=f"random-{'x'.join(map(str, shape))}", fingerprint="0" * 16,
                latent_shape=list(shape), in_channels=3, stats_mode="channel", has_std=has_std, resolution=256,
                flip=flip, dtype="float16", num_images=num, num_classes=1000, class_to_idx=None,
                shard_size=shard_size, num_shards=num_latent_shards(num, shard_size), data_dir="synthetic", format=1)
    g = torch.Generator().manual_seed(0)
    for k in range(info["num_shards"]):
        start, stop = latent_shard_range(k, shard_size, num)
        n = stop - start
        out = {"mean": [torch.randn(n, *shape, generator=g)], "labels": [torch.randint(0, 1000, (n,), generator=g)],
               "indices": [torch.arange(start, stop)]}
        if has_std:
            out["std"] = [torch.rand(n, *shape, generator=g)]
        if flip:
            out["mean_flip"] = [out["mean"][0].flip(-1)]
            if has_std:
                out["std_flip"] = [out["std"][0].flip(-1)]
        means = out["mean"] + out.get("mean_flip", [])
        stds = out.get("std", []) + out.get("std_flip", [])
        save_shard(root, k, out, latent_moments(means, stds), info)
    write_info(root, info)
    compute_folder_stats(root, info)


def measure(root: Path, batch_size: int, num_workers: int, seconds: float, batched: bool = True,
            keep_dtype: bool = False) -> float:
    """Samples/s over whole shuffled epochs (first batch excluded: worker start-up)."""
    import torch

    from datasources import LatentShardDataset, collate_latents

    ds = LatentShardDataset(root, flip=True, seed=0, keep_dtype=keep_dtype)
    # Persistent workers: the figure is the steady state, not the worker start-up of each epoch.
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                         pin_memory=torch.cuda.is_available(), drop_last=True,
                                         collate_fn=collate_latents if batched else None,
                                         persistent_workers=num_workers > 0,
                                         prefetch_factor=4 if num_workers else None)
    count, t0 = 0, None
    while True:
        for batch in loader:
            if t0 is None:
                t0 = time.perf_counter()
                continue
            count += batch["mean"].shape[0]
            if time.perf_counter() - t0 > seconds:
                return count / (time.perf_counter() - t0)


def main(argv=None):
    from common import emit

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--f8-samples", type=int, default=4096)
    p.add_argument("--rae-samples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--seconds", type=float, default=5.0, help="measuring time per folder")
    p.add_argument("--dir", type=str, default=None, help="where to write the folders (default: a temp dir)")
    args = p.parse_args(argv)
    cases = [("SiT-XL/2 on f8d4: 4x32x32 fp16, std + flips", (4, 32, 32), True, args.f8_samples),
             ("RAE DINOv2-B: 768x16x16 fp16, flips", (768, 16, 16), False, args.rae_samples)]
    import torch

    x = torch.ones(64 * 2**20 // 4)
    x.clone()
    t = time.perf_counter()
    for _ in range(5):
        x.clone()
    bandwidth = 5 * x.numel() * 4 / (time.perf_counter() - t) / 2**30
    # Each float32 latent row is written ~3 times (cast, shared-memory batch, trainer side).
    print(f"this machine: {os.cpu_count()} CPUs, single-thread copy bandwidth {bandwidth:.1f} GiB/s "
          f"(RAE rows are 768 KiB in float32; the loader is bound by memory copies there)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"needed: ~{NEEDED_SAMPLES_PER_S} samples/s (one H100, SiT-XL/2 bf16, ~3 it/s x batch 256)",
              file=sys.stderr)
        lines = []
        for title, shape, has_std, num in cases:
            root = Path(tmp) / f"lat-{shape[0]}"
            t = time.perf_counter()
            write_synthetic_folder(root, num, shape, has_std, flip=True, shard_size=1024)
            size = sum(f.stat().st_size for f in (root / "shards").iterdir()) / 2**20
            print(f"{title}: wrote {num} samples ({size:.0f} MiB) in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            for batched, keep in ((True, True), (True, False), (False, False)):
                rate = measure(root, args.batch_size, args.num_workers, args.seconds, batched, keep)
                verdict = "enough" if rate >= NEEDED_SAMPLES_PER_S else "NOT enough"
                how = ("collate_latents, stored dtype (train_ldm_only)" if keep else
                       "collate_latents, float32" if batched else "default collate, float32")
                lines.append(emit("latent_loader", f"{title}; {how}", samples_per_s=rate, workers=args.num_workers,
                                  batch=args.batch_size, needed_samples_per_s=NEEDED_SAMPLES_PER_S, verdict=verdict))
    return lines


if __name__ == "__main__":
    main()
