"""Evaluation metrics with a randomly initialised (properly scaled) torch-fidelity Inception at a
reduced input size: known properties of FID/IS/KID/precision-recall, agreement with a SciPy
reference, invariance to batch size and to 1 vs 2 processes, bad reference files, and the
reconstruction metrics."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

from tests.cli import free_port
from evaluation import metrics as M
from evaluation import scores as S
from evaluation.inception import InceptionFeatures, build_inception
from evaluation.reconstruction import reconstruction_metrics

ROOT = Path(__file__).resolve().parents[1]


def scipy_frechet(mu1, s1, mu2, s2):
    """The ADM / pytorch-fid formula with scipy's sqrtm."""
    covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    covmean = covmean.real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def make_images(n, seed, shift=0):
    """Smooth random colour fields [n, 32, 32, 3] uint8 (structure the features can tell apart)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, 3, 4, 4), generator=g) * 255
    x = torch.nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)
    return (x + shift).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    return InceptionFeatures(build_inception(random_init=True), image_size=75, chunk_size=16)


def test_frechet_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 24))
    b = rng.normal(size=(150, 24)) @ rng.normal(size=(24, 24)) * 0.5 + 0.3
    mu1, s1 = S.feature_statistics(a)
    mu2, s2 = S.feature_statistics(b)
    assert np.allclose(mu1, a.mean(0)) and np.allclose(s1, np.cov(a, rowvar=False))
    assert S.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-8)
    assert S.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    # fewer samples than dimensions: the low-rank paths (reference statistics only, or features
    # on both sides) equal the dense formula
    x, y = rng.normal(size=(20, 48)), rng.normal(size=(30, 48)) + 0.1
    dense = S.frechet_distance(*S.feature_statistics(x), *S.feature_statistics(y))
    assert S.frechet_distance_features(x, *S.feature_statistics(y)) == pytest.approx(dense, rel=1e-7)
    assert S.frechet_distance_features(x, *S.feature_statistics(y), ref_feats=y) == pytest.approx(dense, rel=1e-7)


def test_random_inception_is_not_collapsed(extractor):
    f = extractor(torch.from_numpy(make_images(16, 0)).permute(0, 3, 1, 2), ["pool"])["pool"]
    rel_spread = (f.std(0).mean() / f.mean(0).abs().mean()).item()
    assert rel_spread > 0.05, rel_spread


def test_fid_properties_and_invariance(extractor, tmp_path):
    ref = make_images(72, 1)  # more samples than sFID dims here: full-rank covariances for sqrtm
    same = make_images(72, 2)
    shifted = make_images(72, 2, shift=70)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    kw = dict(inception=extractor, metrics=("fid", "sfid", "is", "kid", "prc"), device="cpu", kid_subset_size=20, kid_subsets=10)
    self_m = M.evaluate_samples(ref, tmp_path / "ref.npz", batch_size=8, **kw)
    assert self_m["fid"] == pytest.approx(0.0, abs=1e-6 * max(1.0, self_m["sfid"])) and self_m["sfid"] == pytest.approx(0.0, abs=1e-6)
    assert self_m["precision"] == 1.0 and self_m["recall"] == 1.0
    m8 = M.evaluate_samples(same, tmp_path / "ref.npz", batch_size=8, **kw)
    m32 = M.evaluate_samples(same, tmp_path / "ref.npz", batch_size=32, **kw)
    assert m8 == m32  # bit-identical, not merely close
    shifted_m = M.evaluate_samples(shifted, tmp_path / "ref.npz", batch_size=32, **{**kw, "metrics": ("fid", "kid")})
    assert shifted_m["fid"] > 2 * m8["fid"] > 0
    assert shifted_m["kid"] > m8["kid"]
    assert m8["is"] >= 1.0

    # FID / sFID equal the SciPy reference on the same features (sFID: 63 dims at this input size)
    fr_all = M.compute_features(torch.from_numpy(ref), extractor, ["pool", "spatial"])
    fs_all = M.compute_features(torch.from_numpy(same), extractor, ["pool", "spatial"])
    fr, fs = fr_all["pool"].double().numpy(), fs_all["pool"].double().numpy()
    sr, ss = fr_all["spatial"].double().numpy(), fs_all["spatial"].double().numpy()
    assert sr.shape[1] < 71  # full rank covariances: sqrtm is well defined
    ref_val = scipy_frechet(ss.mean(0), np.cov(ss, rowvar=False), sr.mean(0), np.cov(sr, rowvar=False))
    assert m8["sfid"] == pytest.approx(ref_val, rel=1e-6)
    assert m8["fid"] == pytest.approx(S.frechet_distance_features(fs, *S.feature_statistics(fr)), rel=1e-6)

    # statistics-only reference (ADM layout): FID from the file, KID/PR skipped with a note
    mu, sigma = S.feature_statistics(fr)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    st = M.evaluate_samples(same, tmp_path / "stats.npz", inception=extractor, metrics=("fid", "kid"), device="cpu")
    assert st["fid"] == pytest.approx(m8["fid"], rel=1e-6) and "kid" not in st and st["skipped"]

    # same images given as a folder of PNGs
    from PIL import Image

    (tmp_path / "pngs").mkdir()
    for i, a in enumerate(same):
        Image.fromarray(a).save(tmp_path / "pngs" / f"{i:06d}.png")
    folder_m = M.evaluate_samples(tmp_path / "pngs", tmp_path / "ref.npz", batch_size=8, **{**kw, "metrics": ("fid", "is")})
    assert folder_m["fid"] == m8["fid"] and folder_m["is"] == m8["is"]


def test_bad_reference_files(extractor, tmp_path):
    imgs = make_images(8, 0)
    np.savez(tmp_path / "wrong_shape.npz", arr_0=np.zeros((4, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"wrong_shape.npz\['arr_0'\].*\[N, H, W, 3\]"):
        M.evaluate_samples(imgs, tmp_path / "wrong_shape.npz", inception=extractor, metrics=("fid",), device="cpu")
    np.savez(tmp_path / "bad_sigma.npz", mu=np.zeros(2048), sigma=np.zeros((2048, 3)))
    with pytest.raises(ValueError, match="bad_sigma.npz.*'sigma'"):
        M.evaluate_samples(imgs, tmp_path / "bad_sigma.npz", inception=extractor, metrics=("fid",), device="cpu")
    np.savez(tmp_path / "other_net.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="other_net.npz.*64 dims"):
        M.evaluate_samples(imgs, tmp_path / "other_net.npz", inception=extractor, metrics=("fid",), device="cpu")
    np.savez(tmp_path / "nothing.npz", foo=np.zeros(3))
    with pytest.raises(KeyError, match="nothing.npz"):
        M.evaluate_samples(imgs, tmp_path / "nothing.npz", inception=extractor, metrics=("fid",), device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        M.evaluate_samples(imgs, tmp_path / "missing.npz", inception=extractor, metrics=("fid",), device="cpu")
    with pytest.raises(ValueError, match="uint8"):
        M.evaluate_samples(imgs.astype(np.float32), tmp_path / "other_net.npz", inception=extractor, device="cpu")


TWO_PROC_SCRIPT = """
import json, sys, numpy as np, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
dist.init_process_group("gloo")
from evaluation import metrics as M
from evaluation.inception import InceptionFeatures, build_inception
ex = InceptionFeatures(build_inception({weights!r}), image_size=75, chunk_size=16)
res = M.evaluate_samples({samples!r}, {ref!r}, inception=ex, metrics=("fid", "sfid", "is", "kid", "prc"),
                         batch_size=5, device="cpu", kid_subset_size=20, kid_subsets=10)
