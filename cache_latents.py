"""Encode an image dataset with a tokenizer into latent shards plus exact latent statistics.

    accelerate launch cache_latents.py --data-dir DATA --output-dir LATENTS --tokenizer kl \
        --vae f8d4 --vae-ckpt e2e-vae.pt --resolution 256 --flip --dtype float16
    accelerate launch cache_latents.py --vae-arch f16d32 --vae-ckpt-path P --vae-latents-name NAME \
        --pproc-batch-size 128      (REPA-E's names: reads data/, writes data/NAME/)

Output folder:
* `shards/latents-KKKKK.safetensors`: shard k holds dataset indices [k*S, (k+1)*S): `mean`
  [n, C, h, w] (stored in --dtype), `std` (KL kinds), `labels`, `indices` int64 [n], with --flip
  `mean_flip` / `std_flip` of the mirrored image, and the shard's exact partial statistics in
  float64 from the float32 encoder outputs (before the dtype cast): `stats_count`, `stats_sum`
  and centred `stats_m2` per position [C, h, w], of the latent z the trainer samples (KL:
  z = mean + std * eps, so M2 adds sum(std^2): Var[z] = Var(mean) + E[std^2], no sampling).
* `tokenizer.json`: the tokenizer's identity (kind, name, weight fingerprint, latent shape) and
  how the folder was made (resolution, flip, dtype, sizes, classes, source folder).
* `latents_stats.pt`: `mean`, `var` [C, h, w] per position, `channel_mean`, `channel_var` [C]
  and `count`, merged over all shards in shard order with the exact parallel (Chan) formula;
  variances are population variances (divide by count).

Shards go round-robin to the processes, so every image is encoded exactly once whatever the
world size, and a batch never straddles two shards. `--batch-size` is the global batch (as the
trainers'); `--per-proc-batch-size` fixes one process's batch, so each shard is encoded in the
same batches whatever the world size. The statistics are exact either way (float64, merged in
shard order); only the encoder's own batch-size rounding can differ.
A rerun skips complete shards (their header, sizes, indices and fingerprint are checked) and
refuses a folder written by another tokenizer / resolution / flip setting; `--stats-only`
recomputes the statistics from the shards.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

import utils
from datasources import (
    LATENT_DTYPES,
    LATENT_INFO_FILE,
    LATENT_STATS_FILE,
    build_image_dataset,
    check_existing_info,
    compute_folder_stats,
    is_archive,
    latent_moments,
    latent_shard_path,
    latent_shard_range,
    load_class_to_idx,
    merge_moments,
    num_latent_shards,
    save_shard,
    shard_problem,
    write_info,
)

DEFAULT_PER_PROC_BATCH = 128  # images per process when no batch flag is given (REPA-E's --pproc-batch-size)


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------
def encode_batch(tokenizer, images: torch.Tensor, flip: bool, autocast) -> Dict[str, Optional[torch.Tensor]]:
    """uint8 [B, C, H, W] -> {mean, std, [mean_flip, std_flip]} float32 on CPU (one forward for
    plain and mirrored images)."""
    B = images.shape[0]
    x = torch.cat([images, images.flip(-1)]) if flip else images
    with autocast():
        mean, std = tokenizer.encode_moments(x)
    mean = mean.float().cpu()
    std = std.float().cpu() if std is not None else None
    out = {"mean": mean[:B], "std": None if std is None else std[:B]}
    if flip:
        out.update(mean_flip=mean[B:], std_flip=None if std is None else std[B:])
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cache_latents.py", description="Encode a dataset into latent shards with exact statistics.")
    p.add_argument("--config", type=str, default=None, help="YAML whose keys are defaults for these flags")
    p.add_argument("--data-dir", type=str, default="data", help="images to encode (folder, archive, REPA-E h5 or EDM zip)")
    p.add_argument("--output-dir", type=str, required=False, default=None,
                   help="latent folder to write (shards, tokenizer.json, latents_stats.pt); with --vae-latents-name "
                        "the folder that holds it (default data, as REPA-E)")
    p.add_argument("--vae-latents-name", type=str, default=None,
                   help="REPA-E's latents name: writes <output-dir>/<name>, found again by train_ldm_only.py "
                        "--data-dir <output-dir> --vae-latents-name <name>")
    p.add_argument("--tokenizer", type=str, default=None, choices=["kl", "vavae", "vq", "rae"],
                   help="tokenizer kind (default: the one the --vae-ckpt export describes, else kl)")
    p.add_argument("--vae", "--vae-arch", dest="vae", type=str, default=None,
                   help="preset name (VAE_PRESETS / VQ_PRESETS / RAE_PRESETS; --vae-arch: REPA-E's name)")
    p.add_argument("--vae-ckpt", "--vae-ckpt-path", dest="vae_ckpt", type=str, default=None,
                   help="weights (RAE: decoder weights); local path or hub file; an export with its NAME.json needs nothing else")
    p.add_argument("--vae-stats", type=str, default=None, help="latent statistics file that travels with the tokenizer")
    p.add_argument("--vae-config", type=str, default=None, help="LDM / taming model config (YAML / JSON) instead of --vae")
    p.add_argument("--rae-config", type=str, default=None, help="RAE config (YAML / JSON) or an RAE preset name")
    p.add_argument("--random-init", "--random-init-vae", dest="random_init_vae", action="store_true",
                   help="random tokenizer weights (tests, demos; --random-init-vae: the trainers' and generate.py's name)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    p.add_argument("--resolution", type=utils.positive_int, default=None,
                   help="image size the tokenizer encodes (ADM center crop); default: the archive's (index.json), else 256")
    p.add_argument("--batch-size", type=utils.positive_int, default=None,
                   help="global encoder batch, split evenly over the processes (as the trainers' --batch-size)")
    p.add_argument("--per-proc-batch-size", "--pproc-batch-size", dest="per_proc_batch_size", type=utils.positive_int,
                   default=None, help=f"images per encoder batch of one process (default {DEFAULT_PER_PROC_BATCH}; "
                                      "--pproc-batch-size: REPA-E's name); excludes --batch-size")
    p.add_argument("--flip", action="store_true", help="also store the latents of the mirrored images")
    p.add_argument("--shard-size", type=utils.positive_int, default=4096, help="images per shard file (RAE: 1024 keeps a shard's memory small)")
    p.add_argument("--dtype", type=str, default="float16", choices=sorted(LATENT_DTYPES), help="storage dtype of the latents (statistics are computed in float64 before the cast)")
    p.add_argument("--num-workers", type=utils.non_negative_int, default=4, help="data loader worker processes per rank")
    p.add_argument("--mixed-precision", type=str, default="no", choices=["no", "bf16", "fp16"], help="autocast precision of the encoder")
    p.add_argument("--allow-tf32", action=argparse.BooleanOptionalAction, default=False,
                   help="allow TF32 matmuls and convolutions on Ampere+ GPUs")
    p.add_argument("--class-to-idx", type=str, default=None, help="JSON {class folder: id} remapping the labels (custom data)")
    p.add_argument("--stats-only", action="store_true", help="only recompute latents_stats.pt from the shards")
    return p


def build_args(argv=None):
    p = build_parser()
    args = utils.parse_args_with_config(p, argv)
    if args.vae_latents_name:
        args.output_dir = str(Path(args.output_dir or "data") / args.vae_latents_name)
    if not args.output_dir:
        p.error("--output-dir (or --vae-latents-name) is required")
    if not args.stats_only and not args.data_dir:
        p.error("--data-dir is required (except with --stats-only)")
    if args.batch_size is not None and args.per_proc_batch_size is not None:
        p.error("give --batch-size (the global batch) or --per-proc-batch-size / --pproc-batch-size (one process's "
                "batch), not both")
    if args.resolution is None:
        args.resolution = archive_resolution(args.data_dir) or 256
    return args


def per_process_batch(args, world: int) -> int:
    """Images per encoder batch of one process: --batch-size / world, or --per-proc-batch-size."""
    if args.batch_size is None:
        return args.per_proc_batch_size or DEFAULT_PER_PROC_BATCH
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} (the global batch) is not divisible by the {world} processes; "
                         f"pass a multiple of {world} or --per-proc-batch-size")
    return args.batch_size // world


def archive_resolution(data_dir) -> Optional[int]:
    """The resolution a preprocessing.py archive was written at (its index.json), else None."""
    if not data_dir or not is_archive(data_dir):
        return None
    index = Path(data_dir) / "index.json"
    try:
        return int(json.loads(index.read_text())["resolution"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{index}: cannot read the archive's resolution ({e}); pass --resolution")


def stats_only(args) -> dict:
    root = Path(args.output_dir)
    path = root / LATENT_INFO_FILE
    if not path.is_file():
        raise SystemExit(f"--stats-only: {path} missing; {root} is not a latent folder")
    info = json.loads(path.read_text())
    stats = compute_folder_stats(root, info)
    print(f"wrote {root / LATENT_STATS_FILE} from {num_latent_shards(info['num_images'], info['shard_size'])} shards "
          f"({stats['count']} latents)")
    return {"stats": stats}


def main(args) -> dict:
    if args.stats_only:
        if int(os.environ.get("RANK", "0")) == 0:
            return stats_only(args)
        return {}
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from models.tokenizers import build_tokenizer

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    root = Path(args.output_dir)
    logger = utils.create_logger(root if accelerator.is_main_process else None, accelerator.is_main_process,
                                 "cache_latents")
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        utils.limit_cpu_threads(args.num_workers, logger)

    from models.tokenizers import read_export_description

    if args.tokenizer is None and (args.vae_ckpt is None or read_export_description(args.vae_ckpt) is None):
        args.tokenizer = "kl"  # a bare state_dict (the originals' layout) with a --vae preset
    tokenizer = build_tokenizer(args.tokenizer, name=args.vae, ckpt=args.vae_ckpt, stats=args.vae_stats,
                                config=args.rae_config if args.tokenizer == "rae" else args.vae_config,
                                random_init=args.random_init_vae, seed=args.seed).to(device)
    dataset = build_image_dataset(args.data_dir, args.resolution, channels=tokenizer.in_channels,
                                  class_to_idx=load_class_to_idx(args.class_to_idx))
    N, S = len(dataset), args.shard_size
    info = dict(tokenizer.identity(args.resolution), stats_mode=tokenizer.stats_mode, has_std=not tokenizer.deterministic,
                resolution=args.resolution, flip=bool(args.flip), dtype=args.dtype, num_images=N,
                num_classes=int(getattr(dataset, "num_classes", 0) or 0),
                class_to_idx=getattr(dataset, "class_to_idx", None), shard_size=S,
                num_shards=num_latent_shards(N, S), data_dir=str(Path(args.data_dir).resolve()), format=1)
    check_existing_info(root, info)  # every rank, before anything is written
    if accelerator.is_main_process:
        # before the barrier: no rank writes into root yet, so only dead writes' temp files go
        stale = utils.remove_stale_temp_files(root) + utils.remove_stale_temp_files(latent_shard_path(root, 0).parent)
        if stale:
            logger.info(f"removed {len(stale)} temp file(s) of interrupted writes in {root}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_info(root, info)
        utils.write_args_json(args, root / "args.json")
    logger.info(f"{world} process(es) on {device} | tokenizer {tokenizer.kind}:{tokenizer.name} "
                f"({info['fingerprint']}) latents {info['latent_shape']} | {N} images -> {info['num_shards']} shards "
                f"of {S} | flip {args.flip} | dtype {args.dtype} | batch {per_process_batch(args, world)} per process")

    batch = per_process_batch(args, world)
    # Shards of this rank (round-robin) that still need writing.
    mine = list(range(rank, info["num_shards"], world))
    todo = []
    for k in mine:
        path = latent_shard_path(root, k)
        problem = shard_problem(path, k, info)
        if problem is None:
            continue
        if problem != "missing":
            logger.warning(f"rewriting {path}: {problem}")
        todo.append(k)
    skipped = len(mine) - len(todo)
    # Batches never straddle shards: each shard is encoded identically whatever the world size.
    batches = [list(range(s, min(s + batch, stop)))
               for k in todo for start, stop in [latent_shard_range(k, S, N)] for s in range(start, stop, batch)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.num_workers,
                                         pin_memory=device.type == "cuda")
    # Rank 0's share times the world size: an estimate of the global work for the bar.
    bar = tqdm(total=sum(len(b) for b in batches) * world, desc="encoding", unit="img", dynamic_ncols=True,
               disable=not accelerator.is_main_process)
    t0, done = time.time(), 0
    todo_iter = iter(todo)
    k = next(todo_iter, None)
    outputs: Dict[str, List[torch.Tensor]] = {}
    moments = None
    for images, labels in loader:
        start, stop = latent_shard_range(k, S, N)
        out = encode_batch(tokenizer, images.to(device, non_blocking=True), args.flip, accelerator.autocast)
        means = [out["mean"]] + ([out["mean_flip"]] if args.flip else [])
        stds = [out["std"]] + ([out["std_flip"]] if args.flip else [])
        moments = merge_moments(moments, latent_moments(means, stds))
        offset = sum(t.shape[0] for t in outputs.get("labels", []))
        for key, t in out.items():
            if t is not None:
                outputs.setdefault(key, []).append(t)
        outputs.setdefault("labels", []).append(labels.long())
        outputs.setdefault("indices", []).append(torch.arange(start + offset, start + offset + images.shape[0]))
        done += images.shape[0]
        bar.update(images.shape[0] * world)
        if offset + images.shape[0] == stop - start:  # shard complete
            save_shard(root, k, outputs, moments, info)
            outputs, moments = {}, None
            k = next(todo_iter, None)
    bar.close()
    elapsed = time.time() - t0
    logger.info(f"rank {rank}: encoded {done} images into {len(todo)} shards, skipped {skipped} complete shards "
                f"({done / max(elapsed, 1e-9):.1f} img/s)")

    accelerator.wait_for_everyone()
    summary = {"encoded_shards": len(todo), "skipped_shards": skipped, "encoded_images": done}
    if accelerator.is_main_process:
        stats = compute_folder_stats(root, info)
        logger.info(f"wrote {root / LATENT_STATS_FILE}: {stats['count']} latents; channel mean "
                    f"{[round(v, 4) for v in stats['channel_mean'][:8].tolist()]} channel std "
                    f"{[round(math.sqrt(v), 4) for v in stats['channel_var'][:8].tolist()]}")
        summary["stats"] = stats
    accelerator.wait_for_everyone()
    return summary


if __name__ == "__main__":
    main(build_args())
