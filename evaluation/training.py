"""Training-time evaluation of a diffusion transformer, shared by train_repae.py and
train_ldm_only.py: the periodic FID flags (`add_training_eval_flags`), the sample grids with one
class per row (`training_sample_grid`) and the in-training FID (`evaluate_generation`), both on
generate.py's code path (samplers.sample_batch / sample_for_eval, evaluation.metrics.evaluate_samples)
with index-keyed noise and labels, so every grid and evaluation of a run sees the same samples."""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch

from evaluation.inception import add_inception_flags
from evaluation.metrics import evaluate_samples
from samplers import sample_batch, sample_for_eval


def add_training_eval_flags(p) -> None:
    """The trainers' periodic FID flags (train_ldm_only.py, train_repae.py)."""
    g = p.add_argument_group("evaluation (FID of EMA samples, the code path of generate.py --eval)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps and at the end (0: off)")
    g.add_argument("--eval-samples", type=int, default=10000, help="samples per evaluation (index-keyed: the same noise and labels every time)")
    g.add_argument("--eval-reference", type=str, default=None, help="reference .npz: images (arr_0) and/or ADM statistics (mu, sigma)")
    g.add_argument("--eval-metrics", type=str, default="fid,is", help="comma list of fid, sfid, is, kid, prc")
    g.add_argument("--eval-batch-size", type=int, default=64, help="sampling batch per process")
    g.add_argument("--eval-num-steps", type=int, default=50, help="Euler steps of the evaluation sampler")
    g.add_argument("--eval-cfg-scale", type=float, default=1.0, help="guidance scale of the evaluation samples")
    g.add_argument("--eval-label-sampling", type=str, default="equal", choices=["random", "equal"], help="labels of the evaluation samples")
    add_inception_flags(g)


def euler_kwargs(num_steps: int, cfg_scale: float, shift: float = 1.0) -> dict:
    """The trainers' sampler: Euler ODE with CFG over the whole time range."""
    return dict(mode="ode", solver="euler", num_steps=num_steps, cfg_scale=cfg_scale, shift=shift)


def grid_row_labels(n: int, num_classes: int) -> torch.Tensor:
    """Labels [n] that give each row of `utils.save_image_grid`'s layout (ceil(sqrt(n)) images per
    row) one class: row r shows class r (classes 0..rows-1 when there are more classes than rows)."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return (torch.arange(n) // cols) % max(1, int(num_classes))


def caption_rows(images: torch.Tensor, labels: torch.Tensor, names: Dict[int, str]) -> torch.Tensor:
    """Write each grid row's class name into the top-left corner of its first image (uint8
    [n, C, H, W], white text on a black box; PIL's built-in font, so it works offline)."""
    from PIL import Image, ImageDraw

    cols = max(1, math.ceil(math.sqrt(len(images))))
    out = images.clone()
    for first in range(0, len(images), cols):
        arr = out[first].permute(1, 2, 0).numpy()
        im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        draw = ImageDraw.Draw(im)
        text = str(names.get(int(labels[first]), int(labels[first])))
        box = draw.textbbox((1, 1), text)
        draw.rectangle(box, fill=0)
        draw.text((1, 1), text, fill=255 if im.mode == "L" else (255, 255, 255))
        a = np.array(im)
        out[first] = torch.from_numpy(a[..., None] if a.ndim == 2 else a).permute(2, 0, 1)
    return out


@torch.no_grad()
def training_sample_grid(field, decode_fn, latent_shape, num_classes: int, n: int, seed: int, num_steps: int,
                         cfg_scale: float, device, shift: float = 1.0,
                         class_names: Optional[Dict[int, str]] = None) -> torch.Tensor:
    """Samples 0..n-1 as images [n, C, H, W] in [0, 1] for the trainers' grids, one class per grid
    row (`grid_row_labels`), each row captioned with its class name when `class_names` {id: name}
    is given: index-keyed, so every grid of a run shows the same noise and labels."""
    labels = grid_row_labels(n, num_classes)
    images = sample_batch(field, decode_fn, latent_shape, num_classes, torch.arange(n), seed,
                          euler_kwargs(num_steps, cfg_scale, shift), device, labels=labels).cpu()
    if class_names:
        images = caption_rows(images, labels, class_names)
    return images.float() / 255


@torch.no_grad()
def evaluate_generation(field, decode_fn, latent_shape, num_classes: int, args, device, step: int, accelerator,
                        logger, shift: float = 1.0) -> Dict[str, float]:
    """Collective: FID etc. of `args.eval_samples` Euler samples of `field` (index-keyed, so every
    evaluation of a run sees the same noise and labels) against `args.eval_reference`, through the
    same `sample_for_eval` + `evaluate_samples` path as generate.py --eval. Logged to the trackers.

    Each decoded batch goes through Inception on the device right away (generate.py's streamed
    features) and only the features are gathered, not the images: no second pass, a few KB per
    sample instead of the whole image on every rank, the same metrics."""
    from evaluation.metrics import batch_features, features_for_metrics, format_scores, gather_features, get_extractor

    extractor = get_extractor(weights_path=args.inception_weights, device=device, image_size=args.inception_image_size,
                              random_init=args.random_init_inception)
    metrics = [m.strip() for m in args.eval_metrics.split(",") if m.strip()]
    want = features_for_metrics(metrics)
    chunks = {f: [] for f in want}

    def on_decoded(chunk, images):  # uint8 [b, C, H, W] on the device, samples chunk of this rank
        for f, v in batch_features(extractor, images, want).items():
            chunks[f].append(v)

    kw = euler_kwargs(args.eval_num_steps, args.eval_cfg_scale, shift)
    sample_for_eval(field, decode_fn, latent_shape, num_classes, args.eval_samples, args.seed, args.eval_batch_size,
                    kw, device, label_sampling=args.eval_label_sampling, progress=accelerator.is_main_process,
                    gather=False, on_decoded=on_decoded)
    feats = gather_features(chunks, args.eval_samples, extractor)
    scores = evaluate_samples(None, args.eval_reference, inception=extractor, metrics=metrics, device=device,
                              features=feats)
    numbers = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    accelerator.log({f"eval/{k}": v for k, v in numbers.items()}, step=step)
    logger.info(f"eval at step {step}: " + format_scores(scores))
    # the random-Inception label travels into the trainers' summary.json with the figures
    return numbers | ({"inception": scores["inception"]} if "inception" in scores else {})
