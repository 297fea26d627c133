"""End-to-end tests of train_stage1.py (and its export through save_vae_weights.py) on tiny
recipes and a generated 32px dataset: every tokenizer kind trains and writes checkpoints, grids
and evaluation metrics; exact resume (VQGAN with the EMA codebook and --disc-every 2, and RAE
with EMA, noise, DiffAug and cosine schedules); a 2-process gloo run; 1-channel data end to end;
clear errors; export + strict reload."""
import json
import os
import re
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
from loss.stage1 import build_schedulers, first_disc_step
from tests.cli import free_port, to_argv
from tests.multiprocess_runs import differing_tensors, launch_two_processes

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


def test_fsdp_rae_matches_ddp_resumes_exactly_and_writes_ddp_checkpoints(data_dir, tmp_path):
    """RAE --fsdp (2 gloo processes, gradient accumulation, the adaptive GAN weight from the first
    step, grids and evaluation from the gathered EMA): the same decoder, EMA and AdamW moments as
    DDP; resuming its step-2 checkpoint gives its step-4 checkpoint bit for bit; the DDP keys."""
    common = dict(batch_size=8, gradient_accumulation_steps=2, check_ranks_every=1, lr_total_steps=4,
                  eval_samples=2, eval_metrics="psnr,ssim", perceptual_weight=0)
    launch_two_processes("train_stage1", [
        flags("rae", data_dir, tmp_path, "ddp", 4, **common),
        flags("rae", data_dir, tmp_path, "fsdp", 4, fsdp=True, **common),
        flags("rae", data_dir, tmp_path, "fsdp-resumed", 4, fsdp=True, continue_train_exp_dir=tmp_path / "fsdp",
              resume_step=2, **common)], tmp_path)
    ddp, sharded = load(tmp_path / "ddp/checkpoints/0000004.pt"), load(tmp_path / "fsdp/checkpoints/0000004.pt")
    assert ddp.keys() == sharded.keys()
    for part in ("model", "ema", "loss"):
        assert {k: (v.shape, v.dtype) for k, v in ddp[part].items()} == \
               {k: (v.shape, v.dtype) for k, v in sharded[part].items()}, part
    assert ddp["opt"]["param_groups"] == sharded["opt"]["param_groups"]
    # The same training (the adaptive weight takes the same full, local gradient of decoder_pred.weight)
    # up to rounding: the sharded path computes from gathered copies of the weights and differs from
    # DDP in the last bits (about 1e-7 of each tensor's scale after 4 steps). The key projection's
    # bias has an analytically zero gradient (softmax ignores a shift shared by all keys): its AdamW
    # moments are rounding noise, as large as themselves, in both runs.
    def close(a, b, what, rel=1e-5):
        torch.testing.assert_close(b, a, rtol=0, atol=rel * a.abs().max().item(), msg=lambda m: f"{what}: {m}")

    for part in ("model", "ema", "loss"):
        for k, v in ddp[part].items():
            close(v, sharded[part][k], f"{part}.{k}")
    names = [k for k in ddp["model"] if k.startswith("decoder.") and k != "decoder.decoder_pos_embed"]
    assert len(names) == len(ddp["opt"]["state"])
    for i, st in ddp["opt"]["state"].items():
        for k, v in st.items():
            if names[i].endswith("attention.key.bias") and k != "step":
                assert v.abs().max() < 1e-9 and sharded["opt"]["state"][i][k].abs().max() < 1e-9
            else:
                close(v, sharded["opt"]["state"][i][k], f"opt.{names[i]}.{k}")
    assert differing_tensors(ddp, sharded, (), ("opt_disc",)) == []
    assert not torch.equal(ddp["ema"]["decoder.decoder_pred.weight"], ddp["model"]["decoder.decoder_pred.weight"])
    assert differing_tensors(sharded, load(tmp_path / "fsdp-resumed/checkpoints/0000004.pt"),
                             ("model", "ema", "loss"), ("opt", "opt_disc")) == []
    # grids and evaluation from the gathered EMA; each process holds half of the decoder's state
    assert (tmp_path / "fsdp/samples/recon_0000002.png").is_file()
    evals = [json.loads((tmp_path / name / "summary.json").read_text())["final_eval"] for name in ("ddp", "fsdp")]
    assert evals[0]["psnr"] == pytest.approx(evals[1]["psnr"], rel=1e-6)
    held = {}
    for name in ("ddp", "fsdp"):
        line = next(x for x in (tmp_path / name / "log.txt").read_text().splitlines() if "per-process training" in x)
        held[name] = [float(v) for v in re.findall(r"([0-9.]+) MiB", line)]
    for full, half in zip(held["ddp"], held["fsdp"]):
        assert half == pytest.approx(full / 2, rel=0.01, abs=1e-3), held  # the log rounds to 1e-3 MiB


