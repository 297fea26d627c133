"""The bench scripts in their tiny CPU modes (one JSON line each, with the machine-independent
counts), the counters they rely on, and the step changes those counts judge: foreach EMA, no host
read of the losses between logged steps, one read of the log values, projector-free inference and
host-side time grids (each checked to leave the results unchanged)."""
import copy
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import utils

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import HostReadCounter, OpCounter, SavedBytes  # noqa: E402


def count_syncs(fn):
    with OpCounter() as ops, HostReadCounter() as reads:
        out = fn()
    return ops.syncs + reads.reads, ops.kernels, out


# ------------------------------------------------------------------------------------------ counters
def test_counters_see_kernels_syncs_and_saved_bytes():
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    syncs, kernels, _ = count_syncs(lambda: (lin(x).view(-1).sum().backward(), float(x.detach().sum()), x.tolist()))
    assert syncs == 2  # float() and tolist(); the view is no kernel
    assert kernels >= 4  # addmm, sum, and the backward's mm / sum
    with SavedBytes() as saved:
        y = torch.relu(lin(x))
    assert saved.total == 2 * 4 * 8 * 4  # x (for the weight's grad) and relu's output; never the weight
    y.sum().backward()


# ------------------------------------------------------------------------------------------ EMA
def _ema_per_tensor(ema, model, decay):
    """The per-tensor loop the foreach update replaced (reference)."""
    with torch.no_grad():
        params = dict(ema.named_parameters())
        for name, p in model.named_parameters():
            params[name].mul_(decay).add_(p.detach().to(params[name].dtype), alpha=1 - decay)
        bufs = dict(ema.named_buffers())
        for name, b in model.named_buffers():
            if b.dtype.is_floating_point:
                bufs[name].mul_(decay).add_(b.to(bufs[name].dtype), alpha=1 - decay)
            else:
                bufs[name].copy_(b)


def test_foreach_ema_is_bit_identical_to_the_per_tensor_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(5))
    model(torch.randn(2, 3, 6, 6))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 3, 6, 6))  # moves the BatchNorm statistics and its step counter
        utils.update_ema(a, model, 0.9)
        _ema_per_tensor(b, model, 0.9)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert a[1].num_batches_tracked.item() == 4  # copied, not averaged


# ------------------------------------------------------------------------------------------ StepMonitor
def _monitor(log_every_unused=None, checkpointing_steps=100, max_train_steps=1000):
    accelerator = SimpleNamespace(reduce=lambda t, reduction: t)
    run = SimpleNamespace(accelerator=accelerator, world=1, logger=logging.getLogger("test_bench"),
                          ckpt_dir=Path("/nonexistent"),
                          args=SimpleNamespace(checkpointing_steps=checkpointing_steps, max_train_steps=max_train_steps))
    return utils.StepMonitor(run, utils.StopRequest())


def test_step_monitor_reads_the_host_only_on_logged_and_checkpoint_steps():
    monitor = _monitor(checkpointing_steps=4)
    loss = {"loss": torch.tensor(1.5)}
    syncs, _, (vals, stop) = count_syncs(lambda: monitor(loss, 1, record=False))
    assert syncs == 0 and vals == {} and stop is False
    syncs, _, (vals, _) = count_syncs(lambda: monitor(loss, 2, record=True))
    assert syncs == 1 and vals == {"loss": 1.5}
    syncs, _, (vals, _) = count_syncs(lambda: monitor(loss, 4, record=False))  # a checkpoint step: read
    assert syncs == 1 and vals == {"loss": 1.5}
    assert monitor.history == {"loss": [1.5]}  # only logged steps are recorded


def test_step_monitor_lets_several_processes_agree_on_a_stop_within_a_few_steps():
    """With --log-every 100 a signal must not wait 100 steps for the ranks' agreement (a launcher
    kills the ranks ~30 s after SIGTERM): the all-reduce also runs every STOP_CHECK_EVERY steps."""
    monitor = _monitor(checkpointing_steps=10**6)
    monitor.run.world = 2
    loss = {"loss": torch.tensor(1.5)}
    monitor.stop.requested = True
    stops = [monitor(loss, step, record=False)[1] for step in range(1, utils.STOP_CHECK_EVERY + 1)]
    assert stops == [False] * (utils.STOP_CHECK_EVERY - 1) + [True]
    assert monitor.stopped_at == utils.STOP_CHECK_EVERY


