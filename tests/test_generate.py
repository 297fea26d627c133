"""generate.py on a hand-made tiny experiment folder: index-keyed randomness (1 vs 2 gloo
processes give the same images), resume without regeneration, refusal to mix configurations,
clear errors, recipes, and --eval through the shared metrics code."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cli import free_port
import generate
import samplers
from sampling import cli
from evaluation.training import caption_rows, evaluate_generation, grid_row_labels
from models.autoencoder import build_vae
from models.diffusion import VelocityModel
from models.loading import LatentDecoder, load_models
from models.sit import build_sit

ROOT = Path(__file__).resolve().parents[1]


def make_experiment(root: Path, step: int = 10) -> Path:
    """args.json + checkpoints/NNNNNNN.pt in train_repae.py's layout, tiny random models."""
    torch.manual_seed(0)
    exp = root / "exp"
    (exp / "checkpoints").mkdir(parents=True)
    vae = build_vae("tiny-f4d4")
    sit = build_sit("SiT-N/2", input_size=8, in_channels=4, num_classes=4, class_dropout_prob=0.1, z_dims=[32],
                    projector_dim=64, encoder_depth=2)
    with torch.no_grad():  # adaLN-Zero starts as the zero map: give the network some output
        for p in sit.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        sit.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
        sit.bn.running_var.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
    args = {"model": "SiT-N/2", "resolution": 32, "num_classes": 4, "cfg_prob": 0.1, "encoder_depth": 2,
            "projector_dim": 64, "vae": "tiny-f4d4", "vae_ckpt": None, "path_type": "linear", "qk_norm": False}
    (exp / "args.json").write_text(json.dumps(args))
    torch.save({"model": sit.state_dict(), "ema": sit.state_dict(), "vae": vae.state_dict(), "discriminator": {},
                "args": args, "steps": step,
                "latent_stats": sit.latent_stats(include_eps=True)},
               exp / "checkpoints" / f"{step:07d}.pt")
    return exp


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    return make_experiment(tmp_path_factory.mktemp("gen"))


def base_args(exp, out, *extra):
    return ["--exp-dir", str(exp), "--ckpt-step", "10", "--sample-dir", str(out), "--folder-name", "run",
            "--device", "cpu", "--num-fid-samples", "10", "--per-proc-batch-size", "4", *extra]


def load_pngs(folder: Path, n: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(folder / f"{i:06d}.png")) for i in range(n)])


def test_index_randomness_is_batch_and_subset_invariant():
    idx = torch.arange(20)
    full = samplers.index_normal(3, idx, 0, (4, 8, 8))
    part = samplers.index_normal(3, idx[[17, 2, 9]], 0, (4, 8, 8))
    assert torch.equal(full[[17, 2, 9]], part)
    assert not torch.equal(samplers.index_normal(4, idx, 0, (4, 8, 8)), full)  # the seed matters
    assert not torch.equal(samplers.index_normal(3, idx, 1, (4, 8, 8)), full)  # and the stream
    big = samplers.index_normal(0, torch.arange(4000), 0, (64,)).double()
    assert abs(big.mean().item()) < 0.01 and abs(big.std().item() - 1) < 0.01
    labels = samplers.index_labels(0, torch.arange(4000), 10, "random")
    assert labels.min() == 0 and labels.max() == 9 and torch.bincount(labels).min() > 300
    eq = samplers.index_labels(0, torch.arange(12), 4, "equal")
    assert torch.bincount(eq).tolist() == [3, 3, 3, 3]
    # 'equal' labels per index are the same however the indices are split over ranks
    assert torch.equal(torch.cat([samplers.index_labels(0, torch.arange(r, 12, 5), 4, "equal") for r in range(5)]).sort().values,
                       eq.sort().values)


def test_generate_resume_and_refusal(exp, tmp_path):
    out = tmp_path / "samples"
    res = generate.main(base_args(exp, out, "--num-steps", "3", "--cfg-scale", "2.0", "--guidance-high", "0.7"))
    folder = out / "run"
    assert res["generated"] == 10
    imgs = load_pngs(folder, 10)
    assert imgs.shape == (10, 32, 32, 3) and imgs.dtype == np.uint8 and imgs.std() > 0
    with np.load(out / "run.npz") as data:
        assert np.array_equal(data["arr_0"], imgs)
    cfg = json.loads((folder / "sampling_config.json").read_text())
    assert cfg["cfg_scale"] == 2.0 and cfg["num_steps"] == 3

    # Interrupted run: some samples missing. Only those are generated, identical to before.
    for i in (1, 7):
        (folder / f"{i:06d}.png").unlink()
    mtimes = {i: os.stat(folder / f"{i:06d}.png").st_mtime_ns for i in (0, 2, 9)}
    res = generate.main(base_args(exp, out, "--num-steps", "3", "--cfg-scale", "2.0", "--guidance-high", "0.7"))
    assert res["generated"] == 2 and res["existing"] == 8
    assert {i: os.stat(folder / f"{i:06d}.png").st_mtime_ns for i in (0, 2, 9)} == mtimes
    assert np.array_equal(load_pngs(folder, 10), imgs)

    # Same folder, other configuration: refused, naming the differing key.
    with pytest.raises(SystemExit, match="cfg_scale"):
        generate.main(base_args(exp, out, "--num-steps", "3", "--cfg-scale", "3.0", "--guidance-high", "0.7"))


