"""End-to-end tests of train_stage1.py (and its export through save_vae_weights.py) on tiny
recipes and a generated 32px dataset: every tokenizer kind trains and writes checkpoints, grids
and evaluation metrics; exact resume (VQGAN with the EMA codebook and --disc-every 2, and RAE
with EMA, noise, DiffAug and cosine schedules); a 2-process gloo run; 1-channel data end to end;
clear errors; export + strict reload."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import save_vae_weights
import train_stage1
import utils
from datasources import make_procedural_dataset
from tests.cli import free_port, to_argv

ROOT = Path(__file__).resolve().parents[1]
CKPT_KEYS = ("model", "loss", "opt", "opt_disc", "sched", "sched_disc", "args", "steps", "rng", "data")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_procedural_dataset(tmp_path_factory.mktemp("stage1") / "data", num_classes=3, per_class=4,
                                   resolution=40, seed=0)


@pytest.fixture(scope="module")
def gray_dir(data_dir, tmp_path_factory):
    """The same images as single-channel PNGs in class folders of arbitrary names."""
    out = tmp_path_factory.mktemp("gray") / "spectrograms"
    for i, f in enumerate(sorted(data_dir.rglob("*.png"))):
        d = out / f"user_{i % 2:02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("L").save(d / f"{i:03d}.png")
    return out


NO_LPIPS = {"perceptual_weight": 0, "eval_metrics": "rfid,psnr,ssim"}


def flags(kind, data_dir, out, name, steps, **extra):
    opts = {"config": ROOT / f"configs/stage1/tiny_{kind}.yaml", "data-dir": data_dir, "output-dir": out,
            "exp-name": name, "max-train-steps": steps, "checkpointing-steps": 2, "sampling-steps": 1,
            "eval-samples": 0, "seed": 3}
    return to_argv(opts, extra)


def run(argv):
    return train_stage1.main(train_stage1.parse_args(argv))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_state(a, b, what):
    if isinstance(a, dict):
        assert set(a) == set(b), what
        for k in a:
            assert_same_state(a[k], b[k], f"{what}.{k}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{what} differs"
    else:
        assert a == b, f"{what} differs: {a} vs {b}"


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Short runs shared by the artefact and export tests: {kind: experiment folder}."""
    out = tmp_path_factory.mktemp("runs")
    # LPIPS (a random VGG16: ~2 s to build) in the kl / vavae runs; vqgan / rae go without it.
    for kind in ("kl", "vavae"):
        run(flags(kind, data_dir, out, kind, 2, eval_samples=3))
    for kind in ("vqgan", "rae"):
        run(flags(kind, data_dir, out, kind, 2, eval_samples=3, **NO_LPIPS))
    return {kind: out / kind for kind in ("kl", "vavae", "vqgan", "rae")}


@pytest.mark.parametrize("kind", ["kl", "vavae", "vqgan", "rae"])
def test_each_kind_trains_and_writes_everything(runs, kind):
    exp = runs[kind]
    assert utils.list_checkpoints(exp / "checkpoints") == [2]
    ckpt = load(exp / "checkpoints/0000002.pt")
    for key in CKPT_KEYS:
        assert key in ckpt, key
    assert ("ema" in ckpt) == (kind == "rae") and ckpt["tokenizer"] == kind
    assert ckpt["steps"] == 2 and ckpt["data"] == {"epoch": 0, "batch": 2}
    assert any(k.startswith("discriminator.") for k in ckpt["loss"])
    assert (exp / "samples/recon_0000001.png").is_file() and (exp / "samples/recon_0000002.png").is_file()
    assert json.loads((exp / "class_to_idx.json").read_text()) == {"class_00": 0, "class_01": 1, "class_02": 2}
    summary = json.loads((exp / "summary.json").read_text())
    final = summary["final_eval"]
    for m in ("psnr", "ssim", "rfid") + (("lpips",) if kind in ("kl", "vavae") else ()):
        assert np.isfinite(final[m]), m
    assert final["num_samples"] == 3 and summary["end_step"] == 2
    assert set(summary["losses"]) >= {"g_loss", "d_loss"}
    if kind == "vqgan":
        assert 0 < final["codebook_usage"] <= 1 and final["perplexity"] >= 1
        assert "codebook_usage" in summary["losses"] and "perplexity" in summary["losses"]
        # EMA codebook: excluded from the optimizer (only parameters with gradients are optimised)
        n_opt = sum(len(g["params"]) for g in ckpt["opt"]["param_groups"])
        n_model = sum(1 for k in ckpt["model"] if not k.startswith("quantize.") and "running" not in k)
        assert n_opt == n_model
    log = (exp / "log.txt").read_text()
    assert "eval at step 2 (" in log and ("(EMA)" in log) == (kind == "rae")


