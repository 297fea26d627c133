"""End-to-end tests of train_ldm_only.py on latents cached by cache_latents.py from a tiny generated
dataset: every family trains and writes its artefacts, resume is exact, the SiT's latent
normalisation stays fixed, a 2-process gloo run works, and bad input gets clear errors."""
import re
from pathlib import Path

import pytest
import torch

import cache_latents
import train_ldm_only
import utils
from datasources import make_procedural_dataset
from models.diffusion import LatentNormalizer, VelocityModel, flow_matching_loss
from tests.cli import to_argv
from tests.multiprocess_runs import differing_tensors, launch_two_processes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm")
    images = make_procedural_dataset(root / "images", num_classes=4, per_class=5, resolution=32, seed=0)
    latents = root / "latents"
    cache_latents.main(cache_latents.build_args([
        "--data-dir", str(images), "--output-dir", str(latents), "--tokenizer", "kl", "--vae", "tiny-f4d4",
        "--random-init", "--seed", "3", "--resolution", "32", "--batch-size", "8", "--shard-size", "8",
        "--flip", "--num-workers", "0", "--dtype", "float32"]))
    return images, latents


def flags(latents, out, name, steps, **extra):
    f = {"latents-dir": latents, "output-dir": out, "exp-name": name, "num-classes": 4, "model": "SiT-N/2",
         "batch-size": 4, "max-train-steps": steps, "checkpointing-steps": 2, "sampling-steps": 2,
         "sample-num-steps": 2, "num-sample-images": 4, "num-workers": 0, "report-to": "none", "seed": 3,
         "vae": "tiny-f4d4"}
    return to_argv(f, extra, ["--no-compile", "--random-init-vae"])


def run(argv):
    return train_ldm_only.main(train_ldm_only.parse_args(argv))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_sit_with_repa_writes_everything_and_keeps_latent_stats_fixed(data, tmp_path):
    images, latents = data
    summary = run(flags(latents, tmp_path, "sit", 3, model="SiT-N/4", enc_type="dinov2-vit-tiny", data_dir=images,
                        projector_dim=32, encoder_depth=2, random_init_encoders=True))
    exp = tmp_path / "sit"
    assert utils.list_checkpoints(exp / "checkpoints") == [2, 3]
    assert sorted(p.name for p in (exp / "samples").glob("*.png")) == ["0000001.png", "0000002.png", "0000003.png"]
    assert set(summary["losses"]) == {"loss", "denoising_loss", "proj_loss"}
    assert all(torch.isfinite(torch.tensor(v["last"])) for v in summary["losses"].values())
    assert summary["losses"]["proj_loss"]["last"] != 0.0
    ckpt = load(exp / "checkpoints/0000003.pt")
    stats = torch.load(latents / "latents_stats.pt", map_location="cpu", weights_only=False)
    # the BatchNorm holds the folder's exact statistics before and after training (model and EMA)
    for key in ("model", "ema"):
        torch.testing.assert_close(ckpt[key]["bn.running_mean"], stats["channel_mean"].float())
        torch.testing.assert_close(ckpt[key]["bn.running_var"], stats["channel_var"].float())
    assert ckpt["model_config"]["family"] == "sit" and ckpt["tokenizer"]["kind"] == "kl"
    assert not list(exp.rglob("*.tmp*"))


@pytest.mark.parametrize("model,extra", [
    ("LightningDiT-N/1", dict(weighting="logit-normal", direction_loss_weight=1.0, lr_schedule="linear",
                              lr_decay_start=2, final_lr=1e-5)),
    ("DiTDH-N", dict(weighting="logit-normal", time_shift="auto", latent_norm="position", sample_shift="auto")),
])
def test_resume_is_exact(data, tmp_path, model, extra):
    _, latents = data
    run(flags(latents, tmp_path, "full", 4, model=model, sampling_steps=0, **extra))
    run(flags(latents, tmp_path, "half", 2, model=model, sampling_steps=0, **extra))
    summary = run(flags(latents, tmp_path, "half", 4, model=model, sampling_steps=0, resume="latest", **extra))
    assert summary["start_step"] == 2
    a, b = load(tmp_path / "full/checkpoints/0000004.pt"), load(tmp_path / "half/checkpoints/0000004.pt")
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert a["sched"] == b["sched"] and a["data"] == b["data"]
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    if "lr_schedule" in extra:  # the LR really decays on the optimizer's clock
        assert a["opt"]["param_groups"][0]["lr"] < 1e-4
    if model.startswith("DiTDH"):
        assert a["latent_stats"]["mode"] == "position" and a["latent_stats"]["mean"].shape == (4, 8, 8)


