"""cache_latents.py, the latent-shard dataset and the common tokenizer interface, on tiny
random tokenizers (KL tiny-f4d4, VQ tiny-f4, RAE tiny-dinov2) and a 15-image procedural dataset
(not divisible by the shard size 4 nor by 2 processes)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli import free_port
import cache_latents
from datasources import (LATENT_DTYPES, LatentShardDataset, build_image_dataset, collate_latents, finalize_moments,
                         latent_flip_choice, latent_moments, latent_shard_path, latent_shard_range,
                         make_procedural_dataset, merge_moments, num_latent_shards, save_shard, write_info)
from models.tokenizers import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RES = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_procedural_dataset(tmp_path_factory.mktemp("cache") / "data", num_classes=3, per_class=5,
                                   resolution=RES, seed=0)


def flags(data_dir, out, tokenizer="kl", vae="tiny-f4d4", flip=True, **extra):
    argv = ["--data-dir", str(data_dir), "--output-dir", str(out), "--tokenizer", tokenizer, "--random-init",
            "--resolution", str(RES), "--per-proc-batch-size", "3", "--shard-size", "4", "--num-workers", "0"]
    if vae is not None:
        argv += ["--vae", vae]
    if flip:
        argv.append("--flip")
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def run(argv):
    return cache_latents.main(cache_latents.build_args(argv))


def all_images(data_dir):
    ds = build_image_dataset(data_dir, RES)
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([ds[i][1] for i in range(len(ds))])


def read_folder(root):
    shards = sorted((Path(root) / "shards").glob("latents-*.safetensors"))
    parts = [load_file(str(p)) for p in shards]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0] if not k.startswith("stats_")}, parts


def direct_stats(means, stds):
    """float64 reference: moments of z = mean + std * eps over all (plain + mirrored) latents."""
    m = torch.cat(means).double()
    s2 = torch.cat(stds).double().pow(2) if stds else torch.zeros_like(m)
    mean = m.mean(0)
    var = m.var(0, unbiased=False) + s2.mean(0)
    ch_mean = m.mean(dim=(0, 2, 3))
    ch_var = m.permute(1, 0, 2, 3).reshape(m.shape[1], -1).var(1, unbiased=False) + s2.mean(dim=(0, 2, 3))
    return mean, var, ch_mean, ch_var


@pytest.fixture(scope="module")
def kl_folder(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("kl") / "latents"
    run(flags(data_dir, out))
    return out


def test_kl_shards_equal_encoder_and_stats_are_exact(data_dir, kl_folder):
    images, labels = all_images(data_dir)
    tok = build_tokenizer("kl", "tiny-f4d4", random_init=True, seed=0)
    mean, std = tok.encode_moments(images)
    mean_f, std_f = tok.encode_moments(images.flip(-1))
    got, parts = read_folder(kl_folder)
    assert len(parts) == 4 and [p["labels"].shape[0] for p in parts] == [4, 4, 4, 3]
    assert torch.equal(got["indices"], torch.arange(15)) and torch.equal(got["labels"], labels)
    assert got["mean"].dtype == torch.float16
    for key, ref in (("mean", mean), ("std", std), ("mean_flip", mean_f), ("std_flip", std_f)):
        torch.testing.assert_close(got[key].float(), ref, atol=2e-3, rtol=2e-3, msg=key)
    stats = torch.load(kl_folder / "latents_stats.pt", weights_only=True)
    ref = direct_stats([mean, mean_f], [std, std_f])
    assert stats["count"] == 30 and stats["mean"].dtype == torch.float64
    for key, r in zip(("mean", "var", "channel_mean", "channel_var"), ref):
        torch.testing.assert_close(stats[key], r, atol=1e-5, rtol=1e-5, msg=key)
    info = json.loads((kl_folder / "tokenizer.json").read_text())
    assert info["fingerprint"] == tok.fingerprint() and info["num_images"] == 15 and info["flip"] is True
    assert info["latent_shape"] == [4, 8, 8] and info["class_to_idx"] == {f"class_{i:02d}": i for i in range(3)}


def test_moment_merge_is_exact():
    """Chan merging of shard moments = one float64 pass over everything (incl. the std term)."""
    g = torch.Generator().manual_seed(0)
    means = [torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64) * 3 + 1 for n in (5, 1, 7)]
    stds = [torch.rand(m.shape, generator=g, dtype=torch.float64) for m in means]
    acc = None
    for m, s in zip(means, stds):
        acc = merge_moments(acc, latent_moments([m], [s]))
    stats = finalize_moments(*acc)
    for key, r in zip(("mean", "var", "channel_mean", "channel_var"), direct_stats(means, stds)):
        torch.testing.assert_close(stats[key], r, atol=1e-12, rtol=1e-12, msg=key)


def test_dataset_items_flip_choice_and_workers(data_dir, kl_folder):
    images, labels = all_images(data_dir)
    got, _ = read_folder(kl_folder)
    ds = LatentShardDataset(kl_folder, flip=True, seed=3, image_dataset=build_image_dataset(data_dir, RES))
    assert len(ds) == 15 and ds.latent_shape == (4, 8, 8) and ds.num_classes == 3
    assert ds.stats["count"] == 30 and ds.tokenizer_info["kind"] == "kl"
    for i in range(15):
        item = ds[i]
        flipped = latent_flip_choice(3, 0, i)
        assert bool(item["flipped"]) == flipped and int(item["index"]) == i and int(item["label"]) == labels[i]
        assert torch.equal(item["mean"], got["mean_flip" if flipped else "mean"][i].float())
        assert torch.equal(item["std"], got["std_flip" if flipped else "std"][i].float())
        assert torch.equal(item["image"], images[i].flip(-1) if flipped else images[i])
    # no flip requested: always the plain latent
    plain = LatentShardDataset(kl_folder, flip=False)
    assert all(not bool(plain[i]["flipped"]) for i in range(15))
    # the choice is a function of (seed, epoch, index) only: workers do not matter
    ds.set_epoch(5)
    ref = torch.stack([ds[i]["mean"] for i in range(15)])
    loader = torch.utils.data.DataLoader(LatentShardDataset(kl_folder, seed=3), batch_size=4, num_workers=2)
    loader.dataset.set_epoch(5)
    torch.testing.assert_close(torch.cat([b["mean"] for b in loader]), ref, atol=0, rtol=0)
    # the batched fetch (collate_latents, no stack copy) returns the same items, images included
    fast = torch.utils.data.DataLoader(ds, batch_size=6, collate_fn=collate_latents)
    batches = list(fast)
    assert [b["mean"].shape[0] for b in batches] == [6, 6, 3]
    for key in ("mean", "std", "label", "index", "flipped", "image"):
        torch.testing.assert_close(torch.cat([b[key] for b in batches]), torch.stack([ds[i][key] for i in range(15)]),
                                   atol=0, rtol=0, msg=key)
    # balanced and epoch-dependent
    a = torch.tensor([latent_flip_choice(3, 0, i) for i in range(20000)])
    b = torch.tensor([latent_flip_choice(3, 1, i) for i in range(20000)])
    assert 0.48 < a.float().mean() < 0.52 and 0.48 < (a != b).float().mean() < 0.52
    assert a.tolist() == [latent_flip_choice(3, 0, i) for i in range(20000)]


def test_two_processes_write_the_same_folder(data_dir, kl_folder, tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
           str(ROOT / "cache_latents.py")] + flags(data_dir, tmp_path / "two")
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 process(es)" in (tmp_path / "two/log.txt").read_text()
    one, one_parts = read_folder(kl_folder)
    two, two_parts = read_folder(tmp_path / "two")
    assert set(one) == set(two)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-3, rtol=0, msg=key)  # fp16 storage
    for p1, p2 in zip(one_parts, two_parts):
        assert int(p1["stats_count"]) == int(p2["stats_count"])
        torch.testing.assert_close(p2["stats_m2"], p1["stats_m2"], atol=1e-6, rtol=1e-6)
    s1 = torch.load(kl_folder / "latents_stats.pt", weights_only=True)
    s2 = torch.load(tmp_path / "two/latents_stats.pt", weights_only=True)
    for key in ("mean", "var", "channel_mean", "channel_var"):
        torch.testing.assert_close(s2[key], s1[key], atol=1e-6, rtol=1e-6)


def test_resume_rewrites_only_damaged_shards_and_refuses_other_tokenizer(data_dir, tmp_path):
    out = tmp_path / "lat"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("tokenizer: kl\nvae: tiny-f4d4\nflip: true\n")
    base = ["--config", str(cfg), "--data-dir", str(data_dir), "--output-dir", str(out), "--random-init",
            "--resolution", str(RES), "--batch-size", "3", "--shard-size", "4", "--num-workers", "0"]
    first = run(base)
    assert first["encoded_shards"] == 4
    # clone: load_file maps the file, and the truncation below rewrites shard 1 in place
    before = {k: {n: t.clone() for n, t in load_file(str(latent_shard_path(out, k))).items()} for k in range(4)}
    mtimes = {k: latent_shard_path(out, k).stat().st_mtime_ns for k in range(4)}
    stats_before = torch.load(out / "latents_stats.pt", weights_only=True)
    latent_shard_path(out, 2).unlink()
    p1 = latent_shard_path(out, 1)
    p1.write_bytes(p1.read_bytes()[:-100])  # truncated
    with pytest.raises(ValueError, match="latents-00001.safetensors.*truncated"):
        LatentShardDataset(out)
    again = run(base)
    assert again["encoded_shards"] == 2 and again["skipped_shards"] == 2 and again["encoded_images"] == 8
    for k in (0, 3):
        assert latent_shard_path(out, k).stat().st_mtime_ns == mtimes[k]
    for k in range(4):
        after = load_file(str(latent_shard_path(out, k)))
        for key, t in before[k].items():
            torch.testing.assert_close(after[key], t, atol=0, rtol=0, msg=f"shard {k} {key}")
    stats_after = torch.load(out / "latents_stats.pt", weights_only=True)
    torch.testing.assert_close(stats_after["var"], stats_before["var"], atol=0, rtol=0)
    # --stats-only recomputes the same file
    (out / "latents_stats.pt").unlink()
    run(["--output-dir", str(out), "--stats-only"])
    torch.testing.assert_close(torch.load(out / "latents_stats.pt", weights_only=True)["mean"], stats_before["mean"],
                               atol=0, rtol=0)
    # another tokenizer (other weights) or other settings: refused, nothing rewritten
    with pytest.raises(SystemExit, match="fingerprint"):
        run(base + ["--seed", "1"])
    with pytest.raises(SystemExit, match="resolution"):
        run(base[:-8] + ["--resolution", "16", "--batch-size", "3", "--shard-size", "4", "--num-workers", "0"])
    other = build_tokenizer("kl", "tiny-f4d4", random_init=True, seed=1)
    ds = LatentShardDataset(out)
    ds.check_tokenizer(build_tokenizer("kl", "tiny-f4d4", random_init=True, seed=0).identity(RES))
    with pytest.raises(ValueError, match=f"{out}.*fingerprint"):
        ds.check_tokenizer(other.identity(RES))


def test_bad_folders_give_clear_errors(kl_folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(kl_folder, bad)
    shard = latent_shard_path(bad, 3)
    tensors = load_file(str(shard))
    save_file({k: v for k, v in tensors.items() if k != "labels"}, str(shard))
    with pytest.raises(KeyError, match="latents-00003.safetensors has no \\['labels'\\]"):
        LatentShardDataset(bad)
    save_file(tensors, str(shard))
    info = json.loads((bad / "tokenizer.json").read_text())
    (bad / "tokenizer.json").write_text(json.dumps(dict(info, num_images=14)))
    with pytest.raises(ValueError, match="holds 3 latents but .*tokenizer.json"):
        LatentShardDataset(bad)
    (bad / "tokenizer.json").write_text(json.dumps(info))
    (bad / "latents_stats.pt").unlink()
    with pytest.raises(FileNotFoundError, match="latents_stats.pt missing"):
        LatentShardDataset(bad).stats
    with pytest.raises(FileNotFoundError, match="tokenizer.json missing"):
        LatentShardDataset(tmp_path)


@pytest.mark.parametrize("kind,name,dtype,flip", [("vq", "tiny-f4", "float32", False), ("rae", None, "bfloat16", True)])
def test_vq_and_rae_end_to_end(data_dir, tmp_path, kind, name, dtype, flip):
    extra = {"dtype": dtype}
    if kind == "rae":
        extra["rae_config"] = "tiny-dinov2"
    run(flags(data_dir, tmp_path, tokenizer=kind, vae=name, flip=flip, **extra))
    images, _ = all_images(data_dir)
    tok = build_tokenizer(kind, name, config="tiny-dinov2" if kind == "rae" else None, random_init=True, seed=0)
    mean, std = tok.encode_moments(images)
    assert std is None
    got, _ = read_folder(tmp_path)
    assert "std" not in got and got["mean"].dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tol = 1e-5 if dtype == "float32" else 2e-2
    torch.testing.assert_close(got["mean"].float(), mean, atol=tol, rtol=tol)
    means = [mean]
    if flip:
        mean_f, _ = tok.encode_moments(images.flip(-1))
        torch.testing.assert_close(got["mean_flip"].float(), mean_f, atol=tol, rtol=tol)
        means.append(mean_f)
    ds = LatentShardDataset(tmp_path)
    assert ds.tokenizer_info["stats_mode"] == ("position" if kind == "rae" else "channel")
    assert torch.equal(ds[0]["std"], torch.zeros(tok.latent_shape(RES)))
    batch = collate_latents(ds.__getitems__([3, 14, 0]))
    assert torch.equal(batch["std"], torch.zeros(3, *tok.latent_shape(RES)))
    torch.testing.assert_close(batch["mean"][1], ds[14]["mean"], atol=0, rtol=0)
    stats = ds.stats
    for key, r in zip(("mean", "var", "channel_mean", "channel_var"), direct_stats(means, [])):
        torch.testing.assert_close(stats[key], r, atol=1e-5, rtol=1e-5, msg=key)
    ds.check_tokenizer(tok.identity(RES))


def test_reconstruction_metrics_accepts_any_tokenizer(data_dir):
    from evaluation.reconstruction import reconstruction_metrics

    images, _ = all_images(data_dir)
    tok = build_tokenizer("vq", "tiny-f4", random_init=True, seed=0)
    rec = ((tok.reconstruct(images[:6]).clamp(-1, 1) + 1) * 127.5).round()
    mse = (rec - images[:6].double()).pow(2).flatten(1).mean(1)
    psnr = (10 * torch.log10(255.0 ** 2 / mse)).mean().item()
    res = reconstruction_metrics(tok, [(images[i], 0) for i in range(6)], metrics=("psnr",), device="cpu",
                                 batch_size=4)
    assert res["psnr"] == pytest.approx(psnr, rel=1e-6)


def test_build_tokenizer_checkpoints_and_errors(tmp_path):
    """Checkpoints load strictly (taming's Lightning layout with loss.* entries for VQ), the
    fingerprint follows the weights, and a tokenizer is never silently random."""
    vq = build_tokenizer("vq", "tiny-f4", random_init=True, seed=4)
    sd = vq.model.state_dict()
    torch.save({"state_dict": dict(sd, **{"loss.discriminator.w": torch.zeros(1)})}, tmp_path / "vq.ckpt")
    loaded = build_tokenizer("vq", "tiny-f4", ckpt=tmp_path / "vq.ckpt")
    assert loaded.fingerprint() == vq.fingerprint() != build_tokenizer("vq", "tiny-f4", random_init=True).fingerprint()
    torch.save({k: v for k, v in sd.items() if k != "quant_conv.bias"}, tmp_path / "bad.ckpt")
    with pytest.raises(Exception, match="quant_conv.bias"):
        build_tokenizer("vq", "tiny-f4", ckpt=tmp_path / "bad.ckpt")
    kl = build_tokenizer("vavae", "tiny-vavae-f16d32", random_init=True)
    torch.save(kl.model.state_dict(), tmp_path / "vavae.pt")
    again = build_tokenizer("vavae", "tiny-vavae-f16d32", ckpt=tmp_path / "vavae.pt")
    assert again.fingerprint() == kl.fingerprint() and again.latent_shape(64) == (32, 4, 4)
    mean, std = again.encode_moments(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert mean.shape == std.shape == (1, 32, 4, 4) and again.stats_mode == "channel"
    with pytest.raises(ValueError, match="--vae-ckpt"):
        build_tokenizer("kl", "tiny-f4d4")
    with pytest.raises(ValueError, match="--random-init"):
        build_tokenizer("rae", "tiny-dinov2")
    with pytest.raises(ValueError, match="valid"):
        build_tokenizer("sdxl", "x", random_init=True)
    with pytest.raises(TypeError, match="uint8"):
        kl.encode_moments(torch.zeros(1, 3, 64, 64))


def test_class_remapping(data_dir, tmp_path):
    """--class-to-idx merges / reorders class folders; the mapping travels in tokenizer.json."""
    names = sorted(p.name for p in Path(data_dir).iterdir() if p.is_dir())
    mapping = {n: (len(names) - 1 - i) // 2 for i, n in enumerate(names)}  # reversed and merged in pairs
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    run(flags(data_dir, tmp_path / "lat", flip=False, class_to_idx=tmp_path / "map.json"))
    ds = LatentShardDataset(tmp_path / "lat", flip=False)
    assert ds.class_to_idx == mapping and ds.num_classes == max(mapping.values()) + 1
    files = sorted(f for f in Path(data_dir).rglob("*.png"))
    want = [mapping[f.parent.name] for f in files]
    assert [int(ds[i]["label"]) for i in range(len(ds))] == want
    (tmp_path / "bad.json").write_text(json.dumps({names[0]: -1}))
    with pytest.raises(ValueError, match="--class-to-idx"):
        run(flags(data_dir, tmp_path / "lat2", flip=False, class_to_idx=tmp_path / "bad.json"))


@pytest.mark.parametrize("dtype,has_std", [("bfloat16", True), ("float32", False)])
def test_dataset_reads_the_stored_tensors_exactly(tmp_path, dtype, has_std):
    """Items and batches (float32 and stored dtype) are the shard tensors as safetensors' own
    whole-file reader returns them, bit for bit, for every stored dtype, with and without std."""
    num, shard_size, shape = 7, 3, (2, 4, 4)
    info = dict(kind="synthetic", name="random", fingerprint="0" * 16, latent_shape=list(shape), in_channels=3,
                stats_mode="channel", has_std=has_std, resolution=16, flip=True, dtype=dtype, num_images=num,
                num_classes=5, class_to_idx=None, shard_size=shard_size,
                num_shards=num_latent_shards(num, shard_size), data_dir="synthetic", format=1)
    g = torch.Generator().manual_seed(0)
    for k in range(info["num_shards"]):
        start, stop = latent_shard_range(k, shard_size, num)
        out = {"mean": [torch.randn(stop - start, *shape, generator=g)],
               "labels": [torch.randint(0, 5, (stop - start,), generator=g)], "indices": [torch.arange(start, stop)]}
        out["mean_flip"] = [out["mean"][0].flip(-1)]
        if has_std:
            out["std"] = [torch.rand(stop - start, *shape, generator=g)]
            out["std_flip"] = [out["std"][0].flip(-1)]
        save_shard(tmp_path, k, out, latent_moments(out["mean"] + out["mean_flip"], out.get("std", [])), info)
    write_info(tmp_path, info)
    got, _ = read_folder(tmp_path)
    assert got["mean"].dtype == LATENT_DTYPES[dtype]
    order = [5, 0, 6, 3, 3, 1]
    for keep in (False, True):
        ds = LatentShardDataset(tmp_path, flip=True, seed=1, keep_dtype=keep)
        batch = ds.get_batch(order)
        for b, i in enumerate(order):
            item, suffix = ds[i], "_flip" if ds.uses_flip(i) else ""
            assert int(item["label"]) == int(got["labels"][i]) and int(batch["index"][b]) == i
            for key in ("mean", "std"):
                ref = got[key + suffix][i] if has_std or key == "mean" else torch.zeros(shape)
                assert torch.equal(item[key], ref.float()), (key, i)
                assert batch[key].dtype == (got["mean"].dtype if keep else torch.float32)
                assert torch.equal(batch[key][b], ref.to(batch[key].dtype)), (key, i, keep)
        assert torch.equal(batch["label"], got["labels"][order])
