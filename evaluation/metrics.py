"""Generation metrics with one code path for offline, in-training and distributed use: FID, sFID,
IS, KID, precision/recall (ADM protocol) against reference statistics, and the distributed,
index-ordered feature extraction that evaluation.reconstruction (rFID, PSNR, SSIM, LPIPS) shares;
the formulas on the feature matrices are in evaluation.scores.

Why the figures do not move with batch size or world size:
* images are split over processes by index (rank r takes r, r + W, ...), features are gathered
  back exactly (padded all_gather, then re-interleaved) so every statistic sees the features in
  sample-index order;
* means and covariances are computed once, in float64, from that ordered matrix;
* IS splits, KID subsets and precision/recall row blocks are fixed by index and seed, not by the
  evaluation batch.
Only the Inception forward itself runs in batches; it is per-image math.

Entry points:
  evaluate_samples(images | folder | .npz, reference, ...)   -> {"fid", "sfid", "is", "kid", "precision", "recall"}
  evaluation.reconstruction.reconstruction_metrics(vae, dataset, ...) -> {"rfid", "psnr", "ssim", "lpips"}
  load_reference(path, ...) -> Reference (cached per file, so periodic evaluation pays once)
The reference is the ADM batch layout: `arr_0` uint8 [N, H, W, 3] and/or `mu`, `sigma` (pool
features, 2048) and `mu_s`, `sigma_s` (spatial, 2023). When a file has both images and
statistics, FID/sFID use the file's statistics (the ADM evaluator's behaviour) and KID and
precision/recall use the images' features.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from evaluation.inception import FEATURE_DIMS, INCEPTION_SIZE, InceptionFeatures, build_inception
from evaluation.scores import (default_device, feature_statistics, frechet_distance_features, inception_score,
                               kernel_inception_distance, precision_recall)

ALL_METRICS = ("fid", "sfid", "is", "kid", "prc")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ------------------------------------------------------------------------------------------------
# Distributed helpers (torch.distributed as set up by torchrun / accelerate; single process works)
# ------------------------------------------------------------------------------------------------
def dist_info() -> Tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if dist_info()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _comm_device(t: torch.Tensor) -> torch.device:
    """NCCL needs CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_strided(local: torch.Tensor, total: int) -> torch.Tensor:
    """Rows of rank r are the items r, r + W, r + 2W, ... of `total`; returns all `total` rows
    in index order on every rank (exact: a padded all_gather and an interleave, no reduction)."""
    rank, world = dist_info()
    if world == 1:
        return local
    per = math.ceil(total / world)
    dev = _comm_device(local)
    padded = local.new_zeros((per, *local.shape[1:]), device=dev)
    padded[: local.shape[0]] = local.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    stacked = torch.stack(parts, dim=1)  # [per, W, ...]: row i*W + r is item i*W + r
    return stacked.reshape(per * world, *local.shape[1:])[:total].to(local.device)


def local_indices(total: int) -> List[int]:
    rank, world = dist_info()
    return list(range(rank, total, world))