def test_fewer_classes_than_the_data_is_refused(data, tmp_path):
    _, latents = data
    with pytest.raises(SystemExit, match="4 classes but --num-classes is 1"):
        run(flags(latents, tmp_path, "uncond", 1, model="LightningDiT-N/1", num_classes=1))


def test_two_processes_resume_is_exact_and_ranks_stay_identical(data, tmp_path):
    """2 gloo processes with gradient accumulation across an epoch boundary: 4 steps == 2 steps +
    resume + 2 steps, bit for bit, and after every step every rank holds bit-identical model, EMA
    and optimizer states (--check-ranks-every 1). Today the EMA differs between ranks from the start."""
    _, latents = data
    common = dict(model="LightningDiT-N/1", batch_size=8, gradient_accumulation_steps=2, check_ranks_every=1,
                  direction_loss_weight=1.0, weighting="logit-normal")
    launch_two_processes("train_ldm_only", [flags(latents, tmp_path, "full", 4, sampling_steps=4, **common),
                                            flags(latents, tmp_path, "split", 2, sampling_steps=0, **common),
                                            flags(latents, tmp_path, "split", 4, sampling_steps=0, resume="latest",
                                                  **common)], tmp_path)
    log = (tmp_path / "full/log.txt").read_text()
    assert "2 process(es)" in log and "batch 8 = 2 x 2 x 2" in log
    assert (tmp_path / "full/samples/0000004.png").is_file()
    a, b = load(tmp_path / "full/checkpoints/0000004.pt"), load(tmp_path / "split/checkpoints/0000004.pt")
    assert len(a["rng"]) == 2 and a["data"] == b["data"] and a["data"]["epoch"] == 1  # crossed an epoch
    assert differing_tensors(a, b, ("model", "ema"), ("opt",)) == []
    assert not torch.equal(a["ema"]["final_layer.linear.weight"], a["model"]["final_layer.linear.weight"])


def test_bad_input_is_named(data, tmp_path):
    images, latents = data
    # a tokenizer other than the one that wrote the latents (another seed = other weights)
    argv = flags(latents, tmp_path, "tok", 1, model="LightningDiT-N/1")
    argv[argv.index("--seed") + 1] = "4"
    with pytest.raises(Exception, match="latents"):
        run(argv)
    with pytest.raises(SystemExit, match="REPA loss needs a SiT"):
        run(flags(latents, tmp_path, "repa", 1, model="DiTDH-N", enc_type="dinov2-vit-tiny", data_dir=images,
                  random_init_encoders=True))
    bad = tmp_path / "nostats"
    bad.mkdir()
    for p in latents.rglob("*"):
        if p.is_file() and p.name != "latents_stats.pt":
            dst = bad / p.relative_to(latents)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(p.read_bytes())
    with pytest.raises(Exception, match="latents_stats.pt"):
        run(flags(bad, tmp_path, "nostats", 1, model="LightningDiT-N/1"))


def test_direction_loss_and_time_reversal():
    """flow_matching_loss: zero for the exact field; a data-at-1 network is read in our convention."""
    torch.manual_seed(0)
    x, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.rand(3)

    class Oracle(torch.nn.Module):  # knows the pair: v = eps - x in the toolkit's convention
        num_classes = 1

        def forward(self, xt, tt, y):
            return noise - x

    loss, logs = flow_matching_loss(VelocityModel(Oracle()), x, torch.zeros(3, dtype=torch.long), t, noise, 1.0)
    assert loss.abs().max() < 1e-6 and logs["direction"].abs() < 1e-6

    class DataAtOne(torch.nn.Module):  # the same field written as hustvl's LightningDiT would predict it
        num_classes = 1

        def forward(self, xt, tt, y):
            assert torch.allclose(tt, 1 - t)
            return x - noise

    loss, _ = flow_matching_loss(VelocityModel(DataAtOne(), data_at_one=True), x, torch.zeros(3, dtype=torch.long), t, noise)
    assert loss.abs().max() < 1e-6
    norm = LatentNormalizer(torch.ones(4), torch.full((4,), 4.0))
    torch.testing.assert_close(norm.denormalize(norm(x)), x)
    torch.testing.assert_close(norm(torch.ones(1, 4, 2, 2)), torch.zeros(1, 4, 2, 2))


