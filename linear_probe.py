"""Linear probe: how linearly separable are a frozen encoder's (or tokenizer's) features?

Extracts features of a labelled image folder ONCE with a frozen network, then trains a linear
classifier on the cached, standardised features and reports train / val top-1 and top-5.

Feature sources (`--encoder`):
  * a representation encoder of `models/encoders.py` (`dinov2-vit-b`, `dinov1-vit-b`, ...,
    `dinov2-vit-tiny`): patch tokens [B, N, D], mean-pooled -> [B, D];
  * an RAE encoder class (`Dinov2withNorm`, `MAEwNorm`, `SigLIP2wNorm`): `--rae-config` is its hub
    id / local folder (pretrained), or a transformers config.json (with `--random-init`); input
    bicubic-resized to `--rae-input-size` and normalised as RAE does; tokens mean-pooled;
  * a KL / VA-VAE preset of `models/autoencoder.py` (`f8d4`, `f16d32`, `vavae-f16d32`,
    `tiny-f4d4`, ...) with `--tokenizer-ckpt` (or `--random-init`), or `--vae-ckpt EXPORT.pt`
    alone for a tokenizer exported by save_vae_weights.py (its NAME.json describes it; 1-channel
    tokenizers read 1-channel images): the posterior mean [B, E, h, w], spatially mean-pooled
    -> [B, E], or flattened -> [B, E*h*w] with `--flatten`.

Class fidelity (`--score-samples SAMPLES.npz`): the classifier trained on the real data scores
generated samples, each against the class it was generated for (`labels.npy` written by
generate.py); overall and per-class accuracy are printed and stored under "class_fidelity".

Classifier: nn.Linear on standardised features (train-set mean / std), trained with AdamW
(mini-batches, cosine learning rate, `--epochs`) or full-batch L-BFGS (`--optimizer lbfgs`).
Everything random (split, init, batch order) is driven by `--seed`, so a run is deterministic.

    python linear_probe.py --data-dir DATA --encoder dinov2-vit-b --val-fraction 0.2
    python linear_probe.py --data-dir TRAIN --val-dir VAL --encoder f16d32 --tokenizer-ckpt vae.pt
    python linear_probe.py --data-dir DATA --vae-ckpt pretrained/doppler.pt --flatten --score-samples S.npz
    python linear_probe.py --config probe.yaml --epochs 50

Writes the resolved arguments and the metrics as JSON to `--output` and prints the metrics.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasources import RGBView, build_image_dataset, image_channels_on_disk
from utils import atomic_write_text, parse_args_with_config


# --------------------------------------------------------------------------------------------
# Feature extractors: uint8 images [B, 3, H, W] -> features [B, D]
# --------------------------------------------------------------------------------------------
class RepaFeatures(nn.Module):
    """A `models/encoders.py` representation encoder, tokens mean-pooled."""

    def __init__(self, name: str, resolution: int, random_init: bool, weights_dir: Optional[str]):
        super().__init__()
        from models.encoders import build_encoder

        self.encoder = build_encoder(name, resolution=resolution, random_init=random_init, weights_dir=weights_dir)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images.float()).float().mean(dim=1)  # [B, N, D] -> [B, D]


class RAEEncoderFeatures(nn.Module):
    """An RAE stage-1 encoder (frozen), input prepared as `models.rae.RAE.encode_tokens` does."""

    def __init__(self, encoder_cls: str, rae_config: Optional[str], input_size: Optional[int], random_init: bool):
        super().__init__()
        from models.encoders import RAE_ENCODER_HUB_IDS, RAE_ENCODERS, build_rae_encoder, read_json_config

        if random_init:
            if rae_config is None:
                raise ValueError(f"--encoder {encoder_cls} --random-init needs --rae-config (a transformers "
                                 f"config.json or a folder holding one)")
            self.encoder = build_rae_encoder(encoder_cls, config=read_json_config(rae_config))
        else:
            self.encoder = build_rae_encoder(encoder_cls, path=rae_config or RAE_ENCODER_HUB_IDS[encoder_cls])
        cls = RAE_ENCODERS[encoder_cls]
        mean, std = cls.default_mean, cls.default_std
        if rae_config is not None and os.path.isdir(rae_config):
            try:
                proc = read_json_config(rae_config, "preprocessor_config.json")
                mean, std = proc.get("image_mean", mean), proc.get("image_std", std)
            except FileNotFoundError:
                pass
        # RAE's input sizes: 224 for DINOv2-B/14 (16x16 tokens), 256 for MAE / SigLIP2 (patch 16).
        self.input_size = int(input_size or 16 * self.encoder.patch_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        S = self.input_size
        if x.shape[-2:] != (S, S):
            x = F.interpolate(x, size=(S, S), mode="bicubic", align_corners=False)
        return self.encoder((x - self.mean) / self.std).float().mean(dim=1)  # [B, N, C] -> [B, C]


class VAEFeatures(nn.Module):
    """A tokenizer's encoder (a KL / VA-VAE preset, or an export rebuilt from its description):
    posterior mean, spatially pooled (or flattened)."""

    def __init__(self, preset: Optional[str], ckpt: Optional[str], random_init: bool, flatten: bool, seed: int = 0):
        super().__init__()
        from models.tokenizers import build_tokenizer, preset_kind

        if ckpt is None and not random_init:
            raise ValueError(f"--encoder {preset} (a VAE preset) needs --tokenizer-ckpt, or --random-init")
        self.tokenizer = build_tokenizer(preset_kind(preset) if preset else None, name=preset, ckpt=ckpt,
                                         random_init=random_init, seed=seed)
        self.in_channels = self.tokenizer.in_channels
        self.flatten = flatten

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = self.tokenizer.encode_moments(images)[0]  # [B, E, h, w]; uint8 in, the tokenizer converts
        return mean.flatten(1) if self.flatten else mean.mean(dim=(2, 3))


def build_feature_extractor(args) -> nn.Module:
    from models.autoencoder import VAE_PRESETS
    from models.encoders import ENCODER_SPECS, RAE_ENCODERS

    name = args.encoder
    if args.vae_ckpt is not None and name is None:  # an export that describes itself
        return VAEFeatures(None, args.vae_ckpt, False, args.flatten)
    if args.vae_ckpt is not None and name not in VAE_PRESETS:
        raise ValueError(f"--tokenizer-ckpt is given, so --encoder must be a VAE preset ({', '.join(VAE_PRESETS)}); "
                         f"got {name!r}")
    if name in VAE_PRESETS:
        return VAEFeatures(name, args.vae_ckpt, args.random_init, args.flatten, args.seed)
    if args.flatten:
        raise ValueError("--flatten applies to VAE tokenizers only (encoder tokens are mean-pooled)")
    if name in RAE_ENCODERS:
        return RAEEncoderFeatures(name, args.rae_config, args.rae_input_size, args.random_init)
    if name in ENCODER_SPECS:
        return RepaFeatures(name, args.resolution, args.random_init, args.encoder_weights_dir)
    raise ValueError(f"--encoder {name!r} unknown: use a representation encoder ({', '.join(ENCODER_SPECS)}), "
                     f"an RAE encoder class ({', '.join(RAE_ENCODERS)}) or a VAE preset ({', '.join(VAE_PRESETS)})")


@torch.no_grad()
def extract_features(model: nn.Module, dataset, batch_size: int, device: torch.device, num_workers: int = 0,
                     desc: str = "features") -> Tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32 on CPU, labels [N] long) in dataset order."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, drop_last=False)
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, leave=False):
        feats.append(model(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(y).long())
    return torch.cat(feats), torch.cat(labels)


def load_probe_data(path: str, resolution: int, channels: int, class_to_idx=None, what: str = "--data-dir"):
    """(labelled dataset, the view the feature network reads): any dataset the trainers read;
    1-channel data for an RGB network is read as stored and repeated to 3 channels (said once)."""
    on_disk = image_channels_on_disk(Path(path)) if Path(path).is_dir() else None
    if on_disk == 1 and channels == 3:
        print(f"{what} {path}: 1-channel images, repeated to 3 channels for the RGB feature network")
        data = build_image_dataset(path, resolution, 1, class_to_idx=class_to_idx)
        return data, RGBView(data)
    data = build_image_dataset(path, resolution, channels, class_to_idx=class_to_idx)
    return data, data


# --------------------------------------------------------------------------------------------
# Split, standardisation, classifier
# --------------------------------------------------------------------------------------------
def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): per class, a seeded random `val_fraction` (at least one
    sample when the class has two or more) goes to val."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(len(idx) - 1, max(1, int(round(val_fraction * len(idx))))) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def standardize(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6):
    """Scale every feature to zero mean / unit std using the TRAIN statistics."""
    mean, std = train.mean(dim=0, keepdim=True), train.std(dim=0, keepdim=True, unbiased=False)
    return tuple((t - mean) / (std + eps) for t in (train, *others))


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> Dict[str, float]:
    """{'top1': .., 'top5': ..}; k is capped at the number of classes."""
    out = {}
    for k in ks:
        kk = min(k, logits.shape[1])
        hit = (logits.topk(kk, dim=1).indices == labels[:, None]).any(dim=1)
        out[f"top{k}"] = hit.float().mean().item() if len(labels) else float("nan")
    return out


def train_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int = 30, lr: float = 1e-3,
                 weight_decay: float = 1e-4, batch_size: int = 256, optimizer: str = "adamw", seed: int = 0,
                 device: torch.device = torch.device("cpu")) -> nn.Linear:
    """A linear classifier on features x [N, D] with labels y [N] (cross entropy).

    adamw: `epochs` passes of shuffled mini-batches, cosine learning rate from `lr` to 0.
    lbfgs: full batch, `epochs` outer steps of up to 20 iterations each (strong-Wolfe line search),
    with an L2 penalty weight_decay / 2 * ||W||^2.
    """
    gen = torch.Generator().manual_seed(seed)
    clf = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():  # seeded init, independent of the global RNG
        bound = 1.0 / math.sqrt(x.shape[1])
        clf.weight.copy_(torch.empty_like(clf.weight).uniform_(-bound, bound, generator=gen))
        clf.bias.zero_()
    clf = clf.to(device)
    x, y = x.to(device), y.to(device)
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=20, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(clf(x), y) + 0.5 * weight_decay * clf.weight.pow(2).sum()
            loss.backward()
            return loss

        for _ in range(epochs):
            opt.step(closure)
        return clf
    if optimizer != "adamw":
        raise ValueError(f"--optimizer must be 'adamw' or 'lbfgs', got {optimizer!r}")
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(x) / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(device)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf


def probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: Optional[torch.Tensor], val_y: Optional[torch.Tensor],
          num_classes: int, score_x: Optional[torch.Tensor] = None, **train_kwargs) -> Dict[str, float]:
    """Standardise, train, evaluate: {'train_top1', 'train_top5', 'val_top1', 'val_top5'}; with
    `score_x` (features of generated samples) also 'score_logits', the classifier's logits on them."""
    others = [t for t in (val_x, score_x) if t is not None]
    train_x, *others = standardize(train_x, *others)
    if val_x is not None:
        val_x = others.pop(0)
    if score_x is not None:
        score_x = others.pop(0)
    clf = train_linear(train_x, train_y, num_classes, **train_kwargs)
    device = clf.weight.device
    with torch.no_grad():
        result = {f"train_{k}": v for k, v in topk_accuracy(clf(train_x.to(device)).cpu(), train_y).items()}
        if val_x is not None:
            result.update({f"val_{k}": v for k, v in topk_accuracy(clf(val_x.to(device)).cpu(), val_y).items()})
        if score_x is not None:
            result["score_logits"] = clf(score_x.to(device)).cpu()
    return result


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="linear_probe.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=str, default=None, help="YAML file whose keys are defaults for these flags")
    p.add_argument("--data-dir", type=str, default=None,
                   help="image folder (one subfolder per class) or any archive the trainers read (preprocessing.py, h5, EDM)")
    p.add_argument("--val-dir", type=str, default=None, help="separate validation folder (same class names)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out share of --data-dir without --val-dir")
    p.add_argument("--encoder", type=str, default=None,
                   help="models/encoders.py name, RAE encoder class, or VAE preset (with --tokenizer-ckpt)")
    p.add_argument("--rae-config", type=str, default=None,
                   help="RAE encoder: hub id / local folder (pretrained) or config.json (--random-init)")
    p.add_argument("--rae-input-size", type=int, default=None, help="RAE encoder input size (default 16 x patch)")
    p.add_argument("--tokenizer-ckpt", "--vae-ckpt", dest="vae_ckpt", metavar="PATH", type=str, default=None,
                   help="KL / VA-VAE checkpoint (with a VAE preset), or a save_vae_weights.py export alone")
    p.add_argument("--encoder-weights-dir", type=str, default=None, help="local official encoder checkpoints")
    p.add_argument("--flatten", action="store_true", help="VAE: flatten the posterior mean instead of pooling")
    p.add_argument("--random-init", action="store_true", help="random weights (baseline / tests)")
    p.add_argument("--resolution", type=int, default=256, help="images are ADM-center-cropped to this size")
    p.add_argument("--epochs", type=int, default=30, help="AdamW epochs over the cached features")
    p.add_argument("--batch-size", type=int, default=256, help="for feature extraction and AdamW")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--optimizer", type=str, default="adamw", choices=["adamw", "lbfgs"], help="adamw (large sets) or lbfgs (small sets)")
    p.add_argument("--shuffle-labels", action="store_true",
                   help="sanity baseline: permute the training labels (val accuracy should fall to chance)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the classifier init and the batches")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers for feature extraction")
    p.add_argument("--device", type=str, default=None, help="default: cuda when available, else cpu")
    p.add_argument("--score-samples", type=str, default=None,
                   help="class fidelity: generated samples (.npz or PNG folder) scored per class by the real-data classifier")
    p.add_argument("--sample-labels", type=str, default=None,
                   help="labels.npy of --score-samples (default: the one generate.py writes beside them)")
    p.add_argument("--output", type=str, default="linear_probe.json", help="JSON file for arguments and metrics")
    return p


