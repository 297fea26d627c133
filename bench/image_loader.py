"""Data-loading throughput: images/s a DataLoader reaches on (a) a PNG image folder, (b) the raw
preprocessing.py archive, (c) the PNG-encoded archive, at the training resolution.

  python bench/image_loader.py [--workers 2] [--batch-size 64] [--num-images 512] [--resolution 256]

The data is the built-in procedural dataset written at `--resolution` (so the folder reader's ADM
crop is a no-op and the comparison is decode vs. no decode), then preprocessed both ways; all of it
is cached under `--work-dir`. Each reader runs one warm-up epoch (page cache, worker start) and is
timed over `--epochs` more with persistent workers. Preprocessing throughput is printed as well.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402
from datasources import ArchiveDataset, ImageFolderDataset, make_procedural_dataset  # noqa: E402
from preprocessing import preprocess  # noqa: E402


def loader_images_per_s(dataset, batch_size: int, workers: int, epochs: int) -> float:
    """Mean images/s over `epochs` shuffled epochs after one warm-up epoch."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, drop_last=False,
                                         generator=torch.Generator().manual_seed(0))
    for _ in loader:  # warm-up: worker start, page cache
        pass
    seen, t = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _ in loader:
            seen += x.shape[0]
    return seen / (time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (and preprocessing workers)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per reader")
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "bench_image_loader"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the workers are the parallelism being measured
    work = Path(args.work_dir)
    classes = 8
    t = time.perf_counter()
    folder = make_procedural_dataset(work / f"png-{args.resolution}", num_classes=classes,
                                     per_class=max(1, args.num_images // classes), resolution=args.resolution)
    print(f"image folder: {folder} ({time.perf_counter() - t:.1f}s to make or find)", file=sys.stderr)
    archives, lines = {}, []
    for encoding in ("raw", "png"):
        dest = work / f"archive-{encoding}-{args.resolution}-{args.num_images}"
        shutil.rmtree(dest, ignore_errors=True)  # time the full preprocessing, not a resume
        t = time.perf_counter()
        index = preprocess(folder, dest, resolution=args.resolution, workers=max(1, args.workers),
                           shard_size=128, encoding=encoding, progress=False)
        dt = time.perf_counter() - t
        size = sum(f.stat().st_size for f in dest.glob("images-*.npy"))
        lines.append(emit("image_loader", f"preprocessing.py --encoding {encoding}, {args.resolution}px",
                          images_per_s=index["num_images"] / dt, kib_per_image=size / index["num_images"] / 1024,
                          workers=max(1, args.workers)))
        archives[encoding] = dest
    readers = {
        "PNG image folder": ImageFolderDataset(folder, args.resolution),
        "raw archive (mmap)": ArchiveDataset(archives["raw"]),
        "PNG-encoded archive": ArchiveDataset(archives["png"]),
    }
    for name, ds in readers.items():
        rate = loader_images_per_s(ds, args.batch_size, args.workers, args.epochs)
        lines.append(emit("image_loader", f"DataLoader over {name}, {args.resolution}px", images_per_s=rate,
                          batch=args.batch_size, workers=args.workers, images=len(ds)))
    return lines


if __name__ == "__main__":
    main()
