"""The training archive `preprocessing.py` writes (uint8 shards read through mmap, or PNG-encoded
shards; see that script for the format and why it is the fast one), and the class-map files."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from torch.utils.data import Dataset

from utils import atomic_write_text
from datasources.images import _decode_image, _to_chw


ARCHIVE_FORMAT = "tokenizer-toolkit-image-archive"
ARCHIVE_VERSION = 1


def read_npy_header(path: str | os.PathLike) -> Tuple[Tuple[int, ...], np.dtype]:
    """Shape and dtype of a `.npy` file from its header alone, after checking the file holds all
    the bytes the header promises. Errors name the file: a missing or truncated shard must be
    reported when the dataset is opened, not as a SIGBUS hours into training."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"archive file missing: {path} (rerun preprocessing.py with the same "
                                f"arguments to rewrite it)")
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            data_offset = f.tell()
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise OSError(f"archive file {path} is not a valid .npy file ({e}); rerun preprocessing.py with the "
                      f"same arguments to rewrite it") from e
    expected = data_offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        raise OSError(f"archive file {path} is truncated ({size} bytes, header promises {expected}); rerun "
                      f"preprocessing.py with the same arguments to rewrite it")
    return tuple(int(s) for s in shape), dtype


def check_archive_shard(root: Path, shard: dict, resolution: int, channels: int, encoding: str) -> None:
    """Validate one shard entry of index.json against its files (headers and sizes only)."""
    n = int(shard["count"])
    if encoding == "raw":
        shape, dtype = read_npy_header(root / shard["images"])
        want = (n, resolution, resolution, channels)
        if shape != want or dtype != np.uint8:
            raise OSError(f"archive file {root / shard['images']} holds {dtype} {shape}, expected uint8 {want}")
    else:
        off_shape, off_dtype = read_npy_header(root / shard["offsets"])
        if off_shape != (n + 1,) or off_dtype != np.int64:
            raise OSError(f"archive file {root / shard['offsets']} holds {off_dtype} {off_shape}, "
                          f"expected int64 ({n + 1},)")
        total = int(np.load(root / shard["offsets"], mmap_mode="r")[-1])
        shape, dtype = read_npy_header(root / shard["images"])
        if shape != (total,) or dtype != np.uint8:
            raise OSError(f"archive file {root / shard['images']} holds {dtype} {shape}, expected uint8 ({total},) "
                          f"(the byte count its offsets file gives)")


