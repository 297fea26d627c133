"""Unit tests for the KL autoencoders (models/autoencoder.py) and VQGAN quantizers (models/vqgan.py):
presets, shapes, strict checkpoint loading, latent statistics, VA-VAE checkpoints, EMA updates."""
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from models.autoencoder import VAE_PRESETS, AutoencoderKL, DiagonalGaussianDistribution, Normalize, build_vae
from models.vae_loading import (default_stats_path, denormalize_latents, load_latents_stats, load_vae, normalize_latents,
                                save_latents_stats)
from models.vqgan import EMAVectorQuantizer, VectorQuantizer2, VQ_PRESETS, build_vqgan
from tests.cli import free_port
from utils import StateDictMismatch


# ---------------------------------------------------------------------------------------------
# KL autoencoders
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(VAE_PRESETS))
def test_presets_construct(name):
    with torch.device("meta"):  # the real sizes have 80M+ parameters: shapes only
        vae = build_vae(name)
    assert vae.latent_channels == VAE_PRESETS[name]["embed_dim"]
    assert vae.downsample_factor == 2 ** (len(VAE_PRESETS[name]["ch_mult"]) - 1)
    assert hasattr(vae, "linear_proj") == ("vf_dim" in VAE_PRESETS[name])


def test_f8d4_is_the_sd_vae_layout():
    with torch.device("meta"):
        vae = build_vae("f8d4")
    # SD-VAE (sd-vae-ft-ema) has 83,653,863 parameters; the same layout must give the same count.
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    sd = vae.state_dict()
    assert tuple(sd["encoder.conv_out.weight"].shape) == (8, 512, 3, 3)
    assert "encoder.down.3.attn.0.q.weight" not in sd  # f8d4: attention only in the mid blocks
    assert tuple(sd["decoder.up.0.block.0.nin_shortcut.weight"].shape) == (128, 256, 1, 1)
    with torch.device("meta"):
        f16 = build_vae("f16d32")
    sd16 = f16.state_dict()
    assert "encoder.down.4.attn.1.q.weight" in sd16 and "decoder.up.4.attn.2.q.weight" in sd16
    assert "encoder.down.3.attn.0.q.weight" not in sd16


@pytest.mark.parametrize("name,size,latent", [("tiny-f4d4", (32, 24), (4, 8, 6)), ("tiny-f8d4", (64, 64), (4, 8, 8)),
                                              ("tiny-f16d32", (32, 48), (32, 2, 3))])
def test_tiny_forward_shapes(name, size, latent):
    torch.manual_seed(0)
    vae = build_vae(name).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        posterior, z, recon = vae(x)
    assert tuple(z.shape) == (2, *latent)
    assert tuple(recon.shape) == tuple(x.shape)
    assert tuple(posterior.kl().shape) == (2,)
    assert torch.isfinite(recon).all()


def test_one_channel_vae_and_linear_proj():
    vae = build_vae("tiny-vavae-f16d32", in_channels=1, out_ch=1).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        post, z, recon = vae(x)
        proj = vae.linear_proj(z)
    assert recon.shape == x.shape and proj.shape == (1, 64, 2, 2)


