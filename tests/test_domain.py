"""Domain data end to end (issue 15): 1-channel class folders through a VA-VAE fine-tuned from an RGB
checkpoint, its self-describing export, latent caching, a class-conditional LightningDiT, and the
class-fidelity score, each step with the flags the README's "Domain data" section shows; plus the
pieces on their own (RGB -> grey weight adaptation, export descriptions, CPU threads, errors)."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cache_latents
import generate
import linear_probe
import loss.stage1
import models.stage1
import save_vae_weights
import train_ldm_only
import train_stage1
import utils
from datasources import make_procedural_dataset
from models.autoencoder import build_vae
from models.vae_loading import load_vae
from models.loading import load_models
from models.tokenizers import Tokenizer, build_tokenizer, describe_model, load_tokenizer, write_export_description
from tests.cli import to_argv

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def spectrograms(tmp_path_factory):
    """1-channel PNGs in per-user class folders (user_00, user_01), one class per source class."""
    root = tmp_path_factory.mktemp("domain")
    rgb = make_procedural_dataset(root / "rgb", num_classes=2, per_class=8, resolution=32, seed=0)
    out = root / "spectrograms"
    for c, folder in enumerate(sorted(p for p in rgb.iterdir() if p.is_dir())):
        (out / f"user_{c:02d}").mkdir(parents=True)
        for f in sorted(folder.glob("*.png")):
            Image.open(f).convert("L").save(out / f"user_{c:02d}" / f.name)
    return out


@pytest.fixture(scope="module")
def rgb_release(tmp_path_factory):
    """A 'released' RGB VA-VAE in the original's layout (a bare state_dict, VF projection 32-d)."""
    path = tmp_path_factory.mktemp("release") / "vavae-rgb.pt"
    torch.manual_seed(0)
    torch.save(build_vae("tiny-f4d4", vf_dim=32, reverse_proj=True).state_dict(), path)
    return path


def test_rgb_weights_adapted_to_one_channel_keep_the_function():
    """A grey image g through the adapted model == (g, g, g) through the RGB model (encoder), and
    the grey decoding == the mean of the RGB decoding's channels."""
    torch.manual_seed(0)
    rgb = build_vae("tiny-f4d4").eval()
    gray = build_vae("tiny-f4d4", in_channels=1, out_ch=1).eval()
    utils.load_state_dict_strict(gray, models.stage1.rgb_to_gray_state_dict(rgb.state_dict()), "adapted")
    g = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(gray.encode(g).mean, rgb.encode(g.expand(-1, 3, -1, -1)).mean, rtol=1e-4, atol=1e-5)
        z = torch.randn(2, 4, 8, 8)
        torch.testing.assert_close(gray.decode(z), rgb.decode(z).mean(dim=1, keepdim=True), rtol=1e-4, atol=1e-5)


def test_other_channel_mismatches_are_still_refused(spectrograms, tmp_path):
    gray_ckpt = tmp_path / "gray.pt"
    torch.save(build_vae("tiny-f4d4", in_channels=1, out_ch=1, vf_dim=32).state_dict(), gray_ckpt)
    argv = to_argv({"config": ROOT / "configs/stage1/tiny_vavae.yaml", "data-dir": spectrograms, "output-dir": tmp_path,
                    "exp-name": "bad", "init-from": gray_ckpt, "max-train-steps": 1, "eval-samples": 0,
                    "convert-channels": True}, {})
    with pytest.raises(SystemExit, match="1-channel images .* --in-channels 3; pass --in-channels 1"):
        train_stage1.main(train_stage1.parse_args(argv))