def test_bad_inputs(exp, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--ckpt-step 99.*available steps: \[10\]"):
        generate.main(["--exp-dir", str(exp), "--ckpt-step", "99", "--sample-dir", str(tmp_path), "--device", "cpu"])
    with pytest.raises(SystemExit, match="no-such-recipe"):
        generate.parse_args(["--recipe", "no-such-recipe"])
    # a folder with PNGs but no stored configuration
    (tmp_path / "x" / "run").mkdir(parents=True)
    (tmp_path / "x" / "run" / "000000.png").write_bytes(b"")
    with pytest.raises(SystemExit, match="no sampling_config.json"):
        generate.main(base_args(exp, tmp_path / "x", "--num-steps", "2"))


def test_recipes_parse():
    names = cli.list_recipes()
    assert {"repae-sde-250", "lightningdit-euler-250", "sit-sde-250"} <= set(names)
    a = generate.parse_args(["--recipe", "repae-sde-250"])
    assert (a.mode, a.num_steps, a.cfg_scale, a.guidance_high) == ("sde", 250, 2.5, 0.75)
    a = generate.parse_args(["--recipe", "lightningdit-euler-250", "--num-steps", "10"])  # explicit flags win
    assert a.mode == "ode" and a.solver == "euler" and a.num_steps == 10 and abs(a.shift - 1 / 0.3) < 1e-9
    assert generate.parse_args(["--heun"]).solver == "heun"


def test_two_processes_match_one_and_eval(exp, tmp_path):
    """SDE sampling with 2 gloo processes equals 1 process bit for bit, and --eval runs."""
    from evaluation.inception import build_inception

    weights = tmp_path / "inception.pth"
    torch.save(build_inception(random_init=True).state_dict(), weights)
    # a tiny reference batch of images
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    common = ["--mode", "sde", "--num-steps", "4", "--cfg-scale", "1.5", "--label-sampling", "equal",
              "--num-fid-samples", "7", "--device", "cpu", "--exp-dir", str(exp), "--folder-name", "run"]
    generate.main(common + ["--sample-dir", str(tmp_path / "one"), "--per-proc-batch-size", "3"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(ROOT / "generate.py"), *common, "--sample-dir", str(tmp_path / "two"), "--per-proc-batch-size", "3",
           "--eval", "--ref-batch", str(tmp_path / "ref.npz"), "--inception-weights", str(weights),
           "--inception-image-size", "75", "--inception-chunk", "8", "--inception-batch-size", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = load_pngs(tmp_path / "one" / "run", 7), load_pngs(tmp_path / "two" / "run", 7)
    assert np.array_equal(one, two)
    metrics = json.loads((tmp_path / "two" / "run" / "metrics.json").read_text())
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0 and 0 <= metrics["precision"] <= 1


def test_repae_readme_command_verbatim_under_torchrun(exp, tmp_path):
    """REPA-E's README command, its flag names only, 2 processes: the samples and one .npz
    (arr_0 uint8 [N, H, W, 3]) land where REPA-E writes them, samples/EXP_STEP_cfg...npz."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_port", free_port(),
           str(ROOT / "generate.py"), "--num-fid-samples", "6", "--path-type", "linear", "--mode", "ode", "--num-steps", "3",
           "--cfg-scale", "2.5", "--guidance-high", "0.75", "--guidance-low", "0.0", "--exp-path", str(exp),
           "--train-steps", "10", "--heun", "--global-seed", "0", "--pproc-batch-size", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = "exp_0000010_cfg2.5-0.0-0.75-labelsampling-equal"
    with np.load(tmp_path / "samples" / f"{name}.npz") as data:
        arr = data["arr_0"]
    assert arr.shape == (6, 32, 32, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr, load_pngs(tmp_path / "samples" / name, 6))
    cfg = json.loads((tmp_path / "samples" / name / "sampling_config.json").read_text())
    assert (cfg["solver"], cfg["num_steps"], cfg["cfg_scale"], cfg["label_sampling"]) == ("heun", 3, 2.5, "equal")


def test_uint8_conversion_truncates_like_the_originals_by_default():
    """REPA-E's generate.py: clamp(255 (x + 1) / 2, 0, 255).to(uint8); rounding is one flag away."""
    values = torch.tensor([-1.5, -1.0, -0.999, -0.5, 0.0, 0.3, 0.5, 0.999, 1.0, 1.2])
    decode = lambda z: values.view(1, 1, 1, -1).expand(z.shape[0], 3, 1, -1)  # noqa: E731
    field = _tiny_velocity(0)
    kw = dict(mode="ode", solver="euler", num_steps=1)
    out = samplers.sample_batch(field, decode, (4, 4, 4), 3, torch.arange(2), 0, kw, "cpu")
    original = torch.clamp(255.0 * ((values + 1) / 2.0), 0, 255).to(torch.uint8)
    assert torch.equal(out[0, 0, 0], original)
    assert original.tolist() == [0, 0, 0, 63, 127, 165, 191, 254, 255, 255]
    rounded = samplers.sample_batch(field, decode, (4, 4, 4), 3, torch.arange(2), 0, kw, "cpu", uint8_conversion="round")
    assert rounded[0, 0, 0].tolist() == [0, 0, 0, 64, 128, 166, 191, 255, 255, 255]
    assert generate.parse_args([]).uint8_conversion == "truncate"


def test_exp_dir_decodes_with_the_checkpoints_trained_statistics(tmp_path):
    """A run trained with --vae-stats: the checkpoint's (EMA BatchNorm) statistics decode, not the
    initial file recorded in args.json; an explicit --vae-stats still wins."""
    exp = make_experiment(tmp_path)
    initial = {"latents_scale": torch.full((1, 4, 1, 1), 3.0), "latents_bias": torch.full((1, 4, 1, 1), 7.0)}
    torch.save(initial, tmp_path / "initial-latents-stats.pt")
    args = json.loads((exp / "args.json").read_text())
    (exp / "args.json").write_text(json.dumps(dict(args, vae_stats=str(tmp_path / "initial-latents-stats.pt"))))
    ckpt = torch.load(exp / "checkpoints" / "0000010.pt", map_location="cpu", weights_only=False)
    setup = load_models(generate.parse_args(["--exp-dir", str(exp), "--device", "cpu"]), lambda m: None)
    assert torch.allclose(setup.decoder.mean, ckpt["latent_stats"]["latents_bias"])
    assert torch.allclose(setup.decoder.std, 1 / ckpt["latent_stats"]["latents_scale"])
    # without the checkpoint's record, the EMA SiT's BatchNorm (REPA-E's generate.py)
    del ckpt["latent_stats"]
    torch.save(ckpt, exp / "checkpoints" / "0000010.pt")
    setup = load_models(generate.parse_args(["--exp-dir", str(exp), "--device", "cpu"]), lambda m: None)
    assert torch.allclose(setup.decoder.mean.flatten(), ckpt["ema"]["bn.running_mean"])
    explicit = generate.parse_args(["--exp-dir", str(exp), "--device", "cpu", "--vae-stats",
                                    str(tmp_path / "initial-latents-stats.pt")])
    assert torch.allclose(load_models(explicit, lambda m: None).decoder.mean, initial["latents_bias"])


def test_npz_holds_exactly_the_requested_samples_and_eval_reads_only_those(exp, tmp_path, capsys):
    """A folder holding 12 samples, asked for 8: the .npz holds 8 and --eval (from the .npz or,
    with --no-npz, from the folder) reads those 8. Offline evaluation: random Inception, labelled
    so everywhere, against a reference image folder (--ref-dir)."""
    from PIL import Image

    out = tmp_path / "s"
    quick = ["--num-steps", "1", "--cfg-scale", "1.0"]
    generate.main(base_args(exp, out, *quick, "--num-fid-samples", "12"))
    assert generate.npz_image_count(out / "run.npz") == 12
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    ev = ["--eval", "--ref-dir", str(ref), "--random-init-inception", "--metrics", "fid", "--inception-image-size", "75",
          "--inception-chunk", "4", "--inception-batch-size", "4"]
    res = generate.main(base_args(exp, out, *quick, "--num-fid-samples", "8", *ev))
    with np.load(out / "run.npz") as data:
        assert data["arr_0"].shape == (8, 32, 32, 3)
        assert np.array_equal(data["arr_0"], load_pngs(out / "run", 8))
    assert res["generated"] == 0 and res["metrics"]["num_samples"] == 8
    saved = json.loads((out / "run" / "metrics.json").read_text())
    assert saved["inception"].startswith("random weights") and saved["ref_dir"] == str(ref)
    assert "FID (random Inception: not comparable)=" in capsys.readouterr().out
    res = generate.main(base_args(exp, out, *quick, "--num-fid-samples", "8", "--no-npz", *ev))
    assert res["metrics"]["num_samples"] == 8 and res["metrics"]["fid"] == saved["fid"]


@pytest.mark.parametrize("flag,value", [("--num-fid-samples", "0"), ("--num-fid-samples", "-3"), ("--num-steps", "0"),
                                        ("--pproc-batch-size", "0"), ("--samples-per-class", "0")])
def test_values_that_would_write_nothing_useful_are_refused(flag, value, capsys, tmp_path):
    with pytest.raises(SystemExit):
        generate.parse_args([flag, value])
    err = capsys.readouterr().err
    assert flag in err and "positive integer" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{flag[2:]}: {value}\n")
    with pytest.raises(SystemExit, match=f"c.yaml.*{flag}.*positive integer"):
        generate.parse_args(["--config", str(cfg)])


def test_heun_with_sde_is_refused():
    with pytest.raises(SystemExit, match="--heun"):
        generate.parse_args(["--heun", "--mode", "sde"])


def test_help_lists_repae_names_with_one_default_each():
    text = cli.build_parser().format_help()
    for name in ("--exp-path", "--exp-dir", "--train-steps", "--ckpt-step", "--pproc-batch-size", "--per-proc-batch-size",
                 "--tf32", "--allow-tf32", "--heun", "--global-seed", "--sample-dir", "--num-fid-samples"):
        assert name in text, name
    options = re.split(r"\n  (?=-)", text)
    for opt in options:
        assert opt.lower().count("default") <= 1, opt
    a = generate.parse_args([])
    assert (a.cfg_scale, a.num_steps, a.mode, a.per_proc_batch_size, a.num_fid_samples, a.sample_dir, a.label_sampling,
            a.guidance_low, a.guidance_high, a.allow_tf32, a.heun) == (1.5, 50, "ode", 128, 50000, "samples", "equal",
                                                                       0.0, 1.0, True, False)
    assert generate.parse_args(["--no-tf32"]).allow_tf32 is False
    assert generate.parse_args(["--no-per-class-sampling"]).label_sampling == "random"
    assert generate.parse_args(["--per-class-sampling"]).label_sampling == "equal"
    assert generate.parse_args(["--exp-path", "E", "--train-steps", "400000"]).ckpt_step == "400000"


def test_config_file_takes_either_name(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("exp-path: E\ntrain_steps: 7\npproc-batch-size: 3\nper-proc-batch-size: 5\n")
    a = generate.parse_args(["--config", str(cfg)])
    assert (a.exp_dir, a.ckpt_step) == ("E", "7") and a.per_proc_batch_size in (3, 5)


# ------------------------------------------------------------------------------------------------
# Stage-2 families, released-checkpoint conventions, autoguidance (generate.py issues 5 and 6)
# ------------------------------------------------------------------------------------------------


def test_learn_sigma_sit_returns_first_channels_and_loads_without_bn_or_projectors(tmp_path):
    """An original-SiT-style release (2C outputs, no projectors, no BatchNorm) loads strictly and
    samples with the first C channels; its default time convention is data-at-1."""
    from models.layers import unpatchify

    torch.manual_seed(0)
    sit = build_sit("SiT-N/2", input_size=8, in_channels=4, num_classes=4, z_dims=[], encoder_depth=2,
                    learn_sigma=True)
    with torch.no_grad():
        for p in sit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert sit.final_layer.linear.out_features == 2 * 2 * 2 * 4
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 4])
    h, c = sit._embed(x, t, y)
    for block in sit.blocks:
        h = block(h, c)
    full = unpatchify(sit.final_layer(h, c), 2, 8)  # [3, 8, 8, 8]: velocity + variance head
    assert torch.allclose(sit.inference(x, t, y), full[:, :4], atol=1e-6)

    sd = {k: v for k, v in sit.state_dict().items() if not k.startswith("bn.")}
    torch.save({"ema": sd}, tmp_path / "SiT-N-2-release.pt")
    res = generate.main(["--ckpt", str(tmp_path / "SiT-N-2-release.pt"), "--model", "SiT-N/2", "--vae", "tiny-f4d4",
                         "--random-init-vae", "--latent-scale", "0.5", "--resolution", "32", "--num-steps", "2",
                         "--cfg-scale", "1.5", "--sample-dir", str(tmp_path / "s"), "--folder-name", "run",
                         "--device", "cpu", "--num-fid-samples", "3", "--per-proc-batch-size", "3", "--no-npz"])
    assert res["generated"] == 3
    cfg = json.loads((tmp_path / "s" / "run" / "sampling_config.json").read_text())
    assert cfg["time_convention"] == "data-at-1" and cfg["latent_stats"] == "scale 0.5"


class _DataAtOneField(torch.nn.Module):
    """The exact flow-matching velocity of a point mass at `a`, in the data-at-1 convention
    (x_s = s a + (1 - s) eps, target a - eps): u(x, s) = (a - x) / (1 - s)."""

    num_classes = 2

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = a

    def forward(self, x, s, y):
        return (self.a - x) / (1 - s.view(-1, 1, 1, 1))


def test_data_at_one_adapter_matches_the_other_convention():
    """Evaluating a data-at-1 net as -f(x, 1 - t) and integrating t: 1 -> 0 gives the same endpoint
    as integrating the net in its own time s: 0 -> 1 (Euler steps coincide), here the point a."""
    a = torch.randn(1, 4, 8, 8)
    net = _DataAtOneField(a)
    z = torch.randn(2, 4, 8, 8)
    y = torch.zeros(2, dtype=torch.int64)
    kw = dict(mode="ode", solver="euler", num_steps=7)
    ours = samplers.run_sampler(VelocityModel(net, data_at_one=True), z, y, kw)
    x, s = z.double(), torch.linspace(0, 1, 8, dtype=torch.float64)  # the net's own convention
    for k in range(7):
        x = x + (s[k + 1] - s[k]) * net(x, s[k].expand(2), y)
    assert torch.allclose(ours, x, atol=1e-6) and torch.allclose(ours, a.double().expand(2, -1, -1, -1), atol=1e-5)
    wrong = samplers.run_sampler(VelocityModel(net, data_at_one=False), z, y, dict(kw, num_steps=6))
    assert not torch.allclose(wrong, ours, atol=1e-2)  # the convention matters
    # a SiT (velocity through .inference) gets the same adapter
    sit = build_sit("SiT-N/2", input_size=8, in_channels=4, num_classes=2, z_dims=[], encoder_depth=2).eval()
    with torch.no_grad():  # eval: no random label dropout between the two evaluations
        for p in sit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    t = torch.full((2,), 0.3)
    assert torch.allclose(VelocityModel(sit, True).inference(z, t, y), -sit.inference(z, 1 - t, y))


class _Counting(torch.nn.Module):
    """Counts calls and rows of a velocity model."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.rows = inner, 0, 0

    @property
    def num_classes(self):
        return self.inner.num_classes

    def inference(self, x, t, y):
        self.calls += 1
        self.rows += x.shape[0]
        return self.inner.inference(x, t, y)


def _tiny_velocity(seed, data_at_one=False):
    from models.diffusion import build_diffusion_model

    torch.manual_seed(seed)
    net = build_diffusion_model("DiTDH-N", (4, 4, 4), 3, 0.1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return VelocityModel(net.eval(), data_at_one)


def test_autoguidance_runs_main_and_guide_once_per_step_on_n_rows():
    main, guide = _Counting(_tiny_velocity(0)), _Counting(_tiny_velocity(1))
    z, y = torch.randn(5, 4, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    kw = dict(mode="ode", solver="euler", num_steps=6, cfg_scale=1.42, guide=guide)
    out = samplers.run_sampler(main, z, y, kw)
    assert (main.calls, main.rows, guide.calls, guide.rows) == (6, 30, 6, 30)
    # the formula, on one step
    x, t = torch.randn(5, 4, 4, 4), torch.full((5,), 0.5)
    m, g = main.inner.inference(x, t, y).double(), guide.inner.inference(x, t, y).double()
    field = samplers.GuidedVelocity(main.inner, 1.42, guide=guide.inner)
    assert torch.allclose(field.inference(x, t, y), g + 1.42 * (m - g))
    # interval: outside it only the main model runs; RAE's grid: K points, K - 1 evaluations
    main.calls = guide.calls = 0
    samplers.run_sampler(main, z, y, dict(kw, guidance_low=0.0, guidance_high=0.5))
    assert main.calls == 6 and guide.calls == 3  # t = 1, 5/6, 4/6 are outside [0, 0.5]
    main.calls = guide.calls = 0
    samplers.run_sampler(main, z, y, dict(kw, time_grid="rae", num_steps=5, shift=2.0))
    assert main.calls == 4 and guide.calls == 4
    # a guide identical to the main model changes nothing
    same = samplers.run_sampler(main.inner, z, y, dict(kw, guide=main.inner))
    assert torch.allclose(same, samplers.run_sampler(main.inner, z, y, dict(kw, cfg_scale=1.0)), atol=1e-6)
    assert torch.isfinite(out).all()


def test_heun_corrector_reuses_the_predictor_guidance_decision():
    """Heun with a guidance interval: the corrector at t_next is guided iff t_cur was (REPA-E's
    euler_sampler), so generate.py's sampler equals samplers.py's own CFG on the plain model."""
    model = _Counting(_tiny_velocity(3))
    z, y = torch.randn(3, 4, 4, 4), torch.tensor([0, 1, 2])
    # 4 steps on 1, .75, .5, .25, 0: t_cur = .75 is guided, its corrector at t_next = .5 (outside
    # [0.6, 1]) must be guided too
    kw = dict(mode="ode", solver="heun", num_steps=4, cfg_scale=2.0, guidance_low=0.6, guidance_high=1.0)
    ours = samplers.run_sampler(model, z, y, kw)
    assert model.rows == 3 * (2 + 2 + 2 + 2 + 1 + 1 + 1)  # predictor+corrector doubled at t = 1 and .75
    ref = samplers.sample(model.inner, z, y, **kw)
    assert torch.equal(ours, ref)


def test_cfg_doubles_only_inside_the_interval_and_legacy_channels():
    main = _Counting(_tiny_velocity(0))
    z, y = torch.randn(2, 4, 4, 4), torch.tensor([0, 2])
    samplers.run_sampler(main, z, y, dict(mode="ode", solver="euler", num_steps=4, cfg_scale=3.0, guidance_high=0.5))
    assert main.calls == 4 and main.rows == 2 * 2 + 2 * 4  # t = 1, .75 plain; t = .5, .25 doubled
    x, t = torch.randn(2, 4, 4, 4), torch.full((2,), 0.3)
    c = main.inner.inference(x, t, y).double()
    u = main.inner.inference(x, t, torch.full_like(y, 3)).double()
    legacy = samplers.GuidedVelocity(main.inner, 3.0, cfg_channels=3).inference(x, t, y)
    assert torch.allclose(legacy[:, :3], u[:, :3] + 3.0 * (c[:, :3] - u[:, :3]), atol=1e-5)
    assert torch.allclose(legacy[:, 3:], c[:, 3:], atol=1e-5)  # channel 3 stays conditional


# ---- end to end: cache latents -> train_ldm_only.py -> generate.py ----------------------------------
WORKER = r'''
import sys, numpy as np, torch
sys.path.insert(0, {root!r})
import generate, samplers
from models.loading import load_models
for argv in {runs!r}:
    generate.main(argv)
# sample_for_eval (what trainers call): gathered in index order on every rank
setup = load_models(generate.parse_args({eval_args!r}), lambda m: None)
kw = dict(mode="ode", solver="euler", num_steps=2, cfg_scale=2.0)
arr = samplers.sample_for_eval(setup.model, setup.decoder, setup.latent_shape, setup.num_classes, 5, 0, 2, kw, "cpu")
if torch.distributed.get_rank() == 0:
    np.save({out!r}, arr)
torch.distributed.destroy_process_group()
'''


@pytest.fixture(scope="module")
def ldm_exps(tmp_path_factory):
    """Latents of a 12-image procedural dataset (random tiny-f4d4 KL tokenizer) and two tiny
    train_ldm_only.py experiments (LightningDiT-N/1, DiTDH-N), 2 steps each."""
    import cache_latents
    import train_ldm_only
    from datasources import make_procedural_dataset

    root = tmp_path_factory.mktemp("ldm")
    data = make_procedural_dataset(root / "data", num_classes=3, per_class=4, resolution=32, seed=0)
    cache_latents.main(cache_latents.build_args(
        ["--data-dir", str(data), "--output-dir", str(root / "lat"), "--tokenizer", "kl", "--vae", "tiny-f4d4",
         "--random-init", "--resolution", "32", "--batch-size", "6", "--num-workers", "0", "--seed", "0"]))
    exps = {}
    for model in ("LightningDiT-N/1", "DiTDH-N"):
        name = model.split("-")[0]
        train_ldm_only.main(train_ldm_only.parse_args(
            ["--latents-dir", str(root / "lat"), "--model", model, "--num-classes", "3", "--output-dir", str(root / "exps"),
             "--exp-name", name, "--max-train-steps", "2", "--checkpointing-steps", "2", "--batch-size", "4",
             "--num-workers", "0", "--random-init-vae", "--sampling-steps", "0", "--learning-rate", "1e-2",
             "--report-to", "none"]))
        exps[name] = root / "exps" / name
    return exps


def _ldm_args(exp, out, *extra):
    return ["--exp-dir", str(exp), "--sample-dir", str(out), "--folder-name", "run", "--device", "cpu",
            "--num-fid-samples", "5", "--per-proc-batch-size", "2", "--num-steps", "3", "--no-npz", *extra]


def test_ldm_experiments_one_vs_two_processes(ldm_exps, tmp_path):
    """LightningDiT (data-at-1, CFG on an interval) and DiT^DH (RAE grid, dimension shift) from
    train_ldm_only.py experiments: 2 gloo processes give the images of 1 process, bit for bit, and
    sample_for_eval gathers in index order."""
    lit = ["--cfg-scale", "2.0", "--guidance-high", "0.7", "--label-sampling", "equal"]
    ddt = ["--time-grid", "rae", "--shift", "auto", "--cfg-scale", "1.5"]
    eval_args = ["--exp-dir", str(ldm_exps["DiTDH"]), "--device", "cpu"]
    runs = {"lit": _ldm_args(ldm_exps["LightningDiT"], tmp_path / "lit1", *lit),
            "ddt": _ldm_args(ldm_exps["DiTDH"], tmp_path / "ddt1", *ddt)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): CPU kernels split reductions by thread count
    try:
        for argv in runs.values():
            generate.main(argv)
        setup = load_models(generate.parse_args(eval_args), lambda m: None)
        kw = dict(mode="ode", solver="euler", num_steps=2, cfg_scale=2.0)
        one_eval = samplers.sample_for_eval(setup.model, setup.decoder, setup.latent_shape, setup.num_classes, 5, 0, 2,
                                            kw, "cpu")
    finally:
        torch.set_num_threads(threads)
    two = [_ldm_args(ldm_exps["LightningDiT"], tmp_path / "lit2", *lit), _ldm_args(ldm_exps["DiTDH"], tmp_path / "ddt2", *ddt)]
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), runs=two, eval_args=eval_args, out=str(tmp_path / "eval2.npy")))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                           str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("lit", "ddt"):
        one, two_ = load_pngs(tmp_path / f"{name}1" / "run", 5), load_pngs(tmp_path / f"{name}2" / "run", 5)
        assert one.shape == (5, 32, 32, 3) and one.std() > 0
        assert np.array_equal(one, two_), name
    cfg = json.loads((tmp_path / "lit1" / "run" / "sampling_config.json").read_text())
    assert cfg["family"] == "lightningdit" and cfg["time_convention"] == "data-at-1" and cfg["tokenizer_fingerprint"]
    cfg = json.loads((tmp_path / "ddt1" / "run" / "sampling_config.json").read_text())
    assert cfg["family"] == "ddt" and "time_convention" not in cfg and cfg["time_grid"] == "rae"
    assert abs(cfg["shift"] - (4 * 8 * 8 / 4096) ** 0.5) < 1e-12

    assert one_eval.shape == (5, 32, 32, 3) and np.array_equal(one_eval, np.load(tmp_path / "eval2.npy"))

    # new identity fields are part of the refusal: another time convention, another guide
    with pytest.raises(SystemExit, match="time_convention"):
        generate.main(_ldm_args(ldm_exps["LightningDiT"], tmp_path / "lit1", *lit, "--time-convention", "noise-at-1"))
    with pytest.raises(SystemExit, match="guide"):
        generate.main(_ldm_args(ldm_exps["DiTDH"], tmp_path / "ddt1", *ddt, "--guide-exp-dir", str(ldm_exps["DiTDH"])))


def test_ldm_autoguidance_and_tokenizer_fingerprint(ldm_exps, tmp_path):
    exp = ldm_exps["DiTDH"]
    small = lambda *a: _ldm_args(*a) + ["--num-fid-samples", "2"]  # noqa: E731
    base = generate.main(small(exp, tmp_path / "plain", "--cfg-scale", "1.0"))
    # the experiment guiding itself: g + s (m - g) = m, the unguided images
    generate.main(small(exp, tmp_path / "ag", "--guidance", "autoguidance", "--guide-exp-dir", str(exp),
                            "--cfg-scale", "1.42"))
    assert np.array_equal(load_pngs(tmp_path / "plain" / "run", 2), load_pngs(tmp_path / "ag" / "run", 2))
    cfg = json.loads((tmp_path / "ag" / "run" / "sampling_config.json").read_text())
    assert cfg["guidance"] == "autoguidance" and cfg["guide"]["model"] == "DiTDH-N"
    assert base["generated"] == 2
    with pytest.raises(SystemExit, match="needs a guide"):
        generate.main(_ldm_args(exp, tmp_path / "x", "--recipe", "rae-ddt-autoguidance"))
    # a tokenizer with other weights than the latents' is refused, naming both fingerprints
    with pytest.raises(SystemExit, match="fingerprint mismatch"):
        generate.main(_ldm_args(exp, tmp_path / "y", "--tokenizer-seed", "1"))
    # the same weights as a hustvl-style release: --ckpt --model, statistics file {mean, std}
    obj = torch.load(ldm_exps["LightningDiT"] / "checkpoints" / "0000002.pt", map_location="cpu", weights_only=False)
    torch.save({"ema": obj["ema"]}, tmp_path / "lightningdit.pt")
    torch.save({"mean": obj["latent_stats"]["mean"].view(1, -1, 1, 1), "std": obj["latent_stats"]["std"].view(1, -1, 1, 1)},
               tmp_path / "latents_stats.pt")
    rel = ["--ckpt", str(tmp_path / "lightningdit.pt"), "--model", "LightningDiT-N/1", "--tokenizer", "kl", "--vae",
           "tiny-f4d4", "--random-init-vae", "--vae-stats", str(tmp_path / "latents_stats.pt"), "--resolution", "32",
           "--sample-dir", str(tmp_path / "rel"), "--folder-name", "run", "--device", "cpu", "--num-fid-samples", "2",
           "--per-proc-batch-size", "2", "--num-steps", "3", "--no-npz"]
    generate.main(rel)
    generate.main(small(ldm_exps["LightningDiT"], tmp_path / "exp"))
    assert np.abs(load_pngs(tmp_path / "rel" / "run", 2).astype(int) - load_pngs(tmp_path / "exp" / "run", 2)).max() <= 1
    cfg = json.loads((tmp_path / "rel" / "run" / "sampling_config.json").read_text())
    assert cfg["time_convention"] == "data-at-1" and cfg["family"] == "lightningdit"  # hustvl default


def test_rae_recipes_parse():
    a = generate.parse_args(["--recipe", "rae-ddt-ode-50"])
    assert (a.time_grid, a.num_steps, a.shift, a.label_sampling) == ("rae", 50, "auto", "equal")
    a = generate.parse_args(["--recipe", "rae-ddt-autoguidance", "--shift", "2"])
    assert (a.guidance, a.cfg_scale, a.shift) == ("autoguidance", 1.42, 2.0)


# ------------------------------------------------------------------------------------------------
# Class-labelled generation, 1-channel samples (domain data)
# ------------------------------------------------------------------------------------------------
def test_classes_by_name_and_labels_written(tmp_path):
    """--classes by the data's class-folder names (or ids) with --samples-per-class: class blocks,
    labels.npy and labels.csv (index, class id, class name, file), the .npz of exactly those."""
    import csv

    exp = make_experiment(tmp_path)
    data = tmp_path / "data"
    for name in ("user_00", "user_03", "user_17", "user_20"):
        (data / name).mkdir(parents=True)
    args = json.loads((exp / "args.json").read_text())
    (exp / "args.json").write_text(json.dumps(dict(args, data_dir=str(data))))
    out = tmp_path / "s"
    res = generate.main(base_args(exp, out, "--num-steps", "1", "--classes", "user_17,0", "--samples-per-class", "2"))
    folder = out / "run"
    assert res["generated"] == 4
    labels = np.load(folder / "labels.npy")
    assert labels.tolist() == [2, 2, 0, 0]
    rows = list(csv.DictReader(open(folder / "labels.csv")))
    assert [(r["index"], r["class_id"], r["class_name"], r["file"]) for r in rows][:3] == [
        ("0", "2", "user_17", "000000.png"), ("1", "2", "user_17", "000001.png"), ("2", "0", "user_00", "000002.png")]
    with np.load(out / "run.npz") as d:
        assert d["arr_0"].shape == (4, 32, 32, 3)
    cfg = json.loads((folder / "sampling_config.json").read_text())
    assert cfg["classes"] == [2, 0] and cfg["samples_per_class"] == 2
    # the class really conditions the samples: index 0 as class 2 differs from index 0 as class 3
    generate.main(base_args(exp, tmp_path / "t", "--num-steps", "1", "--classes", "user_20", "--samples-per-class", "1"))
    assert not np.array_equal(load_pngs(folder, 1), load_pngs(tmp_path / "t" / "run", 1))
    with pytest.raises(SystemExit, match="unknown class 'user_99'.*user_03"):
        generate.main(base_args(exp, tmp_path / "u", "--num-steps", "1", "--classes", "user_99"))
    # without --classes every sample's label is written too
    generate.main(base_args(exp, tmp_path / "v", "--num-steps", "1", "--num-fid-samples", "6"))
    assert np.load(tmp_path / "v" / "run" / "labels.npy").tolist() == [0, 1, 2, 3, 0, 1]  # equal labels


class _GrayTokenizer(torch.nn.Module):
    """Decodes 4-channel latents to 1-channel images (a 1-channel tokenizer's output)."""

    def decode(self, z):
        return torch.tanh(torch.nn.functional.interpolate(z[:, :1], scale_factor=4))


def test_one_channel_samples_npz_and_eval(exp, tmp_path, monkeypatch, capsys):
    """A 1-channel tokenizer: PNGs are grayscale, arr_0 is [N, H, W, 1]; --eval replicates to 3
    channels for Inception (saying so) against a 1-channel reference."""
    real = load_models

    def gray_models(args, log):
        setup = real(args, log)
        setup.decoder = LatentDecoder(_GrayTokenizer(), setup.decoder.mean, setup.decoder.std)
        return setup

    monkeypatch.setattr(generate, "load_models", gray_models)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (6, 32, 32, 1), dtype=np.uint8))
    res = generate.main(base_args(exp, tmp_path / "s", "--num-steps", "1", "--num-fid-samples", "5", "--eval",
                                  "--ref-batch", str(tmp_path / "ref.npz"), "--random-init-inception", "--metrics", "fid",
                                  "--inception-image-size", "75", "--inception-chunk", "5", "--inception-batch-size", "5"))
    from PIL import Image

    assert Image.open(tmp_path / "s" / "run" / "000000.png").mode == "L"
    with np.load(tmp_path / "s" / "run.npz") as d:
        assert d["arr_0"].shape == (5, 32, 32, 1)
    assert np.isfinite(res["metrics"]["fid"])
    assert "replicated to 3 channels for Inception" in capsys.readouterr().out


def test_training_grid_rows_are_classes():
    assert grid_row_labels(9, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert grid_row_labels(16, 1000).view(4, 4)[:, 0].tolist() == [0, 1, 2, 3]
    assert grid_row_labels(4, 1).tolist() == [0, 0, 0, 0]
    images = torch.full((4, 1, 32, 32), 100, dtype=torch.uint8)
    captioned = caption_rows(images, grid_row_labels(4, 2), {0: "user_03", 1: "user_17"})
    assert not torch.equal(captioned[0], images[0]) and not torch.equal(captioned[2], images[2])  # first of each row
    assert torch.equal(captioned[1], images[1]) and torch.equal(captioned[3], images[3])
    assert captioned[0].max() > 200 and captioned[0].min() == 0  # light text on a black box


def training_evaluation(exp, tmp_path, n_ref, metrics, log=None, lines=None, **over):
    """evaluate_generation of the tiny experiment against random reference images: (scores, setup, args)."""
    from types import SimpleNamespace

    setup = load_models(generate.parse_args(["--exp-dir", str(exp), "--device", "cpu"]), lambda m: None)
    rng = np.random.default_rng(n_ref)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (n_ref, 32, 32, 3), dtype=np.uint8))
    args = SimpleNamespace(**dict(dict(inception_weights=None, inception_image_size=75, random_init_inception=True,
                                       eval_num_steps=1, eval_cfg_scale=1.0, eval_samples=4, seed=0, eval_batch_size=4,
                                       eval_label_sampling="equal", eval_metrics=metrics,
                                       eval_reference=str(tmp_path / "ref.npz")), **over))
    accelerator = SimpleNamespace(log=lambda d, step: (log if log is not None else []).append(d), is_main_process=True)
    scores = evaluate_generation(setup.model, setup.decoder, setup.latent_shape, setup.num_classes, args, "cpu",
                                 3, accelerator, SimpleNamespace(info=(lines if lines is not None else []).append))
    return scores, setup, args


