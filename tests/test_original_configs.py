"""`--config` with the originals' own YAML files (copies under tests/fixtures/configs/, unchanged):
RAE stage 1 / stage 2 training / sampling, LightningDiT, VA-VAE (LDM style) and taming VQGAN.
Every key a file sets lands in the resolved flags of its script, explicit flags win, unknown keys
and unsupported values are refused by name, and each family starts a few steps at tiny size."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import cache_latents
import generate
import train_ldm_only
import train_stage1
from configs_compat import OriginalConfigError, translate_original
from datasources import make_procedural_dataset, resolve_load_size

FIX = Path(__file__).resolve().parent / "fixtures" / "configs"
RAE = FIX / "bytetriper+RAE" / "configs"
HUSTVL = FIX / "hustvl+LightningDiT"
TAMING = FIX / "CompVis+taming-transformers" / "configs"
RAE_S1 = RAE / "stage1" / "training" / "DINOv2-B_decXL.yaml"
RAE_S2 = RAE / "stage2" / "training" / "ImageNet256" / "DiTDH-S_DINOv2-B.yaml"
RAE_AG = RAE / "stage2" / "sampling" / "ImageNet256" / "DiTDHXL-DINOv2-B_AG.yaml"
LIT = HUSTVL / "configs" / "lightningdit_xl_vavae_f16d32.yaml"
VAVAE = HUSTVL / "vavae" / "configs" / "f16d32_vfdinov2.yaml"
VQGAN = TAMING / "custom_vqgan.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 procedural 32px images (3 classes) and their latents by a random tiny-f4d4 KL tokenizer."""
    root = tmp_path_factory.mktemp("orig")
    images = make_procedural_dataset(root / "images", num_classes=3, per_class=4, resolution=32, seed=0)
    cache_latents.main(cache_latents.build_args(
        ["--data-dir", str(images), "--output-dir", str(root / "lat"), "--tokenizer", "kl", "--vae", "tiny-f4d4",
         "--random-init", "--resolution", "32", "--batch-size", "6", "--num-workers", "0", "--seed", "0"]))
    return images, root / "lat"


# ---- parsing: every translated key reaches the script's arguments -------------------------------
PARSE_CASES = [
    (RAE_S1, train_stage1.parse_args, "train_stage1.py", []),
    (RAE / "stage1" / "pretrained" / "DINOv2-B.yaml", train_stage1.parse_args, "train_stage1.py", []),
    (RAE_S2, train_ldm_only.parse_args, "train_ldm_only.py", ["--latents-dir", "x", "--eval-every", "0"]),
    (RAE / "stage2" / "training" / "ImageNet512" / "DiTDH-XL_DINOv2-B.yaml", train_ldm_only.parse_args,
     "train_ldm_only.py", ["--latents-dir", "x"]),
    (RAE_AG, generate.parse_args, "generate.py", []),
    (RAE / "stage2" / "sampling" / "ImageNet256" / "DiTDHXL-DINOv2-B.yaml", generate.parse_args, "generate.py", []),
    (LIT, train_ldm_only.parse_args, "train_ldm_only.py", []),
    (HUSTVL / "configs" / "reproductions" / "lightningdit_xl_vavae_f16d32_800ep_cfg.yaml", generate.parse_args,
     "generate.py", []),
    (VAVAE, train_stage1.parse_args, "train_stage1.py", []),
    (HUSTVL / "vavae" / "configs" / "f16d32_ldm.yaml", train_stage1.parse_args, "train_stage1.py", []),
    (VQGAN, train_stage1.parse_args, "train_stage1.py", ["--data-dir", "x"]),
    (TAMING / "imagenet_vqgan.yaml", train_stage1.parse_args, "train_stage1.py", []),
]


