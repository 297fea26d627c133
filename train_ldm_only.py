"""Diffusion transformer training on cached latents: SiT (REPA-E flags, optional REPA loss),
LightningDiT and DiT^DH, with any tokenizer's latents written by `cache_latents.py`.

One optimisation step:
  1. a batch of cached posteriors (mean, std) and labels; z = mean + std * eps (KL tokenizers; the
     deterministic ones have std = 0); with REPA, the images of the same indices (flipped with the
     latent) go through the frozen representation encoders;
  2. SiT: its own forward on raw z (its input BatchNorm holds the latent statistics and stays fixed,
     as in REPA-E): denoising loss + proj_coeff * REPA loss, time from --weighting;
     LightningDiT / DiT^DH: z is normalised by the statistics of the latent folder (per channel or
     per position), time t ~ --weighting (uniform or logit-normal) pushed by --time-shift, loss
     MSE(v, eps - x) (+ --direction-loss-weight x LightningDiT's velocity-direction term);
     (the forward of 1-2 after the encoders is one module, `loss/latent_diffusion.py`, which --compile
     compiles whole; its random numbers are drawn outside it, in the eager order);
  3. clip, AdamW step, LR schedule, EMA (parameters and float buffers).
Everything else (experiment folder, checkpoints with full state, exact resume, stop signals, NaN
guard, summary) is the shared plumbing of `utils/`, as in `train_repae.py`.

  accelerate launch train_ldm_only.py --latents-dir LATENTS --model SiT-XL/2 --enc-type dinov2-vit-b --data-dir IMAGES
  accelerate launch train_ldm_only.py --data-dir data --vae-latents-name NAME --vae f16d32 --vae-ckpt P.pt \
      --model SiT-XL/1      (REPA-E's names: latents in data/NAME, normalisation from P-latents-stats.pt)
  accelerate launch train_ldm_only.py --latents-dir LATENTS --model LightningDiT-XL/1 --enc-type none \
      --weighting logit-normal --direction-loss-weight 1 --learning-rate 2e-4 --adam-beta2 0.95
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from tqdm.auto import tqdm

import utils
from utils import fsdp
from datasources import LatentShardDataset, ResumableDistributedSampler, build_image_dataset, collate_latents
from datasources.latents import tokenizer_differences
from models.diffusion import (DIFFUSION_MODELS, LatentNormalizer, VelocityModel, build_diffusion_model,
                              default_time_convention, model_family, sit_bn_from_stats)
from loss.latent_diffusion import LatentDiffusionLoss
from evaluation.training import add_training_eval_flags, evaluate_generation, training_sample_grid
from models.loading import LatentDecoder
from transport import Transport, shift_from_dims


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train_ldm_only.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=str, default=None, help="YAML file of flag values (flags given explicitly win)")
    utils.add_common_training_flags(p)
    p.set_defaults(report_to="wandb")  # REPA-E's default tracker
    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, default="SiT-XL/2", choices=list(DIFFUSION_MODELS), help="diffusion transformer (SiT, LightningDiT or DiT^DH; N / T sizes are tiny CPU sizes)")
    g.add_argument("--num-classes", type=int, default=1000, help="number of class labels (1 = unconditional; the null label for guidance is this id)")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False, help="normalise queries and keys (LayerNorm for SiT, RMSNorm for LightningDiT / DiT^DH)")
    utils.add_sit_projector_flags(g)
    g.add_argument("--bn-momentum", type=float, default=None, help="refused: the SiT's BatchNorm holds the latent folder's statistics and never updates here (it learns them only in train_repae.py)")
    g.add_argument("--use-gembed", action="store_true", help="LightningDiT with RAE's Gaussian-Fourier time embedding")
    g.add_argument("--time-convention", type=str, default="auto", choices=["auto", "noise-at-1", "data-at-1"],
                   help="how the network reads t: data-at-1 is hustvl LightningDiT's (auto: data-at-1 for LightningDiT without --use-gembed)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute transformer blocks in backward (memory)")
    fsdp.add_fsdp_flag(g)
    g = p.add_argument_group("data")
    g.add_argument("--latents-dir", type=str, required=False, default=None, help="folder written by cache_latents.py (or give --vae-latents-name)")
    g.add_argument("--vae-latents-name", type=str, default=None,
                   help="REPA-E's name of the cached latents: reads <data-dir>/<name>, where `cache_latents.py --vae-latents-name` writes them")
    g.add_argument("--data-dir", type=str, default=None, help="the images the latents were cached from (needed for the REPA loss); with --vae-latents-name also the folder holding the latents (default data)")
    g.add_argument("--no-flip", action="store_true", help="never use the cached horizontally flipped latents")
    g.add_argument("--latent-norm", type=str, default="auto", choices=["auto", "channel", "position"],
                   help="latent statistics used for normalisation (auto: the tokenizer's own mode)")
    g.add_argument("--latent-stats-from", type=str, default="auto", choices=["auto", "vae", "cache"],
                   help="latent normalisation source: vae = <vae-ckpt>-latents-stats.pt (REPA-E: the E2E-VAE's trained "
                        "statistics), cache = the latent folder's exact statistics; auto = vae for the SiT when that file exists")
    g = p.add_argument_group("tokenizer (decodes the sample grids)")
    g.add_argument("--tokenizer", type=str, default=None, choices=["kl", "vavae", "vq", "rae"], help="tokenizer kind (default: the one recorded in the latent folder)")
    g.add_argument("--vae", type=str, default=None, help="tokenizer preset name (default: the one recorded in the latent folder)")
    g.add_argument("--vae-ckpt", type=str, default=None, help="tokenizer weights")
    g.add_argument("--rae-config", type=str, default=None, help="RAE config file (tokenizer rae)")
    g.add_argument("--random-init-vae", "--random-init", dest="random_init_vae", action="store_true",
                   help="tokenizer with seeded random weights (tests; must match the latent folder; --random-init: cache_latents.py's name)")
    g.add_argument("--no-sample-grids", action="store_true", help="do not build the tokenizer; no sample grids")
    g = p.add_argument_group("loss")
    utils.add_flow_loss_flags(g, path_type_help="interpolant (SiT; the other families use linear)",
                              weighting_choices=("uniform", "lognormal", "logit-normal"),
                              weighting_help="training time distribution (SiT: uniform | lognormal; LightningDiT / DiT^DH: uniform | logit-normal)")
    g.add_argument("--time-shift", type=str, default="1", help="t' = s t / (1 + (s - 1) t) on training times: a number or 'auto' (RAE: sqrt(C*h*w / 4096))")
    g.add_argument("--direction-loss-weight", type=float, default=0.0, help="LightningDiT velocity-direction (cosine) loss weight")
    utils.add_repa_loss_flags(g, None, enc_type_help="REPA encoders (comma list) or 'none' (default: dinov2-vit-b for the SiT, as REPA-E; none for the other families)",
                              proj_coeff_help="weight of the REPA loss")
    g.add_argument("--resolution", type=int, default=None, help="image size for the REPA encoders (default: the latent folder's)")
    g = p.add_argument_group("learning rate and EMA")
    utils.add_lr_ema_flags(g, lr_help="AdamW learning rate", ema_help="EMA decay")
    g.add_argument("--lr-schedule", type=str, default="constant", choices=["constant", "linear", "cosine"], help="LR schedule after warm-up")
    g.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warm-up steps")
    g.add_argument("--lr-decay-start", type=int, default=0, help="linear schedule: step where the decay starts")
    g.add_argument("--final-lr", type=float, default=0.0, help="LR at the end of the schedule (linear / cosine schedules)")
    g.add_argument("--lr-total-steps", type=int, default=None,
                   help="step where the linear / cosine decay reaches --final-lr (default: --max-train-steps)")
    g = utils.add_sample_grid_flags(p)
    g.add_argument("--sample-shift", type=str, default="1", help="time shift of the sampling grid (number or 'auto')")
    add_training_eval_flags(p)
    args = fsdp.finish_args_with_fsdp(utils.parse_args_with_config(p, argv), "ldm", mixed_precision_default="fp16")
    if args.enc_type is None:
        args.enc_type = "dinov2-vit-b" if model_family(args.model) == "sit" else "none"
    if not args.latents_dir and args.vae_latents_name:
        args.latents_dir = str(Path(args.data_dir or "data") / args.vae_latents_name)
    if not args.latents_dir:
        p.error("--latents-dir (or --vae-latents-name) is required: a folder written by cache_latents.py")
    if args.eval_every > 0 and not args.eval_reference:
        p.error("--eval-every needs --eval-reference (a reference .npz)")
    refuse_ignored_flags(p, args)
    fsdp.check_fsdp_args(args)
    return args


def refuse_ignored_flags(p, args) -> None:
    """Flags that would be accepted and silently do nothing for this model are refused."""
    family = model_family(args.model)
    if args.bn_momentum is not None:
        p.error("--bn-momentum has no effect in train_ldm_only.py: the SiT's input BatchNorm holds the latent "
                "folder's statistics and never updates (it learns them only end-to-end, in train_repae.py); "
                "drop the flag")
    if family != "sit" and args.path_type != "linear":
        p.error(f"--path-type {args.path_type} is the SiT's option; {args.model} trains on the linear path only")
    if family == "sit" and args.direction_loss_weight:
        p.error(f"--direction-loss-weight is LightningDiT / DiT^DH's velocity-direction loss; the SiT ({args.model}) "
                f"trains with the denoising + REPA losses only")


def resolve_shift(value: str, latent_shape) -> float:
    if str(value).lower() == "auto":
        c, h, w = latent_shape
        return shift_from_dims(c * h * w)
    return float(value)


def build_model(args, latent_shape, num_encoder_dims):
    """The raw network and its options (stored in checkpoints so generate.py rebuilds it)."""
    family = model_family(args.model)
    options = {}
    if family == "sit":
        options = dict(z_dims=num_encoder_dims, encoder_depth=args.encoder_depth, projector_dim=args.projector_dim,
                       qk_norm=args.qk_norm, path_type=args.path_type, grad_checkpointing=args.grad_checkpointing,
                       fused_attn=args.fused_attn, freeze_bn=True)
    else:
        if num_encoder_dims:
            raise SystemExit(f"--enc-type {args.enc_type}: the REPA loss needs a SiT; {args.model} trains with --enc-type none")
        options = dict(use_qknorm=args.qk_norm, use_checkpoint=args.grad_checkpointing)
        if family == "lightningdit":
            options["use_gembed"] = args.use_gembed
    net = build_diffusion_model(args.model, latent_shape, args.num_classes, args.cfg_prob, **options)
    if args.time_convention == "auto":
        data_at_one = default_time_convention(args.model, options)
    else:
        data_at_one = args.time_convention == "data-at-1"
    return net, options, data_at_one


def latent_statistics(args, cache_stats: dict, family: str, norm_mode: str, latent_shape) -> tuple:
    """(statistics dict, source file) of the latent normalisation.

    REPA-E's train_ldm_only initialises the SiT's BatchNorm from `<vae-ckpt>-latents-stats.pt`
    (for an E2E-VAE: the statistics its REPA-E run learned); the latent folder's exact statistics
    are the alternative. A stats file holds scale = (var + bn_eps)^-1/2 (bn_eps = 0 in released
    files), so var = 1 / scale^2 - bn_eps gives back the BatchNorm's running variance."""
    from models.vae_loading import default_stats_path, load_latents_stats

    cache_source = f"{args.latents_dir}/latents_stats.pt"
    vae_file = default_stats_path(args.vae_ckpt) if args.vae_ckpt else None
    use_vae = args.latent_stats_from == "vae" or (
        args.latent_stats_from == "auto" and family == "sit" and vae_file is not None and vae_file.is_file())
    if not use_vae:
        return cache_stats, cache_source
    if vae_file is None:
        raise SystemExit("--latent-stats-from vae needs --vae-ckpt (its <name>-latents-stats.pt is read)")
    if norm_mode != "channel":
        raise SystemExit(f"--latent-stats-from vae: {vae_file} holds per-channel statistics, but --latent-norm is {norm_mode}")
    vae_stats = load_latents_stats(vae_file, channels=int(latent_shape[0]))
    scale, bias = vae_stats["latents_scale"].reshape(-1), vae_stats["latents_bias"].reshape(-1)
    eps = float(vae_stats.get("bn_eps", torch.tensor(0.0)))
    return {"channel_mean": bias, "channel_var": 1.0 / scale.pow(2) - eps}, str(vae_file)


