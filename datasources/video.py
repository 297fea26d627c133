"""`VideoClipDataset`: clips (frame folders or uint8 `.npy` [T, H, W, C]) -> (frames, H, W, C)
windows with an index-keyed start; `flatten_video_batch` / `unflatten_video_batch` move between
(B, T, H, W, C) video batches and the (B*T, C, H, W) image batches tokenizers take."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from datasources.archive import read_npy_header
from datasources.images import IMAGE_EXTENSIONS, center_crop_arr, convert_image, load_image, note_upsampled


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
