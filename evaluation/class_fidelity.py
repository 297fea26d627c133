"""Class fidelity of generated samples: does a classifier trained on the REAL data recognise the
class each sample was generated for? The per-class accuracy is what a domain user (e.g. radar
spectrograms, where FID's ImageNet features say little) needs before using generated images as
training data. `linear_probe.py --score-samples` trains the classifier and calls these helpers.

Generated samples are read as `generate.py` writes them: an `.npz` (`arr_0` uint8 [N, H, W, C])
or a folder of `{index:06d}.png`, with the class id of every sample in a `labels.npy`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

PNG_RE = re.compile(r"^(\d+)\.png$")


def label_file_candidates(samples: Path) -> List[Path]:
    """Where generate.py may have put the labels of `samples` (an .npz or a PNG folder)."""
    folder = samples.with_suffix("") if samples.suffix == ".npz" else samples
    return [folder / "labels.npy", folder.with_name(folder.name + "-labels.npy"),
            folder.with_name(folder.name + ".labels.npy"), samples.parent / "labels.npy"]


def load_labelled_samples(samples: str | os.PathLike, labels: Optional[str | os.PathLike] = None
                          ) -> Tuple[torch.Tensor, np.ndarray]:
    """(images uint8 [N, C, H, W], labels int64 [N]) of generated samples; errors name the file."""
    samples = Path(samples)
    if samples.suffix == ".npz":
        if not samples.is_file():
            raise FileNotFoundError(f"--score-samples {samples} not found")
        with np.load(samples) as f:
            if "arr_0" not in f:
                raise KeyError(f"--score-samples {samples} has no 'arr_0' (has {list(f.keys())})")
            arr = f["arr_0"]
    elif samples.is_dir():
        from PIL import Image

        files = sorted((p for p in samples.iterdir() if PNG_RE.match(p.name)), key=lambda p: int(p.stem))
        if not files:
            raise FileNotFoundError(f"--score-samples {samples} holds no numbered PNG samples")
        arr = np.stack([np.asarray(Image.open(p)) for p in files])
    else:
        raise FileNotFoundError(f"--score-samples {samples}: expected a generate.py .npz or sample folder")
    if arr.ndim == 3:  # [N, H, W] grey
        arr = arr[..., None]
    if arr.ndim != 4 or arr.dtype != np.uint8:
        raise ValueError(f"--score-samples {samples}: expected uint8 images [N, H, W, C], got {arr.dtype} {arr.shape}")
    if labels is None:
        found = [p for p in label_file_candidates(samples) if p.is_file()]
        if not found:
            raise FileNotFoundError(f"--score-samples {samples}: no labels file (looked for "
                                    f"{', '.join(map(str, label_file_candidates(samples)))}); pass --sample-labels")
        labels = found[0]
    y = np.load(labels).astype(np.int64).reshape(-1)
    if len(y) != len(arr):
        raise ValueError(f"--sample-labels {labels} holds {len(y)} labels for {len(arr)} samples in {samples}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous(), y


def match_channels(images: torch.Tensor, channels: int, what: str) -> torch.Tensor:
    """uint8 [N, C, H, W] -> `channels`: grey repeated for an RGB classifier; an RGB image whose
    channels are equal (a replicated grey sample) reduced to one. Anything else is an error."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1 and bool((images == images[:, :1]).all()):
        return images[:, :1].contiguous()
    raise ValueError(f"{what}: {c}-channel samples but the classifier's features take {channels}-channel images")


def class_fidelity(logits: torch.Tensor, labels: torch.Tensor, idx_to_class: Mapping[int, str]) -> Dict:
    """Accuracy of the real-data classifier on generated samples, overall and per class
    (the class each sample was generated for is the target)."""
    pred = logits.argmax(dim=1).cpu()
    labels = labels.cpu()
    per_class, counts = {}, {}
    for c in sorted(set(labels.tolist())):
        mask = labels == c
        name = idx_to_class.get(int(c), str(int(c)))
        per_class[name] = float((pred[mask] == c).float().mean())
        counts[name] = int(mask.sum())
    return {"accuracy": float((pred == labels).float().mean()) if len(labels) else float("nan"),
            "per_class_accuracy": per_class, "per_class_count": counts, "num_samples": int(len(labels))}


def format_class_fidelity(result: Mapping) -> str:
    """Lines for the log: overall, then one line per class."""
    lines = [f"class fidelity (real-data classifier on {result['num_samples']} generated samples): "
             f"accuracy {result['accuracy']:.4f}"]
    for name, acc in result["per_class_accuracy"].items():
        lines.append(f"  {name}: {acc:.4f} ({result['per_class_count'][name]} samples)")
    return "\n".join(lines)


__all__ = ["load_labelled_samples", "match_channels", "class_fidelity", "format_class_fidelity",
           "label_file_candidates"]