def check_resume_latents(ckpt: dict, info: dict, latents_dir, source) -> None:
    """A checkpoint continues only on latents of the tokenizer it was trained on (the folder's
    recorded kind, name, weight fingerprint and latent shape), as a fresh start checks the
    tokenizer that decodes its grids against the folder."""
    diffs = tokenizer_differences(ckpt.get("tokenizer") or {}, info, "checkpoint", "folder")
    if diffs:
        raise SystemExit(f"--resume {source}: the run was trained on latents of another tokenizer than --latents-dir "
                         f"{latents_dir} holds ({'; '.join(diffs)}); resume on the latent folder it was trained on, "
                         f"or start a new experiment")


def build_tokenizer_for_grids(args, dataset, logger):
    """The tokenizer that decodes sample grids; it must be the one that wrote the latents."""
    if args.no_sample_grids or (args.sampling_steps <= 0 and args.eval_every <= 0):
        return None
    from models.tokenizers import build_tokenizer

    info = dataset.tokenizer_info
    if args.vae_ckpt is None and args.rae_config is None and not args.random_init_vae:
        if args.eval_every > 0:
            raise SystemExit("--eval-every decodes samples: pass the tokenizer (--vae-ckpt / --rae-config)")
        logger.info("no --vae-ckpt / --rae-config / --random-init-vae: sample grids are off")
        return None
    tok = build_tokenizer(args.tokenizer or info["kind"], name=args.vae or info.get("name"), ckpt=args.vae_ckpt,
                          config=args.rae_config, random_init=args.random_init_vae, seed=args.seed)
    dataset.check_tokenizer(tok.identity(int(info.get("resolution", 256))))
    return tok.eval().requires_grad_(False)