# ------------------------------------------------------------------------------------------------
# Image sources: an array / tensor, a `.npz` (arr_0) or a folder of images, read batch by batch
# ------------------------------------------------------------------------------------------------
class ImageSource:
    """Random access to uint8 images by index: `batch(indices)` -> uint8 [b, 3, H, W].

    `obj`: an array / tensor, a `.npz` (arr_0), a folder of images, a list of image files (e.g.
    exactly the first N samples of a folder that holds more) or a torch Dataset of uint8 [C, H, W]
    images (or (image, label) pairs: an image folder of class folders, an archive). 1-channel
    images are replicated to 3 channels, the input Inception was trained on, and that is logged."""

    def __init__(self, obj, what: str = "images"):
        self.what = what
        self.files: Optional[List[Path]] = None
        self.array = None
        self.dataset = None
        self._told_gray = False
        if isinstance(obj, ImageSource):
            self.files, self.array, self.dataset, self.what = obj.files, obj.array, obj.dataset, obj.what
            return
        if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], (str, os.PathLike)):
            self.files = [Path(p) for p in obj]
            missing = [p for p in self.files if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"{what}: {len(missing)} image files missing, e.g. {missing[0]}")
            return
        if isinstance(obj, torch.utils.data.Dataset):
            if len(obj) == 0:
                raise ValueError(f"{what}: the dataset holds no images")
            self.dataset = obj
            return
        if isinstance(obj, (str, os.PathLike)):
            path = Path(obj)
            if path.is_dir():
                self.files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
                if not self.files:
                    raise FileNotFoundError(f"{what}: no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
                return
            if not path.is_file():
                raise FileNotFoundError(f"{what}: no such file or folder {path}")
            with np.load(path) as data:
                if "arr_0" not in data.files:
                    raise KeyError(f"{what}: {path} has no 'arr_0' image array (keys: {data.files})")
                obj = data["arr_0"]
            self.array = _check_image_array(obj, f"{what} {path}['arr_0']")
            return
        self.array = _check_image_array(obj, what)

    def __len__(self) -> int:
        if self.dataset is not None:
            return len(self.dataset)
        return len(self.files) if self.files is not None else int(self.array.shape[0])

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        if self.files is not None:
            from PIL import Image

            arrs = []
            for i in indices:
                with Image.open(self.files[i]) as im:
                    if im.mode in ("L", "I;16", "I") and not self._told_gray:
                        self._tell_gray()
                    arrs.append(np.asarray(im.convert("RGB")))
            shapes = {a.shape for a in arrs}
            if len(shapes) > 1:
                raise ValueError(f"{self.what}: images of different sizes {sorted(shapes)} (e.g. {self.files[indices[0]]})")
            return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
        if self.dataset is not None:
            items = [self.dataset[int(i)] for i in indices]
            images = [it[0] if isinstance(it, (list, tuple)) else it for it in items]
            out = _check_image_array(torch.stack([torch.as_tensor(im) for im in images]), f"{self.what} (dataset)")
        else:
            out = self.array[list(indices)]
        if out.shape[1] == 1:
            self._tell_gray()
            out = out.expand(-1, 3, -1, -1).contiguous()
        return out

    def _tell_gray(self) -> None:
        if not self._told_gray and dist_info()[0] == 0:
            print(f"[evaluation] {self.what}: 1-channel images, replicated to 3 channels for Inception", flush=True)
        self._told_gray = True


def _check_image_array(arr, what: str) -> torch.Tensor:
    """uint8 [N, H, W, C] (npz layout) or [N, C, H, W], C = 3 or 1 -> uint8 tensor [N, C, H, W]."""
    t = torch.as_tensor(np.asarray(arr)) if not torch.is_tensor(arr) else arr
    if t.dtype != torch.uint8:
        raise ValueError(f"{what}: expected uint8 images, got {t.dtype}")
    if t.ndim != 4 or (t.shape[-1] not in (1, 3) and t.shape[1] not in (1, 3)):
        raise ValueError(f"{what}: expected images shaped [N, H, W, 3] or [N, 3, H, W] (1-channel: [N, H, W, 1] "
                         f"or [N, 1, H, W]), got {tuple(t.shape)}")
    if t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)
    return t.contiguous().cpu()


# ------------------------------------------------------------------------------------------------
# Feature extraction (distributed, index-ordered)
# ------------------------------------------------------------------------------------------------
_EXTRACTORS: Dict[tuple, InceptionFeatures] = {}


def get_extractor(inception: Optional[nn.Module] = None, weights_path: Optional[str] = None, device=None,
                  image_size: int = INCEPTION_SIZE, random_init: bool = False) -> InceptionFeatures:
    """An `InceptionFeatures` on `device`; built once per (weights, device, size) and cached."""
    device = torch.device(device) if device is not None else default_device()
    if isinstance(inception, InceptionFeatures):
        return inception.to(device)
    if inception is not None:
        return InceptionFeatures(inception, image_size).to(device)
    key = (str(weights_path), random_init, str(device), image_size)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = InceptionFeatures(build_inception(weights_path, random_init=random_init), image_size).to(device)
    return _EXTRACTORS[key]