def test_fsdp_refuses_a_convolutional_tokenizer(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="--fsdp shards a tokenizer's transformer blocks; --tokenizer kl"):
        train_stage1.parse_args(flags("kl", data_dir, tmp_path, "kl", 1, fsdp=True))


def test_one_channel_end_to_end_and_export(gray_dir, tmp_path):
    run(flags("kl", gray_dir, tmp_path, "gray", 2, in_channels=1, eval_samples=3, no_augment=True))
    exp = tmp_path / "gray"
    assert json.loads((exp / "class_to_idx.json").read_text()) == {"user_00": 0, "user_01": 1}
    assert np.isfinite(json.loads((exp / "summary.json").read_text())["final_eval"]["lpips"])
    save_vae_weights.main(["--exp-dir", str(exp), "--output-dir", str(tmp_path / "pre"), "--name", "spec"])
    from models.vae_loading import load_vae

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
    from models.vae_loading import load_vae

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
                 "vqgan_custom"):  # SmallestMaxSize + RandomCrop (taming's custom data: CenterCrop)
        args = _recipe(name)
        assert args.load_mode == "short-side" and (args.load_size or args.resolution) == args.resolution, name
        assert args.crop == ("center" if name == "vqgan_custom" else "random"), name
        assert args.short_side_resize == "cv2-linear", name  # albumentations' OpenCV bilinear
    for name in ("vavae_f16d32_stage1", "vavae_f16d32_stage2", "vavae_f16d32_stage3", "vavae_domain_finetune"):
        assert _recipe(name).vf_legacy_input, name  # the original VF objective: raw [-1, 1] bilinear input
    assert not _recipe("vavae_domain_finetune", "--no-vf-legacy-input").vf_legacy_input
    # VA-VAE stage 1: disc_start 5001 in Lightning's global_step (two optimizers per batch) -> the
    # discriminator loss from batch 2500 (0-based), the generator's GAN term from batch 2501
    args = _recipe("vavae_f16d32_stage1")
    gen = [s for s in range(2498, 2504) if train_stage1.loss_global_steps(args, s)[0] >= args.disc_start]
    dis = [s for s in range(2498, 2504) if train_stage1.loss_global_steps(args, s)[1] >= args.disc_start]
    assert gen[0] == 2501 and dis[0] == 2500 and first_disc_step(args, 5000) == 0
    assert train_stage1.loss_global_steps(_recipe("vqgan_f16_imagenet"), 7) == (7, 7)  # taming counts batches


