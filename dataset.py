"""Datasets and samplers.

* `ImageFolderDataset`: ImageNet layout (one subfolder per class), ADM center crop to the
  training resolution, uint8 [3, H, W] + label.
* `H5ArchiveDataset`: the REPA-E archive, `images.h5` (PNG bytes stored under their relative
  paths, plus an EDM-style `dataset.json` entry with labels) and `images_h5.json` (the list of
  those paths).
* `EDMImageDataset`: the EDM / REPA `dataset_tool.py` output, a folder or `.zip` of images plus a
  `dataset.json` with `{"labels": [[relpath, label], ...]}` (or `null`: unconditional).
* `ArchiveDataset`: the training archive `preprocessing.py` writes (uint8 shards read through
  mmap, or PNG-encoded shards); see that script for the format and why it is the fast one.
* `build_image_dataset`: picks the reader from what the folder holds; clear errors otherwise.
* `VideoClipDataset`: clips (frame folders or uint8 `.npy` [T, H, W, C]) -> (frames, H, W, C)
  windows with an index-keyed start; `flatten_video_batch` / `unflatten_video_batch` move between
  (B, T, H, W, C) video batches and the (B*T, C, H, W) image batches tokenizers take.
* `ResumableDistributedSampler`: the global order is a seeded permutation per epoch, cut into
  rank shards; it can start in the middle of an epoch, which is what exact resume needs.
* `make_procedural_dataset`: the built-in class-conditional dataset for demos and tests.
"""
from __future__ import annotations

import io
import json
import math
import os
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, Subset

