"""Image source -> training archive (ADM center crop), in parallel, deterministic and resumable.

    python preprocessing.py --source SRC --dest DEST --resolution 256 [--workers N] [--shard-size 1000]
        [--channels 3|1] [--encoding raw|png] [--skip-bad-images] [--max-images N]
    python preprocessing.py --imagenet-path SRC [--output-path data --num-workers N]   (REPA-E's names)

SRC is one of
* an image folder: one subfolder per class (any names, sorted -> ids 0..K-1), or images directly
  inside (unconditional, label 0);
* a REPA-E archive folder: `images.h5` + `images_h5.json`;
* an EDM / REPA `dataset_tool.py` output: a folder or `.zip` of images with a `dataset.json`.

Every image goes through the same reader training would use on SRC (`datasources.build_image_dataset`:
RGB or L conversion, ADM center crop), so the archive holds exactly the pixels the folder would
give, computed once instead of every epoch.

Output format (DEST), and why it is the fast one
* `images-00000.npy`, ...: uint8 [n, H, W, C] per shard (`--encoding raw`, the default). A reader
  `np.load(..., mmap_mode="r")`s a shard and copies one image out of the page cache: no decode
  (a 256 px PNG costs a few ms of CPU per image, often the bottleneck of a GPU job), random access
  for shuffled sampling, and one file per shard so ranks and DataLoader workers read in parallel
  without sharing a file handle. About 196 KB per 256 px RGB image (ImageNet-1k: ~250 GB).
* `--encoding png`: `images-00000.npy` is the shard's PNG files concatenated (flat uint8) and
  `offsets-00000.npy` int64 [n + 1] their boundaries: roughly 3x smaller for photos, at the cost of
  one PNG decode per image read.
* `labels.npy` int64 [N], `class_to_idx.json` (folder name -> id), and `index.json` (format name
  and version, resolution, channels, encoding, num_images, num_classes, per-shard files and counts,
  class_to_idx, source path, skipped images). `datasources.ArchiveDataset` reads it.

Determinism and resume
* The sorted source list fixes the global order; shard k holds source images
  [k * shard_size, (k + 1) * shard_size) minus skipped ones, whatever the worker count.
* Every file is written to a temp file and renamed: nothing half-written ever has a final name.
  A shard is complete when its record `shard-00000.json` (written after its arrays) exists and the
  arrays match it; a rerun with the same arguments skips complete shards. `index.json` is written
  last, so its presence means the archive is complete.
* `preprocessing_args.json` stores the arguments that shape the output; a rerun into the same
  DEST with different ones refuses instead of mixing two archives.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

import datasources
from datasources import (
    ARCHIVE_FORMAT,
    ARCHIVE_VERSION,
    EDMImageDataset,
    H5ArchiveDataset,
    ImageFolderDataset,
    check_archive_shard,
    is_archive,
    load_class_to_idx,
    save_class_to_idx,
)
from utils import atomic_write, atomic_write_text, non_negative_int, remove_stale_temp_files

MANIFEST = "preprocessing_args.json"


def open_source(source: str | os.PathLike, resolution: int, channels: int, class_to_idx: Optional[dict] = None):
    """The reader for SRC and its kind ("folder", "h5", "edm"). Readers return (uint8 [C, H, W],
    label), expose `files` (global order) and `class_to_idx`, and raise OSError naming the file
    for an unreadable image."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"--source not found: {source}")
    if source.is_file():
        if source.suffix.lower() == ".zip":
            return EDMImageDataset(source, resolution, channels), "edm"
        raise ValueError(f"--source {source}: unknown source type (expected an image folder, a REPA-E archive "
                         f"folder with images.h5, or an EDM folder/.zip with dataset.json)")
    if is_archive(source):
        raise ValueError(f"--source {source} is already a preprocessed archive (index.json)")
    if (source / "images.h5").is_file() or (source / "images_h5.json").is_file():
        return H5ArchiveDataset(source, resolution, channels), "h5"
    if (source / "dataset.json").is_file():
        return EDMImageDataset(source, resolution, channels), "edm"
    return ImageFolderDataset(source, resolution, channels, class_to_idx=class_to_idx), "folder"


# --------------------------------------------------------------------------------------------
# One shard (runs in a worker process)
# --------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(reader, config: dict) -> None:
    """Pool initializer: the source reader and settings live in the worker for all its shards."""
    import torch

    torch.set_num_threads(1)  # workers are the parallelism; PIL work is single-threaded anyway
    _WORKER.update(reader=reader, **config)


def _shard_names(k: int) -> dict:
    return {"images": f"images-{k:05d}.npy", "offsets": f"offsets-{k:05d}.npy", "record": f"shard-{k:05d}.json"}


def _save_npy(array: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda f: np.save(f, array), "wb")


