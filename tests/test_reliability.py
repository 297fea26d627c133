"""Reliability guarantees shared by every script (issue 14): files that would run code are refused,
written files get the umask's mode, stop signals reach the whole process group and end the run with
a saved checkpoint and exit code 128 + signal, interrupted writes are cleaned, a truncated latest
checkpoint is passed over, a failed resume leaves the experiment intact, bad flag / config values
are refused by name, 16-bit images are scaled, a full disk is named, upsampling is reported."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cache_latents
import preprocessing
import train_ldm_only
import train_repae
import train_stage1
import utils
from datasources import UPSAMPLED, load_image, make_procedural_dataset
from tests.cli import to_argv

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this object creates a folder: proof that a load ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# --------------------------------------------------------------------------------------------
# 1. safe loading
# --------------------------------------------------------------------------------------------
def test_pickle_payload_is_refused_everywhere_and_never_runs(tmp_path):
    from evaluation.inception import build_inception

    marker = tmp_path / "payload-ran"
    bad = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Payload(marker)}, bad)
    for load in (lambda: utils.load_checkpoint_file(bad), lambda: utils.torch_load_safe(bad),
                 lambda: build_inception(weights_path=bad)):
        with pytest.raises(utils.UnsafeCheckpointError, match="evil.pt") as e:
            load()
        assert "weights_only=False" in str(e.value)  # says how to convert a trusted file
    assert not marker.exists()


def test_released_checkpoints_with_plain_data_still_load(tmp_path):
    import argparse

    # REPA / REPA-E / LightningDiT store their args as a Namespace; Lightning files hold numpy scalars
    obj = {"ema": {"w": torch.ones(2)}, "args": argparse.Namespace(model="SiT-XL/2"), "score": np.float64(1.5),
           "table": np.arange(3)}
    torch.save(obj, tmp_path / "released.pt")
    got = utils.load_checkpoint_file(tmp_path / "released.pt")
    assert got["args"].model == "SiT-XL/2" and got["score"] == 1.5 and got["table"].tolist() == [0, 1, 2]


def test_export_as_safetensors_reloads_strictly(tmp_path):
    import save_vae_weights
    from models.discriminators import NLayerDiscriminator, load_discriminator
    from models.tokenizers import build_tokenizer

    tok = build_tokenizer("kl", name="tiny-f4d4", random_init=True, seed=1)
    disc = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=1)
    torch.save({"vae": tok.model.state_dict(), "discriminator": disc.state_dict(),
                "ema": {"bn.running_mean": torch.zeros(4), "bn.running_var": torch.ones(4)}}, tmp_path / "c.pt")
    save_vae_weights.main(["--ckpt", str(tmp_path / "c.pt"), "--output-dir", str(tmp_path / "out"),
                           "--format", "safetensors"])
    again = build_tokenizer("kl", name="tiny-f4d4", ckpt=tmp_path / "out/e2e-vae.safetensors")
    for a, b in zip(tok.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    disc2 = load_discriminator(tmp_path / "out/e2e-vae-discriminator-ckpt.safetensors", input_nc=3, ndf=8, n_layers=1)
    for a, b in zip(disc.state_dict().values(), disc2.state_dict().values()):
        assert torch.equal(a, b)


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    import random

    utils.seed_everything(7)
    random.gauss(0, 1)  # a cached Gaussian in python's state
    np.random.standard_normal()
    state = utils.rng_state()
    torch.save({"rng": [state]}, tmp_path / "r.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    utils.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"][0])
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


# --------------------------------------------------------------------------------------------
# 2. file modes, 8. stale temp files, 16. disk full
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_write_gives_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        utils.atomic_write_text("x", tmp_path / "a.json")
        utils.atomic_save({"w": torch.zeros(1)}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    for name in ("a.json", "b.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_reference_stats_are_written_atomically_with_the_umask_mode(tmp_path):
    from evaluation.inception import InceptionFeatures, build_inception
    from evaluation.metrics import save_reference_stats

    extractor = InceptionFeatures(build_inception(random_init=True), image_size=75, chunk_size=4)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    save_reference_stats(tmp_path / "ref.npz", images, extractor, batch_size=4)
    with np.load(tmp_path / "ref.npz") as ref:
        assert sorted(ref.files) == ["mu", "mu_s", "sigma", "sigma_s"]
    assert (tmp_path / "ref.npz").stat().st_mode & 0o777 == utils.new_file_mode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]


def test_only_our_temp_pattern_is_removed(tmp_path):
    ours = [tmp_path / ".0000003.pt.k2j_9xq1.tmp", tmp_path / ".latents-00001.safetensors.abcdefgh.tmp",
            tmp_path / ".sampling_config.json.0a1b2c3d.tmp"]
    users = [tmp_path / ".notes.tmp", tmp_path / "draft.tmp", tmp_path / ".0000003.pt", tmp_path / "0000003.pt"]
    for p in ours + users:
        p.write_text("x")
    removed = utils.remove_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted(ours)
    assert all(p.exists() for p in users) and not any(p.exists() for p in ours)


def test_disk_full_in_preprocessing_names_enospc_and_the_file(tmp_path, monkeypatch, capsys):
    src = make_procedural_dataset(tmp_path / "src", num_classes=2, per_class=2, resolution=16, seed=0)

    def short_write(f, array):  # what numpy raises when the device fills up mid-file
        f.write(b"\0" * 10)
        raise OSError(f"{array.nbytes} requested and 10 written")

    monkeypatch.setattr(preprocessing.np, "save", short_write)
    with pytest.raises(SystemExit) as e:
        preprocessing.main(["--source", str(src), "--dest", str(tmp_path / "dst"), "--resolution", "16",
                            "--workers", "1"])
    assert "ENOSPC" in str(e.value.code) and "images-00000.npy" in str(e.value.code)
    assert not list((tmp_path / "dst").glob(".*.tmp"))  # nothing half-written left behind
    err = OSError(errno.ENOSPC, "No space left on device")
    assert utils._is_disk_full(err)


# --------------------------------------------------------------------------------------------
# 12. 16-bit images, 17. upsampled images
# --------------------------------------------------------------------------------------------
def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    got = load_image(tmp_path / "deep.png", 8, channels=1)[0].numpy().astype(int)
    expected = np.round(ramp.astype(float) * 255 / 65535).astype(int)
    assert np.abs(got - expected).max() <= 1 and (got == 255).mean() < 0.05
    rgb = load_image(tmp_path / "deep.png", 8, channels=3)
    assert torch.equal(rgb[0], rgb[2]) and abs(int(rgb[0].max()) - 255) <= 1
    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(OSError, match="wide.tif.*beyond 16 bit"):
        load_image(tmp_path / "wide.tif", 8)


def test_images_smaller_than_the_resolution_are_counted_and_reported(tmp_path, capsys):
    src = make_procedural_dataset(tmp_path / "src", num_classes=2, per_class=3, resolution=16, seed=0)
    UPSAMPLED["count"] = 0
    with pytest.warns(UserWarning, match="smaller than the resolution 32") as record:
        load_image(next(src.rglob("*.png")), 32)
        load_image(next(src.rglob("*.png")), 32)
    assert len([w for w in record if "smaller than" in str(w.message)]) == 1  # said once
    assert UPSAMPLED["count"] == 2
    preprocessing.main(["--source", str(src), "--dest", str(tmp_path / "dst"), "--resolution", "32",
                        "--workers", "1", "--shard-size", "4"])
    index = json.loads((tmp_path / "dst/index.json").read_text())
    assert index["num_upsampled"] == 6
    assert "6 images were smaller than --resolution 32" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# 14. bad flag and config values, refused by name in every trainer
# --------------------------------------------------------------------------------------------
PARSERS = {"train_repae": (train_repae.parse_args, ["--data-dir", "d"]),
           "train_ldm_only": (train_ldm_only.parse_args, ["--latents-dir", "l"]),
           "train_stage1": (train_stage1.parse_args, ["--data-dir", "d"])}


@pytest.mark.parametrize("script", sorted(PARSERS))
@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--max-train-steps", "0"),
                                        ("--max-train-steps", "-5"), ("--checkpointing-steps", "0"),
                                        ("--gradient-accumulation-steps", "0"), ("--num-workers", "-1"),
                                        ("--max-train-steps", "2.5")])
def test_bad_flag_values_are_refused_by_name(script, flag, value, capsys):
    parse, required = PARSERS[script]
    with pytest.raises(SystemExit):
        parse(required + [flag, value])
    assert f"argument {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("script", sorted(PARSERS))
@pytest.mark.parametrize("text,key", [("max_train_steps: 2.5", "max_train_steps"), ("batch-size: 0", "batch-size"),
                                      ("checkpointing_steps: true", "checkpointing_steps"),
                                      ("mixed_precision: fp8", "mixed_precision")])
def test_bad_config_values_are_refused_by_key(script, text, key, tmp_path):
    parse, required = PARSERS[script]
    (tmp_path / "c.yaml").write_text(text + "\n")
    with pytest.raises(ValueError, match=f"c.yaml: key '{key}'"):
        parse(required + ["--config", str(tmp_path / "c.yaml")])


def test_config_values_go_through_the_flag_types(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-4\nmax_train_steps: 7\n")  # YAML reads 1e-4 as a string
    args = train_ldm_only.parse_args(["--latents-dir", "l", "--config", str(tmp_path / "c.yaml")])
    assert args.learning_rate == 1e-4 and args.max_train_steps == 7


def test_one_name_per_idea_both_names_work_everywhere(tmp_path):
    """cache_latents' --random-init is the trainers' --random-init-vae and generate.py's
    --per-proc-batch-size its per-process batch: each script takes both names, on the command line
    and as --config keys."""
    cache = ["--data-dir", "d", "--output-dir", "o"]
    args = cache_latents.build_args(cache + ["--random-init-vae", "--per-proc-batch-size", "4"])
    assert args.random_init_vae and args.per_proc_batch_size == 4 and args.batch_size is None
    (tmp_path / "c.yaml").write_text("random-init-vae: true\nper_proc_batch_size: 5\n")
    args = cache_latents.build_args(cache + ["--config", str(tmp_path / "c.yaml")])
    assert args.random_init_vae and args.per_proc_batch_size == 5
    assert train_ldm_only.parse_args(["--latents-dir", "l", "--random-init"]).random_init_vae
    assert train_repae.parse_args(["--random-init"]).random_init_vae
    (tmp_path / "t.yaml").write_text("random_init: true\n")
    assert train_repae.parse_args(["--config", str(tmp_path / "t.yaml")]).random_init_vae


def _parser_of(parse, argv, monkeypatch):
    class Built(Exception):
        pass

    def capture(parser, argv=None):
        raise Built(parser)

    monkeypatch.setattr(utils, "parse_args_with_config", capture)
    with pytest.raises(Built) as e:
        parse(argv)
    return e.value.args[0]


def test_flags_shared_by_the_diffusion_trainers_are_one_definition(monkeypatch):
    """The SiT / REPA / flow-loss / sample-grid flags come from utils.config's groups: the same
    names, types, defaults and choices in train_repae.py and train_ldm_only.py."""
    shared = ["fused_attn", "encoder_depth", "projector_dim", "path_type", "prediction", "cfg_prob", "weighting",
              "random_init_encoders", "encoder_weights_dir", "proj_coeff", "learning_rate", "ema_decay",
              "sample_num_steps", "sample_cfg_scale", "num_sample_images", "random_init_vae"]
    parsers = [_parser_of(train_repae.parse_args, [], monkeypatch), _parser_of(train_ldm_only.parse_args, [], monkeypatch)]
    described = [{a.dest: a for a in p._actions} for p in parsers]
    for dest in shared:
        a, b = (d[dest] for d in described)
        assert (a.option_strings, a.type, a.default, a.nargs) == (b.option_strings, b.type, b.default, b.nargs), dest
        assert a.choices is None or set(a.choices) <= set(b.choices), dest  # ldm adds logit-normal for LightningDiT


def test_cache_latents_refuses_a_zero_batch(capsys):
    with pytest.raises(SystemExit):
        cache_latents.build_args(["--data-dir", "d", "--output-dir", "o", "--batch-size", "0"])
    assert "argument --batch-size" in capsys.readouterr().err


def test_cache_latents_batch_size_is_the_global_batch(capsys):
    """--batch-size is the global batch as in the trainers (split over the processes, refused when
    it does not divide), --per-proc-batch-size one process's batch; the two exclude each other."""
    base = ["--data-dir", "d", "--output-dir", "o"]
    per_process = cache_latents.per_process_batch
    assert per_process(cache_latents.build_args(base + ["--batch-size", "64"]), 4) == 16
    assert per_process(cache_latents.build_args(base + ["--pproc-batch-size", "64"]), 4) == 64
    assert per_process(cache_latents.build_args(base), 4) == 128  # REPA-E's default, per process
    with pytest.raises(SystemExit, match="--batch-size 6 .*not divisible by the 4 processes"):
        per_process(cache_latents.build_args(base + ["--batch-size", "6"]), 4)
    with pytest.raises(SystemExit):
        cache_latents.build_args(base + ["--batch-size", "8", "--per-proc-batch-size", "2"])
    assert "not both" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Trainer runs on cached latents (the lightest trainer): 6/7 signals, 8 temp files at start,
