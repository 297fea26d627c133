"""RAE stage-1 training components: DiffAug, the DINO discriminator, RAELoss, the decoder's
gradient checkpointing, and linear_probe.py (tiny sizes, CPU, offline)."""
import json

import pytest
import torch
import torch.nn as nn
import yaml

from loss.diffaug import diff_augment, max_shift, rand_brightness, sample_translation, translate
from loss.rae import RAELoss, quantize_8bit
from models.discriminators import DINO_DISC_TINY, SpectralConv1d, build_dino_discriminator
from models.rae import RAEDecoder
from utils import StateDictMismatch


# --------------------------------------------------------------------------------------------
# DiffAug
# --------------------------------------------------------------------------------------------
def _images(B=4, C=3, H=16, W=16, seed=0):
    return torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_diffaug_shapes_identity_and_bad_policy():
    x = _images()
    assert diff_augment(x, "") is x
    for policy in ("color", "translation", "cutout", "color,translation"):
        assert diff_augment(x, policy, torch.Generator().manual_seed(0)).shape == x.shape
    with pytest.raises(ValueError, match="colour"):
        diff_augment(x, "colour")


def test_translate_matches_hand_computed_shift_with_zero_fill():
    x = _images(B=2, H=8, W=8)
    out = translate(x, torch.tensor([[2, -1], [-3, 0]]))
    expected = torch.zeros_like(x)
    expected[0, :, 2:, :7] = x[0, :, :6, 1:]  # content moves down 2, left 1
    expected[1, :, :5, :] = x[1, :, 3:, :]  # content moves up 3
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_random_translation_uses_sampled_per_sample_shifts():
    x = _images(B=6, H=16, W=16) + 3  # no zeros in the content: zeros can only be fill
    shifts = sample_translation(x, torch.Generator().manual_seed(3))
    assert shifts.abs().max() <= max_shift(16) == 2
    out = diff_augment(x, "translation", torch.Generator().manual_seed(3))
    for b, (dy, dx) in enumerate(shifts.tolist()):  # the test may loop; the code may not
        expected = torch.zeros_like(x[b])
        ys, yd = slice(max(0, -dy), 16 - max(0, dy)), slice(max(0, dy), 16 - max(0, -dy))
        xs, xd = slice(max(0, -dx), 16 - max(0, dx)), slice(max(0, dx), 16 - max(0, -dx))
        expected[:, yd, xd] = x[b, :, ys, xs]
        torch.testing.assert_close(out[b], expected, rtol=0, atol=0)
        assert int((out[b] == 0).all(0).sum()) == 16 * 16 - (16 - abs(dy)) * (16 - abs(dx))
    assert len({tuple(s) for s in shifts.tolist()}) > 1  # per-sample draws