from utils import atomic_write_text

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".jpe"}


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM center crop: halve with BOX while the short side >= 2 * size, BICUBIC-resize the short
    side to `size`, then crop the center. Returns uint8 [H, W, C]."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def convert_image(img: Image.Image, channels: int) -> Image.Image:
    """RGB (or L for 1 channel). 16-bit images (16-bit grayscale PNG / TIFF: mode I;16, or mode I
    holding values above 255) are scaled to 8 bit first (v * 255 / 65535, rounded): Pillow's own
    convert would clip every value above 255 to white. Float images and integers beyond 16 bits
    are refused: their range is unknown."""
    if img.mode in HIGH_BIT_MODES:
        arr = np.asarray(img)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ValueError(f"{img.mode} image with values in [{lo}, {hi}], beyond 16 bit; convert it to 8 bit first")
        if img.mode == "I" and hi <= 255:  # 32-bit container of 8-bit values: nothing to scale
            img = Image.fromarray(arr.astype(np.uint8), "L")
        else:
            img = Image.fromarray(((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif img.mode == "F":
        raise ValueError("floating-point image (mode F) of unknown range; convert it to 8 bit first")
    return img.convert("RGB" if channels == 3 else "L")


# Images smaller than the target resolution are upsampled by the crop; the count is kept per
# process, the first one is reported once (preprocessing.py totals the counts over its workers).
UPSAMPLED = {"count": 0}


def note_upsampled(name, size: Tuple[int, int], resolution: int) -> None:
    """Count an image whose short side is below `resolution` (it gets upsampled); warn once."""
    if min(size) >= resolution:
        return
    UPSAMPLED["count"] += 1
    if UPSAMPLED["count"] == 1:
        warnings.warn(f"{name} is {size[0]}x{size[1]}, smaller than the resolution {resolution}: it is upsampled "
                      f"(BICUBIC); said once, later ones are only counted (preprocessing.py reports the total)",
                      stacklevel=2)


def _to_chw(arr: np.ndarray, channels: int) -> torch.Tensor:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] != channels:
        raise ValueError(f"image has {arr.shape[2]} channels, expected {channels}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def resize_short_side(pil_image: Image.Image, size: int) -> np.ndarray:
    """BICUBIC resize so the short side is `size`, aspect ratio kept (torchvision Resize(size) /
    albumentations SmallestMaxSize, the stage-1 recipes' load step before a random crop)."""
    scale = size / min(*pil_image.size)
    new = tuple(max(size, round(x * scale)) for x in pil_image.size)
    return np.array(pil_image.resize(new, resample=Image.BICUBIC))


CROP_MODES = {"adm": center_crop_arr, "short-side": resize_short_side}


def load_image(path: str | os.PathLike, resolution: int, channels: int = 3, crop: str = "adm") -> torch.Tensor:
    """Read an image file, convert to RGB (or L for 1 channel), then `crop`: "adm" (ADM center
    crop to resolution x resolution) or "short-side" (short side resized to resolution, aspect
    kept: [C, resolution, W'] or [C, H', resolution]); returns uint8 [C, H, W]."""
    try:
        with Image.open(path) as img:
            img = convert_image(img, channels)
            note_upsampled(path, img.size, resolution)
            arr = CROP_MODES[crop](img, resolution)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise OSError(f"cannot read image {path}: {e}") from e
    return _to_chw(arr, channels)


def _verify(path: Path) -> Optional[str]:
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
        return None
    except Exception as e:  # noqa: BLE001
        return f"{path}: {e}"


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


# --------------------------------------------------------------------------------------------
# EDM / REPA dataset_tool output: a folder or .zip of images + dataset.json
# --------------------------------------------------------------------------------------------
def _decode_image(data: bytes, resolution: Optional[int], channels: int, name: str = "image") -> np.ndarray:
    """Decode encoded image bytes, convert to RGB / L, ADM-crop (skipped when already square at
    `resolution`, which is what the crop would return anyway). Returns uint8 [H, W] or [H, W, C]."""
    with Image.open(io.BytesIO(data)) as img:
        img = convert_image(img, channels)
        if resolution is not None:
            note_upsampled(name, img.size, resolution)
        if resolution is None or img.size == (resolution, resolution):
            return np.array(img)
        return center_crop_arr(img, resolution)


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


# --------------------------------------------------------------------------------------------
# Training archive written by preprocessing.py
# --------------------------------------------------------------------------------------------
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


def build_image_dataset(data_dir: str | os.PathLike, resolution: int, channels: int = 3,
                        skip_bad_images: bool = False, class_to_idx: Optional[dict] = None,
                        crop: str = "adm") -> Dataset:
    """The image dataset at `data_dir`, recognised by what it holds: a preprocessing.py archive
    (`index.json`), a REPA-E archive (`images.h5`), an EDM/REPA folder-or-zip (`dataset.json`),
    or an image folder (class subfolders, or images directly inside = one class). `crop`
    "short-side" (aspect-preserving resize, for a random crop afterwards) needs an image folder:
    the archives hold images already cropped square."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise FileNotFoundError(f"data folder not found: {data_dir} (check --data-dir)")
    if crop != "adm":
        if data_dir.is_file() or is_archive(data_dir) or (data_dir / "images.h5").is_file() \
                or (data_dir / "dataset.json").is_file():
            raise ValueError(f"crop mode '{crop}' needs a folder of original images; {data_dir} holds "
                             f"square-cropped images (use crop 'adm')")
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


# --------------------------------------------------------------------------------------------
# Training-time views: deterministic crops / flips, clip frames, RGB views
# --------------------------------------------------------------------------------------------
class CropFlip(Dataset):
    """Crop an image [C, H, W] (or clip [T, H, W, C]) item to `size`: random offsets (train) or
    the centre (eval), optional horizontal flip. The offsets and the flip come from a generator
    keyed by (seed, epoch, index), so a resumed run sees the very same crops on any number of
    processes or workers."""

    def __init__(self, base: Dataset, size: int, random: bool, hflip: bool = False, seed: int = 0):
        self.base, self.size, self.random, self.hflip, self.seed, self.epoch = base, size, random, hflip, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        base = self.base.dataset if isinstance(self.base, Subset) else self.base
        if hasattr(base, "set_epoch"):  # clip windows (VideoClipDataset) change per epoch too
            base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int):
        item, label = self.base[idx]
        video = item.ndim == 4  # [T, H, W, C] clip vs [C, H, W] image
        H, W = item.shape[1], item.shape[2]  # both layouts keep H, W at dims 1, 2
        s = self.size
        if (H, W) == (s, s) and not self.hflip:
            return item, label
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        if self.random:
            top, left = int(rng.integers(0, H - s + 1)), int(rng.integers(0, W - s + 1))
        else:
            top, left = (H - s) // 2, (W - s) // 2
        flip = self.hflip and rng.random() < 0.5
        if video:
            item = item[:, top:top + s, left:left + s, :]
            item = item.flip(2) if flip else item
        else:
            item = item[:, top:top + s, left:left + s]
            item = item.flip(2) if flip else item
        return item.contiguous(), label


class ClipFrames(Dataset):
    """Frames of a clip dataset as single images (evaluation of a video-trained tokenizer)."""

    def __init__(self, clips: Dataset, num_frames: int):
        self.clips, self.num_frames = clips, num_frames

    def __len__(self) -> int:
        return len(self.clips) * self.num_frames

    def __getitem__(self, idx: int):
        clip, label = self.clips[idx // self.num_frames]
        return clip[idx % self.num_frames].permute(2, 0, 1).contiguous(), label  # [C, H, W]


class RGBView(Dataset):
    """1-channel images repeated to 3 channels (LPIPS and Inception are RGB networks)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int):
        img, label = self.base[idx]
        return img.expand(3, -1, -1).contiguous(), label


def image_channels_on_disk(data_dir: Path):
    """Channel count of the data as stored (None when it cannot be told without conversion)."""
    if is_archive(data_dir):
        return int(json.loads((data_dir / "index.json").read_text())["channels"])
    for f in sorted(data_dir.rglob("*")):
        if f.suffix.lower() in IMAGE_EXTENSIONS:
            try:
                with Image.open(f) as img:
                    return 1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
            except Exception:  # noqa: BLE001 - unreadable files are reported by the dataset
                return None
        if f.suffix.lower() == ".npy":
            shape = np.load(f, mmap_mode="r").shape
            return 1 if len(shape) == 3 or shape[-1] == 1 else int(shape[-1])
    return None


# --------------------------------------------------------------------------------------------
# Video clips
# --------------------------------------------------------------------------------------------
def _has_images(folder: Path) -> bool:
    return any(f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS for f in folder.iterdir())


def _clips_in(folder: Path) -> List[Path]:
    """Clips directly inside `folder`: uint8 .npy files and subfolders of frame images."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and
                  ((p.is_file() and p.suffix.lower() == ".npy") or (p.is_dir() and _has_images(p))))


class VideoClipDataset(Dataset):
    """Fixed-length windows of video clips: uint8 (num_frames, H, W, C) + label.

    root holds clips (a `.npy` uint8 [T, H, W, C] or [T, H, W], or a subfolder of frame images
    sorted by name), either directly (label 0) or inside class subfolders (sorted names -> ids).
    Each frame is ADM-cropped to `resolution`. The window takes frames start, start + stride, ...;
    its start is drawn from a generator keyed by (seed, epoch, index), so a resumed run reads the
    same windows whatever the worker or process count. `set_epoch` changes the windows per epoch
    (call it before creating the epoch's DataLoader iterator; persistent workers keep the old one).
    """

    def __init__(self, root: str | os.PathLike, num_frames: int, resolution: int, channels: int = 3,
                 stride: int = 1, seed: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"video folder not found: {self.root}")
        if num_frames < 1 or stride < 1:
            raise ValueError(f"num_frames ({num_frames}) and stride ({stride}) must be >= 1")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.num_frames, self.resolution, self.channels, self.stride, self.seed = \
            num_frames, resolution, channels, stride, seed
        self.epoch = 0
        top_clips = _clips_in(self.root)
        class_dirs = sorted(p for p in self.root.iterdir()
                            if p.is_dir() and not p.name.startswith(".") and p not in top_clips)
        if class_dirs and top_clips:
            raise ValueError(f"{self.root} mixes clips ({top_clips[0].name}) and class folders "
                             f"({class_dirs[0].name}); use one layout")
        if class_dirs:
            self.class_to_idx = {d.name: i for i, d in enumerate(class_dirs)}
            entries = [(c, d.name) for d in class_dirs for c in _clips_in(d)]
        else:
            self.class_to_idx = {"": 0}
            entries = [(c, "") for c in top_clips]
        if not entries:
            raise FileNotFoundError(f"no clips found in {self.root} (expected .npy files or folders of frames, "
                                    f"optionally inside class folders)")
        self.clips = [c for c, _ in entries]
        self.labels = np.array([self.class_to_idx[n] for _, n in entries], dtype=np.int64)
        self.num_classes = len(self.class_to_idx)
        span = (num_frames - 1) * stride + 1
        self.lengths = np.array([self._length(c) for c in self.clips], dtype=np.int64)
        short = np.flatnonzero(self.lengths < span)
        if len(short):
            c = self.clips[short[0]]
            raise ValueError(f"clip {c} has {self.lengths[short[0]]} frames, fewer than the {span} a window of "
                             f"{num_frames} frames at stride {stride} needs ({len(short)} clips too short)")

    @staticmethod
    def _length(clip: Path) -> int:
        if clip.is_dir():
            return sum(1 for f in clip.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        shape, dtype = read_npy_header(clip)
        if dtype != np.uint8 or len(shape) not in (3, 4):
            raise ValueError(f"clip {clip} holds {dtype} {shape}; expected uint8 [T, H, W, C] or [T, H, W]")
        return shape[0]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def window_start(self, idx: int) -> int:
        """First frame of item idx's window for the current (seed, epoch)."""
        span = (self.num_frames - 1) * self.stride + 1
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        return int(rng.integers(0, int(self.lengths[idx]) - span + 1))

    def _frame(self, frame: np.ndarray) -> np.ndarray:
        """One stored frame [H, W(, C)] -> uint8 [R, R, channels] through the load_image pipeline."""
        if frame.ndim == 3 and frame.shape[2] == 1:
            frame = frame[:, :, 0]
        img = convert_image(Image.fromarray(np.ascontiguousarray(frame)), self.channels)
        note_upsampled("a clip frame", img.size, self.resolution)
        arr = center_crop_arr(img, self.resolution)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, idx: int):
        clip, start = self.clips[idx], self.window_start(idx)
        picks = range(start, start + self.num_frames * self.stride, self.stride)
        if clip.is_dir():
            names = sorted(f for f in clip.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            # load_image gives [C, H, W]; stack -> [T, C, H, W] -> [T, H, W, C]
            frames = torch.stack([load_image(names[i], self.resolution, self.channels) for i in picks])
            return frames.permute(0, 2, 3, 1).contiguous(), int(self.labels[idx])
        try:
            stored = np.load(clip, mmap_mode="r")[start: start + self.num_frames * self.stride: self.stride]
            frames = np.stack([self._frame(f) for f in stored])  # [T, R, R, C]
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise OSError(f"cannot read clip {clip}: {e}") from e
        return torch.from_numpy(frames), int(self.labels[idx])


def flatten_video_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, C) video batch -> (B*T, C, H, W) image batch, frames of a clip consecutive."""
    if x.ndim != 5:
        raise ValueError(f"expected a video batch (batch, frames, H, W, C), got shape {tuple(x.shape)}")
    b, t, h, w, c = x.shape
    return x.permute(0, 1, 4, 2, 3).reshape(b * t, c, h, w)


def unflatten_video_batch(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Inverse of flatten_video_batch: (B*T, C, H, W) -> (B, T, H, W, C)."""
    if x.ndim != 4 or x.shape[0] % num_frames:
        raise ValueError(f"expected (batch*{num_frames}, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    return x.reshape(n // num_frames, num_frames, c, h, w).permute(0, 1, 3, 4, 2).contiguous()


class ResumableDistributedSampler(Sampler[int]):
    """Epoch-seeded global permutation, truncated to a multiple of world_size * batch_size, rank r
    taking every world_size-th batch. `set_position(epoch, batch)` restarts mid-epoch."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        self.n, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.batches_per_epoch = num_samples // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"dataset of {num_samples} images is smaller than one global batch "
                             f"({batch_size} x {world_size} processes); lower --batch-size")
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        order = order[: self.batches_per_epoch * self.batch_size * self.world_size]
        # [batches, world, batch] -> this rank's batches
        mine = order.view(self.batches_per_epoch, self.world_size, self.batch_size)[:, self.rank]
        return iter(mine[self.start_batch:].reshape(-1).tolist())


# --------------------------------------------------------------------------------------------
# Built-in procedural dataset
# --------------------------------------------------------------------------------------------
def _procedural_image(label: int, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One class-conditional image: the class fixes the shape family and the palette, the sample
    draws position, size, rotation-free jitter and texture. Values uint8 [size, size, 3]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    hue = (label / num_classes + rng.normal(0, 0.02)) % 1.0
    base = np.array([math.cos(2 * math.pi * (hue + k / 3)) * 0.5 + 0.5 for k in range(3)], dtype=np.float32)
    bg = 0.15 + 0.2 * rng.random(3).astype(np.float32)
    img = np.broadcast_to(bg, (size, size, 3)).copy()
    # smooth background gradient
    angle = rng.uniform(0, 2 * math.pi)
    img += 0.15 * (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    cx, cy = rng.uniform(0.3, 0.7, 2)
    r = rng.uniform(0.15, 0.3)
    family = label % 5
    if family == 0:  # disc
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
    elif family == 1:  # square
        mask = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r)
    elif family == 2:  # stripes
        freq = 4 + (label // 5) % 4 * 2
        mask = np.sin(2 * math.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle))) > 0
    elif family == 3:  # ring
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        mask = (d < r) & (d > 0.6 * r)
    else:  # checkerboard
        k = 3 + (label // 5) % 3
        mask = ((np.floor(xx * k * 2) + np.floor(yy * k * 2)) % 2) == 0
    img[mask] = base * rng.uniform(0.8, 1.0)
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _photo_crops(size: int, rng: np.random.Generator, count: int) -> List[np.ndarray]:
    """Random crops of the public-domain photos scikit-image ships (if installed)."""
    try:
        from skimage import data as skdata
    except ImportError:
        return []
    photos = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field"):
        try:
            photos.append(np.asarray(getattr(skdata, name)()))
        except Exception:  # noqa: BLE001 - a photo missing from this skimage build is not an error
            continue
    out = []
    for i in range(count if photos else 0):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        s = int(rng.integers(min(h, w) // 3, min(h, w)))
        y0, x0 = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        crop = Image.fromarray(p[y0:y0 + s, x0:x0 + s, :3]).resize((size, size), Image.BICUBIC)
        out.append(np.asarray(crop))
    return out


def make_procedural_dataset(out_dir: str | os.PathLike, num_classes: int = 10, per_class: int = 32,
                            resolution: int = 64, seed: int = 0, photos_per_class: int = 0) -> Path:
    """Write `out_dir/class_XX/NNNNN.png`. Deterministic for a seed; skips work already done.

    photos_per_class > 0 mixes crops of the scikit-image photos into every class (as extra
    texture variety; the class is still the folder)."""
    out_dir = Path(out_dir)
    done_marker = out_dir / ".complete.json"
    spec = dict(num_classes=num_classes, per_class=per_class, resolution=resolution, seed=seed,
                photos_per_class=photos_per_class)
    if done_marker.is_file() and json.loads(done_marker.read_text()) == spec:
        return out_dir
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        d = out_dir / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        imgs = [_procedural_image(c, num_classes, resolution, rng) for _ in range(per_class)]
        for j, photo in enumerate(_photo_crops(resolution, rng, photos_per_class)):
            # blend the class pattern over the photo so the label stays recognisable
            imgs.append((0.5 * photo + 0.5 * _procedural_image(c, num_classes, resolution, rng)).astype(np.uint8))
        for i, arr in enumerate(imgs):
            Image.fromarray(arr).save(d / f"{i:05d}.png")
    done_marker.write_text(json.dumps(spec))
    return out_dir


# --------------------------------------------------------------------------------------------
# Latent shards (written by cache_latents.py, read by the latent-diffusion trainers)
# --------------------------------------------------------------------------------------------
# A latent folder holds `tokenizer.json` (who wrote it and how), `shards/latents-KKKKK.safetensors`
# (shard k = dataset indices [k*S, (k+1)*S)) and `latents_stats.pt` (exact statistics). Shards are
# read through a memory map of the raw safetensors layout: 8-byte little-endian header length, a
# JSON header {name: {dtype, shape, data_offsets}}, then the tensor bytes.
from typing import Dict as _Dict  # noqa: E402

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


def map_shard_arrays(path: str | os.PathLike, header: dict) -> _Dict[str, np.ndarray]:
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
    each (faster than a memory map for the 400 KB rows of RAE latents, as fast for small ones).
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
        self._arrays: _Dict[int, dict] = {}
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
