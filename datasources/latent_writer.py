"""Latent-folder writer: the shard files, `tokenizer.json` and the exact statistics that
cache_latents.py writes and `datasources.latents.LatentShardDataset` reads.

Each shard carries its exact partial statistics in float64 (`stats_count`, `stats_sum`, centred
`stats_m2` per position) of the latent z a trainer samples; `compute_folder_stats` merges them in
shard order with Chan's parallel formula, so the statistics do not depend on the world size.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import utils
from datasources.latents import (LATENT_INFO_FILE, LATENT_STATS_FILE, latent_shard_path, latent_shard_range,
                                 map_shard_arrays, num_latent_shards, read_shard_header)

LATENT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
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
    """(count, sum, M2) a shard stored for its latents; an error naming the shard if it has none."""
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
    """Write the folder's `tokenizer.json` (who wrote it and how) atomically."""
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
    tensors = shard_tensors(outputs, LATENT_DTYPES[info["dtype"]])
    if tensors["labels"].shape[0] != stop - start or not torch.equal(tensors["indices"], torch.arange(start, stop)):
        raise RuntimeError(f"shard {k}: outputs cover indices {tensors['indices'][:3].tolist()}..., "
                           f"expected {start}..{stop - 1}")
    tensors.update(stats_count=torch.tensor(moments[0], dtype=torch.int64), stats_sum=moments[1], stats_m2=moments[2])
    path = latent_shard_path(root, k)
    write_shard(path, tensors, {"shard": str(k), "start": str(start), "num": str(stop - start),
                                "fingerprint": info["fingerprint"], "dtype": info["dtype"], "flip": str(info["flip"])})
    return path