def test_diffaug_reproducible_per_sample_and_differentiable():
    x = _images()
    a = diff_augment(x, "color,translation", torch.Generator().manual_seed(7))
    b = diff_augment(x, "color,translation", torch.Generator().manual_seed(7))
    c = diff_augment(x, "color,translation", torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    offsets = rand_brightness(torch.zeros(8, 3, 4, 4), torch.Generator().manual_seed(0))
    assert offsets.abs().max() <= 0.5 and offsets[:, :, 0, 0].unique().numel() == 8  # one offset per sample

    x = x.clone().requires_grad_(True)
    diff_augment(x, "translation", torch.Generator().manual_seed(1)).sum().backward()
    shifts = sample_translation(x, torch.Generator().manual_seed(1))
    # d sum / dx = 1 where the pixel stays inside the image after the shift, else 0
    torch.testing.assert_close(x.grad, translate(torch.ones_like(x), -shifts), rtol=0, atol=0)
    y = x.detach().clone().requires_grad_(True)
    diff_augment(y, "color,translation", torch.Generator().manual_seed(1)).square().sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# DINO discriminator
# --------------------------------------------------------------------------------------------
def _tiny_disc(seed=0):
    torch.manual_seed(seed)
    return build_dino_discriminator(DINO_DISC_TINY)


def test_dino_disc_shape_frozen_backbone_trainable_heads():
    disc = _tiny_disc()
    x = _images(B=3, H=40, W=40).requires_grad_(True)  # resized to 32 inside
    disc.train()
    logits = disc(x)
    assert logits.shape == (3, disc.num_logits) == (3, 3 * 16)  # blocks 1, 3 + final; (32/8)^2 tokens
    assert not any(m.training for m in disc.backbone.modules())
    assert all(m.training for m in disc.heads.modules())
    assert not any(p.requires_grad for p in disc.backbone.parameters())
    logits.square().mean().backward()
    assert all(p.grad is None for p in disc.backbone.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())
    assert x.grad.abs().sum() > 0  # the frozen backbone still passes gradients to the image
    assert all(k.startswith("heads.") for k in disc.state_dict())  # backbone: constants, not saved
    with pytest.raises(ValueError, match="unknown keys"):
        build_dino_discriminator({**DINO_DISC_TINY, "widht": 3})
    with pytest.raises(ValueError, match="feature_blocks"):
        build_dino_discriminator({**DINO_DISC_TINY, "feature_blocks": (1, 7)})


def test_dino_disc_spectral_norm():
    disc = _tiny_disc().train()
    convs = [m for m in disc.heads.modules() if isinstance(m, SpectralConv1d)]
    assert len(convs) == 3 * 3
    for m in convs:
        assert hasattr(m, "weight_orig") and hasattr(m, "weight_u") and "weight" not in dict(m.named_parameters())
    x = _images(B=2, H=32, W=32)
    with torch.no_grad():
        for _ in range(60):  # one power iteration per training forward
            disc(x)
    for m in convs:
        sigma = torch.linalg.matrix_norm(m.weight.reshape(m.weight.shape[0], -1), ord=2)
        assert abs(sigma.item() - 1.0) < 0.05


def test_dino_disc_heads_roundtrip_and_key_mapping():
    disc, other = _tiny_disc(0), _tiny_disc(0)
    with torch.no_grad():
        for p in disc.heads.parameters():
            p.add_(0.1)
    renamed = {k.replace("heads.", "head_list."): v for k, v in disc.state_dict().items()}
    with pytest.raises(StateDictMismatch, match="missing keys"):
        other.load_heads(renamed)
    other.load_heads({"disc": {"module." + k: v for k, v in renamed.items()}}, key_mapping={"head_list.": "heads."})
    x = _images(B=2, H=32, W=32)
    torch.testing.assert_close(other.eval()(x), disc.eval()(x))


# --------------------------------------------------------------------------------------------
# RAELoss
# --------------------------------------------------------------------------------------------
class _TinyDecoder(nn.Module):
    """features [B, 8] -> image [B, 3, 16, 16] through a last Linear (the adaptive weight's W)."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(8, 16)
        self.pred = nn.Linear(16, 3 * 16 * 16)

    def forward(self, f):
        return torch.tanh(self.pred(torch.relu(self.hidden(f)))).view(-1, 3, 16, 16)


@pytest.fixture(scope="module")
def rae_loss():
    torch.manual_seed(0)
    disc = build_dino_discriminator({**DINO_DISC_TINY, "img_size": 16, "patch_size": 4})
    return RAELoss(discriminator=disc, vgg_weights="random").eval()  # eval: D's spectral norm stays put


def test_rae_loss_adaptive_weight_matches_autograd(rae_loss):
    torch.manual_seed(1)
    dec, f, x = _TinyDecoder(), torch.randn(2, 8), _images(B=2)
    recon = dec(f)
    loss, logs = rae_loss.generator_loss(x, recon, dec.pred.weight, epoch=8, generator=torch.Generator().manual_seed(5))

    # Independently: rec and gan from scratch, their gradients at W with autograd.
    rec = ((x + 1) / 2 - (recon + 1) / 2).abs().mean() + rae_loss.perceptual_loss(x, recon).mean()
    fake = diff_augment(recon, rae_loss.diffaug_policy, torch.Generator().manual_seed(5))
    gan = -rae_loss.discriminator(fake).mean()
    g_rec = torch.autograd.grad(rec, dec.pred.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, dec.pred.weight, retain_graph=True)[0]
    lam = (g_rec.norm() / (g_gan.norm() + 1e-6)).clamp(0, 1e4)
    torch.testing.assert_close(logs["adaptive_weight"], lam)
    torch.testing.assert_close(logs["rec"], rec.detach())
    torch.testing.assert_close(logs["gan"], gan.detach())
    torch.testing.assert_close(loss, rec + 0.75 * lam * gan)
    assert logs["adaptive_weight"] > 0 and not logs["adaptive_weight"].requires_grad

    rae_loss.discriminator.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is None for p in rae_loss.discriminator.parameters())  # D gets nothing from G's loss
    assert dec.pred.weight.grad is not None


@pytest.mark.parametrize("full_precision", [False, True])
def test_rae_loss_runs_under_the_callers_autocast_unless_full_precision(rae_loss, full_precision):
    """As the original, LPIPS and the DINO discriminator run in the step's bf16 autocast (the
    whole RAE step in bf16); `--rae-loss-full-precision` keeps them in float32."""
    dtypes = []
    hooks = [m.register_forward_hook(lambda mod, i, o: dtypes.append(o.dtype)) for m in rae_loss.modules()
             if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))]
    rae_loss.full_precision = full_precision
    try:
        dec, x = _TinyDecoder(), _images(B=2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            recon = dec(torch.randn(2, 8))
            loss, logs = rae_loss.generator_loss(x, recon, dec.pred.weight, epoch=8)
            d_loss, _ = rae_loss.discriminator_loss(x, recon)
    finally:
        rae_loss.full_precision = False
        for h in hooks:
            h.remove()
    assert dtypes and set(dtypes) == ({torch.float32} if full_precision else {torch.bfloat16})
    assert loss.dtype == d_loss.dtype == torch.float32 and logs["adaptive_weight"].dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(d_loss)


def test_rae_loss_no_gan_before_start_epoch(rae_loss):
    calls = []
    handle = rae_loss.discriminator.register_forward_hook(lambda *a: calls.append(1))
    try:
        dec, x = _TinyDecoder(), _images(B=2)
        recon = dec(torch.randn(2, 8))
        loss, logs = rae_loss.generator_loss(x, recon, dec.pred.weight, epoch=7)
    finally:
        handle.remove()
    assert not calls
    assert float(logs["gan"]) == 0 and float(logs["adaptive_weight"]) == 0
    torch.testing.assert_close(loss.detach(), logs["rec"])
    torch.testing.assert_close(logs["rec"], logs["l1"] + logs["lpips"])
    assert (rae_loss.use_gan(7), rae_loss.use_gan(8)) == (False, True)
    assert (rae_loss.update_discriminator(5), rae_loss.update_discriminator(6)) == (False, True)


class _FixedLogits(nn.Module):
    """Returns preset logits for the batch [real; fake] and records what it was shown."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.scale = nn.Parameter(torch.ones(()))
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.logits * self.scale


