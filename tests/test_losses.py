"""Unit tests of the discriminator, LPIPS wrapper, GAN pieces, VF loss and the two tokenizer
losses (offline, CPU, a few seconds)."""
import functools
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from loss.alignment import adaptive_vf_weight, vf_loss
from loss.gan import (adaptive_weight, adopt_weight, hinge_d_loss, lecam_loss, run_discriminator, update_lecam_ema_,
                      vanilla_d_loss)
from loss.perceptual import LPIPS
from loss.reconstruction import ReconstructionLoss, VAVAELoss
from models.autoencoder import DiagonalGaussianDistribution
from models.discriminators import ActNorm, NLayerDiscriminator, load_discriminator
from utils import StateDictMismatch, load_yaml

TINY_D = dict(input_nc=3, ndf=8, n_layers=2, use_actnorm=False)


@pytest.fixture(scope="module")
def lpips_random():
    torch.manual_seed(0)
    return LPIPS(vgg_weights="random")


# --------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------
def test_lpips_offline_identity_and_monotone(lpips_random):
    m = lpips_random
    assert not any(p.requires_grad for p in m.parameters())
    assert m.state_dict() == {}  # frozen constants stay out of checkpoints
    m.train()
    assert not m.training and not any(sub.training for sub in m.modules())
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(x.shape, generator=g)
    d0 = m(x, x)
    assert d0.shape == (3, 1, 1, 1)
    assert d0.abs().max() < 1e-6
    d = [m(x, x + s * noise).flatten() for s in (0.05, 0.2, 0.8)]
    assert (d[0] > 1e-5).all() and (d[1] > d[0]).all() and (d[2] > d[1]).all()


def test_lpips_input_ranges(lpips_random):
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    expected = lpips_random(2 * x - 1, 2 * y - 1)
    lpips_random.input_range = "repae_quirk"  # same network, REPA-E's input convention
    try:
        torch.testing.assert_close(lpips_random(x, y), expected)
    finally:
        lpips_random.input_range = "[-1,1]"
    with pytest.raises(ValueError, match="input_range"):
        LPIPS(vgg_weights="random", input_range="0..255")


def test_lpips_vgg_weights_from_file(tmp_path, lpips_random):
    torch.manual_seed(3)
    conv0 = nn.Conv2d(3, 64, 3, padding=1)
    # A torchvision-layout file holding only the features the trunk uses (shapes of VGG16).
    ref = {k: v.clone() for k, v in lpips_random.net.net.state_dict().items()}
    features = {f"features.{k.split('.', 1)[1]}": v.normal_() for k, v in ref.items()}
    features["features.0.weight"] = conv0.weight.detach()
    path = tmp_path / "vgg16.pth"
    torch.save(features, path)
    m = LPIPS(vgg_weights=str(path))
    torch.testing.assert_close(m.net.net.slice1[0].weight, conv0.weight.detach())
    torch.save({k: v for k, v in features.items() if k != "features.28.bias"}, path)
    with pytest.raises(StateDictMismatch, match="vgg16.pth"):
        LPIPS(vgg_weights=str(path))


def test_lpips_imagenet_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vgg_weights"):
        LPIPS(vgg_weights="imagenet")


# --------------------------------------------------------------------------------------------
# GAN pieces
# --------------------------------------------------------------------------------------------
def test_hinge_vanilla_known_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1.0))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * (sum(sp(-r) for r in real.tolist()) / 3 + sum(sp(f) for f in fake.tolist()) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert adopt_weight(1.0, 4, threshold=5) == 0.0 and adopt_weight(1.0, 5, threshold=5) == 1.0


def test_lecam_values_and_ema():
    ema_real, ema_fake = torch.tensor([0.3]), torch.tensor([-0.4])
    real_mean, fake_mean = torch.tensor(0.5), torch.tensor(0.1)
    # relu(0.5 + 0.4)^2 + relu(0.3 - 0.1)^2 = 0.81 + 0.04
    assert lecam_loss(real_mean, fake_mean, ema_real, ema_fake).item() == pytest.approx(0.85, rel=1e-6)
    assert lecam_loss(torch.tensor(-1.0), torch.tensor(1.0), ema_real, ema_fake).item() == 0.0
    update_lecam_ema_(ema_real, ema_fake, real_mean, fake_mean, decay=0.9)
    assert ema_real.item() == pytest.approx(0.3 * 0.9 + 0.5 * 0.1)
    assert ema_fake.item() == pytest.approx(-0.4 * 0.9 + 0.1 * 0.1)


def test_adaptive_weight_hand_computed():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    rec = (w * a).sum() + 0.5 * (w**2).sum()  # grad = a + w
    gan = (w * b).sum()  # grad = b
    expected = torch.linalg.norm(a + w.detach()) / (torch.linalg.norm(b) + 1e-4)
    got = adaptive_weight(rec, gan, w)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected)
    # the clamp, and the graphs are kept for the real backward afterwards
    assert adaptive_weight(rec, 0.0 * gan, w, max_weight=7.0).item() == 7.0
    vf = (w * b * 3).sum()
    torch.testing.assert_close(adaptive_vf_weight(rec, vf, w, 0.5),
                               0.5 * torch.linalg.norm(a + w.detach()) / (3 * torch.linalg.norm(b) + 1e-4))
    (rec + gan).backward()
    torch.testing.assert_close(w.grad, a + w.detach() + b)


