"""hustvl's LightningDiT configs (`configs/*.yaml` -> train_ldm_only.py, generate.py) and its
VA-VAE tokenizer's LDM-style autoencoder configs (`vavae/configs/*.yaml` -> train_stage1.py: vavae,
or kl without use_vf). The reader and the shared pieces are in `common.py`.
"""
from __future__ import annotations

from pathlib import Path

from configs_compat.common import (_MISSING, _disc_in_channels, _init_from, _lightning_data, _model_params, _Reader,
                                   _sampler_keys)

# ------------------------------------------------------------------------------------------------
# LightningDiT (hustvl)
# ------------------------------------------------------------------------------------------------
def _lightningdit_common(r: _Reader, sampling: bool):
    from models.diffusion import DIFFUSION_MODELS

    name = r.flag("model.model_type", "model", str)
    if name is not _MISSING and name not in DIFFUSION_MODELS:
        r.error("model.model_type", f"= {name!r} is not one of our networks ({', '.join(DIFFUSION_MODELS)})")
    for k, v in (("use_swiglu", True), ("use_rope", True), ("use_rmsnorm", True), ("wo_shift", False)):
        r.fixed(f"model.{k}", (v,), f"LightningDiT is built with {k}={v}")
    if sampling:
        r.unused("model.use_qknorm", "read off the checkpoint")
    else:
        r.flag("model.use_qknorm", "qk_norm", bool)
    r.unused("model.in_chans", "the latent channels are the latents'")
    vae = r.get("vae.model_name", None)
    if vae is not None:
        if str(vae) != "vavae_f16d32":
            r.error("vae.model_name", f"= {vae!r}: the released tokenizer is vavae_f16d32")
        r.set("tokenizer", "vavae")
        r.set("vae", "vavae-f16d32")
    r.fixed("vae.downsample_ratio", (16,), "VA-VAE f16d32 downsamples by 16")
    r.flag("data.image_size", "resolution", int)
    r.flag("data.num_classes", "num_classes", int)
    r.fixed("data.latent_multiplier", (1.0,), "latents are normalised by their statistics only")
    r.fixed("transport.path_type", ("Linear",), "the linear interpolant")
    r.fixed("transport.prediction", ("velocity",), "velocity prediction")
    r.fixed("transport.sample_eps", (None,), "sampling integrates to the end point")
    r.fixed("sample.reverse", (False,), "sampling runs from noise to data")
    r.fixed("sample.likelihood", (False,), "no likelihood evaluation")


def _lightningdit_train(r: _Reader):
    _lightningdit_common(r, sampling=False)
    r.unused("ckpt_path", "the inference checkpoint (generate.py --ckpt)")
    r.flag("data.data_path", "latents_dir", r.path_value)
    r.flag("data.fid_reference_file", "eval_reference", r.path_value)
    r.flag("data.num_workers", "num_workers", int)
    norm = r.get("data.latent_norm", None)
    if norm is not None:
        if norm is not True:
            r.error("data.latent_norm", "= false is not supported: latents are always normalised")
        r.set("latent_norm", "channel")
    r.flag("train.max_steps", "max_train_steps", int)
    r.flag("train.global_batch_size", "batch_size", int)
    r.flag("train.global_seed", "seed", int)
    r.flag("train.output_dir", "output_dir", r.path_value)
    r.flag("train.exp_name", "exp_name", str)
    if r.get("train.ckpt", None) is not None:
        r.error("train.ckpt", "is a resume file: continue an experiment with --resume latest (or a step) instead")
    r.flag("train.log_every", "log_every", int)
    r.flag("train.ckpt_every", "checkpointing_steps", int)
    r.flag("optimizer.lr", "learning_rate", float)
    r.flag("optimizer.beta1", "adam_beta1", float)
    r.flag("optimizer.beta2", "adam_beta2", float)
    r.fixed("transport.loss_weight", (None,), "unweighted MSE")
    r.fixed("transport.train_eps", (None,), "training times cover [0, 1]")
    r.flag("transport.use_cosine_loss", "direction_loss_weight", lambda v: 1.0 if v else 0.0)
    r.flag("transport.use_lognorm", "weighting", lambda v: "logit-normal" if v else "uniform")
    # the sample section drives the training-time grids; FID sampling settings are generate.py's
    r.fixed("sample.mode", ("ODE",), "sample grids integrate the ODE")
    r.fixed("sample.sampling_method", ("euler",), "sample grids use Euler steps")
    r.unused("sample.atol", "Euler has no tolerance")
    r.unused("sample.rtol", "Euler has no tolerance")
    r.flag("sample.num_sampling_steps", "sample_num_steps", int)
    r.flag("sample.cfg_scale", "sample_cfg_scale", float)
    r.flag("sample.timestep_shift", "sample_shift", lambda v: str(1.0 / float(v)))
    for k in ("per_proc_batch_size", "fid_num", "cfg_interval_start"):
        r.unused(f"sample.{k}", "generate.py's FID sampling")