def _encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_shard(k: int) -> dict:
    """Read source images [k * S, (k + 1) * S), write the shard's arrays, then its record.
    Returns the record (count, labels, skipped images)."""
    reader, dest = _WORKER["reader"], Path(_WORKER["dest"])
    size, res, ch = _WORKER["shard_size"], _WORKER["resolution"], _WORKER["channels"]
    lo, hi = k * size, min((k + 1) * size, _WORKER["num_source"])
    images = np.empty((hi - lo, res, res, ch), dtype=np.uint8)  # [n, H, W, C]
    labels, bad = [], []
    upsampled_before = datasources.UPSAMPLED["count"]
    for i in range(lo, hi):
        try:
            x, y = reader[i]  # uint8 [C, H, W]
        except OSError as e:
            if not _WORKER["skip_bad_images"]:
                raise OSError(f"{e} (pass --skip-bad-images to skip unreadable images)") from None
            bad.append({"index": i, "file": str(reader.files[i]), "error": str(e)})
            continue
        images[len(labels)] = x.permute(1, 2, 0).numpy()
        labels.append(int(y))
    images = images[: len(labels)]
    names = _shard_names(k)
    if _WORKER["encoding"] == "raw":
        _save_npy(images, dest / names["images"])
    else:
        blobs = [_encode_png(a) for a in images]
        offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(b) for b in blobs])
        flat = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        _save_npy(flat, dest / names["images"])
        _save_npy(offsets, dest / names["offsets"])
    record = {"shard": k, "count": len(labels), "labels": labels, "bad": bad,
              "upsampled": datasources.UPSAMPLED["count"] - upsampled_before}
    atomic_write_text(json.dumps(record), dest / names["record"])
    return record


def _completed_record(dest: Path, k: int, expected_range: int, settings: dict) -> Optional[dict]:
    """The record of shard k if its files are complete and consistent, else None (rewrite it)."""
    names = _shard_names(k)
    try:
        record = json.loads((dest / names["record"]).read_text())
        if record.get("shard") != k or not 0 <= record["count"] <= expected_range \
                or len(record["labels"]) != record["count"] or record["count"] + len(record["bad"]) != expected_range:
            return None
        entry = {"images": names["images"], "offsets": names["offsets"], "count": record["count"]}
        check_archive_shard(dest, entry, settings["resolution"], settings["channels"], settings["encoding"])
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def _check_manifest(dest: Path, manifest: dict) -> None:
    """Refuse a DEST made with other arguments, or a non-empty folder that is not ours."""
    path = dest / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), manifest.get(k)) for k in sorted(set(old) | set(manifest))
                if old.get(k) != manifest.get(k)}
        if diff:
            listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"--dest {dest} holds an archive made with different arguments ({listed}); "
                             f"use another --dest or delete it")
        return
    if dest.exists() and any(not p.name.startswith(".") for p in dest.iterdir()):
        raise ValueError(f"--dest {dest} is not empty and has no {MANIFEST}; choose an empty or new folder")
    atomic_write_text(json.dumps(manifest, indent=1) + "\n", path)