def test_run_discriminator_is_fp32_under_autocast():
    d = NLayerDiscriminator(**TINY_D)
    x = torch.randn(2, 3, 32, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_discriminator(d, x)
    assert out.dtype == torch.float32 and out.shape == (2, 1, 6, 6)


# --------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------
def test_discriminator_layout_and_actnorm():
    d = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=3, use_actnorm=False)
    keys = {k.rsplit(".", 1)[0] for k in d.state_dict()}
    assert keys == {f"main.{i}" for i in (0, 2, 3, 5, 6, 8, 9, 11)}
    assert d.main[2].bias is None and d(torch.randn(1, 3, 64, 64)).shape == (1, 1, 6, 6)

    an = ActNorm(4)
    x = torch.randn(5, 4, 3, 3) * 3 + 2
    an.eval()
    torch.testing.assert_close(an(x), x)  # eval never initialises
    an.train()
    y = an(x)
    assert an.initialized.item() == 1 and an.initialized.dtype == torch.uint8
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.transpose(0, 1).reshape(4, -1).std(dim=1), torch.ones(4), atol=1e-4, rtol=0)
    loc = an.loc.detach().clone()
    an(x + 5)  # already initialised: no re-init
    torch.testing.assert_close(an.loc.detach(), loc)


def test_load_discriminator(tmp_path):
    torch.manual_seed(0)
    d = NLayerDiscriminator(**TINY_D)
    good = tmp_path / "disc.pt"
    torch.save(d.state_dict(), good)
    loaded = load_discriminator(good, **TINY_D)
    torch.testing.assert_close(loaded.main[0].weight, d.main[0].weight)
    # a loss-module state dict (keys `discriminator.main.*`) loads as well
    wrapped = tmp_path / "loss.pt"
    torch.save({f"discriminator.{k}": v for k, v in d.state_dict().items()} | {"logvar": torch.zeros(())}, wrapped)
    torch.testing.assert_close(load_discriminator(wrapped, **TINY_D).main[5].weight, d.main[5].weight)

    sd = d.state_dict()
    sd["main.2.bias"] = torch.zeros(16)  # a key the BatchNorm layout does not have
    bad = tmp_path / "bad_disc.pt"
    torch.save(sd, bad)
    with pytest.raises(StateDictMismatch, match=r"bad_disc\.pt[\s\S]*main\.2\.bias"):
        load_discriminator(bad, **TINY_D)
    with pytest.raises(StateDictMismatch, match="disc.pt"):
        load_discriminator(good, **{**TINY_D, "use_actnorm": True})


# --------------------------------------------------------------------------------------------
# VF loss
# --------------------------------------------------------------------------------------------
def test_vf_loss_values():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 6, 3, 3, generator=g)
    same = vf_loss(2.0 * f, f)  # same directions: both terms vanish
    assert same["vf_loss_distmat"].abs().item() < 1e-6 and same["vf_loss_cos"].abs().item() < 1e-6
    opposite = vf_loss(-f, f, cos_margin=0.5)  # cos = -1 -> relu(1 - 0.5 + 1) = 1.5
    assert opposite["vf_loss_cos"].item() == pytest.approx(1.5, rel=1e-6)
    assert opposite["vf_loss_distmat"].abs().item() < 1e-6  # Gram matrices are sign-invariant
    z = torch.randn(2, 6, 3, 3, generator=g)
    parts = vf_loss(z, f, distmat_margin=0.1, cos_margin=0.2, distmat_weight=2.0, cos_weight=3.0)
    torch.testing.assert_close(parts["vf_loss"], 2.0 * parts["vf_loss_distmat"] + 3.0 * parts["vf_loss_cos"])
    with pytest.raises(ValueError, match="foundation features"):
        vf_loss(z, f[:, :4])