def main(argv=None) -> Dict[str, float]:
    args = parse_args_with_config(build_parser(), argv)
    missing = [f for f, v in (("--data-dir", args.data_dir), ("--encoder or --vae-ckpt",
                                                             args.encoder or args.vae_ckpt)) if not v]
    if missing:
        raise SystemExit(f"linear_probe.py: {' and '.join(missing)} required (on the command line or in --config)")
    torch.manual_seed(args.seed)  # random-init encoders are seeded too
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    model = build_feature_extractor(args).to(device).eval()
    channels = getattr(model, "in_channels", 3)  # representation encoders are RGB networks
    train_set, train_view = load_probe_data(args.data_dir, args.resolution, channels)
    if args.val_dir is not None:
        val_set, val_view = load_probe_data(args.val_dir, args.resolution, channels, train_set.class_to_idx, "--val-dir")
        train_idx = val_idx = None
        print(f"{len(train_set)} images of --data-dir for training, {len(val_set)} of --val-dir for validation")
    else:
        train_idx, val_idx = stratified_split(train_set.labels, args.val_fraction, args.seed)
        print(f"--val-fraction {args.val_fraction}: of the {len(train_set)} images of --data-dir, {len(train_idx)} "
              f"train the classifier and {len(val_idx)} are held out for validation (--val-dir gives a folder)")
    num_classes = train_set.num_classes

    feats, labels = extract_features(model, train_view, args.batch_size, device, args.num_workers, "train features")
    if args.val_dir is not None:
        val_x, val_y = extract_features(model, val_view, args.batch_size, device, args.num_workers, "val features")
        train_x, train_y = feats, labels
    else:  # one pass over --data-dir, then split the cached features
        train_x, train_y = feats[train_idx], labels[train_idx]
        val_x, val_y = (feats[val_idx], labels[val_idx]) if len(val_idx) else (None, None)
    if args.shuffle_labels:
        train_y = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(args.seed + 1))]

    score_x = score_y = None
    if args.score_samples:
        from torch.utils.data import TensorDataset

        from evaluation.class_fidelity import load_labelled_samples, match_channels

        images, score_y = load_labelled_samples(args.score_samples, args.sample_labels)
        images = match_channels(images, channels, f"--score-samples {args.score_samples}")
        if tuple(images.shape[-2:]) != (args.resolution, args.resolution):
            raise SystemExit(f"--score-samples {args.score_samples}: samples are {tuple(images.shape[-2:])} px but "
                             f"--resolution is {args.resolution}")
        if score_y.min() < 0 or score_y.max() >= num_classes:
            raise SystemExit(f"--score-samples {args.score_samples}: labels {int(score_y.min())}..{int(score_y.max())} "
                             f"do not fit the {num_classes} classes of --data-dir")
        score_x, _ = extract_features(model, TensorDataset(images, torch.from_numpy(score_y)), args.batch_size,
                                      device, 0, "sample features")

    result = probe(train_x, train_y, val_x, val_y, num_classes, score_x=score_x, epochs=args.epochs, lr=args.lr,
                   weight_decay=args.weight_decay, batch_size=args.batch_size, optimizer=args.optimizer,
                   seed=args.seed, device=device)
    result.update(num_train=len(train_y), num_val=0 if val_y is None else len(val_y), num_classes=num_classes,
                  feature_dim=int(train_x.shape[1]))
    fidelity = None
    if score_x is not None:
        from evaluation.class_fidelity import class_fidelity, format_class_fidelity

        idx_to_class = {int(v): str(k) for k, v in (getattr(train_set, "class_to_idx", None) or {}).items()}
        fidelity = class_fidelity(result.pop("score_logits"), torch.from_numpy(score_y), idx_to_class)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    if fidelity is not None:
        print(format_class_fidelity(fidelity))
        result["class_fidelity"] = fidelity
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        atomic_write_text(json.dumps({"args": vars(args), "metrics": result}, indent=2, default=str) + "\n",
                          args.output)
    return result


if __name__ == "__main__":
    main()