def _lightningdit_sample(r: _Reader):
    _lightningdit_common(r, sampling=True)
    r.flag("ckpt_path", "ckpt", r.path_value)
    # hustvl's extract_features.py writes latents_stats.pt into data_path
    r.flag("data.data_path", "vae_stats", lambda v: str(Path(r.path_value(v)) / "latents_stats.pt"))
    r.flag("data.fid_reference_file", "ref_batch", r.path_value)
    r.fixed("data.latent_norm", (True,), "the latent statistics are applied")
    r.unused("data.num_workers", "no data is loaded")
    for section in ("train", "optimizer"):
        r.unused(section, "training settings")
    for k in ("loss_weight", "train_eps", "use_cosine_loss", "use_lognorm"):
        r.unused(f"transport.{k}", "training settings")
    _sampler_keys(r, "sample.mode", "sample.sampling_method", "sample.num_sampling_steps", "sample.")
    r.flag("sample.cfg_scale", "cfg_scale", float)
    r.flag("sample.per_proc_batch_size", "per_proc_batch_size", int)
    r.flag("sample.fid_num", "num_fid_samples", int)
    # hustvl guides data times t >= start (t = 1 data): noise times <= 1 - start here
    r.flag("sample.cfg_interval_start", "guidance_high", lambda v: 1.0 - float(v))
    # hustvl shifts data time by s: the same grid is noise-time shift 1 / s here
    r.flag("sample.timestep_shift", "shift", lambda v: 1.0 / float(v))
    # the published FIDs of these configs were measured with hustvl's CFG on channels 0..2 and
    # with uniformly random labels (DiT's sampler)
    r.set("cfg_legacy_channels", True)
    r.set("label_sampling", "random")


# ------------------------------------------------------------------------------------------------
# LDM-style autoencoder (VA-VAE)
# ------------------------------------------------------------------------------------------------
def _ldm_autoencoder(r: _Reader):
    r.fixed("model.target", ("ldm.models.autoencoder.AutoencoderKL",), "the KL autoencoder")
    model = _model_params(r, ("embed_dim", "ddconfig", "use_vf", "reverse_proj"))
    use_vf = model.get("use_vf")
    if use_vf is not None:
        if use_vf != "dinov2":
            r.error("model.params.use_vf", f"= {use_vf!r}: the VF model we align to is dinov2 (DINOv2-L)")
        r.set("tokenizer", "vavae")
        r.set("vf_model", "dinov2-vit-l")
    else:
        r.set("tokenizer", "kl")
    r.fixed("model.params.reverse_proj", (True,), "the projection maps latents to the foundation features")
    r.set("model_config", model, yields=("model",))
    r.unused("model.params.monitor", "Lightning's best-checkpoint metric; every checkpoint is kept")
    r.unused("ckpt_path", "the original's test-time checkpoint")
    _init_from(r, "weight_init")
    r.flag("model.base_learning_rate", "learning_rate", float)
    lc = "model.params.lossconfig"
    r.fixed(f"{lc}.target", ("ldm.modules.losses.LPIPSWithDiscriminator",), "LPIPS + KL + PatchGAN (+ VF) loss")
    p = f"{lc}.params"
    for key, dest, conv in (("disc_start", "disc_start", int), ("kl_weight", "kl_weight", float),
                            ("disc_weight", "disc_weight", float), ("disc_factor", "disc_factor", float),
                            ("disc_num_layers", "disc_num_layers", int),
                            ("perceptual_weight", "perceptual_weight", float),
                            ("use_actnorm", "use_actnorm", bool), ("disc_loss", "disc_loss", str),
                            ("vf_weight", "vf_weight", float), ("adaptive_vf", "adaptive_vf", bool),
                            ("distmat_margin", "distmat_margin", float), ("cos_margin", "cos_margin", float),
                            ("distmat_weight", "distmat_weight", float), ("cos_weight", "cos_weight", float)):
        r.flag(f"{p}.{key}", dest, conv)
    r.fixed(f"{p}.logvar_init", (0.0,), "the output log-variance starts (and stays) at 0")
    r.fixed(f"{p}.pixelloss_weight", (1.0,), "L1 weight 1")
    r.fixed(f"{p}.disc_conditional", (False,), "an unconditional PatchGAN")
    _disc_in_channels(r, p, model)
    _lightning_data(r)
    for split, dest in (("train", "data_dir"), ("validation", "eval_data_dir")):
        s = f"data.params.{split}"
        r.fixed(f"{s}.target", (f"ldm.data.imagenet.ImageNet{'Train' if split == 'train' else 'Validation'}",),
                "ImageNet-style image folders")
        r.flag(f"{s}.params.data_root", dest, r.path_value)
        if split == "train":
            r.flag(f"{s}.params.config.size", "resolution", int)
            # taming's ImagePaths: albumentations SmallestMaxSize (OpenCV bilinear, --short-side-resize's
            # default for kl / vavae), then RandomCrop
            r.set("load_mode", "short-side")
        else:
            r.unused(f"{s}.params.config.size", "evaluation at --resolution")