@pytest.mark.parametrize("path,parse,prog,argv", PARSE_CASES, ids=lambda c: getattr(c, "stem", None))
def test_every_translated_key_reaches_the_arguments(path, parse, prog, argv):
    args = parse(["--config", str(path), *argv])
    translation = translate_original(yaml.safe_load(path.read_text()), path, prog)
    explicit = {a[2:].replace("-", "_") for a in argv if a.startswith("--")}
    values = {d: v for d, v in translation.defaults(explicit).items() if d not in explicit}
    assert values, path
    for dest, value in values.items():
        if dest == "load_size":  # RAE's "1.5x" is resolved against --resolution
            value = resolve_load_size(value, args.resolution)
        assert getattr(args, dest) == value, (path.name, dest)
    # the file really changes the run: most of its values differ from the script's defaults
    needed = {"train_stage1.py": ["--tokenizer", args.tokenizer],
              "train_ldm_only.py": [] if "--latents-dir" in argv else ["--latents-dir", "x"]}.get(prog, [])
    plain = vars(parse(argv + needed))
    rest = [d for d in values if d not in ("config_epochs", "tokenizer")]
    changed = [d for d in rest if plain.get(d) != values[d]]
    assert len(changed) >= min(4, len(rest)), (path.name, changed)


def test_published_values_arrive_translated():
    a = train_stage1.parse_args(["--config", str(RAE_S1)])
    assert (a.tokenizer, a.batch_size, a.ema_decay, a.gan_weight, a.disc_start_epoch, a.disc_update_start_epoch) == \
        ("rae", 512, 0.9978, 0.75, 8, 6)
    assert (a.lr_schedule, a.lr_warmup_epochs, a.lr_final_ratio, a.adam_beta2, a.optimizer) == \
        ("cosine", 1.0, 0.1, 0.95, "adamw")
    assert a.model_config["decoder_config"]["decoder_hidden_size"] == 1152  # configs/decoder/ViTXL read in
    assert a.model_config["params"]["noise_tau"] == 0.8
    assert a.config_epochs == {"checkpointing_steps": 1.0, "lr_total_steps": 16.0}
    a = train_ldm_only.parse_args(["--config", str(RAE_S2), "--latents-dir", "x", "--eval-every", "0"])
    assert (a.model, a.weighting, a.time_shift, a.final_lr, a.seed, a.ema_decay) == \
        ("DiTDH-S", "logit-normal", "auto", 2e-5, 42, 0.9995)
    assert a.config_epochs == {"checkpointing_steps": 10.0, "lr_decay_start": 40.0, "lr_total_steps": 800.0}
    a = generate.parse_args(["--config", str(RAE_AG)])
    assert (a.model, a.guidance, a.cfg_scale, a.guide_model, a.time_grid, a.shift, a.num_steps) == \
        ("DiTDH-XL", "autoguidance", 1.42, "DiTDH-S", "rae", "auto", 50)
    a = generate.parse_args(["--config", str(LIT)])
    assert (a.model, a.num_steps, a.cfg_scale, a.cfg_legacy_channels) == ("LightningDiT-XL/1", 250, 10.0, True)
    assert a.shift == pytest.approx(1 / 0.3) and a.guidance_high == pytest.approx(0.89)
    assert generate.parse_args(["--config", str(LIT), "--no-cfg-legacy-channels"]).cfg_legacy_channels is False
    a = train_ldm_only.parse_args(["--config", str(LIT)])
    assert (a.weighting, a.direction_loss_weight, a.adam_beta2, a.max_train_steps, a.vae) == \
        ("logit-normal", 1.0, 0.95, 80000, "vavae-f16d32")
    a = train_stage1.parse_args(["--config", str(VAVAE)])
    assert (a.tokenizer, a.vf_model, a.vf_weight, a.disc_start, a.batch_size, a.epochs) == \
        ("vavae", "dinov2-vit-l", 0.1, 5001, 8 * 8 * 4, 50)  # per-GPU 8 x 8 GPUs x 4 nodes
    a = train_stage1.parse_args(["--config", str(VQGAN), "--data-dir", "x", "--tokenizer", "vq"])
    assert (a.tokenizer, a.learning_rate, a.scale_lr, a.disc_start, a.disc_weight) == \
        ("vqgan", 4.5e-6, True, 10000, 0.8)
    assert a.model_config["n_embed"] == 1024 and a.model_config["ddconfig"]["ch_mult"] == [1, 1, 2, 2, 4]