def test_step_monitor_catches_a_nan_of_an_unread_step_at_the_next_read():
    monitor = _monitor()
    monitor({"a": torch.tensor(1.0), "b": torch.tensor(float("nan"))}, 5, record=False)
    monitor({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}, 6, record=False)
    with pytest.raises(utils.NonFiniteLossError, match="non-finite b at steps 5-7"):
        monitor({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}, 7, record=True)


def test_scalars_to_host_reads_once():
    logs = {"a": torch.tensor(1.0), "b": torch.tensor([2.0]), "image": torch.zeros(2, 2), "n": 3}
    syncs, _, out = count_syncs(lambda: utils.scalars_to_host(logs))
    assert out == {"a": 1.0, "b": 2.0} and syncs == 1


def test_training_loader_keeps_workers_unless_the_dataset_chooses_per_epoch():
    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return i

    class PerEpoch(Plain):
        def set_epoch(self, epoch):
            pass

    args = SimpleNamespace(num_workers=1, seed=0)
    assert utils.training_loader(Plain(), 2, None, args).persistent_workers
    assert not utils.training_loader(PerEpoch(), 2, None, args).persistent_workers
    assert utils.training_loader(Plain(), 2, None, SimpleNamespace(num_workers=0, seed=0)).prefetch_factor is None


# ------------------------------------------------------------------------------------------ sampling
def test_sit_inference_skips_the_projectors_with_the_same_velocity():
    from torch.utils.flop_counter import FlopCounterMode

    from models.sit import build_sit

    torch.manual_seed(0)
    sit = build_sit("SiT-N/2", input_size=8, in_channels=4, num_classes=10, z_dims=[32], encoder_depth=2,
                    projector_dim=64).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad(), FlopCounterMode(display=False) as full:
        reference, zs = sit._network(x, t, y)
    with torch.no_grad(), FlopCounterMode(display=False) as lean:
        v = sit.inference(x, t, y)
    assert len(zs) == 1 and torch.equal(v, reference)
    assert lean.get_total_flops() < full.get_total_flops()


class _Field:
    """A velocity field with no host reads of its own: v = -x + t."""
    num_classes = 3

    def inference(self, x, t, y):
        return -x + t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def test_samplers_keep_the_time_grid_on_the_host_with_unchanged_results():
    from samplers import euler_maruyama_sampler, euler_sampler, time_grid

    z, y = torch.randn(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    syncs, _, out = count_syncs(lambda: euler_sampler(_Field(), z, y, num_steps=5, heun=True, shift=2.0))
    assert syncs == 1  # the one read of the host grid (free on CUDA too); it was two per step
    # the per-step .item() loop it replaced
    ts, x = time_grid(5, 2.0), z.double()

    def v(x, t):  # the model runs in the latents' dtype, the state stays float64
        return _Field().inference(x.float(), torch.full((2,), t, dtype=torch.float64).float(), y).double()

    for i in range(5):
        t_cur, t_next = ts[i].item(), ts[i + 1].item()
        d = v(x, t_cur)
        x_next = x + (t_next - t_cur) * d
        if i < 4:
            d2 = v(x_next, t_next)
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d2)
        x = x_next
    assert torch.equal(out, x)
    syncs, _, _ = count_syncs(lambda: euler_maruyama_sampler(_Field(), z, y, num_steps=4))
    assert syncs == 1


def test_rae_grid_sampler_reads_the_grid_once_with_unchanged_results():
    import transport

    sampler = transport.Sampler(transport.Transport(time_dist_shift=3.0))
    z = torch.randn(2, 1, 2, 2, dtype=torch.float64)

    def velocity(x, t, y=None):
        return -x * t.view(-1, 1, 1, 1)

    syncs, _, traj = count_syncs(lambda: sampler.sample_ode("euler", 6)(z, velocity))
    assert syncs == 2  # the host grid and its steps, read once each (it was one device read per step)
    ts, x = sampler.time_grid(6), z
    for k in range(5):  # the per-step tensor loop it replaced
        dt = ts[k + 1] - ts[k]
        x = x + dt * velocity(x, torch.full((2,), float(ts[k])))
    assert torch.equal(traj[-1], x)


# ------------------------------------------------------------------------------------------ the benches
KEYS = {"bench", "config", "device", "commit", "date", "batch", "s_per_step_median", "images_per_s",
        "peak_memory_gib", "flops_per_image", "mfu", "kernels_per_step", "syncs_per_step", "saved_activation_bytes"}
FAST = ["--warmup", "0", "--steps", "1"]


