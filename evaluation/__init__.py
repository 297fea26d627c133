"""Evaluation: Inception features through torch-fidelity (`inception`), the generation metrics
(`metrics`: FID, sFID, IS, KID, precision/recall, with the formulas in `scores`) and the reconstruction metrics built on them
(`reconstruction`: rFID, PSNR, SSIM, LPIPS), and the trainers' periodic evaluation and sample
grids (`training`). One code path serves `generate.py --eval`, periodic evaluation inside the
trainers and offline evaluation of a folder or `.npz`."""
from evaluation.inception import InceptionFeatures, build_inception, init_inception_randomly
from evaluation.metrics import Reference, evaluate_samples, load_reference, save_reference_stats
from evaluation.scores import (feature_statistics, frechet_distance, inception_score, kernel_inception_distance,
                               precision_recall)
from evaluation.reconstruction import reconstruction_metrics

__all__ = [
    "InceptionFeatures", "build_inception", "init_inception_randomly", "Reference", "evaluate_samples",
    "feature_statistics", "frechet_distance", "inception_score", "kernel_inception_distance", "load_reference",
    "precision_recall", "reconstruction_metrics", "save_reference_stats",
]
