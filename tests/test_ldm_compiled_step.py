"""The train_ldm_only step's forward as one module (loss/latent_diffusion.py): eager it is
bit-identical to the trainer's former inline code (same random stream, same loss and gradients);
compiled it is one graph without breaks or random ops, with the eager loss and gradients."""
import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

from loss.latent_diffusion import LatentDiffusionLoss
from models.diffusion import (LatentNormalizer, VelocityModel, build_diffusion_model, flow_matching_loss,
                              sit_bn_from_stats)
from transport import Transport

B = 8
# family, model, latent shape, constructor options, loss settings, statistics mode, stored dtype
CASES = {
    "sit-repa": ("sit", "SiT-N/2", (4, 8, 8), dict(z_dims=[16, 24], encoder_depth=2, projector_dim=32, freeze_bn=True),
                 dict(weighting="lognormal", proj_coeff=0.5), "channel", torch.float16),
    "lightningdit": ("lightningdit", "LightningDiT-N/1", (8, 4, 4), {},
                     dict(weighting="logit-normal", shift=2.0, direction_weight=1.0, data_at_one=True), "channel",
                     torch.float32),
    "ditdh": ("ddt", "DiTDH-N", (8, 4, 4), {}, dict(weighting="uniform", shift=1.5), "position", torch.bfloat16),
}


def build(case):
    family, name, shape, options, loss, mode, dtype = CASES[case]
    torch.manual_seed(0)
    net = build_diffusion_model(name, shape, 5, 0.5, **options).train()  # dropout 0.5: both label branches
    c, h, w = shape
    stats = {"channel_mean": torch.randn(c), "channel_var": torch.rand(c) + 0.5,
             "mean": torch.randn(c, h, w), "var": torch.rand(c, h, w) + 0.5}
    if family == "sit":
        sit_bn_from_stats(net, stats, "test")
    normalizer = LatentNormalizer.from_stats(stats, mode, shape, 1e-5)
    time_dist = "logit-normal_0_1" if loss["weighting"] == "logit-normal" else "uniform"
    transport = Transport(time_dist_type=time_dist, time_dist_shift=loss.get("shift", 1.0))
    step = LatentDiffusionLoss(net, family, normalizer, transport, loss.get("data_at_one", False),
                               weighting=loss["weighting"], proj_coeff=loss.get("proj_coeff", 0.0),
                               direction_weight=loss.get("direction_weight", 0.0))
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(B, *shape, generator=g).to(dtype)
    std = (0.1 * torch.rand(B, *shape, generator=g)).to(dtype)
    labels = torch.randint(0, 5, (B,), generator=g)
    zs = [torch.randn(B, (h // net.x_embedder.patch_size) ** 2, d, generator=g) for d in options.get("z_dims", [])]
    return step, (mean, std, labels, zs), loss


def former_trainer_step(step, loss_cfg, mean, std, labels, zs):
    """train_ldm_only's inline step before the loss module (main at 442eb0c), random draws inside."""
    mean, std = mean.float(), std.float()
    z = mean + std * torch.randn_like(mean)
    if step.family == "sit":
        out = step.net(z, labels, zs, loss_kwargs=dict(weighting=loss_cfg["weighting"], path_type="linear",
                                                         prediction="v"))
        return out["denoising_loss"].mean() + loss_cfg["proj_coeff"] * out["proj_loss"]
    x = step.normalizer(z)
    t = step.transport.sample_time(torch.rand(x.shape[0]))
    per_sample, _ = flow_matching_loss(VelocityModel(step.net, loss_cfg.get("data_at_one", False)), x, labels, t,
                                       torch.randn_like(x), loss_cfg.get("direction_weight", 0.0))
    return per_sample.mean()


def loss_and_grads(step, loss):
    step.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in step.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_eager_step_is_bit_identical_to_the_former_trainer_code(case):
    step, inputs, loss_cfg = build(case)
    torch.manual_seed(7)
    ref_loss, ref_grads = loss_and_grads(step, former_trainer_step(step, loss_cfg, *inputs))
    ref_rng = torch.get_rng_state()
    torch.manual_seed(7)
    mean, _, labels, _ = inputs
    losses = step(*inputs, step.draw(mean, labels))
    loss, grads = loss_and_grads(step, losses["loss"])
    assert torch.equal(torch.get_rng_state(), ref_rng)  # the same numbers of draws, in the same order
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for k in grads:
        assert torch.equal(grads[k], ref_grads[k]), k
    assert all(not v.requires_grad for k, v in losses.items() if k != "loss")


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_is_one_graph_without_random_ops_and_matches_eager(case):
    step, inputs, _ = build(case)
    mean, _, labels, _ = inputs
    torch.manual_seed(7)
    draws = step.draw(mean, labels)
    assert draws["drop"] is not None and draws["drop"].any() and not draws["drop"].all()
    ref_loss, ref_grads = loss_and_grads(step, step(*inputs, draws)["loss"])

    graphs, aot_eager = [], lookup_backend("aot_eager")

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, backend=recording_backend, fullgraph=False)
    rng = torch.get_rng_state()
    loss, grads = loss_and_grads(step, compiled(*inputs, draws)["loss"])
    assert dict(counters["graph_break"]) == {} and len(graphs) == 1
    # the random numbers come from `draw` only: the graph neither draws nor moves the generator
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op in ("call_function", "call_method")]
    assert not [t for t in targets if "rand" in t or "bernoulli" in t or "dropout" in t]
    assert torch.equal(torch.get_rng_state(), rng)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)
    torch._dynamo.reset()