@torch.no_grad()
def compute_features(images, extractor: InceptionFeatures, features: Sequence[str] = ("pool",),
                     batch_size: int = 50, progress: bool = False, what: str = "images") -> Dict[str, torch.Tensor]:
    """{name: float32 [N, D]} on CPU, rows in image-index order, identical on every rank."""
    source = ImageSource(images, what)
    n = len(source)
    device = next(extractor.parameters()).device
    idx = local_indices(n)
    chunks: Dict[str, List[torch.Tensor]] = {f: [] for f in features}
    bar = None
    if progress and dist_info()[0] == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"Inception features ({what})", unit="img", dynamic_ncols=True)
    for start in range(0, len(idx), batch_size):
        batch = source.batch(idx[start:start + batch_size]).to(device, non_blocking=True)
        for f, v in batch_features(extractor, batch, features).items():
            chunks[f].append(v)
        if bar is not None:
            bar.update(batch.shape[0] * dist_info()[1])
    if bar is not None:
        bar.close()
    return gather_features(chunks, n, extractor)


@torch.no_grad()
def batch_features(extractor: InceptionFeatures, images: torch.Tensor, features: Sequence[str]) -> Dict[str, torch.Tensor]:
    """uint8 [b, C, H, W] on the extractor's device (1-channel images replicated to 3, as ImageSource
    does) -> {name: float32 [b, D]} on the CPU. The extractor's fixed chunks make an image's features
    independent of the batch it comes in, so per-batch features equal `compute_features`'."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    out = extractor(images.contiguous(), features)
    parts = [out[f].float() for f in features]  # each [b, D_f]
    # one device -> host copy (one wait on CUDA) for all of them, split back on the host
    flat = torch.cat(parts, dim=1).cpu().split([p.shape[1] for p in parts], dim=1)
    return {f: t.contiguous() for f, t in zip(features, flat)}


def gather_features(chunks: Dict[str, List[torch.Tensor]], total: int, extractor: InceptionFeatures) -> Dict[str, torch.Tensor]:
    """Collective: per-batch features of this rank's items (rank r holds r, r + W, ..., in order) ->
    {name: float32 [total, D]} in index order on every rank."""
    result = {}
    for f, parts in chunks.items():
        local = torch.cat(parts) if parts else torch.zeros((0, _feature_width(extractor, f)))
        result[f] = gather_strided(local, total)
    return result


def features_for_metrics(metrics: Sequence[str]) -> List[str]:
    """The sample features `evaluate_samples` reads for `metrics`."""
    want = []
    if any(m in metrics for m in ("fid", "kid", "prc")):
        want.append("pool")
    if "sfid" in metrics:
        want.append("spatial")
    if "is" in metrics:
        want.append("logits_unbiased")
    return want


def _feature_width(extractor: InceptionFeatures, name: str) -> int:
    if name == "spatial":  # 7 channels at the 17x17 grid (smaller for reduced test inputs)
        probe = extractor(torch.zeros((1, 3, 8, 8), dtype=torch.uint8, device=next(extractor.parameters()).device), [name])
        return probe[name].shape[1]
    return FEATURE_DIMS[name]


# ------------------------------------------------------------------------------------------------
# Reference batches
# ------------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """Statistics (float64) and, when the reference holds images, their pool features."""
    source: str
    mu: Optional[np.ndarray] = None
    sigma: Optional[np.ndarray] = None
    mu_s: Optional[np.ndarray] = None
    sigma_s: Optional[np.ndarray] = None
    pool: Optional[torch.Tensor] = None
    spatial: Optional[torch.Tensor] = None
    stats_from_images: Tuple[str, ...] = ()

    def from_images(self, key: str) -> bool:
        """Whether `key`'s statistics were computed from the stored features (not read from a file)."""
        return key in self.stats_from_images


_REFERENCES: Dict[tuple, Reference] = {}


def _check_stats(mu, sigma, where: str, names: Tuple[str, str]) -> Tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{where}: '{names[0]}' must be [D] and '{names[1]}' [D, D]; got {mu.shape} and {sigma.shape}")
    return mu, sigma


def load_reference(reference, extractor: InceptionFeatures, batch_size: int = 50, use_file_stats: bool = True,
                   need_images: bool = True, progress: bool = False) -> Reference:
    """A `Reference` from an ADM-style `.npz` (arr_0 and/or mu, sigma[, mu_s, sigma_s]), a folder of
    images, an image array, or a `Reference` (returned as is). Files are cached per
    (path, size, mtime, extractor) so periodic evaluation extracts reference features once."""
    if isinstance(reference, Reference):
        return reference
    key = None
    if isinstance(reference, (str, os.PathLike)):
        path = Path(reference)
        if not path.exists():
            raise FileNotFoundError(f"reference batch not found: {path}")
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, id(extractor), use_file_stats, need_images)
        if key in _REFERENCES:
            return _REFERENCES[key]
    ref = _load_reference_uncached(reference, extractor, batch_size, use_file_stats, need_images, progress)
    if key is not None:
        _REFERENCES[key] = ref
    return ref