def _check_lines(lines, capsys):
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert printed == lines
    for line in lines:
        assert KEYS <= set(line), line
        assert line["device"] == "cpu" and line["flops_per_image"] > 0 and line["kernels_per_step"] > 0
        assert line["s_per_step_median"] > 0 and line["steps_timed"] == 1


def test_train_repae_step_tiny_and_checkpointing_and_lean_lpips_cut_saved_bytes(capsys):
    import train_repae_step

    base = ["--preset", "tiny", "--batch-size", "2", "--num-workers", "0", *FAST]
    plain = train_repae_step.main(base)
    ckpt = train_repae_step.main(base + ["--grad-checkpointing", "sit,vae,lpips"])
    lpips_graph = train_repae_step.main(base + ["--no-lpips-lean-head"])
    _check_lines([plain, ckpt, lpips_graph], capsys)
    assert plain["syncs_per_step"] <= 3  # the losses' one read at --log-every 1, and two from the loss module
    assert ckpt["saved_activation_bytes"] < 0.7 * plain["saved_activation_bytes"]
    assert ckpt["flops_per_image"] > plain["flops_per_image"]  # the recomputation
    # the trainer's default lean LPIPS head keeps less than the lpips package's graph, for no FLOPs
    assert plain["saved_activation_bytes"] < lpips_graph["saved_activation_bytes"]
    assert plain["flops_per_image"] <= lpips_graph["flops_per_image"]


def test_lpips_memory_bench_orders_the_options(capsys):
    """bench/lpips_memory.py: each option keeps less than the one before; only checkpointing adds FLOPs."""
    import lpips_memory

    lines = lpips_memory.main(["--batch-size", "1", "--resolution", "16"])
    assert [json.loads(x)["config"] for x in capsys.readouterr().out.splitlines()] == list(lpips_memory.CONFIGS)
    saved = [line["saved_bytes"] for line in lines]
    assert saved == sorted(saved, reverse=True) and len(set(saved)) == 4
    flops = [line["gflops"] for line in lines]
    assert flops[0] == flops[1] == flops[2] < flops[3]


@pytest.mark.parametrize("model", ["SiT-XL/2", "DiTDH-XL"])
def test_train_ldm_step_tiny(model, capsys):
    import train_ldm_step

    _check_lines([train_ldm_step.main(["--model", model, "--num-workers", "0", *FAST])], capsys)


def test_sample_tiny(capsys):
    import sample

    lines = sample.main(["--model", "SiT-XL/2", "--recipe", "repae-ode-50", "--batch-size", "2", *FAST])
    _check_lines(lines, capsys)
    assert lines[0]["syncs_per_step"] <= 2  # the host grid (and the labels), never one per sampler step
    # generate.py's loop with the background writer, streamed features and bf16 decode
    lines = sample.main(["--model", "SiT-XL/2", "--recipe", "repae-ode-50", "--batch-size", "2", "--output", "writer",
                         "--stream-eval", "--decode-precision", "bf16", *FAST])
    _check_lines(lines, capsys)
    assert lines[0]["output"] == "writer" and lines[0]["stream_eval"] and lines[0]["decode_precision"] == "bf16"


def test_train_stage1_step_tiny(capsys):
    import train_stage1_step

    _check_lines(train_stage1_step.main(["--recipe", "tiny-rae", "--batch-size", "2", "--num-workers", "0", *FAST]), capsys)


# ------------------------------------------------------------------------------------------ REPA-E --compile
def test_compile_covers_every_trained_network_and_the_alignment_pass(monkeypatch, tmp_path):
    """--compile compiles the SiT, VAE, LPIPS and discriminator in place, and the frozen-SiT
    alignment pass runs the compiled SiT (recorded through a stand-in for torch.compile)."""
    from collections import Counter

    import train_repae
    from datasources import make_procedural_dataset

    calls = Counter()

    def recording_compile(fn, *args, **kwargs):
        owner = type(fn.__self__).__name__

        def compiled(*a, **k):
            calls[owner] += 1
            return fn(*a, **k)

        return compiled

    monkeypatch.setattr(torch, "compile", recording_compile)
    data = make_procedural_dataset(tmp_path / "data", num_classes=4, per_class=2, resolution=32, seed=0)
    train_repae.main(train_repae.parse_args([
        "--data-dir", str(data), "--output-dir", str(tmp_path), "--exp-name", "c", "--resolution", "32",
        "--num-classes", "4", "--model", "SiT-N/4", "--vae", "tiny-f4d4", "--enc-type", "dinov2-vit-tiny",
        "--projector-dim", "32", "--encoder-depth", "2", "--batch-size", "4", "--max-train-steps", "1",
        "--sampling-steps", "0", "--num-workers", "0", "--report-to", "none", "--random-init-vae",
        "--random-init-encoders", "--lpips-weights", "random", "--compile"]))
    assert calls["SiT"] == 2  # the alignment pass and the SiT update
    assert calls["AutoencoderKL"] == 1 and calls["PerceptualLoss"] >= 1 and calls["NLayerDiscriminator"] >= 2


