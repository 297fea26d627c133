"""`ImageFolderDataset`: ImageNet layout (one subfolder per class; images directly inside = one
class), ADM center crop to the training resolution, uint8 [C, H, W] + label; unreadable files
raise an error naming them, or are found up front and skipped with `skip_bad_images`."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from torch.utils.data import Dataset

from datasources.images import CROP_MODES, IMAGE_EXTENSIONS, _verify, load_image


class ImageFolderDataset(Dataset):
    """root/<class_name>/**/<image>; classes sorted by name -> label ids 0..K-1.

    A root without class subfolders but with images directly inside is one class (label 0).
    `class_to_idx` remaps folder names to ids (custom datasets); folders not in it are an error.
    With `skip_bad_images`, unreadable files are found up front (parallel verify), counted and
    excluded; otherwise the first unreadable file raises an error naming it when it is read.
    """

    def __init__(self, root: str | os.PathLike, resolution: int, channels: int = 3, skip_bad_images: bool = False,
                 class_to_idx: Optional[dict] = None, num_verify_workers: int = 8, crop: str = "adm"):
        if crop not in CROP_MODES:
            raise ValueError(f"crop mode '{crop}' unknown ({', '.join(CROP_MODES)})")
        self.crop = crop
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder not found: {self.root} (check --data-dir)")
        self.resolution, self.channels = resolution, channels
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        files: List[Tuple[Path, str]] = []
        if class_dirs:
            for d in class_dirs:
                files += [(f, d.name) for f in sorted(d.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS]
        else:
            files = [(f, "") for f in sorted(self.root.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            raise FileNotFoundError(f"no images found in {self.root} (expected <data-dir>/<class>/<image> files "
                                    f"with extensions {sorted(IMAGE_EXTENSIONS)})")
        names = sorted({c for _, c in files})
        if class_to_idx is None:
            class_to_idx = {c: i for i, c in enumerate(names)}
        else:
            unknown = [c for c in names if c not in class_to_idx]
            if unknown:
                raise KeyError(f"class folders {unknown[:10]} of {self.root} are not in the class mapping")
        self.class_to_idx = class_to_idx
        self.num_bad = 0
        self.bad_files: List[str] = []
        if skip_bad_images:
            with ThreadPoolExecutor(num_verify_workers) as pool:
                errors = list(pool.map(_verify, [f for f, _ in files]))
            self.bad_files = [e for e in errors if e is not None]
            files = [fc for fc, e in zip(files, errors) if e is None]
            self.num_bad = len(self.bad_files)
            if not files:
                raise FileNotFoundError(f"every image in {self.root} is unreadable ({self.num_bad} files)")
        self.files = [f for f, _ in files]
        self.labels = np.array([class_to_idx[c] for _, c in files], dtype=np.int64)
        self.num_classes = max(class_to_idx.values()) + 1

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: int):
        return load_image(self.files[idx], self.resolution, self.channels, self.crop), int(self.labels[idx])
