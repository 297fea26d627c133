"""Reading one image the way every image source does: channel conversion (16-bit and palette
modes included), the ADM center crop or an aspect-preserving short-side resize, uint8 [C, H, W].
`UPSAMPLED` counts images smaller than the training resolution (warned once, reported by
preprocessing.py)."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image


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
