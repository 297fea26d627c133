"""Reconstruction metrics of a tokenizer: rFID, PSNR, SSIM and LPIPS of its reconstructions of a
dataset, on the distributed and order-exact code path of the generation metrics
(evaluation.metrics: images split over processes by index, per-image values and features
gathered back in index order), so the figures do not depend on batch or world size.

Entry point:
  reconstruction_metrics(vae, dataset, ...)   -> {"rfid", "psnr", "ssim", "lpips"}
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluation.inception import INCEPTION_SIZE
from evaluation.metrics import RANDOM_INCEPTION_NOTE, Reference, _same_dims, dist_info, gather_strided, get_extractor, \
    images_to_uint8, load_reference, local_indices
from evaluation.scores import default_device, feature_statistics, frechet_distance_features


def _ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM (Gaussian 11x11, sigma 1.5, valid window, data range 255) per image, channel mean."""
    c = x.shape[1]
    coords = torch.arange(11, dtype=x.dtype, device=x.device) - 5
    g = torch.exp(-coords ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(c, 1, 11, 11).contiguous()
    blur = lambda t: F.conv2d(t, win, groups=c)  # noqa: E731
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    ssim = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return ssim.mean(dim=(1, 2, 3))


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 [0, 255], the quantisation of a saved PNG. Reconstructions round:
    truncation would turn the float error of an exact reconstruction into one level darker."""
    return images_to_uint8(x, "round")


@torch.no_grad()
def reconstruction_metrics(vae: nn.Module, dataset, reference=None, inception: Optional[nn.Module] = None,
                           inception_weights: Optional[str] = None, metrics: Sequence[str] = ("rfid", "psnr", "ssim", "lpips"),
                           batch_size: int = 32, num_samples: Optional[int] = None, device=None,
                           lpips: Union[None, str, nn.Module] = "imagenet", image_size: int = INCEPTION_SIZE,
                           num_workers: int = 0, progress: bool = False) -> Dict[str, float]:
    """Tokenizer quality on a dataset of uint8 images ([3, H, W] or (image, label) items).

    `vae` is a `models.tokenizers.Tokenizer` (any kind; its `reconstruct`) or an AutoencoderKL.

    Reconstructions use the posterior mode (deterministic) and are quantised to uint8 like saved
    images. PSNR and SSIM are on [0, 255]; LPIPS (VGG, `lpips` = "imagenet" | local VGG16 path |
    "random" | a module taking [-1, 1] images) on [-1, 1]; rFID against `reference` (a file as in
    `load_reference`) or, by default, against the dataset images themselves. Per-image values are
    gathered in index order, so the figures do not depend on batch or world size. Collective.
    """
    device = torch.device(device) if device is not None else default_device()
    n = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    idx = local_indices(n)
    lpips_fn = None
    if "lpips" in metrics:
        if isinstance(lpips, nn.Module):
            lpips_fn = lpips.to(device).eval()
        else:
            from loss.perceptual import LPIPS

            lpips_fn = LPIPS(vgg_weights=lpips or "imagenet").to(device).eval()
    extractor = get_extractor(inception, inception_weights, device, image_size) if "rfid" in metrics else None
    was_training = vae.training
    vae.eval()
    per_image: Dict[str, List[torch.Tensor]] = {k: [] for k in ("psnr", "ssim", "lpips") if k in metrics}
    feats_rec, feats_ref = [], []
    from utils import ignore_stop_signals

    # a stop signal during a trainer's evaluation is the trainer's to handle at the end of its step
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False,
                                         worker_init_fn=ignore_stop_signals if num_workers > 0 else None)
    bar = None
    if progress and dist_info()[0] == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="reconstruction metrics", unit="img", dynamic_ncols=True)
    for item in loader:
        img = item[0] if isinstance(item, (list, tuple)) else item
        if img.dtype != torch.uint8:
            raise ValueError(f"reconstruction_metrics: dataset must yield uint8 images, got {img.dtype}")
        img = img.to(device)
        x = img.float() / 127.5 - 1
        # A models.tokenizers.Tokenizer converts its own input (KL, VQ, RAE alike); a plain
        # AutoencoderKL takes [-1, 1] and returns a posterior.
        rec = vae.reconstruct(img) if hasattr(vae, "reconstruct") else vae.decode(vae.encode(x).mode())
        rec = _to_uint8(rec)  # [B, 3, H, W] uint8
        a, b = img.double(), rec.double()
        if "psnr" in per_image:
            mse = (a - b).pow(2).flatten(1).mean(1)
            per_image["psnr"].append((10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))).cpu())
        if "ssim" in per_image:
            per_image["ssim"].append(_ssim_per_image(a, b).cpu())
        if "lpips" in per_image:
            per_image["lpips"].append(lpips_fn(x, rec.float() / 127.5 - 1).reshape(-1).double().cpu())
        if extractor is not None:
            feats_rec.append(extractor(rec, ["pool"])["pool"].cpu())
            if reference is None:
                feats_ref.append(extractor(img, ["pool"])["pool"].cpu())
        if bar is not None:
            bar.update(img.shape[0] * dist_info()[1])
    if bar is not None:
        bar.close()
    vae.train(was_training)
    result: Dict[str, float] = {"num_samples": n}
    for k, chunks in per_image.items():
        local = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.float64)
        result[k] = float(gather_strided(local, n).mean())
    if extractor is not None:
        rec_pool = gather_strided(torch.cat(feats_rec) if feats_rec else torch.zeros((0, 2048)), n)
        if reference is None:
            ref = Reference(source="dataset images", stats_from_images=("mu",))
            ref.pool = gather_strided(torch.cat(feats_ref) if feats_ref else torch.zeros((0, 2048)), n)
            ref.mu, ref.sigma = feature_statistics(ref.pool)
        else:
            ref = load_reference(reference, extractor, batch_size, need_images=False)
        _same_dims(rec_pool, ref.mu, ref.source, "mu")
        result["rfid"] = frechet_distance_features(rec_pool, ref.mu, ref.sigma, ref.pool if ref.from_images("mu") else None)
        if extractor.random_weights:
            result["inception"] = RANDOM_INCEPTION_NOTE
    return result
