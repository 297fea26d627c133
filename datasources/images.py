"""Reading one image the way every image source does: channel conversion (16-bit and palette
modes included), the ADM center crop or an aspect-preserving short-side resize (OpenCV's bilinear,
reimplemented bit-exactly, as albumentations' SmallestMaxSize; or torchvision's PIL bicubic
Resize), uint8 [C, H, W].
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
        warnings.warn(f"{name} is {size[0]}x{size[1]}, smaller than the resolution {resolution}: it is upsampled; "
                      f"said once, later ones are only counted (preprocessing.py reports the total)",
                      stacklevel=2)


def _to_chw(arr: np.ndarray, channels: int) -> torch.Tensor:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] != channels:
        raise ValueError(f"image has {arr.shape[2]} channels, expected {channels}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _linear_taps(src: int, dst: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR taps along one axis (resizeGeneric_ in imgproc/resize.cpp): the first
    source index of each output and its two 11-bit fixed-point weights. The source position is
    computed in double from OpenCV's own scale (1 / (dst / src), not src / dst: the two differ in
    the last bit), then rounded to float, as OpenCV does; weights are float32 (1 - f, f) * 2048
    rounded half to even (saturate_cast<short>)."""
    scale = 1.0 / (dst / src)
    pos = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(pos)
    frac = pos - first
    return first.astype(np.int64), *(np.rint(w * np.float32(2048)).astype(np.int32)
                                     for w in (np.float32(1) - frac, frac))


def cv2_resize_linear(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    """`cv2.resize(arr, (width, height), interpolation=cv2.INTER_LINEAR)` for uint8 [H, W] or
    [H, W, C], bit for bit (checked against OpenCV in tests/test_dataset.py), without OpenCV:
    half-pixel centres, no antialiasing, a horizontal pass into int32 (weights x 2048) and the
    vertical pass of OpenCV's 8-bit VResizeLinear, whose scalar code mirrors its SIMD code:
    ((b0 * (S0 >> 4)) >> 16) + ((b1 * (S1 >> 4)) >> 16), then (+ 2) >> 2. (An exact 2x downscale,
    which OpenCV hands to INTER_AREA, (a + b + c + d + 2) >> 2, comes out the same here: all
    weights are 1024.)"""
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ValueError(f"cv2_resize_linear takes uint8 [H, W] or [H, W, C], got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    if (w, h) == (width, height):
        return arr.copy()
    x = arr.reshape(h, w, -1)
    sx, a0, a1 = _linear_taps(w, width)
    # borders: OpenCV moves a tap outside the image onto the edge pixel with weights (2048, 0)
    edge = (sx < 0) | (sx >= w - 1)
    sx = np.clip(sx, 0, w - 1)
    a0, a1 = np.where(edge, 2048, a0)[:, None], np.where(edge, 0, a1)[:, None]
    rows = np.take(x, sx, axis=1) * a0  # uint8 x int32 -> int32
    rows += np.take(x, np.minimum(sx + 1, w - 1), axis=1) * a1
    rows >>= 4
    # rows are clamped instead (the weights stay): both taps read the edge row
    sy, b0, b1 = _linear_taps(h, height)
    out = np.take(rows, np.clip(sy, 0, h - 1), axis=0)
    out *= b0[:, None, None]
    out >>= 16
    s1 = np.take(rows, np.clip(sy + 1, 0, h - 1), axis=0)
    s1 *= b1[:, None, None]
    s1 >>= 16
    out += s1
    out += 2
    out >>= 2
    return out.astype(np.uint8).reshape((height, width) + arr.shape[2:])


def resize_short_side(pil_image: Image.Image, size: int) -> np.ndarray:
    """albumentations `SmallestMaxSize(size)` (taming's VQGAN and VA-VAE data): every side
    scaled by size / short side and rounded (half to even), resized with OpenCV's INTER_LINEAR
    (`cv2_resize_linear`); an image whose short side is already `size` is left as it is."""
    scale = size / min(*pil_image.size)
    arr = np.asarray(pil_image)
    if scale == 1.0:
        return arr.copy()
    return cv2_resize_linear(arr, *(round(x * scale) for x in pil_image.size))


def resize_short_side_bicubic(pil_image: Image.Image, size: int) -> np.ndarray:
    """torchvision `Resize(size, BICUBIC)` on a PIL image (RAE's data): the short side becomes
    `size`, the long one int(size * long / short) (truncated), resized by PIL's antialiased
    BICUBIC."""
    w, h = pil_image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    return np.array(pil_image.resize((size, new_long) if w <= h else (new_long, size), resample=Image.BICUBIC))


# crop modes: "short-side-*" load the whole image with its short side at the resolution (a random
# crop follows), resampled as the original named by the suffix does
CROP_MODES = {"adm": center_crop_arr, "short-side-cv2-linear": resize_short_side,
              "short-side-pil-bicubic": resize_short_side_bicubic}


def load_image(path: str | os.PathLike, resolution: int, channels: int = 3, crop: str = "adm") -> torch.Tensor:
    """Read an image file, convert to RGB (or L for 1 channel), then `crop` (a CROP_MODES key):
    "adm" (ADM center crop to resolution x resolution) or "short-side-cv2-linear" /
    "short-side-pil-bicubic" (short side resized to resolution, aspect kept: [C, resolution, W']
    or [C, H', resolution]); returns uint8 [C, H, W]."""
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