def test_unconditional_training_on_a_flat_folder(data, tmp_path):
    images, _ = data
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted(images.rglob("*.png"))[:8]):
        (flat / f"{i:03d}.png").write_bytes(p.read_bytes())
    latents = tmp_path / "latents"
    cache_latents.main(cache_latents.build_args([
        "--data-dir", str(flat), "--output-dir", str(latents), "--tokenizer", "kl", "--vae", "tiny-f4d4",
        "--random-init", "--seed", "3", "--resolution", "32", "--batch-size", "8", "--num-workers", "0"]))
    summary = run(flags(latents, tmp_path, "uncond", 2, model="LightningDiT-N/1", num_classes=1))
    assert summary["end_step"] == 2 and (tmp_path / "uncond/samples/0000002.png").is_file()
    ckpt = load(tmp_path / "uncond/checkpoints/0000002.pt")
    assert ckpt["model"]["y_embedder.embedding_table.weight"].shape[0] == 2  # one class + the null label


def test_periodic_fid_uses_the_shared_evaluation_path(data, tmp_path):
    import numpy as np

    from datasources import build_image_dataset

    images, latents = data
    ds = build_image_dataset(images, 32)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.stack([ds[i][0].permute(1, 2, 0).numpy() for i in range(len(ds))]))
    summary = run(flags(latents, tmp_path, "eval", 2, model="LightningDiT-N/1", sampling_steps=0, eval_every=2,
                        eval_samples=8, eval_batch_size=4, eval_num_steps=2, eval_reference=ref,
                        random_init_inception=True, inception_image_size=75, eval_metrics="fid"))
    fid = summary["evaluations"][2]["fid"]
    assert fid > 0 and np.isfinite(fid) and summary["evaluations"][2]["num_samples"] == 8
    assert "eval at step 2: " in (tmp_path / "eval/log.txt").read_text()


@pytest.mark.parametrize("config", sorted((ROOT / "configs/ldm").glob("*.yaml")), ids=lambda p: p.stem)
def test_published_recipes_parse(config):
    args = train_ldm_only.parse_args(["--config", str(config), "--latents-dir", "x", "--eval-reference", "ref.npz"])
    assert args.model in train_ldm_only.DIFFUSION_MODELS
    # the published ImageNet recipes train at batch >= 256; the domain recipe is for a few hundred images
    assert args.batch_size >= (32 if config.stem == "lightningdit_domain_small" else 256)


def test_lightningdit_recipes_carry_the_published_values():
    """The published LightningDiT configs train without qk-norm and without gradient clipping."""
    for name in ("lightningdit_xl1_vavae_64ep", "lightningdit_xl1_vavae_800ep"):
        args = train_ldm_only.parse_args(["--config", str(ROOT / f"configs/ldm/{name}.yaml"), "--latents-dir", "x"])
        assert args.qk_norm is False and args.max_grad_norm == 0, name
        assert (args.learning_rate, args.adam_beta2, args.batch_size, args.ema_decay) == (2e-4, 0.95, 1024, 0.9999)
        assert args.direction_loss_weight == 1.0 and args.weighting == "logit-normal"


@pytest.mark.parametrize("argv,message", [
    (["--model", "LightningDiT-N/1", "--path-type", "cosine"], "--path-type cosine is the SiT's option"),
    (["--model", "DiTDH-N", "--path-type", "cosine"], "--path-type cosine is the SiT's option"),
    (["--model", "SiT-N/2", "--direction-loss-weight", "1"], "--direction-loss-weight is LightningDiT"),
    (["--model", "SiT-N/2", "--bn-momentum", "0.1"], "--bn-momentum has no effect"),
])
def test_flags_that_would_do_nothing_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        train_ldm_only.parse_args(["--latents-dir", "x"] + argv)
    assert message in capsys.readouterr().err
    # what these flags do where they do something is still accepted
    train_ldm_only.parse_args(["--latents-dir", "x", "--model", "SiT-N/2", "--path-type", "cosine"])
    train_ldm_only.parse_args(["--latents-dir", "x", "--model", "LightningDiT-N/1", "--direction-loss-weight", "1"])


