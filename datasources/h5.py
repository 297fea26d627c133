"""The REPA-E archive: `images.h5` (PNG bytes stored under their relative paths, plus an EDM-style
`dataset.json` entry with labels) and `images_h5.json` (the list of those paths)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from datasources.images import IMAGE_EXTENSIONS, _to_chw, center_crop_arr, convert_image, note_upsampled


class H5ArchiveDataset(Dataset):
    """REPA-E training archive: `images.h5` + `images_h5.json` (list of stored paths).

    The h5 file is opened lazily per worker process (h5py handles must not cross a fork)."""

    def __init__(self, data_dir: str | os.PathLike, resolution: Optional[int] = None, channels: int = 3):
        self.data_dir = Path(data_dir)
        self.h5_path = self.data_dir / "images.h5"
        json_path = self.data_dir / "images_h5.json"
        for p in (self.h5_path, json_path):
            if not p.is_file():
                raise FileNotFoundError(f"REPA-E archive file missing: {p}")
        with open(json_path) as f:
            names = json.load(f)
        self.files = sorted(n for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS)
        import h5py

        with h5py.File(self.h5_path, "r") as hf:
            if "dataset.json" not in hf:
                raise KeyError(f"{self.h5_path} has no 'dataset.json' entry with labels")
            meta = json.loads(np.array(hf["dataset.json"]).tobytes().decode("utf-8"))
        labels = dict((k, v) for k, v in (meta.get("labels") or []))
        missing = [f for f in self.files if f not in labels]
        if missing:
            raise KeyError(f"{self.h5_path}: dataset.json has no label for {len(missing)} images, e.g. {missing[:3]}")
        self.labels = np.array([labels[f] for f in self.files], dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        # the archive stores label ids only; name each class by its id so every reader exposes a mapping
        self.class_to_idx = {str(int(c)): int(c) for c in np.unique(self.labels)}
        self.resolution, self.channels = resolution, channels
        self._h5 = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: int):
        import h5py

        if self._h5 is None:
            self._h5 = h5py.File(self.h5_path, "r")
        name = self.files[idx]
        try:
            with Image.open(io.BytesIO(np.array(self._h5[name]).tobytes())) as img:
                img = convert_image(img, self.channels)
                if self.resolution is not None:
                    note_upsampled(f"{self.h5_path}:{name}", img.size, self.resolution)
                arr = np.array(img) if self.resolution is None or img.size == (self.resolution,) * 2 \
                    else center_crop_arr(img, self.resolution)
        except Exception as e:  # noqa: BLE001
            raise OSError(f"cannot read {name} from {self.h5_path}: {e}") from e
        return _to_chw(arr, self.channels), int(self.labels[idx])


def write_h5_archive(image_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write the REPA-E archive from a folder of PNGs + EDM `dataset.json` (used by tests)."""
    import h5py

    image_dir, out_dir = Path(image_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(str(p.relative_to(image_dir)) for p in image_dir.rglob("*") if p.is_file())
    with h5py.File(out_dir / "images.h5", "w") as hf:
        for n in names:
            hf.create_dataset(n, data=np.frombuffer((image_dir / n).read_bytes(), dtype=np.uint8))
    (out_dir / "images_h5.json").write_text(json.dumps(names))
