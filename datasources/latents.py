"""Latent shards: written by cache_latents.py, read by the latent-diffusion trainers
(`LatentShardDataset`, `collate_latents`), through `safetensors.safe_open(...).get_slice`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset


# A latent folder holds `tokenizer.json` (who wrote it and how), `shards/latents-KKKKK.safetensors`
# (shard k = dataset indices [k*S, (k+1)*S)) and `latents_stats.pt` (exact statistics).
LATENT_INFO_FILE = "tokenizer.json"
LATENT_STATS_FILE = "latents_stats.pt"
LATENT_SHARD_DIR = "shards"


def latent_shard_path(root: str | os.PathLike, k: int) -> Path:
    return Path(root) / LATENT_SHARD_DIR / f"latents-{k:05d}.safetensors"


def latent_shard_range(k: int, shard_size: int, num_images: int) -> Tuple[int, int]:
    """Dataset indices [start, stop) held by shard k."""
    return k * shard_size, min((k + 1) * shard_size, num_images)


def num_latent_shards(num_images: int, shard_size: int) -> int:
    return (num_images + shard_size - 1) // shard_size


def open_shard(path: str | os.PathLike):
    """`safetensors.safe_open` of a shard (a memory map; rows are read with `get_slice`). The library
    checks that the file holds every byte its header announces; a missing, truncated or corrupt
    file raises an error naming it and the way out."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent shard missing: {path}")
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise ValueError(f"latent shard {path} is corrupt or truncated ({e}); delete it and rerun "
                         f"cache_latents.py to rewrite it") from e


def read_shard_header(path: str | os.PathLike) -> dict:
    """{name: {"dtype" (safetensors code, e.g. "F16"), "shape"}} of every tensor of a shard, plus
    "__metadata__"; errors as `open_shard`."""
    f = open_shard(path)
    out = {"__metadata__": f.metadata() or {}}
    for name in f.keys():
        s = f.get_slice(name)
        out[name] = {"dtype": s.get_dtype(), "shape": list(s.get_shape())}
    return out


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
    tokenizer.json says); rows are read lazily in each worker process with `safetensors`'
    `get_slice` (see bench/README.md for the figures against the former hand-written reader).
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
        diffs = []
        for key in ("kind", "name", "fingerprint", "latent_shape"):
            have, want = self.info.get(key), identity.get(key)
            if key == "latent_shape":
                have, want = list(have or []), list(want or [])
            if have != want:
                diffs.append(f"{key}: folder {have!r} vs given {want!r}")
        if diffs:
            raise ValueError(f"latent folder {self.root} was written by another tokenizer ({'; '.join(diffs)}); "
                             f"encode the data again with this tokenizer (cache_latents.py) into another folder")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def uses_flip(self, index: int) -> bool:
        return self.has_flip and self.flip and latent_flip_choice(self.seed, self.epoch, index)

    # ---- items --------------------------------------------------------------------------------
    def _shard(self, k: int) -> dict:
        """{slices, labels, indices} of shard k (`slices`: key -> safetensors slice of the mean /
        std tensors), opened on first use in this process (a forked worker opens its own)."""
        if self._pid != os.getpid():
            self._arrays, self._pid = {}, os.getpid()
        if k not in self._arrays:
            f = open_shard(self._headers[k][0])
            self._arrays[k] = {"slices": {key: f.get_slice(key) for key in f.keys() if key.startswith(("mean", "std"))},
                               "labels": f.get_tensor("labels"), "indices": f.get_tensor("indices")}
        return self._arrays[k]

    def close(self) -> None:
        """Drop this process's shard maps (they reopen on the next access)."""
        self._arrays = {}

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self.num_images:
            raise IndexError(f"latent index {i} out of range [0, {self.num_images})")
        k, j = divmod(i, self.shard_size)
        shard = self._shard(k)
        flipped = self.uses_flip(i)
        suffix = "_flip" if flipped else ""
        item = {"mean": shard["slices"]["mean" + suffix][j].float()}
        if self.has_std:
            item["std"] = shard["slices"]["std" + suffix][j].float()
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
        [B] int64, flipped [B] bool, [image uint8 [B, 3, H, W]]}. Rows are stacked in the stored dtype
        and cast once, instead of cast per item and then stacked."""
        indices = [int(i) for i in indices]
        B, shape = len(indices), list(self.latent_shape)
        for i in indices:
            if not 0 <= i < self.num_images:
                raise IndexError(f"latent index {i} out of range [0, {self.num_images})")
        flipped = [self.uses_flip(i) for i in indices]
        keys = ["mean"] + (["std"] if self.has_std else [])
        out, labels, index = {}, [], []
        for key in keys:
            rows = []
            for i, f in zip(indices, flipped):
                k, j = divmod(i, self.shard_size)
                shard = self._shard(k)
                rows.append(shard["slices"][key + ("_flip" if f else "")][j])
                if key == "mean":
                    labels.append(int(shard["labels"][j]))
                    index.append(int(shard["indices"][j]))
            rows = torch.stack(rows)
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