def test_explicit_flags_win():
    a = train_stage1.parse_args(["--config", str(RAE_S1), "--ema-decay", "0.5", "--model", "tiny-dinov2",
                                 "--checkpointing-steps", "7"])
    assert (a.ema_decay, a.model, a.model_config, a.checkpointing_steps) == (0.5, "tiny-dinov2", None, 7)
    assert a.config_epochs == {"lr_total_steps": 16.0}  # the explicit flag replaced the epoch-valued one
    pretrained = RAE / "stage1" / "pretrained" / "DINOv2-B.yaml"
    assert train_stage1.parse_args(["--config", str(pretrained)]).init_from.endswith("ViTXL_n08/model.pt")
    assert train_stage1.parse_args(["--config", str(pretrained), "--model", "tiny-dinov2"]).init_from is None
    a = generate.parse_args(["--config", str(RAE_AG), "--cfg-scale", "2", "--guide-model", "DiTDH-N"])
    assert (a.cfg_scale, a.guide_model) == (2.0, "DiTDH-N")


def _edited(tmp_path, src, edit):
    cfg = yaml.safe_load(src.read_text())
    edit(cfg)
    out = tmp_path / src.name
    out.write_text(yaml.safe_dump(cfg))
    return out


def test_unknown_keys_and_values_are_refused_by_name(tmp_path):
    bad = _edited(tmp_path, RAE_S1, lambda c: c["training"].update(mystery_knob=3))
    with pytest.raises(OriginalConfigError, match=r"DINOv2-B_decXL.yaml.*'training.mystery_knob'"):
        train_stage1.parse_args(["--config", str(bad)])
    bad = _edited(tmp_path, RAE_S1, lambda c: c["gan"]["loss"].update(disc_loss="softplus"))
    with pytest.raises(ValueError, match=r"DINOv2-B_decXL.yaml: key '-> --disc-loss'.*'softplus' is not one of"):
        train_stage1.parse_args(["--config", str(bad)])
    bad = _edited(tmp_path, RAE_AG, lambda c: c["transport"]["params"].update(prediction="noise"))
    with pytest.raises(SystemExit, match=r"'transport.params.prediction' = 'noise'"):
        generate.parse_args(["--config", str(bad)])
    bad = _edited(tmp_path, RAE_AG, lambda c: c["stage_2"]["params"].update(hidden_size=[1000, 2048]))
    with pytest.raises(SystemExit, match=r"'stage_2.params.hidden_size' / depth / num_heads .* match no DiT\^DH size"):
        generate.parse_args(["--config", str(bad)])
    bad = _edited(tmp_path, LIT, lambda c: c["model"].update(use_swiglu=False))
    with pytest.raises(OriginalConfigError, match=r"'model.use_swiglu'"):
        train_ldm_only.parse_args(["--config", str(bad)])
    bad = _edited(tmp_path, VQGAN, lambda c: c["model"]["params"]["lossconfig"]["params"].update(disc_conditional=True))
    with pytest.raises(OriginalConfigError, match=r"custom_vqgan.yaml: key 'model.params.lossconfig.params.disc_cond"):
        train_stage1.parse_args(["--config", str(bad), "--data-dir", "x"])
    bad = _edited(tmp_path, VAVAE, lambda c: c["lightning"]["trainer"].update(mystery_knob=1.0))
    with pytest.raises(OriginalConfigError, match=r"'lightning.trainer.mystery_knob'"):
        train_stage1.parse_args(["--config", str(bad)])
    ok = _edited(tmp_path, VAVAE, lambda c: c["lightning"]["trainer"].update(accumulate_grad_batches=2,
                                                                             gradient_clip_val=1.0))
    a = train_stage1.parse_args(["--config", str(ok)])
    assert (a.gradient_accumulation_steps, a.batch_size, a.max_grad_norm) == (2, 8 * 8 * 4 * 2, 1.0)
    # a path of the file that does not exist here is named before any training
    with pytest.raises(SystemExit, match="--eval-reference data/imagenet/VIRTUAL_imagenet256_labeled.npz: no such"):
        train_ldm_only.main(train_ldm_only.parse_args(["--config", str(RAE_S2), "--latents-dir", "x"]))
    with pytest.raises(OriginalConfigError, match="train_stage1.py does not read it"):
        train_stage1.parse_args(["--config", str(LIT)])
    with pytest.raises(OriginalConfigError, match="train_ldm_only.py does not read it"):
        train_ldm_only.parse_args(["--config", str(RAE_S1), "--latents-dir", "x"])
    # taming's image list file: our datasets are folders, so --data-dir must be given
    with pytest.raises(OriginalConfigError, match="training_images_list_file.*--data-dir"):
        train_stage1.parse_args(["--config", str(VQGAN)])