def test_export_description_rebuilds_every_kind_and_keeps_the_original_layout(tmp_path, monkeypatch):
    from models.vqgan import build_vqgan

    vae = build_vae("tiny-f4d4", in_channels=1, out_ch=1, vf_dim=32)
    torch.save(vae.state_dict(), tmp_path / "spec.pt")
    write_export_description(tmp_path / "spec.pt", describe_model("vavae", vae))
    desc = json.loads((tmp_path / "spec.json").read_text())
    assert desc["kind"] == "vavae" and desc["in_channels"] == 1 and desc["model"]["vf_dim"] == 32
    tok = Tokenizer.load(tmp_path / "spec.pt")  # nothing else: kind, channels and VF width from spec.json
    assert (tok.kind, tok.in_channels, tok.name) == ("vavae", 1, "spec")
    assert tok.fingerprint() == build_tokenizer(None, ckpt=tmp_path / "spec.pt").fingerprint()
    assert build_tokenizer("kl", ckpt=tmp_path / "spec.pt").kind == "kl"  # a VA-VAE used as a plain KL-VAE
    with pytest.raises(ValueError, match="describes a 'vavae' tokenizer"):
        build_tokenizer("vq", ckpt=tmp_path / "spec.pt")
    from safetensors.torch import save_file  # save_vae_weights.py --format safetensors: NAME.json beside it too

    save_file(vae.state_dict(), str(tmp_path / "st.safetensors"))
    write_export_description(tmp_path / "st.safetensors", describe_model("vavae", vae))
    assert load_tokenizer(tmp_path / "st.safetensors").fingerprint() == tok.fingerprint()
    # the weights file is the original's layout: the original loader (preset + overrides) still reads it
    load_vae("tiny-f4d4", tmp_path / "spec.pt", in_channels=1, out_ch=1, vf_dim=32)
    vq = build_vqgan("tiny-f4", quantizer="ema")
    torch.save({"state_dict": vq.state_dict()}, tmp_path / "vq.ckpt")
    write_export_description(tmp_path / "vq.ckpt", describe_model("vqgan", vq))
    assert load_tokenizer(tmp_path / "vq.ckpt").kind == "vq"
    assert load_tokenizer("tiny-vavae-f16d32", random_init=True).kind == "vavae"  # presets: the same entry
    with pytest.raises(ValueError, match="no description"):
        build_tokenizer(None, ckpt=tmp_path / "nothing.pt")
    # the same export on the hub: Tokenizer.load("owner/repo/spec.pt") finds owner/repo/spec.json
    import huggingface_hub

    hub = {("me/doppler", "spec.pt"): tmp_path / "spec.pt", ("me/doppler", "spec.json"): tmp_path / "spec.json"}
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename: str(hub[(repo_id, filename)]))
    assert Tokenizer.load("me/doppler/spec.pt").fingerprint() == tok.fingerprint()
    rae = build_tokenizer("rae", "tiny-dinov2", random_init=True).model
    torch.save(rae.decoder.state_dict(), tmp_path / "rae.pt")
    write_export_description(tmp_path / "rae.pt", describe_model("rae", rae))
    assert json.loads((tmp_path / "rae.json").read_text())["model"]["params"]["encoder_cls"] == "Dinov2withNorm"
    with pytest.raises(ValueError, match="random-weight encoder"):  # no export holds a random encoder
        load_tokenizer(tmp_path / "rae.pt")


def test_repae_export_describes_its_preset_and_statistics(tmp_path):
    vae = build_vae("tiny-f4d4")
    ckpt = {"vae": vae.state_dict(), "discriminator": {"discriminator.main.0.weight": torch.zeros(2, 3, 4, 4)}, "args": {"vae": "tiny-f4d4"},
            "ema": {"bn.running_mean": torch.arange(4.0), "bn.running_var": torch.ones(4)}}
    paths = save_vae_weights.export(tmp_path / "ckpt.pt", tmp_path, "e2e", ckpt)
    desc = json.loads(paths["description"].read_text())
    assert desc["kind"] == "kl" and desc["stats"] == "e2e-latents-stats.pt" and desc["model"]["embed_dim"] == 4
    tok = load_tokenizer(tmp_path / "e2e.pt")
    torch.testing.assert_close(tok.stats["latents_bias"].flatten(), torch.arange(4.0))


def test_cpu_threads_leave_room_for_loader_workers(monkeypatch):
    old = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setattr("os.cpu_count", lambda: 8)
        torch.set_num_threads(4)
        assert utils.limit_cpu_threads(2, logging.getLogger("t")) == 2 == torch.get_num_threads()  # 8 // 2 - 2
        assert utils.limit_cpu_threads(0) == 2  # never raised
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert utils.limit_cpu_threads(8) == 3  # the user's setting decides
    finally:
        torch.set_num_threads(old)