def test_resume_on_another_tokenizers_latents_is_refused(data, tmp_path):
    """The checkpoint records the tokenizer of its latents; --resume on a folder written by
    another tokenizer (another weight fingerprint) is refused, as a fresh start is."""
    import json
    import shutil

    _, latents = data
    run(flags(latents, tmp_path, "tok", 1, model="LightningDiT-N/1", sampling_steps=0))
    other = tmp_path / "other-latents"
    shutil.copytree(latents, other)
    info = json.loads((other / "tokenizer.json").read_text())
    info["fingerprint"] = "0" * len(str(info["fingerprint"]))
    (other / "tokenizer.json").write_text(json.dumps(info))
    with pytest.raises(SystemExit, match="another tokenizer.*fingerprint"):
        run(flags(other, tmp_path, "tok", 2, model="LightningDiT-N/1", sampling_steps=0, resume="latest"))
    assert utils.list_checkpoints(tmp_path / "tok/checkpoints") == [1]


def test_resume_with_another_batch_size_or_nothing_to_resume_says_so(data, tmp_path):
    _, latents = data
    base = dict(model="LightningDiT-N/1", sampling_steps=0, checkpointing_steps=1)
    run(flags(latents, tmp_path, "bs", 1, **base))
    with pytest.raises(SystemExit, match="--batch-size 8: .* was trained with --batch-size 4"):
        run(flags(latents, tmp_path, "bs", 2, batch_size=8, resume="latest", **base))
    # the same batch split into 2 accumulated micro-batches: the data position is converted exactly
    summary = run(flags(latents, tmp_path, "bs", 2, gradient_accumulation_steps=2, resume="latest", **base))
    assert summary["start_step"] == 1
    log = (tmp_path / "bs/log.txt").read_text()
    assert "data position converted from micro-batches of 4 to 2 images: batch 1 -> 2" in log
    # --resume latest on a misspelled experiment: it says so (and names the near miss)
    summary = run(flags(latents, tmp_path, "bss", 1, resume="latest", **base))
    assert summary["start_step"] == 0
    log = (tmp_path / "bss/log.txt").read_text()
    assert "--resume latest: nothing to resume" in log and "the experiment folder did not exist" in log
    assert "similar names: bs" in log


def test_fsdp_matches_ddp_resumes_exactly_and_writes_ddp_checkpoints(data, tmp_path):
    """--fsdp (2 gloo processes, gradient accumulation, clipping active at every step): the same
    weights, EMA and AdamW moments as DDP; resuming its step-2 checkpoint with --fsdp gives its
    step-4 checkpoint bit for bit, and with DDP the DDP run's; its checkpoints have the DDP keys."""
    _, latents = data
    common = dict(model="LightningDiT-N/1", batch_size=8, gradient_accumulation_steps=2, check_ranks_every=1,
                  max_grad_norm=0.05, sampling_steps=0)
    resumed = dict(continue_train_exp_dir=tmp_path / "fsdp", resume_step=2, **common)
    launch_two_processes("train_ldm_only", [flags(latents, tmp_path, "ddp", 4, **common),
                                            flags(latents, tmp_path, "fsdp", 4, fsdp=True, sampling_steps=4,
                                                  **{k: v for k, v in common.items() if k != "sampling_steps"}),
                                            flags(latents, tmp_path, "fsdp-resumed", 4, fsdp=True, **resumed),
                                            flags(latents, tmp_path, "ddp-from-fsdp", 4, **resumed)], tmp_path)
    ddp, sharded = load(tmp_path / "ddp/checkpoints/0000004.pt"), load(tmp_path / "fsdp/checkpoints/0000004.pt")
    # (3) the DDP layout: same keys, shapes and dtypes everywhere, optimizer keyed by parameter index
    assert ddp.keys() == sharded.keys()
    for part in ("model", "ema"):
        assert {k: (v.shape, v.dtype) for k, v in ddp[part].items()} == \
               {k: (v.shape, v.dtype) for k, v in sharded[part].items()}
    assert ddp["opt"]["param_groups"] == sharded["opt"]["param_groups"]
    assert {i: {k: v.shape for k, v in st.items()} for i, st in ddp["opt"]["state"].items()} == \
           {i: {k: v.shape for k, v in st.items()} for i, st in sharded["opt"]["state"].items()}
    # (1) the same training: only the reductions' summation order differs (the gradient norm is
    # summed per shard, then over shards), a few ulps of the weights
    def assert_close(a, b):
        for part in ("model", "ema"):
            for k, v in a[part].items():
                torch.testing.assert_close(b[part][k], v, rtol=0, atol=1e-6 * max(v.abs().max().item(), 1e-3),
                                           msg=lambda m: f"{part}.{k}: {m}")
        for i, st in a["opt"]["state"].items():
            for k, v in st.items():
                torch.testing.assert_close(b["opt"]["state"][i][k], v, rtol=1e-4, atol=1e-12)
    assert_close(ddp, sharded)
    assert not torch.equal(ddp["ema"]["final_layer.linear.weight"], ddp["model"]["final_layer.linear.weight"])
    # (2) exact resume under --fsdp; and DDP continues an FSDP checkpoint
    assert differing_tensors(sharded, load(tmp_path / "fsdp-resumed/checkpoints/0000004.pt"),
                             ("model", "ema"), ("opt",)) == []
    assert_close(ddp, load(tmp_path / "ddp-from-fsdp/checkpoints/0000004.pt"))
    # the sample grid decodes the gathered EMA; each process holds half of the state
    assert (tmp_path / "fsdp/samples/0000004.png").is_file()
    held = {}
    for name in ("ddp", "fsdp"):
        line = next(x for x in (tmp_path / name / "log.txt").read_text().splitlines() if "per-process training" in x)
        held[name] = [float(v) for v in re.findall(r"([0-9.]+) MiB", line)]
    for full, half in zip(held["ddp"], held["fsdp"]):
        assert half == pytest.approx(full / 2, rel=0.02), held


