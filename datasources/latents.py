"""Latent shards: written by cache_latents.py, read by the latent-diffusion trainers
(`LatentShardDataset`, `collate_latents`) with one positional read per row (see the class)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset


# A latent folder holds `tokenizer.json` (who wrote it and how), `shards/latents-KKKKK.safetensors`
# (shard k = dataset indices [k*S, (k+1)*S)) and `latents_stats.pt` (exact statistics). Shards are
# read through a memory map of the raw safetensors layout: 8-byte little-endian header length, a
# JSON header {name: {dtype, shape, data_offsets}}, then the tensor bytes.
LATENT_INFO_FILE = "tokenizer.json"
LATENT_STATS_FILE = "latents_stats.pt"
LATENT_SHARD_DIR = "shards"
# safetensors dtype -> (numpy storage dtype, torch dtype); bf16 is stored as raw 16-bit words.
_SAFETENSORS_DTYPES = {"F16": (np.float16, torch.float16), "BF16": (np.uint16, torch.bfloat16),
                       "F32": (np.float32, torch.float32), "F64": (np.float64, torch.float64),
                       "I64": (np.int64, torch.int64), "I32": (np.int32, torch.int32)}


def latent_shard_path(root: str | os.PathLike, k: int) -> Path:
    return Path(root) / LATENT_SHARD_DIR / f"latents-{k:05d}.safetensors"


def latent_shard_range(k: int, shard_size: int, num_images: int) -> Tuple[int, int]:
    """Dataset indices [start, stop) held by shard k."""
    return k * shard_size, min((k + 1) * shard_size, num_images)


def num_latent_shards(num_images: int, shard_size: int) -> int:
    return (num_images + shard_size - 1) // shard_size


def read_shard_header(path: str | os.PathLike) -> dict:
    """Parse a safetensors header and check that the file holds every byte it announces.

    Returns {name: {"dtype", "shape", "start", "stop"} (absolute byte offsets)} plus
    "__metadata__". A missing, truncated or corrupt file raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent shard missing: {path}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header of {n} bytes does not fit a {size}-byte file")
            header = json.loads(f.read(n).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"latent shard {path} is corrupt or truncated ({e}); delete it and rerun "
                         f"cache_latents.py to rewrite it") from e
    out = {"__metadata__": header.pop("__metadata__", {}) or {}}
    end = 0
    for name, entry in header.items():
        if entry.get("dtype") not in _SAFETENSORS_DTYPES:
            raise ValueError(f"latent shard {path}: tensor '{name}' has unsupported dtype {entry.get('dtype')}")
        a, b = entry["data_offsets"]
        out[name] = {"dtype": entry["dtype"], "shape": list(entry["shape"]), "start": 8 + n + a, "stop": 8 + n + b}
        end = max(end, 8 + n + b)
    if end > size:
        raise ValueError(f"latent shard {path} is truncated: {size} bytes, its header announces {end}; delete it "
                         f"and rerun cache_latents.py to rewrite it")
    return out


def map_shard_arrays(path: str | os.PathLike, header: dict) -> Dict[str, np.ndarray]:
    """Read-only numpy views (one memory map) of every tensor of a shard (bf16 as uint16 words)."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        np_dtype = _SAFETENSORS_DTYPES[entry["dtype"]][0]
        arrays[name] = raw[entry["start"]:entry["stop"]].view(np_dtype).reshape(entry["shape"])
    return arrays


def _pread_into(fd: int, buf: np.ndarray, offset: int) -> int:
    """Fill the uint8 array `buf` from `offset` of `fd`; returns the bytes read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buf], offset)
    data = os.pread(fd, buf.nbytes, offset)  # platforms without preadv
    buf.reshape(-1)[:len(data)] = np.frombuffer(data, dtype=np.uint8)
    return len(data)