def test_rae_discriminator_hinge_and_quantised_fake():
    logits = torch.tensor([[2.0, 0.5], [-1.0, 1.0],  # real
                           [-2.0, 0.0], [0.5, -0.5]])  # fake
    disc = _FixedLogits(logits)
    loss_fn = RAELoss(discriminator=disc, perceptual_weight=0.0, diffaug_policy="")
    x = _images(B=2, H=8, W=8)
    recon = (torch.randn(2, 3, 8, 8) * 1.5).requires_grad_(True)  # partly outside [-1, 1]
    loss, logs = loss_fn.discriminator_loss(x, recon)
    # real: relu(1 - l) = [0, .5, 2, 0] -> .625; fake: relu(1 + l) = [0, 1, 1.5, .5] -> .75
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.625 + 0.75)))
    torch.testing.assert_close(logs["logits_real"], torch.tensor(0.625))
    torch.testing.assert_close(logs["logits_fake"], torch.tensor(-0.5))
    real_seen, fake_seen = disc.seen[:2], disc.seen[2:]
    torch.testing.assert_close(real_seen, x)
    torch.testing.assert_close(fake_seen, quantize_8bit(recon.detach()))
    assert fake_seen.min() >= -1 and fake_seen.max() <= 1
    levels = (fake_seen + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    loss.backward()
    assert recon.grad is None and disc.scale.grad is not None


def test_rae_discriminator_independent_diffaug():
    disc = _FixedLogits(torch.zeros(4, 1))
    loss_fn = RAELoss(discriminator=disc, perceptual_weight=0.0, diffaug_policy="translation")
    x = _images(B=2, H=16, W=16)
    loss_fn.discriminator_loss(x, x.clone(), generator=torch.Generator().manual_seed(0))
    real_seen, fake_seen = disc.seen[:2], disc.seen[2:]
    assert not torch.allclose(real_seen, fake_seen)  # same images, different draws


# --------------------------------------------------------------------------------------------
# RAEDecoder gradient checkpointing
# --------------------------------------------------------------------------------------------
def test_rae_decoder_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    dec = RAEDecoder(num_tokens=16, in_dim=12, patch_size=4, hidden_size=32, depth=2, num_heads=4, mlp_dim=64)
    ckpt = RAEDecoder(num_tokens=16, in_dim=12, patch_size=4, hidden_size=32, depth=2, num_heads=4, mlp_dim=64,
                      grad_checkpointing=True)
    ckpt.load_state_dict(dec.state_dict())
    tokens = torch.randn(2, 16, 12)
    outs, grads = [], []
    for m in (dec, ckpt):
        t = tokens.clone().requires_grad_(True)
        y = m(t)
        (y.square().mean()).backward()
        outs.append(y.detach())
        grads.append([t.grad] + [p.grad for p in m.parameters()])
    assert outs[0].shape == (2, 3, 16, 16)
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    ckpt.set_grad_checkpointing(False)
    assert not ckpt.grad_checkpointing and ckpt.get_last_layer() is ckpt.decoder_pred.weight


# --------------------------------------------------------------------------------------------
# linear_probe.py
# --------------------------------------------------------------------------------------------
def test_linear_probe_separates_classes_and_shuffled_labels_are_chance(tmp_path):
    import linear_probe
    from datasources import make_procedural_dataset

    data = make_procedural_dataset(tmp_path / "data", num_classes=4, per_class=40, resolution=32, seed=0)
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(yaml.safe_dump({"data-dir": str(data), "encoder": "dinov2-vit-tiny", "resolution": 32}))
    common = ["--config", str(cfg), "--random-init", "--val-fraction", "0.3", "--optimizer", "lbfgs",
              "--epochs", "10", "--seed", "0"]
    real = linear_probe.main(common + ["--output", str(tmp_path / "real.json")])
    shuffled = linear_probe.main(common + ["--shuffle-labels", "--output", str(tmp_path / "shuffled.json")])
    assert real["num_val"] == 48 and real["num_classes"] == 4
    assert real["val_top1"] >= 0.55  # chance is 0.25
    assert shuffled["val_top1"] <= 0.45
    assert real["val_top5"] == 1.0  # 4 classes: top-5 is everything
    saved = json.loads((tmp_path / "real.json").read_text())
    assert saved["metrics"]["val_top1"] == real["val_top1"] and saved["args"]["encoder"] == "dinov2-vit-tiny"
    again = linear_probe.main(common + ["--output", str(tmp_path / "again.json")])
    assert again == real  # deterministic with --seed

    vae = linear_probe.main(["--data-dir", str(data), "--encoder", "tiny-f4d4", "--random-init", "--resolution", "32",
                             "--flatten", "--epochs", "5", "--output", str(tmp_path / "vae.json")])
    assert vae["feature_dim"] == 4 * 8 * 8
    dino_cfg = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=56,
                    patch_size=14, num_register_tokens=4, layer_norm_eps=1e-6)
    (tmp_path / "dino.json").write_text(json.dumps(dino_cfg))
    rae = linear_probe.main(["--data-dir", str(data), "--encoder", "Dinov2withNorm", "--rae-config",
                             str(tmp_path / "dino.json"), "--rae-input-size", "56", "--random-init", "--resolution",
                             "32", "--epochs", "2", "--output", str(tmp_path / "rae.json")])
    assert rae["feature_dim"] == 32
    with pytest.raises(ValueError, match="--tokenizer-ckpt"):
        linear_probe.main(["--data-dir", str(data), "--encoder", "tiny-f4d4", "--resolution", "32"])


