"""RAE's configs: stage 1 (`configs/stage1/{training,pretrained}/*.yaml` -> train_stage1.py
--tokenizer rae) and stage 2 (`configs/stage2/{training,sampling}/**/*.yaml` -> train_ldm_only.py,
generate.py). The reader and the shared pieces are in `common.py`.
"""
from __future__ import annotations

import math
from pathlib import Path

from configs_compat.common import (_MISSING, UNLIMITED_STEPS, _betas, _flatten, _init_from, _Reader, _same,
                                   _sampler_keys)

_RAE_PARAMS = {"encoder_cls", "encoder_config_path", "encoder_input_size", "encoder_params", "decoder_config_path",
               "decoder_patch_size", "pretrained_decoder_path", "noise_tau", "reshape_to_2d",
               "normalization_stat_path", "eps"}
_RAE_ENCODER_PARAMS = {"dinov2_path", "model_name", "normalize"}


def _rae_model(r: _Reader, keep_decoder_weights: bool) -> dict:
    """`stage_1` -> an RAE model config for models.tokenizers.rae_spec, paths resolved and the
    ViT decoder's config.json read in (so args.json holds the whole model)."""
    r.fixed("stage_1.target", ("stage1.RAE",), "the RAE autoencoder")
    params = r.subtree("stage_1.params")
    for k in params:
        if k not in _RAE_PARAMS:
            r.error(f"stage_1.params.{k}", f"is not an RAE parameter we build (known: {sorted(_RAE_PARAMS)})")
    for k in dict(params.get("encoder_params") or {}):
        if k not in _RAE_ENCODER_PARAMS:
            r.error(f"stage_1.params.encoder_params.{k}", f"is not understood (known: {sorted(_RAE_ENCODER_PARAMS)})")
    for k in ("pretrained_decoder_path", "normalization_stat_path", "decoder_config_path"):
        if params.get(k):
            params[k] = r.path_value(params[k])
    if not keep_decoder_weights:
        params.pop("pretrained_decoder_path", None)
    model = {"params": params}
    dec = params.get("decoder_config_path")
    if dec and ((Path(dec) / "config.json").is_file() or Path(dec).is_file()):
        from models.encoders import read_json_config

        model["decoder_config"] = read_json_config(dec)
    return model


def _rae_schedule(r: _Reader, prefix: str, stage: int):
    """RAE's epoch-based scheduler, nested (`scheduler: {type, warmup_epochs, decay_end_epoch,
    base_lr, final_lr, warmup_from_zero}`) or flat (`schedule_type, decay_start_epoch, ...`)."""
    nested = r.has(f"{prefix}.scheduler")
    s = f"{prefix}.scheduler." if nested else f"{prefix}."
    typ_key = f"{s}type" if nested else f"{s}schedule_type"
    if typ_key not in r.leaves:
        return
    typ = str(r.get(typ_key)).lower()
    schedules = {"cosine": "cosine", "linear": "linear", "const": "constant", "constant": "constant"}
    if typ not in schedules:
        r.error(typ_key, f"= {typ!r}: known schedules {sorted(schedules)}")
    r.set("lr_schedule", schedules[typ])
    base = r.get(f"{s}base_lr", None)
    lr = r.out.values.get("learning_rate")
    if base is not None:
        if lr is not None and not _same(float(base), float(lr)):
            r.error(f"{s}base_lr", f"= {base} differs from the optimizer's lr {lr}: one --learning-rate sets both")
        r.set("learning_rate", float(base))
        lr = float(base)
    final = r.get(f"{s}final_lr", None)
    if final is not None:
        if stage == 1:
            r.set("lr_final_ratio", float(final) / lr if lr else 0.0)
        else:
            r.set("final_lr", float(final))
    warmup = r.get(f"{s}warmup_epochs", 0) or 0
    from_zero = r.get(f"{s}warmup_from_zero", True) if nested else False
    decay_start = r.get(f"{s}decay_start_epoch", None)
    if warmup and from_zero:
        if stage == 1:
            r.set("lr_warmup_epochs", float(warmup))
        else:
            r.out.epochs["lr_warmup_steps"] = float(warmup)
    elif warmup:  # RAE: no warm-up from zero = the base LR held for warmup_epochs, then the decay
        if schedules[typ] != "linear":
            r.error(f"{s}warmup_from_zero", f"= False with a {typ} schedule: only the linear schedule holds the "
                                            f"base LR before decaying (--lr-decay-start)")
        decay_start = warmup
    if decay_start is not None:
        r.out.epochs["lr_decay_start"] = float(decay_start)
    end = r.get(f"{s}decay_end_epoch", None)
    if end is not None:  # RAE's horizon, whatever --epochs or --max-train-steps stop the run at
        r.out.epochs["lr_total_steps"] = float(end)


