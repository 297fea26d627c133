"""Training-time views over an image or clip dataset: index-keyed crops / flips (`CropFlip`), clip
frames as images (`ClipFrames`), 1-channel images as RGB (`RGBView`); the load size before the
crop given in pixels or as a multiple of the crop (`load_size_arg`, `resolve_load_size`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

from datasources.archive import is_archive
from datasources.images import IMAGE_EXTENSIONS


class CropFlip(Dataset):
    """Crop an image [C, H, W] (or clip [T, H, W, C]) item to `size`: random offsets (RandomCrop)
    or the centre (evaluation; CenterCrop, as taming's custom-data training: albumentations'
    (H - size) // 2 offsets), optional horizontal flip. The offsets and the flip come from a generator
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


def load_size_arg(text) -> int | str:
    """Type of a load-size flag: pixels ("384") or a multiple of the crop resolution ("1.5x", RAE's
    rule), the latter kept as normalised text until the resolution is known (`resolve_load_size`)."""
    text = str(text).strip().lower()
    try:
        if text.endswith("x"):
            ratio = float(text[:-1])
            if ratio >= 1 and ratio != float("inf"):
                return f"{ratio:g}x"
        elif int(text) > 0:
            return int(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a size in pixels (384) or a multiple >= 1 of the resolution "
                                     f"(1.5x), got {text!r}")


def resolve_load_size(value: int | str | None, resolution: int) -> int | None:
    """The load size in pixels: `value` as given, or "Nx" -> int(N * resolution) (truncated, as RAE's
    int(image_size * 1.5): 384 at 256, 768 at 512)."""
    if value is None or isinstance(value, int):
        return value
    return int(float(value[:-1]) * resolution)


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