def test_rae_bad_input_is_named():
    """Statistics of the wrong shape, decoder weights of another width, an encoder input size the
    patch does not divide: clear errors."""
    import utils
    from models.rae import RAEDecoder, build_rae
    from models.tokenizers import RAE_PRESETS, build_tokenizer

    spec = RAE_PRESETS["tiny-dinov2"]
    rae = build_tokenizer("rae", name="tiny-dinov2", random_init=True).model
    c, h, w = rae.latent_shape
    with pytest.raises(ValueError, match=r"expected \(%d, %d, %d\)" % (c, h, w)):
        rae.set_latent_stats(torch.zeros(c + 1, h, w), torch.ones(c + 1, h, w))
    wide = RAEDecoder.from_config(dict(spec["decoder_config"]), c + 16, 8, h * w)
    with pytest.raises(utils.StateDictMismatch, match="decoder_embed.weight"):
        utils.load_state_dict_strict(rae.decoder, wide.state_dict(), "decoder.pt")
    with pytest.raises(ValueError, match="not a multiple of the encoder patch"):
        build_rae(dict(spec["params"], encoder_input_size=50), encoder_config=spec["encoder_config"],
                  decoder_config=spec["decoder_config"], random_init=True)


def test_diffaug_default_is_the_originals_order():
    """The original RAE augments translation first, then colour: a shift after the colour ops
    moves the zero fill differently than a shift before them."""
    from loss.rae import RAE_LOSS_DEFAULTS

    assert RAE_LOSS_DEFAULTS["diffaug_policy"] == "translation,color"
    x = _images(B=2, H=16, W=16)
    assert torch.equal(diff_augment(x, generator=torch.Generator().manual_seed(3)),
                       diff_augment(x, "translation,color", torch.Generator().manual_seed(3)))