def test_short_side_resampling_follows_each_original(tmp_path):
    """The VA-VAE / VQGAN recipes and the originals' own YAMLs (through --config) load the training
    images as albumentations' SmallestMaxSize does (OpenCV bilinear), the RAE recipes as
    torchvision's Resize (PIL bicubic); the other resampling is one flag away, and evaluation
    images keep the ADM crop."""
    import cv2

    arr = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    Image.fromarray(arr).save(tmp_path / "a" / "wide.png")
    fix = ROOT / "tests" / "fixtures" / "configs"
    originals = [fix / "hustvl+LightningDiT" / "vavae" / "configs" / "f16d32_vfdinov2.yaml",
                 fix / "CompVis+taming-transformers" / "configs" / "imagenet_vqgan.yaml",
                 fix / "CompVis+taming-transformers" / "configs" / "custom_vqgan.yaml"]
    cases = [(ROOT / f"configs/stage1/{n}.yaml", "short-side-cv2-linear")
             for n in ("vavae_f16d32_stage1", "vqgan_f16_imagenet")] + [(p, "short-side-cv2-linear") for p in originals]
    cases += [(ROOT / "configs/stage1/rae_dinov2b_vitxl_256.yaml", "short-side-pil-bicubic")]
    for config, crop in cases:
        args = train_stage1.parse_args(["--config", str(config), "--data-dir", str(tmp_path), "--resolution", "32"])
        assert train_stage1.build_data(args, tmp_path, 3, 32, "--data-dir").crop == crop, config.name
        assert train_stage1.build_data(args, tmp_path, 3, 32, "--eval-data-dir").crop == "adm", config.name
    args = train_stage1.parse_args(["--config", str(originals[1]), "--data-dir", str(tmp_path), "--resolution", "32"])
    img = train_stage1.build_data(args, tmp_path, 3, 32, "--data-dir")[0][0]
    assert torch.equal(img, torch.from_numpy(cv2.resize(arr, (48, 32), interpolation=cv2.INTER_LINEAR)).permute(2, 0, 1))
    args = train_stage1.parse_args(["--config", str(originals[1]), "--data-dir", str(tmp_path), "--resolution", "32",
                                    "--short-side-resize", "pil-bicubic"])
    img = train_stage1.build_data(args, tmp_path, 3, 32, "--data-dir")[0][0]
    bicubic = np.array(Image.fromarray(arr).resize((48, 32), resample=Image.BICUBIC))
    assert torch.equal(img, torch.from_numpy(bicubic).permute(2, 0, 1))
    # a plain run keeps the ADM crop: the short-side modes need folders of original images
    plain = train_stage1.parse_args(["--tokenizer", "vqgan", "--data-dir", str(tmp_path)])
    assert (plain.load_mode, plain.short_side_resize) == ("adm", "cv2-linear")


# data settings the crop a training step sees depends on (after resolve_defaults)
DATA_ARGS = ("resolution", "load_size", "load_mode", "short_side_resize", "crop", "hflip", "no_augment")
ORIGINALS = ROOT / "tests" / "fixtures" / "configs"


ORIGINAL_DATA_CASES = [
    ("bytetriper+RAE/configs/stage1/training/DINOv2-B_decXL.yaml", [], "rae_dinov2b_vitxl_256",
     ("short-side", 384, "pil-bicubic", "random")),
    ("bytetriper+RAE/configs/stage1/pretrained/DINOv2-B_512.yaml", ["--resolution", "512"], "rae_dinov2b_vitxl_512",
     ("short-side", 768, "pil-bicubic", "random")),
    ("CompVis+taming-transformers/configs/custom_vqgan.yaml", [], "vqgan_custom",
     ("short-side", None, "cv2-linear", "center")),
    ("CompVis+taming-transformers/configs/imagenet_vqgan.yaml", [], "vqgan_f16_imagenet",
     ("short-side", None, "cv2-linear", "random")),
    ("hustvl+LightningDiT/vavae/configs/f16d32_vfdinov2.yaml", [], "vavae_f16d32_stage1",
     ("short-side", None, "cv2-linear", "random")),
]


@pytest.mark.parametrize("original,extra,recipe,loading", ORIGINAL_DATA_CASES, ids=[c[2] for c in ORIGINAL_DATA_CASES])
def test_original_yaml_loads_data_as_the_matching_recipe(original, extra, recipe, loading):
    """An original's YAML through --config resolves the same data arguments as our recipe for it:
    RAE Resize(int(1.5 x size), bicubic) + RandomCrop (384 / 768), taming's CustomTrain
    SmallestMaxSize + CenterCrop, its ImageNetTrain and VA-VAE SmallestMaxSize + RandomCrop."""
    ours = _recipe(recipe, *extra)
    theirs = train_stage1.parse_args(["--config", str(ORIGINALS / original), "--data-dir", "x", *extra])
    assert {k: getattr(theirs, k) for k in DATA_ARGS} == {k: getattr(ours, k) for k in DATA_ARGS}
    assert (ours.load_mode, ours.load_size, ours.short_side_resize, ours.crop) == loading
    assert not ours.hflip and not ours.no_augment