def main(args):
    if args.eval_every > 0 and not Path(args.eval_reference).exists():
        # named now, not at the first evaluation hours into the run (config files carry such paths)
        raise SystemExit(f"--eval-reference {args.eval_reference}: no such file (or pass --eval-every 0)")
    run = utils.start_run(args, "train_ldm_only")
    accelerator, logger, device, world = run.accelerator, run.logger, run.device, run.world
    exp_dir, local_bs = run.exp_dir, run.local_batch_size
    family = model_family(args.model)

    # ---------------- data
    use_repa = args.enc_type.lower() != "none"
    image_dataset = None
    if use_repa:
        if not args.data_dir:
            raise SystemExit("--enc-type needs --data-dir (the images the latents were cached from)")
    dataset = LatentShardDataset(args.latents_dir, flip=not args.no_flip, seed=args.seed, keep_dtype=True)
    info, latent_shape = dataset.tokenizer_info, tuple(dataset.latent_shape)
    # grid rows are captioned with the data's class folder names (cache_latents records them)
    class_names = {int(v): str(k) for k, v in (info.get("class_to_idx") or {}).items()} if args.num_classes > 1 else None
    resolution = args.resolution or int(info.get("resolution", 256))
    if use_repa:
        image_dataset = build_image_dataset(args.data_dir, resolution)
        if len(image_dataset) != len(dataset):
            raise SystemExit(f"--data-dir {args.data_dir} holds {len(image_dataset)} images but --latents-dir "
                             f"{args.latents_dir} was cached from {len(dataset)}")
        dataset = LatentShardDataset(args.latents_dir, flip=not args.no_flip, seed=args.seed, image_dataset=image_dataset,
                                     keep_dtype=True)
    if dataset.num_classes > args.num_classes:
        raise SystemExit(f"{args.latents_dir} has {dataset.num_classes} classes but --num-classes is {args.num_classes}")
    norm_mode = info.get("stats_mode", "channel") if args.latent_norm == "auto" else args.latent_norm
    if family == "sit" and norm_mode != "channel":
        raise SystemExit(f"--latent-norm {norm_mode}: the SiT normalises per channel (its input BatchNorm)")
    stats, stats_source = latent_statistics(args, dataset.stats, family, norm_mode, latent_shape)
    sampler = ResumableDistributedSampler(len(dataset), local_bs, run.rank, world, seed=args.seed)
    loader = utils.training_loader(dataset, local_bs, sampler, args, collate_fn=collate_latents)
    logger.info(f"latents {args.latents_dir}: {len(dataset)} x {latent_shape} from tokenizer {info.get('kind')}/"
                f"{info.get('name')}, {dataset.num_classes} classes; batch {args.batch_size} = {world} x "
                f"{args.gradient_accumulation_steps} x {local_bs}")

    # ---------------- models
    encoders = []
    if use_repa:
        from models.encoders import load_encoders

        encoders = load_encoders(args.enc_type, "cpu", resolution, random_init=args.random_init_encoders,
                                 weights_dir=args.encoder_weights_dir)
    net, model_options, data_at_one = build_model(args, latent_shape, [e.embed_dim for e in encoders])
    if family == "sit":
        sit_bn_from_stats(net, stats, stats_source)
        tokens = net.x_embedder.num_patches
        for e in encoders:
            if e.num_tokens(resolution) != tokens:
                raise SystemExit(f"encoder {e.name} gives {e.num_tokens(resolution)} tokens at {resolution}px but "
                                 f"{args.model} on {latent_shape} latents has {tokens}; change the patch size")
        normalizer = LatentNormalizer.from_stats(stats, "channel", latent_shape, net.bn.eps, stats_source)
    else:
        normalizer = LatentNormalizer.from_stats(stats, norm_mode, latent_shape, 0.0 if norm_mode == "channel" else 1e-5,
                                                 stats_source)
    normalizer = normalizer.to(device)
    train_shift = resolve_shift(args.time_shift, latent_shape)
    sample_shift = resolve_shift(args.sample_shift, latent_shape)
    time_dist = "logit-normal_0_1" if args.weighting == "logit-normal" else "uniform"
    if family != "sit" and args.weighting == "lognormal":
        raise SystemExit(f"--weighting lognormal is the SiT's; {args.model} takes uniform or logit-normal")
    if family == "sit" and (args.weighting == "logit-normal" or train_shift != 1.0):
        raise SystemExit("the SiT samples time with --weighting uniform | lognormal and no --time-shift")
    transport = Transport(time_dist_type=time_dist, time_dist_shift=train_shift)
    ema = copy.deepcopy(net).eval()
    utils.requires_grad(ema, False)
    tokenizer = build_tokenizer_for_grids(args, dataset, logger)
    logger.info(f"{args.model}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params; time "
                f"{'data' if data_at_one else 'noise'} at t = 1; train shift {train_shift:.3f}; "
                f"latent normalisation per {norm_mode} from {stats_source}; encoders {[e.name for e in encoders]}")

    step, epoch, batch_pos = 0, 0, 0
    ckpt = utils.load_resume_checkpoint(run)
    if ckpt is not None:
        src = run.resume_path
        utils.load_state_dict_strict(net, ckpt["model"], f"{src}['model']")
        utils.load_state_dict_strict(ema, ckpt["ema"], f"{src}['ema']")
        check_resume_latents(ckpt, info, args.latents_dir, src)
    ema_template = None  # --fsdp: the EMA's architecture on the meta device (for its gathered copies)
    if args.fsdp:  # shards net and EMA in place; the optimizer is then built over the shards
        ema_template = fsdp.shard_for_training(net, ema, accelerator, args.mixed_precision, fresh=ckpt is None)
    opt = utils.adamw([p for p in net.parameters() if p.requires_grad], args.learning_rate, args)
    steps_per_epoch = max(sampler.batches_per_epoch // args.gradient_accumulation_steps, 1)
    utils.apply_config_epochs(args, steps_per_epoch, logger)
    sched = utils.lr_scheduler(opt, schedule=args.lr_schedule, warmup_steps=args.lr_warmup_steps,
                               decay_start=args.lr_decay_start, total_steps=args.lr_total_steps or args.max_train_steps,
                               final_ratio=args.final_lr / args.learning_rate if args.learning_rate else 0.0)

    # ---------------- resume (the weights were loaded above)
    if ckpt is not None:
        if args.fsdp:
            fsdp.load_full_optimizer_state(opt, ckpt["opt"])
        else:
            opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        step, epoch, batch_pos = utils.resume_position(run, ckpt)
    # the step's whole forward (posterior sample, normalisation, noising, network, losses) is one
    # module; --compile compiles it once (backward by AOTAutograd), the optimizer step stays eager
    step_loss = LatentDiffusionLoss(net, family, normalizer, transport, data_at_one, weighting=args.weighting,
                                    path_type=args.path_type, prediction=args.prediction, proj_coeff=args.proj_coeff,
                                    direction_weight=args.direction_loss_weight)
    if args.fsdp:
        model = net  # already sharded: accelerator.prepare would wrap it in DDP
        step_fn = step_loss
        opt = accelerator.prepare(opt)  # skips the optimizer step on accumulation micro-steps
    else:
        # DDP (several processes) wraps the loss module: its parameters are the network's
        model, opt = accelerator.prepare(torch.compile(step_loss) if args.compile else step_loss, opt)
        step_fn = model
        ema = ema.to(device)
    net_m = utils.unwrap(net)
    if ckpt is None and not args.fsdp:
        # Every rank built its network from its own seed and DDP broadcast rank 0's: the EMA starts
        # from those synchronised weights (the originals' update_ema(ema, model, decay=0)).
        ema.load_state_dict(net_m.state_dict())
    for e in encoders:
        e.to(device)
    if tokenizer is not None:
        tokenizer.to(device)
    if ckpt is not None:
        utils.restore_scaler(run, ckpt)
        utils.restore_rng(run, ckpt)
        del ckpt

    model_record = {"name": args.model, "family": family, "options": model_options, "data_at_one": data_at_one,
                    "latent_shape": list(latent_shape), "num_classes": args.num_classes,
                    "class_dropout_prob": args.cfg_prob, "latent_norm": norm_mode, "sample_shift": sample_shift}

    def save_checkpoint():
        # collective under --fsdp: the shards are gathered into full CPU tensors on the main process
        model_sd, ema_sd, opt_sd = (fsdp.full_state_dict(x, run.is_main) for x in (net_m, ema, opt.optimizer))
        utils.save_training_checkpoint(run, step, {"epoch": epoch, "batch": batch_pos}, lambda: {
            "model": model_sd, "ema": ema_sd, "opt": opt_sd,
            "sched": sched.state_dict(), "model_config": model_record, "tokenizer": info,
            "latent_stats": {"mean": normalizer.mean.cpu(), "std": normalizer.std.cpu(), "mode": norm_mode}},
            keep=args.keep_checkpoints)

    # Grids and evaluation share generate.py's index-keyed sampling: the same noise and labels at
    # every step, whatever the world size.
    decoder = None if tokenizer is None else LatentDecoder(tokenizer, normalizer.mean, normalizer.std).to(device)

    def ema_field():
        """The EMA network for sampling (collective under --fsdp: a gathered, unsharded copy)."""
        return VelocityModel(fsdp.full_copy(ema, ema_template) if args.fsdp else ema, data_at_one)

    def sample_grid(field):
        return training_sample_grid(field, decoder, latent_shape, args.num_classes, args.num_sample_images,
                                    args.seed, args.sample_num_steps, args.sample_cfg_scale, device, sample_shift,
                                    class_names=class_names)

    def evaluate(at_step: int) -> dict:
        return evaluate_generation(ema_field(), decoder, latent_shape, args.num_classes, args, device, at_step,
                                   accelerator, logger, shift=sample_shift)

    evaluations = {}
    model.train()
    progress = tqdm(total=min(args.max_train_steps, args.epochs * steps_per_epoch), initial=step,
                    disable=not accelerator.is_main_process,
                    desc="train_ldm_only", dynamic_ncols=True)
    data_iter = utils.infinite_epochs(loader, sampler, epoch, batch_pos)
    stop = utils.StopRequest().install()
    monitor = utils.StepMonitor(run, stop)
    speed = utils.Throughput(step, args.max_train_steps)
    start_step = step
    try:
        while step < args.max_train_steps and epoch < args.epochs:
            epoch, batch_pos, batch = next(data_iter)
            batch_pos += 1  # position of the NEXT micro-batch, what a checkpoint must record
            # stored dtype (e.g. float16) over the wire, float32 inside the step
            mean = batch["mean"].to(device, non_blocking=True)
            std = batch["std"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            draws = step_loss.draw(mean, labels)  # all the step's random numbers, outside a compiled graph
            with torch.no_grad(), accelerator.autocast():
                zs = [enc(batch["image"].to(device, non_blocking=True)).float() for enc in encoders]
            with accelerator.accumulate(model):
                # --fsdp: no reduce-scatter on accumulation micro-steps (no-op for DDP, which accumulate() handles)
                fsdp.set_gradient_sync(net, accelerator.sync_gradients)
                with accelerator.autocast():
                    losses = step_fn(mean, std, labels, zs, draws)
                loss = losses["loss"]
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    sched.step()
            speed.update(mean.shape[0] * world, step + accelerator.sync_gradients)
            if not accelerator.sync_gradients:
                continue
            utils.update_ema(ema, net_m, args.ema_decay)
            step += 1
            if step == start_step + 1:
                logger.info(fsdp.state_bytes_line(net_m, ema, opt, args.fsdp))
            if args.check_ranks_every > 0 and step % args.check_ranks_every == 0:
                utils.check_ranks_identical(accelerator, utils.training_state_tensors(model=net_m, ema=ema, opt=opt), step)

            logged = step % args.log_every == 0 or step == args.max_train_steps
            vals, stop_requested = monitor(losses, step, record=logged)
            if logged:
                vals["lr"] = sched.get_last_lr()[0]
                vals["images_per_sec"] = speed.rate()
                accelerator.log(vals, step=step)
                progress.set_postfix({k: f"{v:.4f}" for k, v in vals.items() if k not in ("images_per_sec", "lr")})
                logger.info(f"step {step:07d} " + " ".join(f"{k}={v:.4g}" for k, v in vals.items()))
            progress.update(1)
            if utils.should_run(step, args.eval_every, args.max_train_steps):
                evaluations[step] = evaluate(step)
            if tokenizer is not None and utils.should_run(step, args.sampling_steps, args.max_train_steps, first=True):
                field = ema_field()
                if accelerator.is_main_process:
                    images = sample_grid(field)
                    utils.save_image_grid(images, exp_dir / "samples" / f"{step:07d}.png")
                    utils.log_images(accelerator, images, step)
                del field
                accelerator.wait_for_everyone()
            if utils.checkpoint_or_stop(run, step, stop_requested, save_checkpoint):
                break
    finally:
        stop.restore()
        progress.close()

    return utils.finish_run(run, dict(start_step=start_step, evaluations=evaluations), step, monitor, speed)


if __name__ == "__main__":
    main(parse_args())