@pytest.mark.parametrize("kind", ["vqgan", "rae"])
def test_resume_is_bit_identical(data_dir, tmp_path, kind):
    extra = {"lr_total_steps": 4, **NO_LPIPS}  # the schedules' horizon is the full run's in both halves
    full = run(flags(kind, data_dir, tmp_path, "full", 4, **extra))
    run(flags(kind, data_dir, tmp_path, "split", 2, **extra))
    resumed = run(flags(kind, data_dir, tmp_path, "split", 4, resume="latest", **extra))
    assert resumed["start_step"] == 2 and resumed["end_step"] == 4
    a, b = load(tmp_path / "full/checkpoints/0000004.pt"), load(tmp_path / "split/checkpoints/0000004.pt")
    for part in ("model", "ema", "loss", "opt", "opt_disc", "sched", "sched_disc", "data"):
        if part in a:
            assert_same_state(a[part], b[part], part)
    assert a["sched"]["last_epoch"] == 4
    if kind == "vqgan":  # --disc-every 2 from step 1: the discriminator stepped at steps 2 only -> 1 step
        assert a["sched_disc"]["last_epoch"] == 1
    for k in ("g_loss", "d_loss"):
        assert full["losses"][k]["last"] == resumed["losses"][k]["last"]


def test_two_processes_gloo(data_dir, tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
           str(ROOT / "train_stage1.py")] + flags("vqgan", data_dir, tmp_path, "ddp", 2, eval_samples=3, disc_every=1,
                                                               **NO_LPIPS)
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = (tmp_path / "ddp/log.txt").read_text()
    assert "2 process(es)" in log and "batch 4 = 2 x 1 x 2" in log and "eval at step 2 (" in log
    ckpt = load(tmp_path / "ddp/checkpoints/0000002.pt")
    assert len(ckpt["rng"]) == 2 and ckpt["sched_disc"]["last_epoch"] == 1


def test_one_channel_end_to_end_and_export(gray_dir, tmp_path):
    run(flags("kl", gray_dir, tmp_path, "gray", 2, in_channels=1, eval_samples=3, no_augment=True))
    exp = tmp_path / "gray"
    assert json.loads((exp / "class_to_idx.json").read_text()) == {"user_00": 0, "user_01": 1}
    assert np.isfinite(json.loads((exp / "summary.json").read_text())["final_eval"]["lpips"])
    save_vae_weights.main(["--exp-dir", str(exp), "--output-dir", str(tmp_path / "pre"), "--name", "spec"])
    from models.autoencoder import load_vae

    vae, _ = load_vae("tiny-f4d4", tmp_path / "pre/spec.pt", in_channels=1, out_ch=1)
    assert vae.encoder.conv_in.weight.shape[1] == 1
    disc = load(tmp_path / "pre/spec-discriminator-ckpt.pt")
    assert disc["discriminator.main.0.weight"].shape[1] == 1
    # fine-tuning from the export: a new run starts from it
    run(flags("kl", gray_dir, tmp_path, "ft", 1, in_channels=1, no_augment=True, init_from=tmp_path / "pre/spec.pt",
              checkpointing_steps=1, sampling_steps=0))


def test_channel_mismatch_is_a_clear_error(gray_dir, tmp_path):
    with pytest.raises(SystemExit, match="1-channel images .* --in-channels 3"):
        run(flags("kl", gray_dir, tmp_path, "mismatch", 1))


def test_codebook_of_another_size_is_a_clear_error(data_dir, tmp_path):
    from models.vqgan import build_vqgan

    ckpt = tmp_path / "taming.ckpt"
    torch.save({"state_dict": build_vqgan("tiny-f4", n_embed=32).state_dict()}, ckpt)
    with pytest.raises(SystemExit, match=r"--init-from .*taming.ckpt.*32 codes.*64 codes.*--n-embed 32"):
        run(flags("vqgan", data_dir, tmp_path, "badcb", 1, init_from=ckpt))