# ---- a few steps per family at tiny size (sizes overridden by flags) ----------------------------
STAGE1_TINY = ["--resolution", "32", "--batch-size", "4", "--max-train-steps", "4", "--sampling-steps", "0",
               "--eval-samples", "0", "--lpips-weights", "random", "--num-workers", "0", "--report-to", "none",
               "--no-compile", "--mixed-precision", "no", "--log-every", "1"]


def _stage1(config, images, out, name, *extra):
    argv = ["--config", str(config), "--data-dir", str(images), "--output-dir", str(out), "--exp-name", name,
            *STAGE1_TINY, *extra]
    return train_stage1.main(train_stage1.parse_args(argv))


def _record_views(monkeypatch) -> list:
    """The CropFlip views train_stage1.main builds (training view first), for checking its data."""
    views = []

    class Recorded(train_stage1.CropFlip):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            views.append(self)

    monkeypatch.setattr(train_stage1, "CropFlip", Recorded)
    return views


def test_rae_stage1_config_trains(data, tmp_path, monkeypatch):
    images, _ = data
    views = _record_views(monkeypatch)
    _stage1(RAE_S1, images, tmp_path, "rae", "--model", "tiny-dinov2", "--random-init-encoders",
            "--disc-config", "tiny", "--perceptual-weight", "0", "--eval-samples", "2", "--eval-every", "100",
            "--random-init-inception", "--inception-size", "75")
    # RAE's data: Resize(int(1.5 x 32) = 48, bicubic) on the short side, then RandomCrop(32), no flip
    train, evaluation = views
    assert (train.base.crop, train.base.resolution, train.random, train.hflip) == ("short-side-pil-bicubic", 48, True,
                                                                                    False)
    # rFID's images: the ADM crop at the resolution, not the centre of the 48-pixel training load
    assert (evaluation.base.dataset.crop, evaluation.base.dataset.resolution, evaluation.random) == ("adm", 32, False)
    ckpts = sorted(p.name for p in (tmp_path / "rae" / "checkpoints").glob("*.pt"))
    # checkpoint_interval: 1 epoch = 3 steps of 4 of the 12 images; and the last step
    assert ckpts == ["0000003.pt", "0000004.pt"], ckpts
    assert json.loads((tmp_path / "rae" / "args.json").read_text())["ema_decay"] == 0.9978


def test_vavae_config_trains(data, tmp_path):
    images, _ = data
    _stage1(VAVAE, images, tmp_path, "vavae", "--model", "tiny-f4d4", "--vf-model", "dinov2-vit-tiny",
            "--random-init-encoders", "--checkpointing-steps", "4")
    args = json.loads((tmp_path / "vavae" / "args.json").read_text())
    assert (args["tokenizer"], args["vf_weight"], args["cos_margin"], args["disc_start"]) == ("vavae", 0.1, 0.5, 5001)
    assert (tmp_path / "vavae" / "checkpoints" / "0000004.pt").is_file()


def test_taming_config_trains(data, tmp_path, monkeypatch):
    images, _ = data
    views = _record_views(monkeypatch)
    _stage1(VQGAN, images, tmp_path, "vq", "--model", "tiny-f4", "--checkpointing-steps", "4")
    # CustomTrain: SmallestMaxSize(32) then CenterCrop(32)
    train = views[0]
    assert (train.base.crop, train.base.resolution, train.random) == ("short-side-cv2-linear", 32, False)
    args = json.loads((tmp_path / "vq" / "args.json").read_text())
    assert (args["tokenizer"], args["scale_lr"], args["codebook_weight"]) == ("vqgan", True, 1.0)
    assert (tmp_path / "vq" / "checkpoints" / "0000004.pt").is_file()