if dist.get_rank() == 0:
    json.dump(res, open({out!r}, "w"))
dist.destroy_process_group()
"""


def test_two_processes_match_one(extractor, tmp_path):
    weights = tmp_path / "inception.pth"
    torch.save(extractor.net.state_dict(), weights)
    np.savez(tmp_path / "ref.npz", arr_0=make_images(23, 1))
    np.savez(tmp_path / "samples.npz", arr_0=make_images(21, 2))
    one = M.evaluate_samples(tmp_path / "samples.npz", tmp_path / "ref.npz", inception=extractor,
                             metrics=("fid", "sfid", "is", "kid", "prc"), batch_size=16, device="cpu",
                             kid_subset_size=20, kid_subsets=10)
    script = tmp_path / "two.py"
    script.write_text(TWO_PROC_SCRIPT.format(root=str(ROOT), weights=str(weights), samples=str(tmp_path / "samples.npz"),
                                             ref=str(tmp_path / "ref.npz"), out=str(tmp_path / "two.json")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                           str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert one.pop("inception") == M.RANDOM_INCEPTION_NOTE  # built random here, loaded from a file there
    assert two == json.loads(json.dumps(one))


class IdentityTokenizer(nn.Module):
    """encode(x).mode() = x, decode(z) = z: a perfect tokenizer."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def encode(self, x):
        class P:
            def mode(self_inner):
                return x
        return P()

    def decode(self, z):
        return z