def test_training_evaluation_labels_random_inception(exp, tmp_path):
    """The trainers' periodic FID (evaluate_generation): the log line and the returned scores
    (which go into summary.json) say the Inception was random."""
    logged, lines = [], []
    scores, _, _ = training_evaluation(exp, tmp_path, 6, "fid", logged, lines)
    assert scores["inception"].startswith("random weights") and np.isfinite(scores["fid"])
    assert "FID (random Inception: not comparable)=" in lines[0] and set(logged[0]) == {"eval/num_samples", "eval/fid"}


def test_training_evaluation_streams_features_with_the_former_scores(exp, tmp_path):
    """The trainers' FID takes Inception features batch by batch right after decode (no image
    gather): the scores equal those of the former path (all images gathered, then evaluate_samples),
    with a short last batch (6 samples in batches of 4)."""
    from evaluation.metrics import evaluate_samples, get_extractor
    from evaluation.training import euler_kwargs

    scores, setup, args = training_evaluation(exp, tmp_path, 8, "fid,sfid,is", eval_num_steps=2, eval_cfg_scale=1.5,
                                              eval_samples=6)
    images = samplers.sample_for_eval(setup.model, setup.decoder, setup.latent_shape, setup.num_classes, 6, 0, 4,
                                      euler_kwargs(2, 1.5), "cpu", label_sampling="equal")
    extractor = get_extractor(image_size=75, random_init=True, device="cpu")
    former = evaluate_samples(images, args.eval_reference, inception=extractor, metrics=["fid", "sfid", "is"],
                              device="cpu")
    assert scores["num_samples"] == 6 and np.isfinite(scores["fid"]) and scores["fid"] > 0
    for k in ("fid", "sfid", "is"):
        assert scores[k] == former[k], k
