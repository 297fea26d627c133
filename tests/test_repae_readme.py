"""The REPA-E README's commands, with its flag names, run unchanged and chain: preprocess ->
train_repae -> (continue) -> save_vae_weights -> cache_latents -> train_ldm_only -> torchrun
generate.py -> .npz. Only the offline stand-ins (`--random-init-vae`, `--random-init-encoders`, a
loss config without LPIPS) and tiny sizes differ from the README. Also: the originals' defaults (fp16 / compile switched off on CPU with a
notice, the launcher's precision wins), wandb offline without a login, and `--help` listing the
original names."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cache_latents
import generate
import preprocessing
import save_vae_weights
import train_ldm_only
import train_repae
import utils
from datasources import make_procedural_dataset
from models.vae_loading import load_vae
from models.discriminators import NLayerDiscriminator
from tests.cli import free_port

ROOT = Path(__file__).resolve().parents[1]
LOSS_CFG = str(ROOT / "configs/repae/demo_loss.yaml")  # the README's l1_lpips_kl_gan.yaml without LPIPS (offline)


def readme_train_repae(exp_name, steps, *extra):
    """`accelerate launch train_repae.py ...` of the README, tiny sizes."""
    return [f"--max-train-steps={steps}", "--report-to=wandb", "--allow-tf32", "--mixed-precision=fp16", "--seed=0",
            "--data-dir=data", "--output-dir=exps", "--batch-size=4", "--path-type=linear", "--prediction=v",
            "--weighting=uniform", "--model=SiT-N/4", "--checkpointing-steps=2", f"--loss-cfg-path={LOSS_CFG}",
            "--vae=tiny-f4d4", "--enc-type=dinov2-vit-tiny", "--proj-coeff=0.5", "--encoder-depth=2",
            "--vae-align-proj-coeff=1.5", "--bn-momentum=0.1", f"--exp-name={exp_name}",
            "--resolution=32", "--num-classes=4", "--num-workers=0", "--sampling-steps=0",
            "--random-init-vae", "--random-init-encoders", *extra]


def test_readme_commands_chain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the README's relative paths: data/, exps/
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    make_procedural_dataset(tmp_path / "imagenet_train", num_classes=4, per_class=3, resolution=40, seed=0)

    # 2. python preprocessing.py --imagenet-path ... : the archive lands where --data-dir data reads it
    preprocessing.main(["--imagenet-path", "imagenet_train", "--output-path", "data", "--resolution", "32",
                        "--num-workers", "1", "--max-images", "12"])
    assert json.loads((tmp_path / "data/index.json").read_text())["num_images"] == 12

    # 3. accelerate launch train_repae.py ... (fp16 and compile are GPU defaults: off on CPU, said so)
    summary = train_repae.main(train_repae.parse_args(readme_train_repae("repae", 2)))
    assert summary["end_step"] == 2
    log = (tmp_path / "exps/repae/log.txt").read_text()
    assert "fp16 switched off" in log and "--compile switched off" in log
    runs = sorted((tmp_path / "exps/repae/wandb").glob("offline-run-*"))
    assert len(runs) == 1  # wandb's run folder sits in the experiment folder

    # --continue-train-exp-dir + --resume-step: the original's meaning (checkpoint read from that
    # folder, the run written to --exp-name); --wandb-history-path continues the wandb run
    summary = train_repae.main(train_repae.parse_args(readme_train_repae(
        "repae-cont", 3, "--continue-train-exp-dir=exps/repae", "--resume-step=2", f"--wandb-history-path={runs[0]}",
        "--no-allow-tf32", "--no-compile")))
    assert summary["start_step"] == 2 and summary["end_step"] == 3
    assert utils.list_checkpoints(tmp_path / "exps/repae-cont/checkpoints") == [3]
    assert utils.list_checkpoints(tmp_path / "exps/repae/checkpoints") == [2]
    run_id = runs[0].name.rsplit("-", 1)[1]
    assert any(p.name.endswith(run_id) for p in (tmp_path / "exps/repae-cont/wandb").glob("offline-run-*"))

    # 4. python save_vae_weights.py --repae-ckpt ... --vae-name ... --save-dir ...: original layout
    save_vae_weights.main(["--repae-ckpt", "exps/repae-cont/checkpoints/0000003.pt", "--vae-name", "e2e-vae",
                           "--save-dir", "exps"])
    out = tmp_path / "exps/e2e-vae"
    ckpt = torch.load(tmp_path / "exps/repae-cont/checkpoints/0000003.pt", map_location="cpu", weights_only=False)
    stats = torch.load(out / "e2e-vae-latents-stats.pt", weights_only=True)
    assert set(stats) == {"latents_scale", "latents_bias"}
    torch.testing.assert_close(stats["latents_scale"].flatten(), ckpt["ema"]["bn.running_var"].rsqrt())
    torch.testing.assert_close(stats["latents_bias"].flatten(), ckpt["ema"]["bn.running_mean"])
    disc = torch.load(out / "e2e-vae-discriminator-ckpt.pt", weights_only=True)
    assert disc and all(k.startswith("main.") for k in disc)
    NLayerDiscriminator(input_nc=3, ndf=32, n_layers=2, use_actnorm=False).load_state_dict(disc, strict=True)
    vae_sd = torch.load(out / "e2e-vae.pt", weights_only=True)
    assert vae_sd.keys() == ckpt["vae"].keys()
    load_vae("tiny-f4d4", ckpt_path=out / "e2e-vae.pt")

    # 4.2 accelerate launch cache_latents.py --vae-arch ... (resolution from the archive)
    cache_latents.main(cache_latents.build_args(["--vae-arch=tiny-f4d4", "--vae-ckpt-path=exps/e2e-vae/e2e-vae.pt",
                                                 "--vae-latents-name=e2e-vae", "--pproc-batch-size=4"]))
    info = json.loads((tmp_path / "data/e2e-vae/tokenizer.json").read_text())
    assert info["resolution"] == 32 and info["num_images"] == 12

    # 4.3 accelerate launch train_ldm_only.py ... --data-dir data --vae-latents-name ... --vae-ckpt ...
    summary = train_ldm_only.main(train_ldm_only.parse_args([
        "--max-train-steps=2", "--report-to=wandb", "--allow-tf32", "--mixed-precision=fp16", "--seed=0",
        "--data-dir=data", "--batch-size=4", "--path-type=linear", "--prediction=v", "--weighting=uniform",
        "--model=SiT-N/4", "--checkpointing-steps=2", "--vae=tiny-f4d4", "--vae-ckpt=exps/e2e-vae/e2e-vae.pt",
        "--vae-latents-name=e2e-vae", "--learning-rate=1e-4", "--enc-type=dinov2-vit-tiny", "--proj-coeff=0.5",
        "--encoder-depth=2", "--output-dir=exps", "--exp-name=ldm", "--num-classes=4", "--num-workers=0",
        "--sampling-steps=0", "--random-init-encoders"]))
    assert summary["end_step"] == 2
    ldm = torch.load(tmp_path / "exps/ldm/checkpoints/0000002.pt", map_location="cpu", weights_only=False)
    # the SiT normalises with the E2E-VAE's trained statistics (REPA-E), not the cache's
    torch.testing.assert_close(ldm["ema"]["bn.running_mean"], ckpt["ema"]["bn.running_mean"])
    torch.testing.assert_close(ldm["ema"]["bn.running_var"], ckpt["ema"]["bn.running_var"])
    assert "e2e-vae-latents-stats.pt" in (tmp_path / "exps/ldm/log.txt").read_text()

    # 5. torchrun generate.py ...: the samples and one .npz (arr_0 uint8 [N, H, W, 3]) for the ADM evaluator
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=1", "--master_port",
           free_port(), str(ROOT / "generate.py"), "--num-fid-samples", "4", "--path-type", "linear", "--mode", "sde",
           "--num-steps", "3", "--cfg-scale", "1.0", "--guidance-high", "1.0", "--guidance-low", "0.0",
           "--exp-path", "exps/ldm", "--train-steps", "2", "--pproc-batch-size", "4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (npz,) = (tmp_path / "samples").glob("ldm_0000002_*.npz")
    with np.load(npz) as f:
        assert f["arr_0"].shape == (4, 32, 32, 3) and f["arr_0"].dtype == np.uint8


def test_launcher_precision_wins_unless_the_flag_is_given(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["--data-dir", str(tmp_path), "--exp-name", "x"]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert train_repae.parse_args(base).mixed_precision == "bf16"
    assert train_repae.parse_args(base + ["--mixed-precision", "no"]).mixed_precision == "no"
    # accelerate launch exports 'no' also when nothing was set: the script default (fp16) stands,
    # and fp16 autocast is off on CPU with a notice
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    utils.DEFAULT_NOTICES.clear()
    args = train_repae.parse_args(base)
    assert args.mixed_precision == "no" and args.compile is False and args.allow_tf32 is True
    assert any("fp16 switched off" in n for n in utils.DEFAULT_NOTICES)
    assert any("--compile switched off" in n for n in utils.DEFAULT_NOTICES)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = train_ldm_only.parse_args(["--latents-dir", str(tmp_path)])
    assert (args.mixed_precision, args.compile, args.report_to, args.enc_type) == ("fp16", True, "wandb", "dinov2-vit-b")
    assert train_ldm_only.parse_args(["--latents-dir", str(tmp_path), "--model", "LightningDiT-N/1"]).enc_type == "none"
    utils.DEFAULT_NOTICES.clear()


def test_wandb_without_login_goes_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    args = train_repae.parse_args(["--exp-name", "e", "--no-compile", "--mixed-precision", "no"])
    kwargs = utils.wandb_init_kwargs(args, tmp_path / "e")
    assert kwargs == {"name": "e", "dir": str(tmp_path / "e")}
    assert os.environ["WANDB_MODE"] == "offline"
    assert any("no wandb login" in n for n in utils.DEFAULT_NOTICES)
    utils.DEFAULT_NOTICES.clear()
    (tmp_path / "id.txt").write_text("abc123\n")
    assert utils.wandb_run_id(tmp_path / "id.txt") == "abc123"
    assert utils.wandb_run_id(tmp_path / "wandb/run-20250101_120000-xyz9/files") == "xyz9"
    with pytest.raises(SystemExit, match="wandb-history-path"):
        utils.wandb_run_id(tmp_path)


@pytest.mark.parametrize("module, names", [
    (preprocessing, ["--imagenet-path", "--output-path", "--resolution", "--num-workers", "--max-images"]),
    (save_vae_weights, ["--repae-ckpt", "--vae-name", "--save-dir"]),
    (cache_latents, ["--vae-arch", "--vae-ckpt-path", "--vae-latents-name", "--pproc-batch-size", "--data-dir",
                     "--output-dir"]),
    (train_ldm_only, ["--vae-latents-name", "--vae-ckpt", "--no-allow-tf32", "--no-compile", "--wandb-history-path",
                      "--continue-train-exp-dir", "--resume-step", "--enc-type", "--mixed-precision"]),
    (generate, ["--num-fid-samples", "--path-type", "--mode", "--num-steps", "--cfg-scale", "--guidance-high",
                "--guidance-low", "--exp-path", "--train-steps", "--heun", "--global-seed", "--sample-dir",
                "--pproc-batch-size"]),
    (train_repae, ["--no-allow-tf32", "--no-compile", "--wandb-history-path", "--continue-train-exp-dir",
                   "--disc-pretrained-ckpt", "--loss-cfg-path", "--vae-align-proj-coeff", "--bn-momentum"]),
])
def test_help_lists_the_original_names(module, names, capsys):
    entry = {cache_latents: cache_latents.build_args, train_ldm_only: train_ldm_only.parse_args,
             train_repae: train_repae.parse_args, generate: generate.parse_args}.get(module, getattr(module, "main"))
    with pytest.raises(SystemExit):
        entry(["--help"])
    text = capsys.readouterr().out
    missing = [n for n in names if n not in text]
    assert not missing, f"{module.__name__} --help lacks {missing}"


def test_latent_statistics_source(tmp_path):
    """auto: the VAE's `-latents-stats.pt` for the SiT (var = 1 / scale^2 - bn_eps recovers the
    BatchNorm's running variance), the cache for the other families or with --latent-stats-from cache."""
    from argparse import Namespace

    torch.save({}, tmp_path / "v.pt")
    scale, bias = torch.tensor([0.5, 2.0]), torch.tensor([1.0, -1.0])
    torch.save({"latents_scale": scale.view(1, 2, 1, 1), "latents_bias": bias.view(1, 2, 1, 1)},
               tmp_path / "v-latents-stats.pt")
    cache = {"channel_mean": torch.zeros(2), "channel_var": torch.ones(2)}
    args = Namespace(vae_ckpt=str(tmp_path / "v.pt"), latents_dir="lat", latent_stats_from="auto")
    stats, source = train_ldm_only.latent_statistics(args, cache, "sit", "channel", (2, 4, 4))
    assert source.endswith("v-latents-stats.pt")
    torch.testing.assert_close(stats["channel_mean"], bias)
    torch.testing.assert_close(stats["channel_var"], torch.tensor([4.0, 0.25]))
    assert train_ldm_only.latent_statistics(args, cache, "lightningdit", "channel", (2, 4, 4))[0] is cache
    args.latent_stats_from = "cache"
    assert train_ldm_only.latent_statistics(args, cache, "sit", "channel", (2, 4, 4)) == (cache, "lat/latents_stats.pt")
    args.latent_stats_from = "vae"
    with pytest.raises(SystemExit, match="per-channel"):
        train_ldm_only.latent_statistics(args, cache, "ddt", "position", (2, 4, 4))