def test_export_reloads_strictly(runs, tmp_path):
    from models.rae import RAEDecoder
    from models.tokenizers import load_vq_checkpoint
    from models.vqgan import build_vqgan

    for kind in ("vavae", "vqgan", "rae"):
        save_vae_weights.main(["--exp-dir", str(runs[kind]), "--output-dir", str(tmp_path), "--name", kind])
        assert (tmp_path / f"{kind}-discriminator-ckpt.pt").is_file()
    ckpt = load(runs["vqgan"] / "checkpoints/0000002.pt")
    vq = build_vqgan("tiny-f4", quantizer="ema")
    load_vq_checkpoint(vq, tmp_path / "vqgan.pt")  # taming layout: state_dict with loss.* entries dropped
    assert_same_state(vq.state_dict(), ckpt["model"], "vqgan export")
    assert any(k.startswith("loss.discriminator.") for k in load(tmp_path / "vqgan.pt")["state_dict"])
    rae_ckpt = load(runs["rae"] / "checkpoints/0000002.pt")
    dec = load(tmp_path / "rae.pt")  # the released decoder layout, from the EMA
    assert_same_state(dec, {k[len("decoder."):]: v for k, v in rae_ckpt["ema"].items() if k.startswith("decoder.")},
                      "rae export")
    utils.load_state_dict_strict(RAEDecoder(num_tokens=16, in_dim=32, patch_size=8, hidden_size=32, depth=1,
                                            num_heads=2, mlp_dim=64), dec, "rae export")
    from models.autoencoder import load_vae

    vae, _ = load_vae("tiny-f4d4", tmp_path / "vavae.pt", vf_dim=32, reverse_proj=True)  # VF projection kept
    assert vae.linear_proj.weight.shape == (32, 4, 1, 1)