# 9 truncated checkpoints, 10 args.json of a failed resume
# --------------------------------------------------------------------------------------------
def cache_argv(images, out):
    return ["--data-dir", str(images), "--output-dir", str(out), "--tokenizer", "kl", "--vae", "tiny-f4d4",
            "--random-init", "--seed", "3", "--resolution", "16", "--batch-size", "8", "--shard-size", "8",
            "--num-workers", "0", "--dtype", "float32"]


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    images = make_procedural_dataset(root / "images", num_classes=2, per_class=4, resolution=16, seed=0)
    cache_latents.main(cache_latents.build_args(cache_argv(images, root / "latents")))
    return root / "latents"


def test_cache_latents_rerun_removes_interrupted_writes(latents):
    from datasources import latent_shard_path

    shards = latent_shard_path(latents, 0).parent
    stale, mine = shards / ".latents-00000.safetensors.x1y2z3w4.tmp", shards / "notes.tmp"
    stale.write_bytes(b"half a shard")
    mine.write_text("a user's file")
    try:
        summary = cache_latents.main(cache_latents.build_args(cache_argv(latents.parent / "images", latents)))
        assert summary["encoded_shards"] == 0 and not stale.exists() and mine.exists()
    finally:
        mine.unlink()
    # shards are written through the same temp-file naming and get the umask's mode too
    assert latent_shard_path(latents, 0).stat().st_mode & 0o777 == utils.new_file_mode()
    fd, name = utils.reserve_temp_file(latent_shard_path(latents, 0))
    os.close(fd)
    assert utils.remove_stale_temp_files(shards) == [Path(name)]