def test_load_size_in_pixels_or_times_the_resolution():
    assert [_recipe("tiny_kl", "--load-size", v).load_size for v in ("40", "1.5x", "1.25X")] == [40, 48, 40]
    assert _recipe("tiny_kl", "--load-size", "1.5x", "--no-augment").load_size is None
    for bad in ("0.5x", "x", "-3", "1.5"):
        with pytest.raises(SystemExit):
            _recipe("tiny_kl", "--load-size", bad)


def test_custom_data_is_center_cropped_and_rae_data_randomly_cropped(tmp_path):
    """One wide image through the training view of each original's YAML (resolution 32): taming's
    CustomTrain gives albumentations' CenterCrop of the SmallestMaxSize image in every epoch; RAE
    gives RandomCrop windows of torchvision's Resize(48, BICUBIC) image."""
    import cv2
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from datasources import CropFlip

    arr = np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    Image.fromarray(arr).save(tmp_path / "a" / "wide.png")

    def views(original):
        args = train_stage1.parse_args(["--config", str(ORIGINALS / original), "--data-dir", str(tmp_path),
                                        "--resolution", "32"])
        base = train_stage1.build_data(args, tmp_path, 3, args.load_size or args.resolution, "--data-dir")
        view = CropFlip(base, 32, random=args.crop == "random", hflip=args.hflip, seed=args.seed)
        out = []
        for epoch in range(8):
            view.set_epoch(epoch)
            out.append(view[0][0].permute(1, 2, 0).numpy())
        return out

    loaded = cv2.resize(arr, (48, 32), interpolation=cv2.INTER_LINEAR)  # SmallestMaxSize(32): 60x90 -> 32x48
    for crop in views("CompVis+taming-transformers/configs/custom_vqgan.yaml"):
        assert np.array_equal(crop, loaded[:, 8:40])  # CenterCrop: x offset (48 - 32) // 2
    loaded = np.asarray(TF.resize(Image.fromarray(arr), 48, interpolation=InterpolationMode.BICUBIC))  # 48x72
    offsets = set()
    for crop in views("bytetriper+RAE/configs/stage1/training/DINOv2-B_decXL.yaml"):
        hits = [(y, x) for y in range(17) for x in range(41) if np.array_equal(crop, loaded[y:y + 32, x:x + 32])]
        assert hits, "not a window of the Resize(48) image"
        offsets.add(hits[0])
    assert len(offsets) > 3


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
    first = first_disc_step(args, spe)
    assert first == 600
    sched, sched_d = build_schedulers(opt, opt_d, args, 16 * spe, spe, first)
    for _ in range(10 * spe):
        opt_d.step()
        sched_d.step()
    assert sched_d.get_last_lr()[0] == pytest.approx(8.2189e-5, rel=1e-4)
    args.disc_lr_horizon = "disc-steps"  # ours: fitted to its own 10 epochs of updates
    _, sched_d = build_schedulers(opt, opt_d, args, 16 * spe, spe, first)
    for _ in range(10 * spe):
        opt_d.step()
        sched_d.step()
    assert sched_d.get_last_lr()[0] == pytest.approx(2e-5)


def test_lpips_memory_flags_reach_the_loss(data_dir, tmp_path):
    """--lpips-grad-checkpointing / --no-lpips-lean-head / --no-lpips-lean-trunk reach every LPIPS
    of the family's loss (the lean head and trunk are on, checkpointing off, by default)."""
    from loss.perceptual import LPIPS
    from loss.stage1 import build_loss

    def lpips_options(argv):
        loss_fn, _ = build_loss(train_stage1.parse_args(argv), 3)
        return {(m.lean_head, m.grad_checkpointing, m.lean_trunk) for m in loss_fn.modules() if isinstance(m, LPIPS)}

    base = flags("kl", data_dir, tmp_path, "m", 1)
    assert lpips_options(base) == {(True, False, True)}
    assert lpips_options(base + ["--no-lpips-lean-head", "--lpips-grad-checkpointing"]) == {(False, True, True)}
    assert lpips_options(base + ["--no-lpips-lean-trunk"]) == {(True, False, False)}