def preprocess(source: str | os.PathLike, dest: str | os.PathLike, resolution: int = 256, workers: int = 1,
               shard_size: int = 1000, channels: int = 3, encoding: str = "raw", skip_bad_images: bool = False,
               max_images: Optional[int] = None, progress: bool = True, class_to_idx: Optional[dict] = None) -> dict:
    """Write the archive of `source` into `dest` (see the module docstring); returns index.json's
    content. Shards already complete from an earlier run with the same arguments are kept."""
    if resolution < 1 or shard_size < 1:
        raise ValueError(f"--resolution ({resolution}) and --shard-size ({shard_size}) must be >= 1")
    if channels not in (1, 3):
        raise ValueError(f"--channels must be 1 or 3, got {channels}")
    if encoding not in ("raw", "png"):
        raise ValueError(f"--encoding must be raw or png, got {encoding!r}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {max_images}")
    source, dest = Path(source).resolve(), Path(dest)
    reader, kind = open_source(source, resolution, channels, class_to_idx)
    num_source = len(reader) if max_images is None else min(len(reader), max_images)
    settings = dict(format=ARCHIVE_FORMAT, version=ARCHIVE_VERSION, source=str(source), resolution=resolution,
                    channels=channels, encoding=encoding, shard_size=shard_size, skip_bad_images=skip_bad_images,
                    max_images=max_images, class_to_idx=class_to_idx)
    _check_manifest(dest, settings)
    remove_stale_temp_files(dest)  # leftovers of an interrupted run; never under a final name

    num_shards = (num_source + shard_size - 1) // shard_size
    ranges = [min(shard_size, num_source - k * shard_size) for k in range(num_shards)]
    records = {k: r for k in range(num_shards) if (r := _completed_record(dest, k, ranges[k], settings))}
    todo = [k for k in range(num_shards) if k not in records]
    if todo and (dest / "index.json").exists():
        (dest / "index.json").unlink()  # the archive is incomplete until this run finishes
    config = dict(dest=str(dest), shard_size=shard_size, resolution=resolution, channels=channels,
                  encoding=encoding, skip_bad_images=skip_bad_images, num_source=num_source)
    bar = tqdm(total=num_source, initial=sum(ranges[k] for k in records), unit="img", unit_scale=True,
               desc=f"preprocessing {source.name}", disable=not progress, dynamic_ncols=True)
    num_bad = sum(len(r["bad"]) for r in records.values())

    def done(record: dict) -> None:
        nonlocal num_bad
        records[record["shard"]] = record
        num_bad += len(record["bad"])
        bar.update(ranges[record["shard"]])
        if num_bad:
            bar.set_postfix(skipped=num_bad)

    num_workers = max(1, min(workers, len(todo)))
    try:
        if num_workers == 1:
            _init_worker(reader, config)
            for k in todo:
                done(_write_shard(k))
        elif todo:
            with multiprocessing.get_context().Pool(num_workers, _init_worker, (reader, config)) as pool:
                for record in pool.imap_unordered(_write_shard, todo):
                    done(record)
    finally:
        bar.close()
        _WORKER.clear()

    ordered = [records[k] for k in range(num_shards)]
    num_images = sum(r["count"] for r in ordered)
    if num_images == 0:
        raise ValueError(f"--source {source}: no readable images ({num_bad} skipped)")
    labels = np.array([y for r in ordered for y in r["labels"]], dtype=np.int64)
    class_to_idx = {str(k): int(v) for k, v in reader.class_to_idx.items()}
    shards = [{"images": _shard_names(r["shard"])["images"],
               "offsets": _shard_names(r["shard"])["offsets"] if encoding == "png" else None,
               "count": r["count"]} for r in ordered]
    index = dict(format=ARCHIVE_FORMAT, version=ARCHIVE_VERSION, resolution=resolution, channels=channels,
                 encoding=encoding, num_images=num_images, num_classes=max(class_to_idx.values()) + 1,
                 labels="labels.npy", shards=shards, class_to_idx=class_to_idx, source=str(source),
                 source_type=kind, shard_size=shard_size, num_bad=num_bad,
                 num_upsampled=sum(r.get("upsampled", 0) for r in ordered),
                 bad_images=[b for r in ordered for b in r["bad"]])
    _save_npy(labels, dest / "labels.npy")
    save_class_to_idx(class_to_idx, dest / "class_to_idx.json")
    atomic_write_text(json.dumps(index, indent=1) + "\n", dest / "index.json")  # last: marks completion
    return index


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="preprocessing.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", "--imagenet-path", dest="source", required=True,
                   help="image folder, REPA-E archive folder, or EDM folder/.zip (--imagenet-path: REPA-E's name)")
    p.add_argument("--dest", "--output-path", dest="dest", default="data",
                   help="output folder (created; resumable); the default 'data' is where train_repae.py / "
                        "cache_latents.py look (--data-dir data), as REPA-E's images.h5")
    p.add_argument("--resolution", type=int, default=256, help="output image size (ADM center crop)")
    p.add_argument("--workers", "--num-workers", dest="num_workers", type=non_negative_int, default=os.cpu_count() or 1,
                   help="worker processes (one shard per task; 0 or 1: in this process)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard file")
    p.add_argument("--channels", type=int, default=3, choices=[1, 3], help="1: convert to grayscale (L)")
    p.add_argument("--encoding", default="raw", choices=["raw", "png"],
                   help="raw: uint8 arrays read through mmap (fastest); png: ~3x smaller, one decode per read")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images (counted and listed in index.json) instead of stopping")
    p.add_argument("--max-images", type=int, default=None, help="only the first N images of the sorted source")
    p.add_argument("--class-to-idx", type=str, default=None, help="JSON {class folder: id} remapping the labels (image folders)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        index = preprocess(args.source, args.dest, args.resolution, args.num_workers, args.shard_size, args.channels,
                           args.encoding, args.skip_bad_images, args.max_images,
                           class_to_idx=load_class_to_idx(args.class_to_idx))
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"preprocessing.py: error: {e}")
    print(f"wrote {index['num_images']} images ({index['num_classes']} classes, {len(index['shards'])} shards, "
          f"{index['num_bad']} skipped) to {args.dest}")
    if index["num_upsampled"]:
        print(f"{index['num_upsampled']} images were smaller than --resolution {args.resolution} and were upsampled")


if __name__ == "__main__":
    main()
