"""`build_image_dataset`: the image reader for a `--data-dir`, picked from what it holds; a clear
error otherwise."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from torch.utils.data import Dataset

from datasources.archive import ArchiveDataset, is_archive
from datasources.edm import EDMImageDataset
from datasources.h5 import H5ArchiveDataset
from datasources.image_folder import ImageFolderDataset


def build_image_dataset(data_dir: str | os.PathLike, resolution: int, channels: int = 3,
                        skip_bad_images: bool = False, class_to_idx: Optional[dict] = None,
                        crop: str = "adm") -> Dataset:
    """The image dataset at `data_dir`, recognised by what it holds: a preprocessing.py archive
    (`index.json`), a REPA-E archive (`images.h5`), an EDM/REPA folder-or-zip (`dataset.json`),
    or an image folder (class subfolders, or images directly inside = one class). `crop`
    (a CROP_MODES key) other than "adm" (the "short-side-*" aspect-preserving resizes, for a random
    crop afterwards) needs an image folder: the archives hold images already cropped square."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise FileNotFoundError(f"data folder not found: {data_dir} (check --data-dir)")
    if crop != "adm":
        if data_dir.is_file() or is_archive(data_dir) or (data_dir / "images.h5").is_file() \
                or (data_dir / "dataset.json").is_file():
            raise ValueError(f"crop mode '{crop}' needs a folder of original images; {data_dir} holds "
                             f"square-cropped images (use crop 'adm': train_stage1.py --load-mode adm)")
        return ImageFolderDataset(data_dir, resolution, channels, skip_bad_images, class_to_idx, crop=crop)
    if data_dir.is_file():
        if data_dir.suffix.lower() == ".zip":
            return EDMImageDataset(data_dir, resolution, channels)
        raise ValueError(f"--data-dir {data_dir} is a file; expected a folder (images, index.json archive, "
                         f"images.h5 archive, dataset.json) or an EDM .zip")
    if is_archive(data_dir):
        ds = ArchiveDataset(data_dir, channels, class_to_idx)
        if ds.resolution != resolution:
            raise ValueError(f"{data_dir / 'index.json'}: the archive was preprocessed at {ds.resolution}px but "
                             f"--resolution is {resolution}; rerun preprocessing.py --resolution {resolution}")
        return ds
    if (data_dir / "images.h5").is_file():
        return H5ArchiveDataset(data_dir, resolution, channels)
    if (data_dir / "dataset.json").is_file():
        return EDMImageDataset(data_dir, resolution, channels)
    return ImageFolderDataset(data_dir, resolution, channels, skip_bad_images, class_to_idx)