LDM_TINY = ["--batch-size", "4", "--max-train-steps", "2", "--num-workers", "0", "--report-to", "none",
            "--no-compile", "--mixed-precision", "no", "--no-sample-grids", "--eval-every", "0"]


@pytest.mark.parametrize("config,model", [(RAE_S2, "DiTDH-N"), (LIT, "LightningDiT-N/1")], ids=["rae", "lightningdit"])
def test_stage2_configs_train(data, tmp_path, config, model):
    _, latents = data
    argv = ["--config", str(config), "--latents-dir", str(latents), "--model", model, "--output-dir", str(tmp_path),
            "--exp-name", "run", "--checkpointing-steps", "2", *LDM_TINY]
    args = train_ldm_only.parse_args(argv)
    train_ldm_only.main(args)
    assert (tmp_path / "run" / "checkpoints" / "0000002.pt").is_file()
    if config == RAE_S2:  # the epoch-valued schedule was turned into steps: 12 latents / 4 = 3 per epoch
        assert (args.lr_decay_start, args.lr_total_steps) == (120, 2400)


def _release(tmp_path, name, model, latent_shape, seed):
    from models.diffusion import build_diffusion_model

    torch.manual_seed(seed)
    net = build_diffusion_model(model, latent_shape, 1000, 0.1)
    torch.save({"ema": net.state_dict()}, tmp_path / name)
    return str(tmp_path / name)


SAMPLE_TINY = ["--device", "cpu", "--num-fid-samples", "2", "--per-proc-batch-size", "2", "--num-steps", "3",
               "--folder-name", "run", "--random-init-vae", "--resolution", "32"]


def test_rae_sampling_config_generates(tmp_path):
    main = _release(tmp_path, "main.pt", "DiTDH-N", (32, 4, 4), 0)
    guide = _release(tmp_path, "guide.pt", "DiTDH-N", (32, 4, 4), 1)
    torch.save({"mean": torch.zeros(32, 4, 4), "var": torch.ones(32, 4, 4)}, tmp_path / "stat.pt")
    res = generate.main(["--config", str(RAE_AG), "--ckpt", main, "--model", "DiTDH-N", "--guide-ckpt", guide,
                         "--guide-model", "DiTDH-N", "--rae-config", "tiny-dinov2", "--vae-stats", str(tmp_path / "stat.pt"),
                         "--sample-dir", str(tmp_path / "s"), *SAMPLE_TINY])
    assert res["generated"] == 2
    cfg = json.loads((tmp_path / "s" / "run" / "sampling_config.json").read_text())
    assert (cfg["guidance"], cfg["cfg_scale"], cfg["time_grid"]) == ("autoguidance", 1.42, "rae")
    assert (tmp_path / "s" / "run.npz").is_file()


def test_lightningdit_config_generates(tmp_path):
    ckpt = _release(tmp_path, "lit.pt", "LightningDiT-N/1", (4, 8, 8), 0)
    torch.save({"mean": torch.zeros(1, 4, 1, 1), "std": torch.ones(1, 4, 1, 1)}, tmp_path / "latents_stats.pt")
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 32, 32, 3), np.uint8))  # for data.fid_reference_file
    res = generate.main(["--config", str(LIT), "--ckpt", ckpt, "--model", "LightningDiT-N/1", "--tokenizer", "kl",
                         "--vae", "tiny-f4d4", "--vae-stats", str(tmp_path / "latents_stats.pt"),
                         "--ref-batch", str(tmp_path / "ref.npz"),
                         "--sample-dir", str(tmp_path / "s"), *SAMPLE_TINY])
    assert res["generated"] == 2
    cfg = json.loads((tmp_path / "s" / "run" / "sampling_config.json").read_text())
    assert cfg["cfg_scale"] == 10.0 and cfg["shift"] == pytest.approx(1 / 0.3)
    assert (cfg["guidance_high"], cfg["cfg_channels"], cfg["label_sampling"]) == (pytest.approx(0.89), 3, "random")