def test_fsdp_defaults_on_a_gpu(monkeypatch):
    """On a GPU the script's defaults (fp16, compile) are what --fsdp refuses: --fsdp alone gets bf16
    and no compile instead, while explicit flags still win (and are refused below)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    plain = train_ldm_only.parse_args(["--latents-dir", "x"])
    sharded = train_ldm_only.parse_args(["--latents-dir", "x", "--fsdp"])
    assert (plain.mixed_precision, plain.compile) == ("fp16", True)
    assert (sharded.mixed_precision, sharded.compile) == ("bf16", False)
    assert train_ldm_only.parse_args(["--latents-dir", "x", "--fsdp", "--mixed-precision", "no"]).mixed_precision == "no"


def test_fsdp_refuses_what_it_does_not_support(data, tmp_path):
    from argparse import Namespace

    from utils.fsdp import check_fsdp_args, shard_blocks

    _, latents = data
    with pytest.raises(SystemExit, match="--fsdp with --mixed-precision fp16 is not supported"):
        check_fsdp_args(Namespace(fsdp=True, compile=False, mixed_precision="fp16"))
    with pytest.raises(SystemExit, match="--fsdp with --compile is not supported"):
        train_ldm_only.parse_args(["--latents-dir", "x", "--fsdp", "--compile"])
    with pytest.raises(SystemExit, match="--fsdp shards over processes"):
        run(flags(latents, tmp_path, "one", 1, model="LightningDiT-N/1", fsdp=True))
    with pytest.raises(SystemExit, match="--fsdp: Linear has no transformer blocks"):
        shard_blocks(torch.nn.Linear(2, 2), mesh=None)


def test_compile_compiles_the_whole_step_with_the_eager_random_stream(data, tmp_path, monkeypatch):
    """--compile hands the loss module (normalisation, noising, network, losses) to torch.compile
    (here with the fast aot_eager backend); two steps then give the eager run's weights: the same
    random numbers reach the same places."""
    from loss.latent_diffusion import LatentDiffusionLoss

    images, latents = data
    compiled, torch_compile = [], torch.compile

    def aot_eager_compile(module, **kw):
        compiled.append(module)
        return torch_compile(module, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", aot_eager_compile)
    extra = dict(model="SiT-N/4", enc_type="dinov2-vit-tiny", data_dir=images, projector_dim=32, encoder_depth=2,
                 random_init_encoders=True, sampling_steps=0, cfg_prob=0.5, weighting="lognormal")
    run(flags(latents, tmp_path, "eager", 2, **extra))
    assert not compiled
    run(flags(latents, tmp_path, "compiled", 2, compile=True, **extra))
    assert len(compiled) == 1 and isinstance(compiled[0], LatentDiffusionLoss)
    a, b = load(tmp_path / "eager/checkpoints/0000002.pt"), load(tmp_path / "compiled/checkpoints/0000002.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    torch._dynamo.reset()