def _read_rows(fd: int, entry: dict, j: int, count: int = 1) -> torch.Tensor:
    """Rows j..j+count of a shard tensor [n, ...] as float32 [count, ...]: one positional read
    (no shared file offset, so safe in forked workers) into a fresh buffer, then the cast."""
    n = entry["shape"][0]
    row_bytes = (entry["stop"] - entry["start"]) // max(n, 1)
    buf = np.empty(row_bytes * count, dtype=np.uint8)
    offset = entry["start"] + j * row_bytes
    if _pread_into(fd, buf, offset) != buf.nbytes:
        raise OSError(f"short read of a latent shard ({buf.nbytes} bytes at offset {offset}): "
                      f"the file changed after it was opened")
    t = torch.from_numpy(buf).view(_SAFETENSORS_DTYPES[entry["dtype"]][1])
    return t.reshape([count] + entry["shape"][1:]).float()


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a well-mixed 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def latent_flip_choice(seed: int, epoch: int, index: int) -> bool:
    """Whether dataset item `index` uses its flipped latent in `epoch`: a hash of the three
    numbers (no global RNG), so the choice survives resume and ignores the DataLoader workers."""
    h = _mix64(_mix64(_mix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64))
    return bool(h >> 63)


def tokenizer_differences(a: dict, b: dict, a_name: str, b_name: str) -> list:
    """["key: <a_name> X vs <b_name> Y"] for each identity field (kind, name, weight fingerprint,
    latent shape) in which two tokenizer records differ; empty when they are the same tokenizer."""
    diffs = []
    for key in ("kind", "name", "fingerprint", "latent_shape"):
        have, want = a.get(key), b.get(key)
        if key == "latent_shape":
            have, want = list(have or []), list(want or [])
        if have != want:
            diffs.append(f"{key}: {a_name} {have!r} vs {b_name} {want!r}")
    return diffs