def test_posterior_math():
    moments = torch.cat([torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 100.0)], dim=1)
    post = DiagonalGaussianDistribution(moments)
    assert torch.all(post.logvar == 20.0)  # clamped
    zero = DiagonalGaussianDistribution(torch.zeros(2, 6, 4, 4))
    assert torch.allclose(zero.kl(), torch.zeros(2))
    noise = torch.randn(2, 3, 4, 4)
    assert torch.equal(zero.sample(noise=noise), noise)
    a = zero.sample(generator=torch.Generator().manual_seed(1))
    b = zero.sample(generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="noise"):
        zero.sample(noise=torch.randn(2, 3, 2, 2))


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    vae = build_vae("tiny-f4d4").train()
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    noise = torch.randn(1, 4, 2, 2)
    grads = []
    for flag in (False, True):
        vae.set_grad_checkpointing(flag)
        vae.zero_grad()
        x.grad = None
        _, _, recon = vae(x, noise=noise)
        recon.square().mean().backward()
        grads.append((x.grad.clone(), vae.encoder.conv_in.weight.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="multiple of 32"):
        Normalize(48)
    with pytest.raises(ValueError, match="bogus"):
        AutoencoderKL(4, (1, 2), bogus=1)
    with pytest.raises(KeyError, match="no-such"):
        build_vae("no-such")
    with pytest.raises(ValueError, match="foo"):
        AutoencoderKL.from_ldm_config({"ddconfig": {}, "embed_dim": 4, "foo": 1})


def _tiny_ckpt(tmp_path, name="tiny-f4d4"):
    torch.manual_seed(0)
    vae = build_vae(name)
    path = tmp_path / "vae.pt"
    return vae, path


def test_checkpoint_strict_errors_name_key_and_file(tmp_path):
    vae, path = _tiny_ckpt(tmp_path)
    sd = vae.state_dict()
    good = dict(sd)
    torch.save(good, path)
    loaded, stats = load_vae("tiny-f4d4", ckpt_path=path)
    assert stats is None
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())

    missing = dict(sd)
    del missing["decoder.conv_out.bias"]
    torch.save(missing, path)
    with pytest.raises(StateDictMismatch, match=r"(?s)vae\.pt.*missing keys.*decoder\.conv_out\.bias"):
        load_vae("tiny-f4d4", ckpt_path=path)

    extra = dict(sd)
    extra["encoder.extra.weight"] = torch.zeros(1)
    torch.save(extra, path)
    with pytest.raises(StateDictMismatch, match=r"unexpected keys.*encoder\.extra\.weight"):
        load_vae("tiny-f4d4", ckpt_path=path)

    shaped = dict(sd)
    shaped["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    torch.save(shaped, path)
    with pytest.raises(StateDictMismatch, match=r"quant_conv\.weight: checkpoint \(8, 8, 3, 3\)"):
        load_vae("tiny-f4d4", ckpt_path=path)

    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_vae("tiny-f4d4", ckpt_path=tmp_path / "nowhere.pt")


def test_latent_stats_round_trip(tmp_path):
    vae, path = _tiny_ckpt(tmp_path)
    torch.save(vae.state_dict(), path)
    scale, bias = torch.rand(4) + 0.5, torch.randn(4)
    save_latents_stats(default_stats_path(path), scale, bias)
    assert default_stats_path(path).name == "vae-latents-stats.pt"
    _, stats = load_vae("tiny-f4d4", ckpt_path=path)  # found next to the checkpoint
    assert stats["latents_scale"].shape == (1, 4, 1, 1)
    assert torch.equal(stats["latents_scale"].flatten(), scale) and torch.equal(stats["latents_bias"].flatten(), bias)
    z = torch.randn(2, 4, 3, 3)
    assert torch.allclose(denormalize_latents(normalize_latents(z, stats), stats), z, atol=1e-6)

    flat = tmp_path / "flat.pt"
    torch.save({"latents_scale": scale, "latents_bias": bias}, flat)  # [C] accepted
    assert load_latents_stats(flat, channels=4)["latents_bias"].shape == (1, 4, 1, 1)

    wrong = tmp_path / "wrong.pt"
    torch.save({"latents_scale": torch.ones(1, 8, 1, 1), "latents_bias": torch.zeros(1, 8, 1, 1)}, wrong)
    with pytest.raises(ValueError, match=r"wrong\.pt.*8 channels.*4 latent channels"):
        load_vae("tiny-f4d4", ckpt_path=path, stats_path=wrong)
    with pytest.raises(FileNotFoundError, match="absent-latents-stats.pt"):
        load_vae("tiny-f4d4", stats_path=tmp_path / "absent-latents-stats.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"scale": torch.ones(4)}, bad)
    with pytest.raises(KeyError, match="latents_scale"):
        load_latents_stats(bad)


def test_vavae_checkpoint_with_training_keys_loads(tmp_path):
    torch.manual_seed(0)
    src = build_vae("tiny-vavae-f16d32")
    sd = dict(src.state_dict())
    sd["loss.logvar"] = torch.zeros(())
    sd["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    sd["foundation_model.model.blocks.0.weight"] = torch.randn(3)
    path = tmp_path / "vavae.ckpt"
    torch.save({"state_dict": sd, "global_step": 7}, path)
    # Without linear_proj (inference model): the projection is dropped, everything else strict.
    plain, _ = load_vae("tiny-f16d32", ckpt_path=path)
    assert not hasattr(plain, "linear_proj")
    assert torch.equal(plain.encoder.conv_out.weight, src.encoder.conv_out.weight)
    # With linear_proj (VA-VAE fine-tuning): the projection is kept.
    proj, _ = load_vae("tiny-vavae-f16d32", ckpt_path=path)
    assert torch.equal(proj.linear_proj.weight, src.linear_proj.weight)
    # LDM-config construction gives the same key set (incl. linear_proj for use_vf + reverse_proj).
    cfg = {"ddconfig": dict(double_z=True, z_channels=32, resolution=64, in_channels=3, out_ch=3, ch=32,
                            ch_mult=[1, 1, 1, 1, 2], num_res_blocks=1, attn_resolutions=[4], dropout=0.0),
           "embed_dim": 32, "use_vf": "dinov2", "reverse_proj": True, "lossconfig": {"target": "x"}}
    ldm = AutoencoderKL.from_ldm_config(cfg, vf_feature_dim=64)
    assert set(ldm.state_dict()) == set(src.state_dict())
    assert AutoencoderKL.from_ldm_config(cfg).linear_proj.weight.shape == (1024, 32, 1, 1)


# ---------------------------------------------------------------------------------------------
# Quantizers and VQModel
# ---------------------------------------------------------------------------------------------
def test_vqmodel_decode_code_and_shapes():
    torch.manual_seed(0)
    model = build_vqgan("tiny-f4").eval()
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        quant, qloss, (_, _, indices) = model.encode(x)
        assert quant.shape == (2, 8, 4, 6) and indices.shape == (48,)
        from_codes = model.decode_code(indices.view(2, 4, 6))
        assert torch.allclose(from_codes, model.decode(quant), atol=1e-5)
        assert torch.allclose(model.decode_code(indices, grid=(4, 6)), from_codes)
        dec, loss = model(x)
    assert dec.shape == x.shape and loss.ndim == 0
    with torch.device("meta"):
        assert build_vqgan("imagenet-f16-16384").quantize.embedding.weight.shape == (16384, 256)
    assert set(VQ_PRESETS) >= {"imagenet-f16-1024", "tiny-f4"}


def test_vq2_remap_from_npy(tmp_path):
    torch.manual_seed(0)
    used = np.array([3, 5, 7, 11], dtype=np.int64)
    np.save(tmp_path / "used.npy", used)
    q = VectorQuantizer2(16, 4, remap=str(tmp_path / "used.npy"), unknown_index="extra", sane_index_shape=True)
    assert q.re_embed == 5 and torch.equal(q.used, torch.from_numpy(used))
    z = q.embedding.weight[[5, 3, 0, 11]].t().reshape(1, 4, 2, 2)  # exact codes: 5, 3, 0 (unknown), 11
    _, _, (_, _, idx) = q(z)
    assert idx.tolist() == [[[1, 0], [4, 3]]]
    flat = idx.reshape(-1).clone()
    entry = q.get_codebook_entry(flat, (1, 2, 2, 4))
    assert flat.tolist() == [1, 0, 0, 3]  # the original's in-place write of the unknown slot
    assert torch.equal(entry[0, :, 1, 0], q.embedding.weight[3])  # unknown decodes to used[0]


def test_ema_quantizer_updates_and_eval_freezes():
    torch.manual_seed(0)
    q = EMAVectorQuantizer(8, 3, beta=0.25, decay=0.9, eps=1e-5)
    z = torch.randn(2, 3, 2, 2)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()
    q(z)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    q.train()
    _, loss, (perp, enc, idx) = q(z)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 3)
    counts = enc.sum(0)
    exp_cluster = 0.9 * before["embedding.cluster_size"] + 0.1 * counts
    exp_avg = 0.9 * before["embedding.embed_avg"] + 0.1 * enc.t() @ rows
    assert torch.allclose(q.embedding.cluster_size, exp_cluster)
    assert torch.allclose(q.embedding.embed_avg, exp_avg)
    n = exp_cluster.sum()
    assert torch.allclose(q.embedding.weight, exp_avg / ((exp_cluster + 1e-5) / (n + 8e-5) * n)[:, None])
    assert q.embedding.weight.grad is None and not q.embedding.weight.requires_grad
    assert 1.0 <= perp.item() <= 8.0 and idx.shape == (8,)


def test_ema_dead_code_restart():
    torch.manual_seed(0)
    plain = EMAVectorQuantizer(16, 3).train()
    torch.manual_seed(0)
    q = EMAVectorQuantizer(16, 3, restart_dead_codes=True, dead_code_threshold=1e-3).train()
    z = torch.randn(1, 3, 2, 2)
    _, _, (_, _, idx) = plain(z)
    q(z)
    used = torch.zeros(16, dtype=torch.bool)
    used[idx] = True
    rows = z.permute(0, 2, 3, 1).reshape(-1, 3)
    # Used codes follow the EMA exactly as without restart ...
    assert torch.equal(q.embedding.weight[used], plain.embedding.weight[used])
    # ... unused ones (cluster size 0: the original blows them up to embed_avg / ~0) are now rows
    # of the batch, with cluster size 1 so the next normalisation keeps them there.
    dead_w = q.embedding.weight[~used]
    assert torch.cdist(dead_w, rows).min(dim=1).values.max() < 1e-6
    assert torch.all(q.embedding.cluster_size[~used] == 1.0)
    assert plain.embedding.weight[~used].abs().max() > 1e3


def _ema_rank(rank, world, port, zs, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    q = EMAVectorQuantizer(8, 3, decay=0.9).train()
    q(zs[rank])
    out[rank] = q.embedding.weight.clone()
    dist.destroy_process_group()


def test_ema_all_reduce_two_ranks():
    torch.manual_seed(1)
    zs = [torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_ema_rank, args=(2, free_port(), zs, out), nprocs=2, join=True)
    torch.manual_seed(0)
    ref = EMAVectorQuantizer(8, 3, decay=0.9).train()
    ref(torch.cat(zs))  # one process on the global batch
    assert torch.allclose(out[0], out[1])
    assert torch.allclose(out[0], ref.embedding.weight, atol=1e-5)