def _load_reference_uncached(reference, extractor, batch_size, use_file_stats, need_images, progress) -> Reference:
    images = reference
    ref = Reference(source=str(reference) if isinstance(reference, (str, os.PathLike)) else type(reference).__name__)
    if isinstance(reference, (str, os.PathLike)) and Path(reference).is_file():
        path = Path(reference)
        try:
            data = np.load(path)
        except Exception as e:  # noqa: BLE001 - re-raised naming the file
            raise ValueError(f"reference batch {path}: not a readable .npz ({e})") from e
        with data:
            keys = set(data.files)
            if not keys & {"arr_0", "mu"}:
                raise KeyError(f"reference batch {path}: needs 'arr_0' (images) or 'mu'/'sigma' (statistics); has {sorted(keys)}")
            if use_file_stats and "mu" in keys:
                if "sigma" not in keys:
                    raise KeyError(f"reference batch {path}: has 'mu' but no 'sigma'")
                ref.mu, ref.sigma = _check_stats(data["mu"], data["sigma"], f"reference batch {path}", ("mu", "sigma"))
            if use_file_stats and "mu_s" in keys and "sigma_s" in keys:
                ref.mu_s, ref.sigma_s = _check_stats(data["mu_s"], data["sigma_s"], f"reference batch {path}", ("mu_s", "sigma_s"))
            images = data["arr_0"] if "arr_0" in keys else None
            if images is not None:
                images = _check_image_array(images, f"reference batch {path}['arr_0']")
    if images is None:
        return ref
    want = []
    if need_images:
        want.append("pool")
    elif ref.mu is None:
        want.append("pool")
    if ref.mu_s is None:
        want.append("spatial")
    if not want:
        return ref
    feats = compute_features(images, extractor, want, batch_size, progress, what="reference")
    if "pool" in feats:
        ref.pool = feats["pool"]
        if ref.mu is None:
            ref.mu, ref.sigma = feature_statistics(feats["pool"])
            ref.stats_from_images += ("mu",)
    if "spatial" in feats:
        ref.spatial = feats["spatial"]
        ref.mu_s, ref.sigma_s = feature_statistics(feats["spatial"])
        ref.stats_from_images += ("mu_s",)
    return ref


# ------------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_samples(images, reference, inception: Optional[nn.Module] = None, inception_weights: Optional[str] = None,
                     metrics: Sequence[str] = ALL_METRICS, batch_size: int = 50, device=None,
                     image_size: int = INCEPTION_SIZE, use_file_stats: bool = True, progress: bool = False,
                     kid_subsets: int = 100, kid_subset_size: int = 1000, pr_k: int = 3,
                     is_split_size: int = 5000, features: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, float]:
    """Metrics of generated images against a reference batch.

    images: uint8 array/tensor [N, H, W, 3] or [N, 3, H, W], a `.npz` with arr_0, or a folder of
    PNGs (sorted by name). reference: see `load_reference`. Collective under torch.distributed:
    every rank must call it with the same arguments; every rank gets the same dict. Metrics that
    need reference images (KID, precision/recall) are skipped, and listed under "skipped", when the
    reference only holds statistics. `features`: the samples' features already computed
    ({name: float32 [N, D]} in index order, as compute_features returns them; rank 0's are read),
    used instead of `images` (generate.py's streamed evaluation).
    """
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {ALL_METRICS}")
    extractor = get_extractor(inception, inception_weights, device, image_size)
    need_ref_images = any(m in metrics for m in ("kid", "prc"))
    ref = load_reference(reference, extractor, batch_size, use_file_stats, need_ref_images, progress)
    want = features_for_metrics(metrics)
    rank, _ = dist_info()
    if features is not None:
        missing = [f for f in want if f not in features] if rank == 0 else []
        if missing:
            raise ValueError(f"evaluate_samples: the given features lack {missing}")
        feats = features
    else:
        feats = compute_features(images, extractor, want, batch_size, progress, what="samples")
    result: Optional[Dict[str, float]] = None
    if rank == 0:
        result = {"num_samples": int(next(iter(feats.values())).shape[0]) if feats else 0}
        skipped = []
        if "fid" in metrics:
            _same_dims(feats["pool"], ref.mu, ref.source, "mu")
            result["fid"] = frechet_distance_features(feats["pool"], ref.mu, ref.sigma,
                                                      ref.pool if ref.from_images("mu") else None)
        if "sfid" in metrics:
            if ref.mu_s is None:
                skipped.append("sfid (reference has no images and no mu_s/sigma_s)")
            else:
                _same_dims(feats["spatial"], ref.mu_s, ref.source, "mu_s")
                result["sfid"] = frechet_distance_features(feats["spatial"], ref.mu_s, ref.sigma_s,
                                                           ref.spatial if ref.from_images("mu_s") else None)
        if "is" in metrics:
            result["is"] = inception_score(feats["logits_unbiased"], is_split_size)
        if need_ref_images and ref.pool is None:
            skipped += [f"{m} (reference has statistics only)" for m in ("kid", "prc") if m in metrics]
        else:
            if "kid" in metrics:
                result["kid"], result["kid_std"] = kernel_inception_distance(ref.pool, feats["pool"], kid_subsets, kid_subset_size)
            if "prc" in metrics:
                result["precision"], result["recall"] = precision_recall(ref.pool, feats["pool"], pr_k,
                                                                         device=next(extractor.parameters()).device)
        if skipped:
            result["skipped"] = skipped
        if extractor.random_weights:
            result["inception"] = RANDOM_INCEPTION_NOTE
    return broadcast_object(result)