# --------------------------------------------------------------------------------------------
# Tokenizer losses
# --------------------------------------------------------------------------------------------
def _posterior(b=2, c=4, h=4):
    return DiagonalGaussianDistribution(torch.randn(b, 2 * c, h, h))


class ConstantDistance(nn.Module):
    def forward(self, x, y):
        return torch.full((x.shape[0], 1, 1, 1), 0.25)


def test_reconstruction_loss_from_yaml_and_keys():
    cfg = load_yaml("configs/l1_lpips_kl_gan.yaml")
    assert cfg["model"]["vq_model"]["quantize_mode"] == "vae" and cfg["losses"]["perceptual_weight"] == 1.0
    loss = ReconstructionLoss(cfg, discriminator=TINY_D, perceptual=ConstantDistance())
    assert set(loss.state_dict()) == {"logvar", "perceptual_loss.imagenet_mean", "perceptual_loss.imagenet_std"} | {
        f"discriminator.{k}" for k in NLayerDiscriminator(**TINY_D).state_dict()}
    assert not loss.logvar.requires_grad
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_hat = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    loss.train()
    bn_mean = loss.discriminator.main[3].running_mean.clone()
    total, d = loss(x, x_hat, _posterior(), global_step=0, mode="generator")
    assert not torch.equal(bn_mean, loss.discriminator.main[3].running_mean)  # D runs in train mode, as REPA-E
    assert d["perceptual_loss"].item() == pytest.approx(0.25)  # the injected distance is used
    expected = d["reconstruction_loss"] + d["perceptual_loss"] + d["kl_loss"] + d["weighted_gan_loss"]
    torch.testing.assert_close(total.detach(), expected)
    total.backward()
    assert all(p.grad is None for p in loss.discriminator.parameters())  # D frozen in the generator step
    assert x_hat.grad is not None
    dl, dd = loss(x, x_hat, _posterior(), global_step=0, mode="discriminator")
    dl.backward()
    assert loss.discriminator.main[0].weight.grad is not None

    lecam = ReconstructionLoss({**cfg["losses"], "lecam_regularization_weight": 0.01, "perceptual_weight": 0.0},
                               discriminator=TINY_D)
    assert {"ema_real_logits_mean", "ema_fake_logits_mean"} <= set(lecam.state_dict())
    with pytest.raises(KeyError, match="kl_weight"):
        ReconstructionLoss({k: v for k, v in cfg["losses"].items() if k != "kl_weight"})
    with pytest.raises(ValueError, match="bogus"):
        ReconstructionLoss({**cfg["losses"], "bogus": 1})
    with pytest.raises(ValueError, match="quantize_mode"):
        ReconstructionLoss({"model": {"vq_model": {"quantize_mode": "vq"}}, "losses": cfg["losses"]})


def test_reconstruction_loss_adaptive_weight():
    cfg = {**load_yaml("configs/l1_lpips_kl_gan.yaml")["losses"], "perceptual_weight": 0.0,
           "adaptive_disc_weight": True}
    torch.manual_seed(0)
    loss = ReconstructionLoss(cfg, discriminator=TINY_D)
    last = nn.Parameter(torch.randn(3, 3, 1, 1))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_hat = torch.nn.functional.conv2d(x, last) * 0.5
    total, d = loss(x, x_hat, _posterior(), 0, "generator", last_layer=last)
    rec = (x - x_hat).abs().mean()
    gan = -loss.discriminator(x_hat).mean()
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, last, retain_graph=True)[0]
    expected = (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4) * 0.1
    torch.testing.assert_close(d["d_weight"], expected.detach())
    with pytest.raises(ValueError, match="last_layer"):
        loss(x, x_hat, _posterior(), 0, "generator")