def test_missing_pretrained_encoder_names_the_offline_options(monkeypatch):
    from models import encoders

    def offline(*a, **k):
        raise OSError("no connection")

    monkeypatch.setattr(encoders, "build_timm_vit", offline)
    with pytest.raises(RuntimeError, match="--encoder-weights-dir.*--random-init-encoders"):
        encoders.build_encoder("dinov2-vit-b", 224)
    with pytest.raises(RuntimeError, match="local folder.*--random-init-encoders"):  # RAE's transformers encoders
        encoders.build_rae_encoder("Dinov2withNorm", path=str(Path(__file__).parent / "no-such-encoder"))


def test_rgb_networks_see_the_grey_channel_repeated():
    """VF foundation features and LPIPS take 3-channel input: a 1-channel batch gives exactly what
    its 3-channel repetition gives (never a silent conversion of the user's data)."""
    from loss.perceptual import LPIPS
    from models.encoders import build_encoder

    torch.manual_seed(0)
    g, h = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    rgb = lambda t: t.expand(-1, 3, -1, -1)  # noqa: E731
    vf = models.stage1.FoundationFeatures(build_encoder("dinov2-vit-tiny", 32, random_init=True))
    torch.testing.assert_close(vf(g, (8, 8)), vf(rgb(g), (8, 8)))
    lpips = loss.stage1.RepeatChannels(LPIPS(vgg_weights="random"))
    torch.testing.assert_close(lpips(g, h), lpips(rgb(g), rgb(h)))


def test_linear_probe_reads_archives_and_checks_sample_labels(spectrograms, tmp_path):
    import preprocessing

    archive = tmp_path / "archive"
    preprocessing.main(["--source", str(spectrograms), "--dest", str(archive), "--resolution", "32", "--channels", "1",
                        "--workers", "1"])
    common = {"encoder": "tiny-f4d4", "resolution": 32, "epochs": 2, "output": tmp_path / "p.json"}
    res = linear_probe.main(to_argv({"data-dir": archive, **common}, {}, ["--random-init"]))
    assert res["num_train"] + res["num_val"] == 16 and res["num_classes"] == 2
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.zeros((3, 32, 32, 1), np.uint8))
    np.save(tmp_path / "wrong.npy", np.array([0, 1, 5]))
    with pytest.raises(SystemExit, match="labels 0..5 do not fit the 2 classes"):
        linear_probe.main(to_argv({"data-dir": archive, "score-samples": samples, "sample-labels": tmp_path / "wrong.npy",
                                   **common}, {}, ["--random-init"]))
    with pytest.raises(FileNotFoundError, match="no labels file"):
        linear_probe.main(to_argv({"data-dir": archive, "score-samples": samples, **common}, {}, ["--random-init"]))


def _stage1(spectrograms, rgb_release, out):
    """README: train_stage1.py --config ... --data-dir spectrograms --in-channels 1 --init-from RGB.pt."""
    argv = to_argv({"config": ROOT / "configs/stage1/tiny_vavae.yaml", "data-dir": spectrograms, "in-channels": 1,
                    "init-from": rgb_release, "output-dir": out, "exp-name": "doppler", "max-train-steps": 2,
                    "eval-samples": 4}, {})
    return train_stage1.main(train_stage1.parse_args(argv))


