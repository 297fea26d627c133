"""The EDM / REPA `dataset_tool.py` output: a folder or `.zip` of images plus a `dataset.json` with
`{"labels": [[relpath, label], ...]}` (or `null`: unconditional)."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from datasources.images import IMAGE_EXTENSIONS, _decode_image, _to_chw


class EDMImageDataset(Dataset):
    """Folder or `.zip` written by EDM's / REPA's `dataset_tool.py`: images under relative paths
    plus `dataset.json` = {"labels": [[relpath, int label], ...]} (labels `null` or no
    dataset.json: unconditional, label 0). Images are read in sorted relpath order and ADM-cropped
    to `resolution`. A zip is opened lazily once per process (handles must not cross a fork)."""

    def __init__(self, path: str | os.PathLike, resolution: int, channels: int = 3):
        self.path = Path(path)
        self.resolution, self.channels = resolution, channels
        self.is_zip = self.path.is_file()
        if self.is_zip:
            if self.path.suffix.lower() != ".zip":
                raise ValueError(f"{self.path}: expected a folder or a .zip of images")
            with zipfile.ZipFile(self.path) as zf:
                names = zf.namelist()
                meta = json.loads(zf.read("dataset.json")) if "dataset.json" in names else None
        elif self.path.is_dir():
            names = [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]
            meta_path = self.path / "dataset.json"
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        else:
            raise FileNotFoundError(f"dataset not found: {self.path}")
        self.files = sorted(n for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise FileNotFoundError(f"no images found in {self.path}")
        labels = (meta or {}).get("labels")
        if labels is None:
            self.labels = np.zeros(len(self.files), dtype=np.int64)
        else:
            table = {str(k): v for k, v in labels}
            missing = [f for f in self.files if f not in table]
            if missing:
                raise KeyError(f"{self.path}/dataset.json has no label for {len(missing)} images, e.g. {missing[:3]}")
            bad = [f for f in self.files if not isinstance(table[f], int) or table[f] < 0]
            if bad:
                raise ValueError(f"{self.path}/dataset.json: labels must be non-negative integers, "
                                 f"got {table[bad[0]]!r} for {bad[0]}")
            self.labels = np.array([table[f] for f in self.files], dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1
        self.class_to_idx = {str(int(c)): int(c) for c in np.unique(self.labels)}
        self._zip, self._zip_pid = None, None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"], state["_zip_pid"] = None, None
        return state

    def _read_bytes(self, name: str) -> bytes:
        if not self.is_zip:
            return (self.path / name).read_bytes()
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip.read(name)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: int):
        name = self.files[idx]
        try:
            arr = _decode_image(self._read_bytes(name), self.resolution, self.channels, f"{self.path}/{name}")
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise OSError(f"cannot read image {name} from {self.path}: {e}") from e
        return _to_chw(arr, self.channels), int(self.labels[idx])