# ------------------------------------------------------------------------------------------------
# RAE
# ------------------------------------------------------------------------------------------------
def _rae_training(r: _Reader, t: str = "training") -> None:
    """The `training` section both RAE stages share (stage 2 also spells two keys its own way)."""
    epochs = r.flag(f"{t}.epochs", "epochs", int)
    if epochs is not _MISSING:
        r.set("max_train_steps", UNLIMITED_STEPS)
    r.flag(f"{t}.ema_decay", "ema_decay", float)
    r.flag(f"{t}.global_batch_size", "batch_size", int)
    r.flag(f"{t}.grad_accum_steps", "gradient_accumulation_steps", int)
    r.flag(f"{t}.num_workers", "num_workers", int)
    r.flag(f"{t}.clip_grad", "max_grad_norm", float)
    r.flag(f"{t}.log_interval", "log_every", int)
    r.flag(f"{t}.log_every", "log_every", int)
    r.flag(f"{t}.checkpoint_interval", "checkpointing_steps", float, epochs=True)
    r.flag(f"{t}.ckpt_every", "checkpointing_steps", int)
    r.flag(f"{t}.sample_every", "sampling_steps", int)
    r.flag(f"{t}.global_seed", "seed", int)
    r.flag(f"{t}.optimizer.lr", "learning_rate", float)
    _betas(r, f"{t}.optimizer.betas")
    r.flag(f"{t}.optimizer.weight_decay", "adam_weight_decay", float)


def _rae_stage1(r: _Reader):
    r.set("tokenizer", "rae")
    model = _rae_model(r, keep_decoder_weights=False)
    # an explicit --model (a preset) replaces the file's model, as any explicit flag wins
    r.set("model_config", model, yields=("model",))
    _init_from(r, "stage_1.params.pretrained_decoder_path")
    t = "training"
    _rae_training(r, t)
    _rae_schedule(r, t, 1)
    # RAE's train_stage1.py (not in the file): torchvision Resize(int(1.5 x --image-size), BICUBIC) on
    # the short side, then RandomCrop(--image-size), no flip; the RAE recipes' data settings
    r.set("load_mode", "short-side")
    r.set("short_side_resize", "pil-bicubic")
    r.set("load_size", "1.5x")
    r.set("crop", "random")

    g = "gan.disc"
    if r.has(g):
        arch = {}
        ckpt = r.get(f"{g}.arch.dino_ckpt_path", None)
        if ckpt:
            arch["pretrained"] = r.path_value(ckpt)
        ks = r.get(f"{g}.arch.ks", None)
        if ks is not None:
            arch["kernel_size"] = int(ks)
        r.fixed(f"{g}.arch.norm_type", ("bn",), "the heads' per-sample token norm")
        r.fixed(f"{g}.arch.using_spec_norm", (True,), "spectral-norm heads")
        r.fixed(f"{g}.arch.recipe", ("S_8",), "the DINO ViT-S/8 backbone")
        r.set("disc_config", arch)
        r.flag(f"{g}.optimizer.lr", "disc_learning_rate", float)
        for key, dest in (("betas", None), ("weight_decay", "adam_weight_decay")):
            k = f"{g}.optimizer.{key}"
            if k in r.leaves:
                ours = ([r.out.values.get("adam_beta1"), r.out.values.get("adam_beta2")] if dest is None
                        else r.out.values.get(dest))
                theirs = r.get(k)
                same = (all(_same(a, b) for a, b in zip(theirs, ours)) if dest is None else _same(theirs, ours))
                if not same:
                    r.error(k, f"= {theirs} differs from training.optimizer's {ours}: both optimizers share the "
                               f"Adam settings here")
        disc_sched = r.subtree(f"{g}.scheduler")
        main_sched = {k[len(t) + 11:]: v for k, v in r.leaves.items() if k.startswith(f"{t}.scheduler.")}
        flat_disc = {k: v for k, v in _flatten(disc_sched)}
        if disc_sched and any(not _same(v, main_sched.get(k)) for k, v in flat_disc.items()):
            r.error(f"{g}.scheduler", "differs from training.scheduler: one --lr-schedule drives both optimizers "
                                      "(each on its own clock)")
        r.fixed(f"{g}.augment.prob", (1.0,), "DiffAug on every discriminator input")
        r.fixed(f"{g}.augment.cutout", (0.0,), "DiffAug policy color,translation (no cutout)")
    l = "gan.loss"
    r.flag(f"{l}.disc_loss", "disc_loss", str)
    r.fixed(f"{l}.gen_loss", ("vanilla",), "the generator's GAN term is -mean D(fake)")
    r.flag(f"{l}.disc_weight", "gan_weight", float)
    r.flag(f"{l}.perceptual_weight", "perceptual_weight", float)
    r.flag(f"{l}.disc_start", "disc_start_epoch", int)
    r.flag(f"{l}.disc_upd_start", "disc_update_start_epoch", int)
    r.fixed(f"{l}.lpips_start", (0,), "LPIPS from the first step")
    r.fixed(f"{l}.max_d_weight", (1e4,), "the adaptive GAN weight is clamped to 1e4")
    r.fixed(f"{l}.disc_updates", (1,), "one discriminator update per step (--disc-every for fewer)")
    e = "eval"
    r.flag(f"{e}.eval_interval", "eval_every", int)
    r.fixed(f"{e}.eval_model", (True,), "evaluation runs on the EMA model")
    r.flag(f"{e}.data_path", "eval_data_dir", r.path_value)
    r.unused(f"{e}.reference_npz_path", "rFID compares reconstructions with the --eval-data-dir images themselves")
    r.flag(f"{e}.metrics", "eval_metrics", lambda v: ",".join(str(m) for m in v))


