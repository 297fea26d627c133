"""Pictures: sample / reconstruction grids written as PNG and sent to the trackers."""
from __future__ import annotations

import math
import os

import torch

from utils.io import atomic_save_png


def save_image_grid(images: torch.Tensor, path: str | os.PathLike) -> None:
    """Images [N, C, H, W] in [0, 1] -> one PNG grid, written atomically; 1-channel images give
    a 1-channel (greyscale) PNG."""
    from torchvision.utils import make_grid

    grid = make_grid(images.float().cpu(), nrow=int(math.ceil(math.sqrt(len(images)))), padding=2)
    # A diverged model gives NaN pixels: show them black rather than cast garbage.
    arr = (grid.nan_to_num(0.0).permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8")
    atomic_save_png(arr[..., 0] if images.shape[1] == 1 else arr, path)  # make_grid repeats a grey channel


def log_images(accelerator, images: torch.Tensor, step: int, tag: str = "samples") -> None:
    """Send an image batch [N, C, H, W] in [0, 1] to the active trackers."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            from torchvision.utils import make_grid

            tracker.writer.add_image(tag, make_grid(images.float().cpu(), nrow=int(math.ceil(math.sqrt(len(images))))), step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(img) for img in images.float().cpu()]}, step=step)