def test_loader_benches_tiny(tmp_path, capsys):
    import image_loader
    import latent_loader

    lines = image_loader.main(["--workers", "0", "--batch-size", "4", "--num-images", "8", "--resolution", "32",
                               "--epochs", "1", "--work-dir", str(tmp_path / "img")])
    lines += latent_loader.main(["--f8-samples", "16", "--rae-samples", "4", "--batch-size", "4", "--num-workers", "0",
                                 "--seconds", "0.2", "--dir", str(tmp_path)])
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert printed == lines and len(lines) == 5 + 6
    assert all((x.get("images_per_s") or x.get("samples_per_s")) > 0 for x in lines)


def test_rae_grid_guidance_is_decided_on_the_host_with_unchanged_results():
    import samplers
    import transport

    class LabelField(_Field):
        def inference(self, x, t, y):
            return super().inference(x, t, y) + 0.1 * y.view(-1, 1, 1, 1).to(x.dtype)

    z, y = torch.randn(2, 1, 2, 2), torch.tensor([0, 2])
    kw = dict(mode="ode", solver="euler", num_steps=8, time_grid="rae", shift=2.0, cfg_scale=3.0,
              guidance_low=0.0, guidance_high=0.6)
    syncs, _, out = count_syncs(lambda: samplers.run_sampler(LabelField(), z, y, kw))
    assert syncs == 2  # the host grid and its steps; the guidance decision read t[0] at every step before
    # the path it replaced: the guided field's own decision from the device time
    field = samplers.GuidedVelocity(LabelField(), 3.0, 0.0, 0.6, None, None)
    sampler = transport.Sampler(transport.Transport(time_dist_shift=2.0))
    reference = sampler.sample_ode("euler", 8)(
        z.double(), lambda x, t, y: field.inference(x.float(), t.float(), y).to(x.dtype), y=y)[-1]
    assert torch.equal(out, reference)


# ------------------------------------------------------------------------------------------------ memory model
def test_memory_estimate_extrapolates_saved_bytes_exactly():
    """bench/memory_estimate.py, tiny RAE with every checkpointing option under bf16: the saved
    bytes extrapolated from depth and batch {2, 3} equal those counted directly at (depth 4,
    batch 5), per phase, to the byte; the state counts AdamW's two fp32 moments and DDP's buckets."""
    import memory_estimate as me

    [est] = me.main(["--tiny", "--only", "rae-xl", "--precision", "bf16", "--option-set", "all", "--world", "2"])
    assert est["config"] == "tiny-rae-xl" and est["max_rss_gib"] < 6
    assert est["saved_extrapolated"] == est["saved_direct"]
    assert est["saved_per_block_per_sample"]["generator"] > 0 and est["peak_live"] > 0
    parts, trainable = est["state_parts"], est["params"]["tokenizer"]["trainable"]
    assert parts["tokenizer.adamw_moments"] == 8 * trainable and parts["tokenizer.ddp_buckets"] == 4 * trainable
    assert parts["tokenizer.ema"] == parts["tokenizer.params"]  # the EMA copies the whole RAE, encoder included


@pytest.mark.parametrize("kind", ["rae", "repae"])
def test_memory_estimate_fake_count_matches_the_real_one(kind):
    """The XL figures come from fake tensors (no data): at tiny sizes the same step over real
    tensors saves the same bytes and reaches the same live peak. Tolerance 1e-3: under bf16 with
    checkpointing one small saved storage is sized differently by the fake kernels (136 bytes of
    ~1.5 MB at depth 2, batch 2; the float32 step without checkpointing matched to the byte)."""
    import memory_estimate as me

    opts = me.OPTION_SETS[kind]["all"]
    real = me.measure(kind, True, 1, 2, "bf16", opts, fake=False)
    fake = me.measure(kind, True, 1, 2, "bf16", opts, fake=True)
    assert real["state"] == fake["state"] and real["grads"] == fake["grads"]
    for phase, n in real["saved"].items():
        assert fake["saved"][phase] == pytest.approx(n, rel=1e-3), phase
    assert fake["peak_live"] == pytest.approx(real["peak_live"], rel=1e-3)