def test_vavae_loss_generator_and_discriminator():
    torch.manual_seed(0)
    loss = VAVAELoss(disc_start=3, kl_weight=1e-6, disc_weight=0.5, perceptual_weight=0.0, disc_num_layers=1,
                     disc_ndf=8, vf_weight=0.1, adaptive_vf=True, distmat_margin=0.25, cos_margin=0.5)
    assert set(loss.state_dict()) == {"logvar"} | {f"discriminator.{k}" for k in
                                                  NLayerDiscriminator(3, 8, 1).state_dict()}
    enc_w = nn.Parameter(torch.randn(5, 3, 1, 1) * 0.3)
    dec_w = nn.Parameter(torch.randn(3, 5, 1, 1) * 0.3)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    h = torch.nn.functional.conv2d(x, enc_w)  # a 1x1 "encoder" to 5 channels
    post = DiagonalGaussianDistribution(torch.cat([h, torch.zeros_like(h)], dim=1))
    z = post.mean
    dec = torch.nn.functional.conv2d(z, dec_w)
    aux = torch.randn(2, 5, 8, 8)
    l0, log = loss(x, dec, post, 0, 2, last_layer=dec_w, z=z, aux_feature=aux, enc_last_layer=enc_w)
    assert log["train/disc_factor"].item() == 0.0 and log["train/d_weight"].item() > 0
    nll = (x - dec).abs().sum() / 2
    vf = log["train/vf_loss"]
    torch.testing.assert_close(l0.detach(), nll.detach() + 1e-6 * log["train/kl_loss"] + log["train/vf_weight"] * vf)
    l1, dlog = loss(x, dec, post, 1, 2)
    assert l1.item() == 0.0 and dlog["train/logits_real"].shape == ()
    l1, _ = loss(x, dec, post, 1, 3)
    assert l1.item() > 0
    with torch.no_grad():  # validation: no graph, the adaptive weights fall back to 0
        _, vlog = loss(x, dec, post, 0, 5, z=z, aux_feature=aux, split="val")
    assert vlog["val/d_weight"].item() == 0.0 and vlog["val/vf_weight"].item() == 0.0


def _lpips_run(m, x, y, lean_head, grad_checkpointing, grad_x=False, lean_trunk=False):
    """(distance, saved bytes, grad w.r.t. y[, grad w.r.t. x]) with the given memory options."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from common import SavedBytes

    m.set_memory_options(lean_head=lean_head, grad_checkpointing=grad_checkpointing, lean_trunk=lean_trunk)
    x, y = x.clone().requires_grad_(grad_x), y.clone().requires_grad_(True)
    with SavedBytes() as saved:
        d = m(x, y)
    d.backward(torch.linspace(0.5, 2.0, d.numel()).view_as(d))  # a different weight per sample
    return d.detach(), saved.total, y.grad, x.grad


def test_lpips_memory_options_same_loss_and_gradient_fewer_saved_bytes(lpips_random):
    """The lean head and VGG checkpointing give lpips' loss bit for bit and its gradient (both
    inputs) to fp rounding, and keep exactly the expected bytes fewer for backward."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    try:
        ref, ref_bytes, ref_gy, _ = _lpips_run(lpips_random, x, y, False, False)
        # features of one input (float32): relu1_2 .. relu5_3 at 16 px
        feats = [(64, 16), (128, 8), (256, 4), (512, 2), (512, 1)]
        feat_bytes = sum(2 * c * s * s * 4 for c, s in feats)
        norm_bytes = sum(2 * 1 * s * s * 4 for _, s in feats)
        runs = {}
        for lean, ckpt in [(True, False), (False, True), (True, True)]:
            d, nbytes, gy, _ = runs[lean, ckpt] = _lpips_run(lpips_random, x, y, lean, ckpt)
            assert torch.equal(d, ref)
            torch.testing.assert_close(gy, ref_gy, rtol=1e-5, atol=1e-6 * ref_gy.abs().max().item())
        # lpips keeps per layer the diff and its square (+ two norm maps); the lean head the target's feature
        assert ref_bytes - runs[True, False][1] == 2 * feat_bytes + 2 * norm_bytes - feat_bytes
        # checkpointed: the scaled input (+ lpips' 3-float scale buffer), both inputs' five
        # features, nothing else
        assert runs[True, True][1] == 2 * 3 * 16 * 16 * 4 + 12 + 2 * feat_bytes
        assert runs[True, True][1] < runs[False, True][1] < ref_bytes
        # both inputs with a gradient (the lean head's two-sided backward)
        _, _, ref_gy, ref_gx = _lpips_run(lpips_random, x, y, False, False, grad_x=True)
        _, _, gy, gx = _lpips_run(lpips_random, x, y, True, True, grad_x=True)
        torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6 * ref_gx.abs().max().item())
        torch.testing.assert_close(gy, ref_gy, rtol=1e-5, atol=1e-6 * ref_gy.abs().max().item())
    finally:
        lpips_random.set_memory_options(lean_head=True, grad_checkpointing=False, lean_trunk=True)


