"""SiT: every registry size runs, BatchNorm statistics round-trip, options behave."""
import pytest
import torch

from models.sit import SiT, SiT_models, build_sit, sample_time
from samplers import euler_sampler, sample


def tiny(**kw):
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, encoder_depth=2,
               num_classes=10, z_dims=[16], projector_dim=24)
    cfg.update(kw)
    return SiT(**cfg)


@pytest.mark.parametrize("name", list(SiT_models))
def test_every_registry_size_runs(name):
    """Every size builds and runs forward and inference; L and XL on the meta device (shapes only:
    initialising their 0.5-0.7B random weights on CPU is most of a minute per size and tests
    nothing the S / B sizes, which run for real, do not)."""
    torch.manual_seed(0)
    patch = int(name.split("/")[1])
    real = name.split("-")[1].split("/")[0] in ("S", "B")
    with torch.device("cpu" if real else "meta"):
        model = build_sit(name, input_size=2 * patch, in_channels=4, num_classes=10, z_dims=[8], projector_dim=16,
                          encoder_depth=2)
        x = torch.randn(2, 4, 2 * patch, 2 * patch)
        out = model(x, torch.tensor([1, 2]), zs=[torch.randn(2, 4, 8)])
        v = model.eval().inference(x, torch.rand(2), torch.tensor([10, 3]))
    assert out["model_output"].shape == x.shape and v.shape == x.shape
    if real:
        assert torch.isfinite(out["denoising_loss"]).all() and torch.isfinite(out["proj_loss"])


def test_unknown_size_lists_choices():
    with pytest.raises(KeyError, match="SiT-XL/2"):
        build_sit("SiT-Q/2")


def test_bn_init_and_readback_roundtrip():
    model = tiny()
    bias = torch.randn(1, 4, 1, 1)
    scale = torch.rand(1, 4, 1, 1) + 0.5
    model.init_bn(bias, scale, eps_included=model.bn.eps)
    stats = model.latent_stats(include_eps=True)
    torch.testing.assert_close(stats["latents_scale"], scale)
    torch.testing.assert_close(stats["latents_bias"], bias)
    # eval-mode BN and the stats describe the same normalisation
    x = torch.randn(3, 4, 8, 8)
    model.eval()
    torch.testing.assert_close(model.bn(x), (x - bias) * scale, atol=1e-5, rtol=1e-5)
    # the original's convention (no eps) is available for released stats files
    model.init_bn(bias, scale)
    torch.testing.assert_close(model.latent_stats(include_eps=False)["latents_scale"], scale)
    with pytest.raises(ValueError, match="channels"):
        model.init_bn(torch.zeros(3), torch.ones(3))


def test_align_only_stops_after_encoder_depth_and_has_no_denoising_loss():
    torch.manual_seed(0)
    model = tiny().eval()
    for b in model.blocks:  # make blocks non-trivial
        torch.nn.init.normal_(b.adaLN_modulation[1].weight, std=0.1)
    calls = []
    for i, b in enumerate(model.blocks):
        b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    x = torch.randn(2, 4, 8, 8)
    out = model(x, torch.tensor([0, 1]), zs=[torch.randn(2, 16, 16)], loss_kwargs={"align_only": True})
    assert calls == [0, 1]
    assert out["denoising_loss"] is None and out["proj_loss"].ndim == 0


def test_projection_loss_gradients_reach_input_latents():
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = model(x, torch.tensor([0, 1]), zs=[torch.randn(2, 16, 16)], loss_kwargs={"align_only": True})
    out["proj_loss"].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("weighting", ["uniform", "lognormal"])
@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_time_sampling_in_unit_interval(weighting, path):
    t = sample_time(4096, weighting, path, "cpu")
    assert t.shape == (4096, 1, 1, 1) and t.min() >= 0 and t.max() <= 1
    if weighting == "lognormal":
        assert abs(t.median().item() - 0.5) < 0.05  # sigma = exp(N(0,1)) has median 1 -> t = 1/2


def test_qk_norm_and_grad_checkpointing():
    torch.manual_seed(0)
    a = tiny(qk_norm=True)
    assert any("q_norm" in k for k in a.state_dict())
    b = tiny(qk_norm=True, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x, y, zs = torch.randn(2, 4, 8, 8), torch.tensor([0, 1]), [torch.randn(2, 16, 16)]
    t, n = torch.rand(2, 1, 1, 1), torch.randn(2, 4, 8, 8)
    for m in (a, b):
        m.y_embedder.dropout_prob = 0.0
        o = m(x, y, zs, time_input=t, noises=n)
        (o["denoising_loss"].mean() + o["proj_loss"]).backward()
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, msg=k)


def test_decoder_hidden_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="decoder_hidden_size"):
        tiny(decoder_hidden_size=64)


def test_cfg_doubles_batch_only_inside_interval():
    torch.manual_seed(0)
    model = tiny().eval()
    sizes = []
    orig = model.inference
    model.inference = lambda x, t, y: (sizes.append((x.shape[0], float(t[0]))), orig(x, t, y))[1]
    euler_sampler(model, torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2]), num_steps=4, cfg_scale=2.0,
                  guidance_low=0.3, guidance_high=0.8)
    assert [s for s, t in sizes] == [3, 6, 6, 3]  # t = 1, .75, .5, .25


def test_sampler_dispatch_and_shapes():
    torch.manual_seed(0)
    model = tiny().eval()
    z, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    for mode, solver in [("ode", "euler"), ("ode", "heun"), ("sde", "euler"), ("ode", "dopri5")]:
        out = sample(model, z, y, mode=mode, solver=solver, num_steps=3, cfg_scale=1.5)
        assert out.shape == z.shape and out.dtype == torch.float64 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="solver"):
        sample(model, z, y, solver="rk9")


def test_frozen_batchnorm_stays_in_eval_mode():
    from models.sit import build_sit

    sit = build_sit("SiT-N/2", input_size=8, in_channels=4, num_classes=2, z_dims=[], freeze_bn=True)
    sit.train()
    assert sit.training and not sit.bn.training
    x = torch.randn(4, 4, 8, 8) * 3 + 1
    before = sit.bn.running_mean.clone()
    sit(x, torch.zeros(4, dtype=torch.long))
    assert torch.equal(sit.bn.running_mean, before)  # a training forward does not move the statistics
    assert build_sit("SiT-N/2", input_size=8, in_channels=4, num_classes=2, z_dims=[]).train().bn.training


def test_models_never_import_losses():
    """Models compute features, losses live in loss/: no module of models/ imports the loss package
    (the REPA projection loss the SiT's training forward returns lives in models.layers)."""
    import ast
    from pathlib import Path

    import loss.alignment
    import models.layers

    upward = []
    for path in sorted((Path(__file__).resolve().parents[1] / "models").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            upward += [f"{path.name}: {n}" for n in names if n == "loss" or n.startswith("loss.")]
    assert not upward, upward
    assert loss.alignment.projection_loss is models.layers.projection_loss  # the loss package still offers it
