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
world size; each shard is encoded in the same batches whatever the world size (a batch never
straddles two shards), so shards and statistics do not depend on the number of processes.
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
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import utils
from datasources import (
    LATENT_INFO_FILE,
    LATENT_STATS_FILE,
    build_image_dataset,
    is_archive,
    latent_shard_path,
    latent_shard_range,
    load_class_to_idx,
    map_shard_arrays,
    num_latent_shards,
    read_shard_header,
)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
STAT_KEYS = ("stats_count", "stats_sum", "stats_m2")
# Keys of tokenizer.json that must match for a rerun to continue an existing folder.
RESUME_KEYS = ("kind", "name", "fingerprint", "latent_shape", "in_channels", "has_std", "resolution", "flip", "dtype",
               "num_images", "num_classes", "class_to_idx", "shard_size")


# --------------------------------------------------------------------------------------------
# Exact statistics: (count, sum, M2) per position, merged with Chan's parallel formula
# --------------------------------------------------------------------------------------------
def latent_moments(means: Sequence[torch.Tensor], stds: Sequence[Optional[torch.Tensor]]
                   ) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """(count, sum [C, h, w], M2 [C, h, w]) in float64 of the latent z over a batch.

    `means` [n, C, h, w] each (plain and mirrored images count as separate samples); `stds` the
    matching posterior std or None. z = mean + std * eps mixes the posteriors, so
    M2(z) = sum (mean - mu)^2 + sum std^2 exactly (E[eps] = 0, E[eps^2] = 1)."""
    vals = torch.cat([m.double() for m in means])  # [N, C, h, w]
    count = vals.shape[0]
    total = vals.sum(0)
    m2 = (vals - total / count).pow(2).sum(0)
    for s in stds:
        if s is not None:
            m2 = m2 + s.double().pow(2).sum(0)
    return count, total, m2


def merge_moments(a: Optional[Tuple[int, torch.Tensor, torch.Tensor]], b: Tuple[int, torch.Tensor, torch.Tensor]
                  ) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """Chan et al.: M2 = M2_a + M2_b + delta^2 * n_a n_b / n with delta = mean_b - mean_a."""
    if a is None:
        return b
    na, sa, m2a = a
    nb, sb, m2b = b
    n = na + nb
    delta = sb / nb - sa / na
    return n, sa + sb, m2a + m2b + delta.pow(2) * (na * nb / n)