def test_lpips_lean_head_under_autocast(lpips_random):
    """bf16 autocast: the lean head's loss is lpips' (same ops), its gradient within bf16 rounding."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref, _, ref_gy, _ = _lpips_run(lpips_random, x, y, False, False)
            d, _, gy, _ = _lpips_run(lpips_random, x, y, True, True)
        assert torch.equal(d, ref)
        assert gy.dtype == torch.float32 and torch.isfinite(gy).all()
        assert torch.nn.functional.cosine_similarity(gy.flatten(), ref_gy.flatten(), dim=0) > 0.99
    finally:
        lpips_random.set_memory_options(lean_head=True, grad_checkpointing=False, lean_trunk=True)


# VGG16's conv widths ("M": 2x2/2 max-pool); lpips' feature maps are the ReLU before each pool and the last.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


def _vgg_activation_bytes(b, h, w):
    """Per input of shape [b, 3, h, w] (float32): (ReLU outputs that are no feature map, the five
    feature maps, 1-bit ReLU masks, pooled elements), in bytes (the last: a count)."""
    relu, feats, masks, pooled, ch = 0, 0, 0, 0, 3
    for i, c in enumerate(_VGG16):
        if c == "M":
            h, w = h // 2, w // 2  # floor mode
            pooled += b * ch * h * w
            continue
        ch, n = c, b * c * h * w
        masks += -(-n // 8)
        if i + 1 == len(_VGG16) or _VGG16[i + 1] == "M":
            feats += 4 * n
        else:
            relu += 4 * n
    return relu, feats, masks, pooled


@pytest.mark.parametrize("shape, options", [((2, 3, 16, 16), [(False, False), (True, False), (True, True)]),
                                            ((1, 3, 18, 22), [(True, False)])])
def test_lpips_lean_trunk_bit_identical_and_saves_only_bits(lpips_random, shape, options):
    """The lean trunk gives the same loss and the same gradient bit for bit, with the other
    options (lean head, checkpointing), odd sizes included (18x22: pools of 9x11 and 5x5 maps drop a row / column), and keeps
    exactly a 1-bit mask per ReLU output and a uint8 position per pooled output instead of the
    conv inputs, ReLU outputs and int64 indices."""
    g = torch.Generator().manual_seed(6)
    x = torch.rand(shape, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(shape, generator=g)).clamp(-1, 1)
    try:
        for lean_head, ckpt in options:
            ref, ref_bytes, ref_gy, _ = _lpips_run(lpips_random, x, y, lean_head, ckpt, lean_trunk=False)
            d, nbytes, gy, _ = _lpips_run(lpips_random, x, y, lean_head, ckpt, lean_trunk=True)
            assert torch.equal(d, ref) and torch.equal(gy, ref_gy), (lean_head, ckpt)
            if lean_head and not ckpt:
                head_bytes, plain_bytes = nbytes, ref_bytes
        relu, feats, masks, pooled = _vgg_activation_bytes(shape[0], *shape[2:])
        scaled_input = 4 * math.prod(shape)
        # lean head: lpips' 3-float scale buffer and both inputs' feature maps, plus the trunk's bits
        assert head_bytes == 12 + 2 * feats + masks + pooled  # + a uint8 position per pooled element
        # torch keeps every conv input (the scaled image, ReLU outputs, pooled maps: float32) and
        # each pool's int64 indices
        assert plain_bytes - head_bytes == scaled_input + relu + (4 + 8) * pooled - masks - pooled
        # both inputs with a gradient
        _, _, ref_gy, ref_gx = _lpips_run(lpips_random, x, y, True, False, grad_x=True)
        _, _, gy, gx = _lpips_run(lpips_random, x, y, True, False, grad_x=True, lean_trunk=True)
        assert torch.equal(gx, ref_gx) and torch.equal(gy, ref_gy)
    finally:
        lpips_random.set_memory_options(lean_head=True, grad_checkpointing=False, lean_trunk=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lpips_lean_trunk_under_autocast_and_channels_last(lpips_random, dtype):
    """Under autocast the lean trunk convolves the same cast weights and casts the gradient back
    as autograd does: loss and gradient bit-identical, and the per-call half-precision copies of
    the weights that aten's convolution saves are not kept. channels_last (the trainers' CUDA
    layout) too."""
    g = torch.Generator().manual_seed(7)
    x = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    try:
        with torch.autocast("cpu", dtype=dtype):
            ref, ref_bytes, ref_gy, _ = _lpips_run(lpips_random, x, y, True, False, lean_trunk=False)
            d, nbytes, gy, _ = _lpips_run(lpips_random, x, y, True, False, lean_trunk=True)
        assert torch.equal(d, ref) and torch.equal(gy, ref_gy) and gy.dtype == torch.float32
        weights = sum(p.numel() for n, p in lpips_random.net.net.named_parameters() if n.endswith("weight"))
        assert ref_bytes - nbytes > 2 * weights  # the cast weights alone
        lpips_random.to(memory_format=torch.channels_last)
        x, y = (t.contiguous(memory_format=torch.channels_last) for t in (x, y))
        ref, _, ref_gy, ref_gx = _lpips_run(lpips_random, x, y, True, False, grad_x=True, lean_trunk=False)
        d, _, gy, gx = _lpips_run(lpips_random, x, y, True, False, grad_x=True, lean_trunk=True)
        assert torch.equal(d, ref) and torch.equal(gy, ref_gy) and torch.equal(gx, ref_gx)
    finally:
        lpips_random.to(memory_format=torch.contiguous_format)
        lpips_random.set_memory_options(lean_head=True, grad_checkpointing=False, lean_trunk=True)


def test_lean_max_pool_routes_ties_and_signed_zeros_as_torch():
    """The uint8-position pool gives max_pool2d's output and gradient bit for bit (sign of zero
    included) where windows hold tied maxima (the first one wins) and on odd sizes."""
    from loss.perceptual import _MaxPool2x2

    g = torch.Generator().manual_seed(8)
    for shape in [(2, 3, 8, 8), (1, 2, 7, 9)]:
        x = torch.randint(0, 3, shape, generator=g).float()  # many ties
        x[0, 0, :2, :2] = torch.tensor([[-0.0, 0.0], [0.0, -0.0]])
        grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, generator=g)
        grad[0, 0, 0, 0] = -0.0  # torch's backward accumulates it into +0.0
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_ref, out = torch.nn.functional.max_pool2d(a, 2, 2), _MaxPool2x2.apply(b)
        out_ref.backward(grad)
        out.backward(grad)
        assert torch.equal(out.view(torch.int32), out_ref.view(torch.int32))
        assert torch.equal(b.grad.view(torch.int32), a.grad.view(torch.int32))


def test_lean_trunk_runs_an_unfrozen_conv_as_its_module():
    """A conv whose weight needs a gradient is left to its module (the lean node returns no weight
    gradient), so its weight gradient is still computed."""
    from loss.perceptual import _lean_slice

    torch.manual_seed(0)
    s = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True))
    s[3].requires_grad_(False)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    _lean_slice(s, x, lean=True).sum().backward()
    lean_w, lean_x = s[0].weight.grad.clone(), x.grad.clone()
    s[0].weight.grad, x.grad = None, None
    s(x).sum().backward()
    assert torch.equal(lean_w, s[0].weight.grad) and torch.equal(lean_x, x.grad)


def test_lean_trunk_compiles_to_one_graph():
    """torch.compile traces the lean nodes, forward and backward (aot_eager), without a graph
    break, and gives the eager output and gradient (one VGG-like slice: the whole LPIPS takes a
    minute to trace on a CPU)."""
    import torch._dynamo
    from loss.perceptual import _lean_slice

    torch.manual_seed(0)
    s = nn.Sequential(nn.MaxPool2d(2, 2), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True)).requires_grad_(False)
    x = torch.randn(2, 3, 10, 14)

    def run(fn):
        xg = x.clone().requires_grad_(True)
        out = fn(s, xg)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        return out.detach(), xg.grad

    ref = run(functools.partial(_lean_slice, lean=True))
    torch._dynamo.reset()
    try:
        out = run(torch.compile(functools.partial(_lean_slice, lean=True), backend="aot_eager", fullgraph=True))
    finally:
        torch._dynamo.reset()
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_lpips_built_under_meta_leaves_later_builds_real(monkeypatch):
    """LPIPS copies a cached template network: one first built under `torch.device("meta")` (the
    memory estimate's weightless build) must not make every later LPIPS weightless."""
    from loss import perceptual

    monkeypatch.setattr(perceptual, "_TEMPLATE", {})
    with torch.device("meta"):
        LPIPS(vgg_weights="random")
    later = LPIPS(vgg_weights="random")
    assert not any(t.is_meta for t in list(later.parameters()) + list(later.buffers()))