def _rae_stage2_common(r: _Reader, sampling: bool):
    r.set("tokenizer", "rae")
    r.set("rae_config", _rae_model(r, keep_decoder_weights=True))
    r.fixed("stage_2.target", ("stage2.models.DDT.DiTwDDTHead",),
            "DiT^DH networks (our LightningDiT takes hustvl's configs)")
    sizes = r.subtree("stage_2.params")
    r.set("model", _ddt_name(r, "stage_2.params", sizes))
    if "num_classes" in sizes:
        r.set("num_classes", int(sizes["num_classes"]))
    _check_ddt_options(r, "stage_2.params", sizes, sampling)
    r.fixed("transport.params.path_type", ("Linear",), "the linear interpolant x_t = (1 - t) x + t eps")
    r.fixed("transport.params.prediction", ("velocity",), "velocity prediction")
    r.fixed("transport.params.loss_weight", (None,), "unweighted MSE")
    latent = r.get("misc.latent_size", None)
    dim, base = r.get("misc.time_dist_shift_dim", None), r.get("misc.time_dist_shift_base", None)
    shift = None
    if dim is not None:
        base = 4096 if base is None else base
        if latent is not None and math.prod(latent) == int(dim) and int(base) == 4096:
            shift = "auto"  # sqrt(C*h*w / 4096) of the latents actually used
        else:
            shift = math.sqrt(float(dim) / float(base))
    n = r.get("misc.num_classes", None)
    if n is not None:
        if "num_classes" in r.out.values and int(n) != r.out.values["num_classes"]:
            r.error("misc.num_classes", f"= {n} differs from stage_2.params.num_classes {r.out.values['num_classes']}")
        r.set("num_classes", int(n))
    return shift


def _ddt_name(r: _Reader, prefix: str, params: dict) -> str:
    """Our DiT^DH preset with the sizes of `params` (hidden_size, depth, num_heads pairs)."""
    from models.ddt import DDT_SIZES

    key = tuple(tuple(params.get(k, ())) for k in ("hidden_size", "depth", "num_heads"))
    name = next((n for n, s in DDT_SIZES.items() if s == key), None)
    if name is None:
        r.error(f"{prefix}.hidden_size", f"/ depth / num_heads = {key} match no DiT^DH size "
                                         f"({', '.join(f'{n}: {s}' for n, s in DDT_SIZES.items())})")
    return name