def test_reconstruction_metrics(extractor):
    from models.autoencoder import build_vae

    imgs = torch.from_numpy(make_images(12, 3)).permute(0, 3, 1, 2).contiguous()
    dataset = [(imgs[i], 0) for i in range(len(imgs))]
    perfect = reconstruction_metrics(IdentityTokenizer(), dataset, inception=extractor, device="cpu", batch_size=5,
                                     metrics=("rfid", "psnr", "ssim"))
    assert perfect["psnr"] > 100 and perfect["ssim"] == pytest.approx(1.0) and perfect["rfid"] == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    vae = build_vae("tiny-f4d4")
    from loss.perceptual import LPIPS

    lp = LPIPS(vgg_weights="random")
    a = reconstruction_metrics(vae, dataset, inception=extractor, device="cpu", batch_size=5, lpips=lp)
    b = reconstruction_metrics(vae, dataset, inception=extractor, device="cpu", batch_size=12, lpips=lp)
    assert a == b
    assert a["rfid"] > 0 and a["psnr"] < perfect["psnr"] and a["ssim"] < 1 and a["lpips"] > 0


def test_image_sources_one_channel_file_lists_datasets_and_random_label(extractor, tmp_path, capsys):
    """1-channel images are replicated to 3 channels (and the log says so); a list of files reads
    exactly those files; a Dataset of (image, label) items is a source; random Inception figures
    are labelled not comparable."""
    from PIL import Image

    gray = make_images(6, 0)[..., :1]  # [6, 32, 32, 1]
    rgb = np.repeat(gray, 3, axis=-1)
    f_gray = M.compute_features(gray, extractor)["pool"]
    assert torch.equal(f_gray, M.compute_features(rgb, extractor)["pool"])
    assert "replicated to 3 channels for Inception" in capsys.readouterr().out
    for i in range(8):
        Image.fromarray(rgb[i % 6]).save(tmp_path / f"{i:06d}.png")
    files = [tmp_path / f"{i:06d}.png" for i in range(6)]
    assert torch.equal(M.compute_features(files, extractor)["pool"], f_gray)
    assert len(M.ImageSource(tmp_path)) == 8 and len(M.ImageSource(files)) == 6
    pairs = [(torch.from_numpy(rgb[i]).permute(2, 0, 1), i) for i in range(6)]
    dataset = torch.utils.data.TensorDataset(torch.stack([p[0] for p in pairs]), torch.arange(6))
    assert torch.equal(M.compute_features(dataset, extractor)["pool"], f_gray)
    scores = M.evaluate_samples(rgb, make_images(8, 1), inception=extractor, metrics=("fid",), device="cpu")
    assert scores["inception"] == M.RANDOM_INCEPTION_NOTE
    assert M.format_scores(scores).startswith("FID (random Inception: not comparable)=")
    assert M.format_scores({"fid": 1.0, "num_samples": 3}) == "FID=1.0000"


def test_uint8_conversion_modes():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0])
    assert M.images_to_uint8(x).tolist() == [0, 63, 127, 254, 255]
    assert M.images_to_uint8(x, "round").tolist() == [0, 64, 128, 255, 255]
    with pytest.raises(ValueError, match="truncate"):
        M.images_to_uint8(x, "floor")