def ldm_flags(latents, out, name, steps, **extra):
    f = {"latents-dir": latents, "output-dir": out, "exp-name": name, "num-classes": 2, "model": "LightningDiT-N/1",
         "batch-size": 2, "max-train-steps": steps, "checkpointing-steps": 2, "sampling-steps": 0,
         "num-workers": 0, "report-to": "none", "seed": 3}
    return to_argv(f, extra, ["--no-compile", "--no-sample-grids"])


def ldm_run(argv):
    return train_ldm_only.main(train_ldm_only.parse_args(argv))


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return i


def test_workers_signalled_before_their_init_survive():
    """A process-group SIGTERM can land between a worker's fork and its worker_init_fn; workers
    started by `utils.start_workers` hold it blocked until they ignore it (a plain iter() dies with
    "DataLoader worker ... is killed by signal"). The main thread's signal mask is restored."""
    import signal as sig

    loader = torch.utils.data.DataLoader(_Numbers(), batch_size=2, num_workers=2)
    utils.shield_workers(loader)
    before = sig.pthread_sigmask(sig.SIG_BLOCK, [])
    for _ in range(3):
        it = utils.start_workers(loader)
        for w in it._workers:  # at once: most workers have not reached their init yet
            os.kill(w.pid, sig.SIGTERM)
        assert sorted(int(v) for b in it for v in b) == list(range(8))
    assert sig.pthread_sigmask(sig.SIG_BLOCK, []) == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_process_group_with_workers_saves_and_exits_128_plus_signal(latents, tmp_path, sig):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    argv = ldm_flags(latents, tmp_path, "sig", 100000, checkpointing_steps=100000, num_workers=2)
    # its own session: the signal goes to the trainer and its DataLoader workers, as scancel does
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_ldm_only.py")] + argv, env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = tmp_path / "sig/log.txt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (log.is_file() and "step 0000003" in log.read_text()):
        time.sleep(0.2)
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 128 + sig, out[-3000:]
    assert "killed by signal" not in out
    steps = utils.list_checkpoints(tmp_path / "sig/checkpoints")
    text = log.read_text()
    assert len(steps) == 1 and steps[0] >= 3 and f"stopped by {signal.Signals(sig).name} at step {steps[0]}" in text
    assert "done at step" not in text
    summary = json.loads((tmp_path / "sig/summary.json").read_text())
    assert summary["stopped"] == {"signal": signal.Signals(sig).name, "step": steps[0], "exit_code": 128 + sig}
    # the saved state loads safely and resumes
    resumed = ldm_run(ldm_flags(latents, tmp_path, "sig", steps[0] + 1, resume="latest"))
    assert resumed["start_step"] == steps[0] and resumed["stopped"] is None