RANDOM_INCEPTION_NOTE = "random weights: figures not comparable to any published or other run"
METRIC_NAMES = {"fid": "FID", "sfid": "sFID", "is": "IS", "kid": "KID", "kid_std": "KID std", "precision": "precision",
                "recall": "recall", "rfid": "rFID"}
INCEPTION_METRICS = set(METRIC_NAMES)


def format_scores(scores: Dict[str, object]) -> str:
    """One printable line of metrics; with random-weight Inception every Inception-based figure
    says so ("FID (random Inception: not comparable)=...")."""
    random = scores.get("inception") == RANDOM_INCEPTION_NOTE
    parts = []
    for k, v in scores.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or k == "num_samples":
            continue
        name = METRIC_NAMES.get(k, k)
        if random and k in INCEPTION_METRICS:
            name += " (random Inception: not comparable)"
        parts.append(f"{name}={v:.4f}")
    return ", ".join(parts)


def _same_dims(feats: torch.Tensor, ref_mu: np.ndarray, source: str, key: str) -> None:
    if feats.shape[1] != ref_mu.shape[0]:
        raise ValueError(f"reference {source}: '{key}' has {ref_mu.shape[0]} dims but the Inception features "
                         f"have {feats.shape[1]} (a reference computed with another network or layer?)")


UINT8_CONVERSIONS = ("truncate", "round")


def images_to_uint8(x: torch.Tensor, conversion: str = "truncate") -> torch.Tensor:
    """Images in about [-1, 1] -> uint8 [0, 255].

    'truncate' is the originals' sampling scripts (REPA-E / REPA / SiT generate.py):
    clamp(255 (x + 1) / 2, 0, 255).to(uint8), in that operation order; the published FIDs were
    measured on it. 'round' takes the nearest level: half of all pixels come out one level
    brighter (+0.5 on average), which moves FID against published numbers."""
    if conversion == "truncate":
        return (255.0 * ((x.float() + 1) / 2.0)).clamp(0, 255).to(torch.uint8)
    if conversion == "round":
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    raise ValueError(f"uint8 conversion must be one of {UINT8_CONVERSIONS}, got {conversion!r}")


def save_reference_stats(path: Union[str, os.PathLike], images, extractor: InceptionFeatures, batch_size: int = 50) -> None:
    """Write an ADM-layout statistics file (mu, sigma, mu_s, sigma_s) for a folder / array / npz."""
    feats = compute_features(images, extractor, ["pool", "spatial"], batch_size, what="reference")
    if dist_info()[0] == 0:
        mu, sigma = feature_statistics(feats["pool"])
        mu_s, sigma_s = feature_statistics(feats["spatial"])
        from utils import atomic_write

        atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s), "wb")
    barrier()
