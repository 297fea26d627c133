"""`make_procedural_dataset`: the built-in class-conditional image folder of the demo and the tests
(shapes and palettes per class, deterministic in the seed)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import List

import numpy as np
from PIL import Image


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