def test_sigterm_to_a_two_process_launch_saves_once_and_exits_non_zero(latents, tmp_path):
    from tests.cli import free_port

    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           free_port(), str(ROOT / "train_ldm_only.py")] + ldm_flags(latents, tmp_path, "ddp", 100000, batch_size=4,
                                                                checkpointing_steps=100000, num_workers=1)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log = tmp_path / "ddp/log.txt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (log.is_file() and "step 0000003" in log.read_text()):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # launcher, both ranks and their workers, as scancel does
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0 and "killed by signal" not in out, out[-3000:]
    steps = utils.list_checkpoints(tmp_path / "ddp/checkpoints")
    assert len(steps) == 1 and f"stopped by SIGTERM at step {steps[0]}" in log.read_text()
    ckpt = torch.load(utils.checkpoint_path(tmp_path / "ddp/checkpoints", steps[0]), weights_only=True)
    assert len(ckpt["rng"]) == 2 and ckpt["steps"] == steps[0]


def test_truncated_latest_checkpoint_falls_back_and_names_the_file(latents, tmp_path):
    ldm_run(ldm_flags(latents, tmp_path, "cut", 4))
    ckpts = tmp_path / "cut/checkpoints"
    latest = utils.checkpoint_path(ckpts, 4)
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="0000004.pt"):  # an explicit step names the broken file
        ldm_run(ldm_flags(latents, tmp_path, "cut", 6, resume="4"))
    (ckpts / ".0000006.pt.a1b2c3d4.tmp").write_bytes(b"half")  # an interrupted save of an earlier start
    summary = ldm_run(ldm_flags(latents, tmp_path, "cut", 6, resume="latest"))
    assert summary["start_step"] == 2
    log = (tmp_path / "cut/log.txt").read_text()
    assert "skipping incomplete checkpoint" in log and "0000004.pt" in log
    assert "removed 1 temp file(s)" in log and not list(ckpts.glob("*.tmp"))


def test_failed_resume_leaves_args_json_and_keeps_one_args_file_per_start(latents, tmp_path):
    from models.loading import _experiment_checkpoint

    ldm_run(ldm_flags(latents, tmp_path, "exp", 2))
    exp = tmp_path / "exp"
    before = (exp / "args.json").read_bytes()
    with pytest.raises(utils.StateDictMismatch):
        ldm_run(ldm_flags(latents, tmp_path, "exp", 4, resume="latest", model="DiTDH-N"))
    assert (exp / "args.json").read_bytes() == before
    exp_args, ckpt = _experiment_checkpoint(exp, None, "--exp-dir")
    assert exp_args["model"] == "LightningDiT-N/1" and ckpt.name == "0000002.pt"
    assert len(list(exp.glob("args-*.json"))) == 1
    time.sleep(1.1)  # history files are named by the start time (seconds)
    ldm_run(ldm_flags(latents, tmp_path, "exp", 4, resume="latest"))
    history = sorted(exp.glob("args-*.json"))
    assert len(history) == 2 and history[-1].name.endswith("-from-0000002.json")
    assert json.loads((exp / "args.json").read_text())["max_train_steps"] == 4