class LatentShardDataset(Dataset):
    """Cached latents of one tokenizer (a folder written by `cache_latents.py`).

    Item i (dataset index i) is a dict: `mean`, `std` float32 [C, h, w] (std zeros for a
    deterministic tokenizer: VQ, RAE), `label` int64, `index` int64, `flipped` bool and, with
    `image_dataset`, `image` uint8 [3, H, W] of the same index (mirrored when the mirrored latent
    was chosen). When the folder stores flips and `flip` is on, the plain / mirrored choice is
    `latent_flip_choice(seed, epoch, index)`; call `set_epoch` before each epoch's iterator is
    made (DataLoader workers copy the dataset when they start, so use persistent_workers=False
    or recreate the loader). Sampling z = mean + std * eps is the trainer's job.

    Shard headers are checked up front (every shard present, complete, with `labels`, sizes as
    tokenizer.json says); rows are read lazily in each worker process with one positional read
    each (faster than a memory map for the 400 KB rows of RAE latents, as fast for small ones, and
    ~12x faster per 8 KiB row than `safetensors.safe_open(...).get_slice`: bench/README.md).
    `keep_dtype`: batches carry mean / std in the stored dtype (e.g. float16) instead of float32,
    so worker -> trainer transfers and pinning move half the bytes; the trainer casts on the GPU.
    """

    def __init__(self, root: str | os.PathLike, flip: bool = True, seed: int = 0, image_dataset: Optional[Dataset] = None,
                 keep_dtype: bool = False):
        self.keep_dtype = bool(keep_dtype)
        self.root = Path(root)
        info_path = self.root / LATENT_INFO_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"{info_path} missing: {self.root} is not a latent folder (write one with "
                                    f"cache_latents.py --output-dir {self.root})")
        try:
            self.info = json.loads(info_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{info_path} is not valid JSON: {e}") from e
        missing = [k for k in ("latent_shape", "num_images", "shard_size", "flip", "has_std") if k not in self.info]
        if missing:
            raise KeyError(f"{info_path} lacks {missing}; rewrite the folder with cache_latents.py")
        self.num_images, self.shard_size = int(self.info["num_images"]), int(self.info["shard_size"])
        self.has_flip, self.has_std = bool(self.info["flip"]), bool(self.info["has_std"])
        self.flip, self.seed, self.epoch = bool(flip), int(seed), 0
        self.image_dataset = image_dataset
        if image_dataset is not None and len(image_dataset) != self.num_images:
            raise ValueError(f"image dataset has {len(image_dataset)} images but {info_path} records "
                             f"{self.num_images}: pass the dataset the latents were computed from")
        keys = ["mean", "labels", "indices"] + (["std"] if self.has_std else [])
        if self.has_flip:
            keys += ["mean_flip"] + (["std_flip"] if self.has_std else [])
        shape = [int(s) for s in self.info["latent_shape"]]
        self._headers = []
        total = 0
        for k in range(num_latent_shards(self.num_images, self.shard_size)):
            path = latent_shard_path(self.root, k)
            if not path.is_file():
                raise FileNotFoundError(f"latent shard {path} missing ({info_path} records {self.num_images} images in "
                                        f"shards of {self.shard_size}); rerun cache_latents.py to complete the folder")
            header = read_shard_header(path)
            absent = [key for key in keys if key not in header]
            if absent:
                raise KeyError(f"latent shard {path} has no {absent} (has {sorted(k for k in header if k != '__metadata__')})")
            start, stop = latent_shard_range(k, self.shard_size, self.num_images)
            n = header["labels"]["shape"][0]
            if n != stop - start:
                raise ValueError(f"latent shard {path} holds {n} latents but {info_path} implies {stop - start} "
                                 f"(num_images {self.num_images}, shard_size {self.shard_size})")
            for key in keys:
                want = [n] + shape if key.startswith(("mean", "std")) else [n]
                if header[key]["shape"] != want:
                    raise ValueError(f"latent shard {path}: '{key}' has shape {header[key]['shape']}, expected {want} "
                                     f"(latent_shape in {info_path})")
            total += n
            self._headers.append((path, header))
        if total != self.num_images:
            raise ValueError(f"{self.root}: shards hold {total} latents, {info_path} records {self.num_images}")
        self._arrays: Dict[int, dict] = {}
        self._pid = None
        self._stats = None

    # ---- metadata -----------------------------------------------------------------------------
    @property
    def tokenizer_info(self) -> dict:
        return dict(self.info)

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in self.info["latent_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.info.get("num_classes") or 0)

    @property
    def class_to_idx(self) -> Optional[dict]:
        return self.info.get("class_to_idx")

    @property
    def stats(self) -> dict:
        """`latents_stats.pt`: mean / var [C, h, w] per position, channel_mean / channel_var [C], count."""
        if self._stats is None:
            path = self.root / LATENT_STATS_FILE
            if not path.is_file():
                raise FileNotFoundError(f"latent statistics {path} missing; run cache_latents.py --stats-only "
                                        f"--output-dir {self.root} to compute them from the shards")
            self._stats = torch.load(path, map_location="cpu", weights_only=True)
        return self._stats

    def check_tokenizer(self, identity: dict) -> None:
        """Raise when the latents were written by another tokenizer than `identity` describes."""
        diffs = tokenizer_differences(self.info, identity, "folder", "given")
        if diffs:
            raise ValueError(f"latent folder {self.root} was written by another tokenizer ({'; '.join(diffs)}); "
                             f"encode the data again with this tokenizer (cache_latents.py) into another folder")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def uses_flip(self, index: int) -> bool:
        return self.has_flip and self.flip and latent_flip_choice(self.seed, self.epoch, index)

    # ---- items --------------------------------------------------------------------------------
    def _shard(self, k: int) -> dict:
        """{fd, labels, indices} of shard k, opened on first use in this process (a forked
        worker opens its own descriptors)."""
        if self._pid != os.getpid():
            self._arrays, self._pid = {}, os.getpid()
        if k not in self._arrays:
            path, header = self._headers[k]
            fd = os.open(path, os.O_RDONLY)
            self._arrays[k] = {"fd": fd, "labels": _read_rows(fd, header["labels"], 0, header["labels"]["shape"][0]),
                               "indices": _read_rows(fd, header["indices"], 0, header["indices"]["shape"][0])}
        return self._arrays[k]

    def close(self) -> None:
        """Close this process's shard descriptors (they reopen on the next access)."""
        if self._pid == os.getpid():
            for entry in self._arrays.values():
                os.close(entry["fd"])
        self._arrays = {}

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self.num_images:
            raise IndexError(f"latent index {i} out of range [0, {self.num_images})")
        k, j = divmod(i, self.shard_size)
        shard, header = self._shard(k), self._headers[k][1]
        flipped = self.uses_flip(i)
        suffix = "_flip" if flipped else ""
        item = {"mean": _read_rows(shard["fd"], header["mean" + suffix], j)[0]}
        if self.has_std:
            item["std"] = _read_rows(shard["fd"], header["std" + suffix], j)[0]
        else:
            item["std"] = torch.zeros(self.latent_shape)
        index = int(shard["indices"][j])
        item.update(label=torch.tensor(int(shard["labels"][j]), dtype=torch.int64),
                    index=torch.tensor(index, dtype=torch.int64), flipped=torch.tensor(flipped))
        if self.image_dataset is not None:
            image = self.image_dataset[index]
            image = image[0] if isinstance(image, (tuple, list)) else image
            item["image"] = image.flip(-1) if flipped else image
        return item

    def get_batch(self, indices) -> dict:
        """The items of `indices` already batched: {mean, std [B, C, h, w] float32, label, index
        [B] int64, flipped [B] bool, [image uint8 [B, 3, H, W]]}. Rows are read straight into one
        buffer per tensor and cast once, instead of per item and then stacked."""
        indices = [int(i) for i in indices]
        B, shape = len(indices), list(self.latent_shape)
        for i in indices:
            if not 0 <= i < self.num_images:
                raise IndexError(f"latent index {i} out of range [0, {self.num_images})")
        flipped = [self.uses_flip(i) for i in indices]
        keys = ["mean"] + (["std"] if self.has_std else [])
        out, labels, index = {}, [], []
        for key in keys:
            first = self._headers[0][1][key]
            row_bytes = (first["stop"] - first["start"]) // first["shape"][0]
            buf = np.empty((B, row_bytes), dtype=np.uint8)
            for b, (i, f) in enumerate(zip(indices, flipped)):
                k, j = divmod(i, self.shard_size)
                entry = self._headers[k][1][key + ("_flip" if f else "")]
                shard = self._shard(k)
                if _pread_into(shard["fd"], buf[b], entry["start"] + j * row_bytes) != row_bytes:
                    raise OSError(f"short read of latent shard {self._headers[k][0]}: the file changed after it was opened")
                if key == "mean":
                    labels.append(int(shard["labels"][j]))
                    index.append(int(shard["indices"][j]))
            dtype = _SAFETENSORS_DTYPES[first["dtype"]][1]
            rows = torch.from_numpy(buf).view(dtype).reshape([B] + shape)
            out[key] = rows if self.keep_dtype else rows.float()
        if not self.has_std:
            # stride-0 zeros: no memory, and nothing to copy between worker and trainer processes
            out["std"] = torch.zeros((), dtype=out["mean"].dtype).expand([B] + shape)
        out.update(label=torch.tensor(labels, dtype=torch.int64), index=torch.tensor(index, dtype=torch.int64),
                   flipped=torch.tensor(flipped))
        if self.image_dataset is not None:
            images = []
            for i, f in zip(index, flipped):
                image = self.image_dataset[i]
                image = image[0] if isinstance(image, (tuple, list)) else image
                images.append(image.flip(-1) if f else image)
            out["image"] = torch.stack(images)
        return out

    def __getitems__(self, indices) -> "LatentBatch":
        """DataLoader's batched fetch: per-item dicts that are views of one `get_batch`, so the
        default collate still works; `collate_latents` returns the batch without the stack copy."""
        batch = self.get_batch(indices)
        items = LatentBatch({k: v[b] for k, v in batch.items()} for b in range(len(indices)))
        items.batched = batch
        return items


class LatentBatch(list):
    """A list of per-item dicts that also carries the ready batch (`.batched`)."""

    batched: Optional[dict] = None


def collate_latents(items) -> dict:
    """collate_fn for LatentShardDataset loaders: the batch `__getitems__` already built (no copy),
    otherwise the default collate."""
    if isinstance(items, LatentBatch) and items.batched is not None:
        return items.batched
    return torch.utils.data.default_collate(items)