def finalize_moments(count: int, total: torch.Tensor, m2: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-position mean / var and per-channel mean / var (float64, population variances).

    Every position has the same count, so the channel moments follow exactly from the position
    moments (law of total variance): var_c = mean_p(var_p + (mean_p - mean_c)^2)."""
    mean, var = total / count, m2 / count  # [C, h, w]
    channel_mean = mean.mean(dim=(1, 2))  # [C]
    channel_var = (var + (mean - channel_mean[:, None, None]).pow(2)).mean(dim=(1, 2))
    return {"mean": mean, "var": var, "channel_mean": channel_mean, "channel_var": channel_var, "count": int(count)}


# --------------------------------------------------------------------------------------------
# Shard files
# --------------------------------------------------------------------------------------------
def write_shard(path: str | os.PathLike, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    """Write a safetensors shard atomically: a temp file in the same folder, fsync, rename."""
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = utils.reserve_temp_file(path)  # the name a later start's remove_stale_temp_files knows
    os.close(fd)
    tmp = Path(tmp)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, utils.new_file_mode())  # save_file recreates the file 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def shard_problem(path: Path, k: int, info: dict) -> Optional[str]:
    """None when shard k is complete and belongs to the folder described by `info`, else why not."""
    if not path.is_file():
        return "missing"
    try:
        header = read_shard_header(path)
    except (OSError, ValueError) as e:
        return str(e)
    start, stop = latent_shard_range(k, info["shard_size"], info["num_images"])
    n, shape = stop - start, list(info["latent_shape"])
    keys = {"mean": [n] + shape, "labels": [n], "indices": [n], "stats_count": [], "stats_sum": shape, "stats_m2": shape}
    if info["has_std"]:
        keys["std"] = [n] + shape
    if info["flip"]:
        keys.update({f"{k_}_flip": [n] + shape for k_ in (("mean", "std") if info["has_std"] else ("mean",))})
    for key, want in keys.items():
        if key not in header:
            return f"no '{key}'"
        if header[key]["shape"] != want:
            return f"'{key}' has shape {header[key]['shape']}, expected {want}"
    if header["__metadata__"].get("fingerprint") != info["fingerprint"]:
        return "written by another tokenizer"
    indices = map_shard_arrays(path, {"indices": header["indices"]})["indices"]
    if not (torch.from_numpy(indices.copy()) == torch.arange(start, stop)).all():
        return f"indices are not {start}..{stop - 1}"
    return None


def read_shard_moments(path: Path) -> Tuple[int, torch.Tensor, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        missing = [k for k in STAT_KEYS if k not in keys]
        if missing:
            raise KeyError(f"latent shard {path} has no statistics {missing}; rerun cache_latents.py to rewrite it")
        return int(f.get_tensor("stats_count")), f.get_tensor("stats_sum"), f.get_tensor("stats_m2")


def compute_folder_stats(root: str | os.PathLike, info: dict) -> Dict[str, torch.Tensor]:
    """Merge every shard's partial statistics in shard order and write `latents_stats.pt`."""
    root = Path(root)
    acc = None
    for k in range(num_latent_shards(info["num_images"], info["shard_size"])):
        path = latent_shard_path(root, k)
        if not path.is_file():
            raise FileNotFoundError(f"latent shard {path} missing: statistics need every shard (rerun cache_latents.py)")
        acc = merge_moments(acc, read_shard_moments(path))
    expected = info["num_images"] * (2 if info["flip"] else 1)
    if acc[0] != expected:
        raise ValueError(f"{root}: shards hold statistics of {acc[0]} latents, {LATENT_INFO_FILE} implies {expected}")
    stats = finalize_moments(*acc)
    stats["stats_mode"] = info.get("stats_mode", "channel")
    utils.atomic_save(stats, root / LATENT_STATS_FILE)
    return stats


def write_info(root: str | os.PathLike, info: dict) -> None:
    utils.atomic_write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", Path(root) / LATENT_INFO_FILE)


def check_existing_info(root: Path, info: dict) -> None:
    """Refuse to continue a folder that another tokenizer / setting wrote."""
    path = root / LATENT_INFO_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    diffs = [f"{k}: folder {old.get(k)!r} vs now {info.get(k)!r}" for k in RESUME_KEYS if old.get(k) != info.get(k)]
    if diffs:
        raise SystemExit(f"{path} was written with other settings ({'; '.join(diffs)}); choose another --output-dir "
                         f"or delete {root}")


def shard_tensors(outputs: Dict[str, List[torch.Tensor]], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Concatenate one shard's per-batch outputs; latents cast to the storage dtype."""
    out = {}
    for key, parts in outputs.items():
        t = torch.cat(parts)
        out[key] = t.to(dtype) if key.startswith(("mean", "std")) else t
    return out


def save_shard(root: str | os.PathLike, k: int, outputs: Dict[str, List[torch.Tensor]],
               moments: Tuple[int, torch.Tensor, torch.Tensor], info: dict) -> Path:
    """Write shard k of the folder described by `info` from its per-batch float32 outputs
    ({mean, [std], [mean_flip, std_flip], labels, indices}) and its merged moments."""
    start, stop = latent_shard_range(k, info["shard_size"], info["num_images"])
    tensors = shard_tensors(outputs, DTYPES[info["dtype"]])
    if tensors["labels"].shape[0] != stop - start or not torch.equal(tensors["indices"], torch.arange(start, stop)):
        raise RuntimeError(f"shard {k}: outputs cover indices {tensors['indices'][:3].tolist()}..., "
                           f"expected {start}..{stop - 1}")
    tensors.update(stats_count=torch.tensor(moments[0], dtype=torch.int64), stats_sum=moments[1], stats_m2=moments[2])
    path = latent_shard_path(root, k)
    write_shard(path, tensors, {"shard": str(k), "start": str(start), "num": str(stop - start),
                                "fingerprint": info["fingerprint"], "dtype": info["dtype"], "flip": str(info["flip"])})
    return path


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


def build_args(argv=None):
    p = argparse.ArgumentParser(description="Encode a dataset into latent shards with exact statistics.")
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
    p.add_argument("--random-init", "--random-init-vae", dest="random_init", action="store_true",
                   help="random tokenizer weights (tests, demos; --random-init-vae: the trainers' and generate.py's name)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    p.add_argument("--resolution", type=utils.positive_int, default=None,
                   help="image size the tokenizer encodes (ADM center crop); default: the archive's (index.json), else 256")
    p.add_argument("--batch-size", "--pproc-batch-size", "--per-proc-batch-size", dest="batch_size", type=utils.positive_int,
                   default=128, help="images per encoder batch, per process (--per-proc-batch-size / --pproc-batch-size: "
                                     "generate.py's names; the trainers' --batch-size is the global batch)")
    p.add_argument("--flip", action="store_true", help="also store the latents of the mirrored images")
    p.add_argument("--shard-size", type=utils.positive_int, default=4096, help="images per shard file (RAE: 1024 keeps a shard's memory small)")
    p.add_argument("--dtype", type=str, default="float16", choices=sorted(DTYPES), help="storage dtype of the latents (statistics are computed in float64 before the cast)")
    p.add_argument("--num-workers", type=utils.non_negative_int, default=4, help="data loader worker processes per rank")
    p.add_argument("--mixed-precision", type=str, default="no", choices=["no", "bf16", "fp16"], help="autocast precision of the encoder")
    p.add_argument("--allow-tf32", action="store_true", help="allow TF32 matmuls and convolutions on Ampere+ GPUs")
    p.add_argument("--class-to-idx", type=str, default=None, help="JSON {class folder: id} remapping the labels (custom data)")
    p.add_argument("--stats-only", action="store_true", help="only recompute latents_stats.pt from the shards")
    args = utils.parse_args_with_config(p, argv)
    if args.vae_latents_name:
        args.output_dir = str(Path(args.output_dir or "data") / args.vae_latents_name)
    if not args.output_dir:
        p.error("--output-dir (or --vae-latents-name) is required")
    if not args.stats_only and not args.data_dir:
        p.error("--data-dir is required (except with --stats-only)")
    if args.resolution is None:
        args.resolution = archive_resolution(args.data_dir) or 256
    return args


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
                                random_init=args.random_init, seed=args.seed).to(device)
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
                f"of {S} | flip {args.flip} | dtype {args.dtype}")

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
    batches = [list(range(s, min(s + args.batch_size, stop)))
               for k in todo for start, stop in [latent_shard_range(k, S, N)] for s in range(start, stop, args.batch_size)]
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