def _check_ddt_options(r: _Reader, prefix: str, params: dict, sampling: bool):
    """DiT^DH keys besides the sizes: our network has RAE's released options only."""
    fixed = dict(patch_size=1, mlp_ratio=4.0, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False,
                 use_pos_embed=True)
    for k, v in params.items():
        if k in ("hidden_size", "depth", "num_heads", "num_classes", "input_size", "in_channels"):
            continue  # sizes -> the preset; the input shape is the latents'
        if k == "use_qknorm":
            if sampling:
                continue  # read off the checkpoint's state_dict
            r.set("qk_norm", bool(v))
        elif k == "class_dropout_prob":
            if not sampling:
                r.set("cfg_prob", float(v))
        elif k in fixed:
            if not _same(v, fixed[k]):
                r.error(f"{prefix}.{k}", f"= {v!r} is not supported (DiT^DH is built with {k}={fixed[k]!r})")
        else:
            r.error(f"{prefix}.{k}", "is not a DiT^DH option")


def _rae_stage2_train(r: _Reader):
    shift = _rae_stage2_common(r, sampling=False)
    if shift is not None:
        r.set("time_shift", str(shift))
        r.set("sample_shift", str(shift))
    tdist = r.get("transport.params.time_dist_type", None)
    if tdist is not None:
        weighting = {"uniform": "uniform", "logit-normal_0_1": "logit-normal"}.get(str(tdist))
        if weighting is None:
            r.error("transport.params.time_dist_type", f"= {tdist!r}: known uniform, logit-normal_0_1")
        r.set("weighting", weighting)
    # the sampler / guidance sections drive the training-time sample grids (Euler, CFG)
    r.fixed("sampler.mode", ("ODE",), "sample grids integrate the ODE")
    r.fixed("sampler.params.sampling_method", ("euler",), "sample grids use Euler steps")
    r.flag("sampler.params.num_steps", "sample_num_steps", int)
    r.unused("sampler.params.atol", "Euler has no tolerance")
    r.unused("sampler.params.rtol", "Euler has no tolerance")
    r.fixed("sampler.params.reverse", (False,), "sampling runs from noise to data")
    r.fixed("guidance.method", ("cfg",), "sample grids use classifier-free guidance")
    r.flag("guidance.scale", "sample_cfg_scale", float)
    for k in ("t_min", "t-min"):
        r.fixed(f"guidance.{k}", (0.0,), "sample grids guide the whole trajectory")
    for k in ("t_max", "t-max"):
        r.fixed(f"guidance.{k}", (1.0,), "sample grids guide the whole trajectory")
    r.flag("eval.eval_interval", "eval_every", int)
    r.fixed("eval.eval_model", (True,), "evaluation samples the EMA model")
    r.unused("eval.data_path", "FID compares generated samples with --eval-reference")
    r.flag("eval.reference_npz_path", "eval_reference", r.path_value)
    t = "training"
    _rae_training(r, t)
    _betas(r, f"{t}.beta")
    r.flag(f"{t}.wd", "adam_weight_decay", float)
    _rae_schedule(r, t, 2)


def _rae_stage2_sample(r: _Reader):
    shift = _rae_stage2_common(r, sampling=True)
    r.set("time_grid", "rae")
    if shift is not None:
        r.set("shift", shift)
    r.flag("stage_2.ckpt", "ckpt", r.path_value)
    r.unused("transport.params.time_dist_type", "the training time distribution")
    _sampler_keys(r, "sampler.mode", "sampler.params.sampling_method", "sampler.params.num_steps", "sampler.params.")
    r.fixed("sampler.params.reverse", (False,), "sampling runs from noise to data")
    method = r.flag("guidance.method", "guidance", lambda v: str(v).lower())
    if method is not _MISSING and method not in ("cfg", "autoguidance"):
        r.error("guidance.method", f"= {method!r}: cfg or autoguidance")
    r.flag("guidance.scale", "cfg_scale", float)
    for k in ("t_min", "t-min"):
        r.flag(f"guidance.{k}", "guidance_low", float)
    for k in ("t_max", "t-max"):
        r.flag(f"guidance.{k}", "guidance_high", float)
    if r.has("guidance.guidance_model"):
        gm = "guidance.guidance_model"
        r.fixed(f"{gm}.target", ("stage2.models.DDT.DiTwDDTHead",), "DiT^DH guides")
        sizes = r.subtree(f"{gm}.params")
        r.set("guide_model", _ddt_name(r, f"{gm}.params", sizes))
        _check_ddt_options(r, f"{gm}.params", sizes, sampling=True)
        r.flag(f"{gm}.ckpt", "guide_ckpt", r.path_value)
    r.unused("training", "training settings")
    r.unused("eval", "training-time evaluation")