class ArchiveDataset(Dataset):
    """Reader of the `preprocessing.py` archive: `index.json`, `labels.npy` and shards of
    already-cropped uint8 images. Returns (uint8 [C, H, W], int label) like ImageFolderDataset.

    Raw shards are `np.load(mmap_mode="r")`-ed lazily, once per process (DataLoader workers map
    their own, pickling carries no arrays), so reading an image is a page-cache copy with no
    decode. PNG shards (flat byte buffer + offsets) cost one PNG decode per image. Every shard's
    header and size are checked on construction, so a missing or truncated shard is named at
    start. `class_to_idx` optionally remaps the stored class names to other label ids."""

    def __init__(self, root: str | os.PathLike, channels: Optional[int] = None, class_to_idx: Optional[dict] = None):
        self.root = Path(root)
        index_path = self.root / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"archive index missing: {index_path} (run preprocessing.py to completion)")
        index = json.loads(index_path.read_text())
        if index.get("format") != ARCHIVE_FORMAT:
            raise ValueError(f"{index_path} is not a {ARCHIVE_FORMAT} index (format={index.get('format')!r})")
        if index.get("version") != ARCHIVE_VERSION:
            raise ValueError(f"{index_path} has format version {index.get('version')}, this reader understands "
                             f"{ARCHIVE_VERSION}; rerun preprocessing.py")
        self.index = index
        self.resolution, self.channels, self.encoding = index["resolution"], index["channels"], index["encoding"]
        if channels is not None and channels != self.channels:
            raise ValueError(f"{index_path}: the archive holds {self.channels}-channel images but {channels} "
                             f"channels were requested; rerun preprocessing.py with --channels {channels}")
        self.shards = index["shards"]
        counts = np.array([s["count"] for s in self.shards], dtype=np.int64)
        self._starts = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(counts)])  # [num_shards + 1]
        if int(self._starts[-1]) != index["num_images"]:
            raise ValueError(f"{index_path}: shard counts sum to {int(self._starts[-1])}, num_images says "
                             f"{index['num_images']}")
        labels_path = self.root / index["labels"]
        shape, _ = read_npy_header(labels_path)
        if shape != (index["num_images"],):
            raise ValueError(f"{labels_path} holds {shape} labels, {index_path} lists {index['num_images']} images")
        labels = np.load(labels_path).astype(np.int64)
        for shard in self.shards:
            check_archive_shard(self.root, shard, self.resolution, self.channels, self.encoding)

        stored = {str(k): int(v) for k, v in index["class_to_idx"].items()}
        if class_to_idx is None:
            self.class_to_idx = stored
        else:
            unknown = [c for c in stored if c not in class_to_idx]
            if unknown:
                raise KeyError(f"classes {unknown[:10]} of {index_path} are not in the class mapping")
            lut = np.zeros(max(stored.values()) + 1, dtype=np.int64)  # stored id -> requested id
            for name, idx in stored.items():
                lut[idx] = class_to_idx[name]
            labels = lut[labels]
            self.class_to_idx = dict(class_to_idx)
        self.labels = labels
        self.num_classes = max(self.class_to_idx.values()) + 1 if self.class_to_idx else 1
        # images skipped when the archive was written (--skip-bad-images), for the trainers' log
        self.num_bad = int(index.get("num_bad", 0))
        self.bad_files = [b["file"] for b in index.get("bad_images", [])]
        self._maps, self._pid = {}, None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"], state["_pid"] = {}, None  # each process maps the shards itself
        return state

    def _shard_arrays(self, k: int):
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        if k not in self._maps:
            shard = self.shards[k]
            images = np.load(self.root / shard["images"], mmap_mode="r")
            offsets = np.load(self.root / shard["offsets"]) if self.encoding == "png" else None
            self._maps[k] = (images, offsets)
        return self._maps[k]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, idx: int):
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {self.root} ({len(self)} images)")
        k = int(np.searchsorted(self._starts, idx, side="right")) - 1
        j = idx - int(self._starts[k])
        images, offsets = self._shard_arrays(k)
        if self.encoding == "raw":
            arr = images[j]  # [H, W, C] view into the page cache; _to_chw copies it out
        else:
            try:
                arr = _decode_image(images[offsets[j]: offsets[j + 1]].tobytes(), None, self.channels)
            except Exception as e:  # noqa: BLE001
                raise OSError(f"cannot decode image {j} of {self.root / self.shards[k]['images']}: {e}") from e
            if arr.shape[:2] != (self.resolution, self.resolution):
                raise OSError(f"image {j} of {self.root / self.shards[k]['images']} is {arr.shape[:2]}, "
                              f"index.json says {self.resolution}px")
        return _to_chw(arr, self.channels), int(self.labels[idx])


def is_archive(path: str | os.PathLike) -> bool:
    """True when `path` is a folder holding an index.json of the preprocessing.py format."""
    index_path = Path(path) / "index.json"
    if not index_path.is_file():
        return False
    try:
        return json.loads(index_path.read_text()).get("format") == ARCHIVE_FORMAT
    except (ValueError, AttributeError):
        return False


def save_class_to_idx(class_to_idx: dict, path: str | os.PathLike) -> None:
    """Write a class mapping as `{"name": id}` JSON (sorted by id), atomically."""
    ordered = dict(sorted(class_to_idx.items(), key=lambda kv: (kv[1], kv[0])))
    atomic_write_text(json.dumps(ordered, indent=1) + "\n", path)


def load_class_to_idx(path: Optional[str | os.PathLike], flag: str = "--class-to-idx") -> Optional[dict]:
    """A class mapping file `{"folder name": id}` (custom datasets: reorder, merge or subset
    classes); None passes through. Errors name the flag and the file."""
    if path is None:
        return None
    try:
        mapping = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path}: cannot read a JSON class mapping ({e})") from e
    if not isinstance(mapping, dict) or not all(isinstance(v, int) and v >= 0 for v in mapping.values()):
        raise ValueError(f"{flag} {path}: expected {{\"class folder\": non-negative int id, ...}}")
    return {str(k): int(v) for k, v in mapping.items()}