def test_domain_pipeline_end_to_end(spectrograms, rgb_release, tmp_path):
    # 1. fine-tune the RGB release on 1-channel data: first / last conv adapted, said in the log
    _stage1(spectrograms, rgb_release, tmp_path)
    log = (tmp_path / "doppler/log.txt").read_text()
    assert "RGB weights adapted to 1-channel images" in log
    assert Image.open(tmp_path / "doppler/samples/recon_0000002.png").mode == "L"  # 1-channel reconstructions
    # 2. export: the weights in the original layout plus doppler.json
    save_vae_weights.main(["--exp-dir", str(tmp_path / "doppler"), "--output-dir", str(tmp_path / "pretrained"),
                           "--name", "doppler"])
    export = tmp_path / "pretrained/doppler.pt"
    desc = json.loads((tmp_path / "pretrained/doppler.json").read_text())
    assert desc["kind"] == "vavae" and desc["in_channels"] == 1 and desc["model"]["vf_dim"] == 32
    assert not any(k.startswith(("format", "kind")) for k in torch.load(export, weights_only=True))
    # 3. cache with --vae-ckpt alone: cached as the vavae it was trained as, 1-channel
    latents = tmp_path / "latents"
    cache_latents.main(cache_latents.build_args(to_argv(
        {"data-dir": spectrograms, "output-dir": latents, "vae-ckpt": export, "resolution": 32,
         "num-workers": 0, "batch-size": 8}, {})))
    info = json.loads((latents / "tokenizer.json").read_text())
    assert (info["kind"], info["in_channels"], info["num_classes"]) == ("vavae", 1, 2)
    assert info["class_to_idx"] == {"user_00": 0, "user_01": 1}
    # 4. class-conditional LightningDiT with sample grids decoded by the export (--vae-ckpt alone)
    summary = train_ldm_only.main(train_ldm_only.parse_args(to_argv(
        {"config": ROOT / "configs/ldm/lightningdit_domain_small.yaml", "latents-dir": latents, "vae-ckpt": export,
         "num-classes": 2, "output-dir": tmp_path, "exp-name": "doppler-dit", "model": "LightningDiT-N/1",
         "batch-size": 4, "max-train-steps": 2, "checkpointing-steps": 2, "sampling-steps": 2,
         "sample-num-steps": 2, "num-sample-images": 4, "num-workers": 0, "report-to": "none"}, {})))
    assert summary["end_step"] == 2 and all(Image.open(f).mode == "L" for f in summary["samples"])  # grey grids
    ldm_log = (tmp_path / "doppler-dit/log.txt").read_text()
    assert "no GPU: --compile switched off" in ldm_log
    # 4b. the same network as a release (--ckpt --model): --vae-ckpt alone names the tokenizer too
    obj = torch.load(tmp_path / "doppler-dit/checkpoints/0000002.pt", map_location="cpu", weights_only=False)
    torch.save({"ema": obj["ema"]}, tmp_path / "dit.pt")
    torch.save({k: obj["latent_stats"][k].view(1, -1, 1, 1) for k in ("mean", "std")}, tmp_path / "dit-stats.pt")
    setup = load_models(generate.parse_args(to_argv(
        {"ckpt": tmp_path / "dit.pt", "model": "LightningDiT-N/1", "vae-ckpt": export,
         "vae-stats": tmp_path / "dit-stats.pt", "resolution": 32, "device": "cpu"}, {})), print)
    assert setup.info["vae"] == "vavae:doppler" and setup.latent_shape == (4, 8, 8)
    assert setup.decoder(torch.zeros(1, 4, 8, 8)).shape == (1, 1, 32, 32)  # 1-channel images
    # 5. labelled samples of chosen classes at CFG 4.0, 1-channel, labels beside the .npz
    gen = generate.main(to_argv({"exp-dir": tmp_path / "doppler-dit", "classes": "user_01,user_00",
                                 "samples-per-class": 3, "cfg-scale": 4.0, "sample-dir": tmp_path / "samples",
                                 "num-steps": 2, "device": "cpu"}, {}))
    npz = Path(gen["npz"])
    with np.load(npz) as f:
        assert f["arr_0"].shape == (6, 32, 32, 1)
    assert np.load(npz.with_suffix("") / "labels.npy").tolist() == [1, 1, 1, 0, 0, 0]
    # 6. class fidelity of the generated samples: the real-data classifier, per class
    probe = {"data-dir": spectrograms, "vae-ckpt": export, "resolution": 32, "optimizer": "lbfgs", "epochs": 5}
    out = tmp_path / "fidelity.json"
    result = linear_probe.main(to_argv({**probe, "score-samples": npz, "output": out}, {}, ["--flatten"]))
    fid = json.loads(out.read_text())["metrics"]["class_fidelity"]
    assert fid == result["class_fidelity"] and fid["per_class_count"] == {"user_00": 3, "user_01": 3}
    assert 0 <= fid["accuracy"] <= 1 and set(fid["per_class_accuracy"]) == {"user_00", "user_01"}
    # the score means what it says: the real images, written as samples, are recognised
    real = linear_probe.build_image_dataset(spectrograms, 32, 1)
    fake = tmp_path / "real-as-samples"
    fake.mkdir()
    np.savez(fake.with_suffix(".npz"), arr_0=np.stack([real[i][0].permute(1, 2, 0).numpy() for i in range(len(real))]))
    np.save(fake / "labels.npy", real.labels)
    again = linear_probe.main(to_argv({**probe, "score-samples": fake.with_suffix(".npz"), "output": out}, {},
                                      ["--flatten"]))
    assert again["class_fidelity"]["num_samples"] == 16 and again["class_fidelity"]["accuracy"] >= 0.75