def test_video_clips_are_flattened_to_frames(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("walk", "run"):
        (tmp_path / "clips" / c).mkdir(parents=True)
        for i in range(3):
            np.save(tmp_path / "clips" / c / f"{i}.npy", rng.integers(0, 255, (5, 36, 36, 3), dtype=np.uint8))
    summary = run(flags("kl", tmp_path / "clips", tmp_path, "video", 2, video_frames=2, batch_size=2, eval_samples=4,
                        eval_holdout=True, **NO_LPIPS))
    log = (tmp_path / "video/log.txt").read_text()
    assert "3 clips of 2 frames for training" in log and "batch 2 = 1 x 1 x 2" in log
    # the hold-out counts clips, not frames
    assert "3 clips of 2 frames of --data-dir" in log and "held out for evaluation, 3 clips of 2 frames left" in log
    assert summary["final_eval"]["num_samples"] == 4  # evaluated frame by frame
    assert json.loads((tmp_path / "video/class_to_idx.json").read_text()) == {"run": 0, "walk": 1}


@pytest.mark.parametrize("config", sorted((ROOT / "configs/stage1").glob("*.yaml")), ids=lambda p: p.stem)
def test_recipes_parse(config):
    args = train_stage1.parse_args(["--config", str(config), "--data-dir", "x"])
    assert args.tokenizer in train_stage1.TOKENIZERS and args.resolution > 0


def test_evaluation_set_is_held_out_only_when_asked(data_dir, tmp_path):
    """Default: evaluate on training images that still train; --eval-holdout removes them;
    --eval-data-dir is a separate folder (the papers' rFID is on the validation images)."""
    one = dict(eval_samples=3, checkpointing_steps=1, sampling_steps=0, **NO_LPIPS)
    run(flags("vqgan", data_dir, tmp_path, "shared", 1, **one))
    log = (tmp_path / "shared/log.txt").read_text()
    assert "evaluation on 3 of the 12 training images" in log and "12 images for training" in log
    run(flags("vqgan", data_dir, tmp_path, "held", 1, eval_holdout=True, **one))
    log = (tmp_path / "held/log.txt").read_text()
    assert "--eval-holdout: 3 images of --data-dir" in log and "9 images left for training" in log
    assert "9 images for training, 3 images evaluated" in log
    run(flags("vqgan", data_dir, tmp_path, "sep", 1, eval_data_dir=data_dir, **one))
    log = (tmp_path / "sep/log.txt").read_text()
    assert f"evaluation on --eval-data-dir {data_dir}: 12 images" in log and "12 images for training" in log
    with pytest.raises(SystemExit, match="--eval-holdout .* --eval-data-dir"):
        train_stage1.parse_args(flags("vqgan", data_dir, tmp_path, "x", 1, eval_holdout=True, eval_data_dir=data_dir))


def _recipe(name, *extra):
    return train_stage1.parse_args(["--config", str(ROOT / f"configs/stage1/{name}.yaml"), "--data-dir", "x", *extra])


def test_recipes_carry_the_originals_values():
    for name in ("rae_dinov2b_vitxl_256", "rae_dinov2b_vitxl_512", "rae_small_1gpu"):
        assert _recipe(name).diffaug_policy == "translation,color", name  # the original: translation, then colour
    for name in ("vavae_f16d32_stage1", "vavae_f16d32_stage2", "vavae_f16d32_stage3", "vqgan_f16_imagenet",
                 "vqgan_custom"):  # SmallestMaxSize + RandomCrop
        args = _recipe(name)
        assert args.load_mode == "short-side" and (args.load_size or args.resolution) == args.resolution, name
    for name in ("vavae_f16d32_stage1", "vavae_f16d32_stage2", "vavae_f16d32_stage3", "vavae_domain_finetune"):
        assert _recipe(name).vf_legacy_input, name  # the original VF objective: raw [-1, 1] bilinear input
    assert not _recipe("vavae_domain_finetune", "--no-vf-legacy-input").vf_legacy_input
    # VA-VAE stage 1: disc_start 5001 in Lightning's global_step (two optimizers per batch) -> the
    # discriminator loss from batch 2500 (0-based), the generator's GAN term from batch 2501
    args = _recipe("vavae_f16d32_stage1")
    gen = [s for s in range(2498, 2504) if train_stage1.loss_global_steps(args, s)[0] >= args.disc_start]
    dis = [s for s in range(2498, 2504) if train_stage1.loss_global_steps(args, s)[1] >= args.disc_start]
    assert gen[0] == 2501 and dis[0] == 2500 and train_stage1.first_disc_step(args, 5000) == 0
    assert train_stage1.loss_global_steps(_recipe("vqgan_f16_imagenet"), 7) == (7, 7)  # taming counts batches


def test_lightning_global_step_steps_the_discriminator_optimizer_from_the_first_batch(data_dir, tmp_path):
    """--lightning-global-step with disc_start 5: the discriminator loss counts from step 2
    (2 x 2 + 1 >= 5); before that its Adam steps on a zero loss, as Lightning's, so at its first
    real update the step count is 3 and the moments were 0 until then."""
    run(flags("kl", data_dir, tmp_path, "pl", 3, disc_start=5, lightning_global_step=True, checkpointing_steps=1,
              sampling_steps=0, **NO_LPIPS))
    states = [load(tmp_path / f"pl/checkpoints/{s:07d}.pt")["opt_disc"]["state"] for s in (1, 2, 3)]
    for s, st in zip((1, 2), states[:2]):
        assert all(int(v["step"]) == s and not v["exp_avg"].any() for v in st.values())
    assert all(int(v["step"]) == 3 for v in states[2].values()) and any(v["exp_avg"].any() for v in states[2].values())


def test_discriminator_lr_schedule_follows_the_run_on_its_own_clock():
    """RAE: warmup 1 epoch, cosine to 0.1 x at epoch 16; the discriminator starts at epoch 6 and
    steps the same schedule on its own clock, so it ends 10 epochs in (8.2e-5), as the original."""
    args = _recipe("rae_dinov2b_vitxl_256")
    spe = 100
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt, opt_d = torch.optim.AdamW(params, lr=2e-4), torch.optim.AdamW(params, lr=2e-4)
    first = train_stage1.first_disc_step(args, spe)
    assert first == 600
    sched, sched_d = train_stage1.build_schedulers(opt, opt_d, args, 16 * spe, spe, first)
    for _ in range(10 * spe):
        opt_d.step()
        sched_d.step()
    assert sched_d.get_last_lr()[0] == pytest.approx(8.2189e-5, rel=1e-4)
    args.disc_lr_horizon = "disc-steps"  # ours: fitted to its own 10 epochs of updates
    _, sched_d = train_stage1.build_schedulers(opt, opt_d, args, 16 * spe, spe, first)
    for _ in range(10 * spe):
        opt_d.step()
        sched_d.step()
    assert sched_d.get_last_lr()[0] == pytest.approx(2e-5)


def test_lpips_memory_flags_reach_the_loss(data_dir, tmp_path):
    """--lpips-grad-checkpointing / --no-lpips-lean-head reach every LPIPS of the family's loss
    (the lean head is on, checkpointing off, by default)."""
    from loss.perceptual import LPIPS
    from loss.stage1 import build_loss

    def lpips_options(argv):
        loss_fn, _ = build_loss(train_stage1.parse_args(argv), 3)
        return {(m.lean_head, m.grad_checkpointing) for m in loss_fn.modules() if isinstance(m, LPIPS)}

    base = flags("kl", data_dir, tmp_path, "m", 1)
    assert lpips_options(base) == {(True, False)}
    assert lpips_options(base + ["--no-lpips-lean-head", "--lpips-grad-checkpointing"]) == {(False, True)}
