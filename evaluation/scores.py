"""The metric formulas on feature matrices, in float64 and in an order fixed by sample index and
seed (never by batch): mean / covariance, FID (also in the low-rank form for N <= D), ADM's IS,
KID, improved precision / recall. `evaluation/metrics.py` extracts the features and calls these."""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch


def default_device() -> torch.device:
    """The current CUDA device when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def feature_statistics(feats) -> Tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] in float64."""
    x = np.asarray(feats.double().numpy() if torch.is_tensor(feats) else feats, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors [N, D] for statistics, got {x.shape}")
    mu = x.mean(axis=0)
    xc = x - mu
    sigma = xc.T @ xc / (x.shape[0] - 1)
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), in float64.

    tr((S1 S2)^1/2) = sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2), a symmetric PSD matrix: two
    symmetric eigendecompositions instead of scipy's (slow, sometimes complex) `sqrtm`."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    w1, v1 = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = root1 @ s2 @ root1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(w, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance_features(feats, ref_mu, ref_sigma, ref_feats=None) -> float:
    """FID of a feature matrix [N, D] against reference statistics (and, optionally, the
    reference features they came from). Same value as `frechet_distance(*feature_statistics(feats),
    ref_mu, ref_sigma)`, but when N <= D the covariance is low-rank, S1 = A^T A with
    A = (F - mu) / sqrt(N - 1) [N, D], and tr((S1 S2)^1/2) is computed in the N-dimensional space:
    the sum of sqrt(eig(A S2 A^T)), or the nuclear norm of A B^T when S2 = B^T B is known too."""
    x = torch.as_tensor(feats).double()
    n, d = x.shape
    mu = x.mean(0)
    if n - 1 >= d:
        mu_np, sigma = feature_statistics(x)
        return frechet_distance(mu_np, sigma, ref_mu, ref_sigma)
    a = (x - mu) / math.sqrt(n - 1)  # [N, D]
    ref_mu_t = torch.as_tensor(np.asarray(ref_mu, np.float64))
    ref_sigma_t = torch.as_tensor(np.asarray(ref_sigma, np.float64))
    if ref_mu_t.shape != mu.shape or ref_sigma_t.shape != (d, d):
        raise ValueError(f"statistics do not match: mu {tuple(mu.shape)} vs {tuple(ref_mu_t.shape)}, "
                         f"sigma {(d, d)} vs {tuple(ref_sigma_t.shape)}")
    if ref_feats is not None and torch.as_tensor(ref_feats).shape[0] - 1 < d:
        r = torch.as_tensor(ref_feats).double()
        b = (r - r.mean(0)) / math.sqrt(r.shape[0] - 1)
        tr_covmean = torch.linalg.svdvals(a @ b.T).sum()
    else:
        m = a @ ref_sigma_t @ a.T
        tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu - ref_mu_t
    return float(diff @ diff + a.pow(2).sum() + ref_sigma_t.trace() - 2 * tr_covmean)


def inception_score(logits, split_size: int = 5000) -> float:
    """ADM's IS: softmax of the bias-free logits, consecutive splits of `split_size` samples,
    mean over splits of exp(E[KL(p(y|x) || p(y))])."""
    x = torch.as_tensor(logits).double()
    p = torch.softmax(x, dim=1)
    scores = []
    for start in range(0, p.shape[0], split_size):
        part = p[start:start + split_size]
        py = part.mean(dim=0, keepdim=True)
        kl = (part * (torch.log(part.clamp_min(1e-300)) - torch.log(py.clamp_min(1e-300)))).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


def kernel_inception_distance(f_real, f_fake, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> Tuple[float, float]:
    """KID (mean, std over subsets): unbiased MMD^2 with the kernel (x.y / d + 1)^3, float64."""
    r = torch.as_tensor(f_real).double()
    g = torch.as_tensor(f_fake).double()
    m = min(subset_size, r.shape[0], g.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    d = r.shape[1]
    rng = np.random.RandomState(seed)
    vals = []
    for _ in range(subsets):
        x = g[torch.as_tensor(rng.choice(g.shape[0], m, replace=False))]
        y = r[torch.as_tensor(rng.choice(r.shape[0], m, replace=False))]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - kxx.diagonal().sum()) + (kyy.sum() - kyy.diagonal().sum())) / (m * (m - 1)) - 2 * kxy.mean()
        vals.append(mmd.item())
    return float(np.mean(vals)), float(np.std(vals))


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(a), len(b)] (clamped at 0, as ADM's DistanceBlock)."""
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)[None]).clamp_min(0)


def _knn_radii(x: torch.Tensor, k: int, row_batch: int) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour (itself excluded)."""
    radii = []
    for s in range(0, x.shape[0], row_batch):
        dists = _sq_distances(x[s:s + row_batch], x)
        radii.append(dists.kthvalue(k + 1, dim=1).values)  # the smallest is the point itself
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, row_batch: int) -> float:
    """Fraction of `points` inside at least one ball (centre, radius) of the manifold estimate."""
    inside = []
    for s in range(0, points.shape[0], row_batch):
        inside.append((_sq_distances(points[s:s + row_batch], centres) <= radii[None]).any(dim=1))
    return torch.cat(inside).double().mean().item()


@torch.no_grad()
def precision_recall(f_real, f_fake, k: int = 3, row_batch: int = 10000, device=None) -> Tuple[float, float]:
    """Improved precision / recall (Kynkaanniemi et al., the ADM evaluator's k = 3) on pool features."""
    device = device or default_device()
    r = torch.as_tensor(f_real).float().to(device)
    g = torch.as_tensor(f_fake).float().to(device)
    if min(r.shape[0], g.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set")
    precision = _coverage(g, r, _knn_radii(r, k, row_batch), row_batch)
    recall = _coverage(r, g, _knn_radii(g, k, row_batch), row_batch)
    return precision, recall
