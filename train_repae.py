"""REPA-E end-to-end training: SiT + KL-VAE + PatchGAN discriminator, three AdamW optimizers.

One optimisation step, in the original order (see specs/repae.md):
  1. representation features zs of the uint8 images (frozen encoders, no grad);
  2. VAE forward on x / 127.5 - 1 -> posterior, z, reconstruction;
  3. VAE update: reconstruction loss (generator mode) + vae_align_proj_coeff * REPA loss of the
     SiT run in eval mode with frozen weights on the non-detached z (align_only); the time samples
     and noise of that pass are kept for step 5;
  4. discriminator update on the same (image, reconstruction);
  5. SiT update on z.detach(): denoising loss + proj_coeff * REPA loss;
  6. EMA of the SiT over parameters and float buffers.
Multi-process runs keep every trained tensor identical on every rank: the SiT's input BatchNorm
normalises with the statistics of the global batch (the original's SyncBatchNorm), `pos_embed`
trains with its gradient averaged like every other parameter, the EMA starts from the weights
DDP synchronised, and the discriminator's buffers (BatchNorm statistics, LeCam EMAs) follow the
main process's, as DDP makes them before each discriminator forward. `--check-ranks-every N`
verifies it (bit for bit) every N steps.
Gradient accumulation accumulates all three networks over the window and synchronises/steps only
at its end. Checkpoints hold everything needed to continue bit-for-bit (RNG of every rank, data
position) and are written atomically.

  accelerate launch train_repae.py --config configs/repae/sit_xl_f8d4.yaml --data-dir DATA --exp-name NAME
"""
from __future__ import annotations

import argparse
import copy

import torch
from tqdm.auto import tqdm

import utils
from datasources import ResumableDistributedSampler, build_image_dataset
from loss.perceptual import add_lpips_memory_flags, set_memory_options
from loss.reconstruction import ReconstructionLoss
from models.autoencoder import VAE_PRESETS
from models.vae_loading import load_vae
from models.discriminators import discriminator_state_dict_from_checkpoint
from models.sit import SiT_models, build_sit
from evaluation.training import add_training_eval_flags, evaluate_generation, training_sample_grid
from models.loading import LatentDecoder
from models.diffusion import VelocityModel


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train_repae.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=str, default=None, help="YAML file of flag values (flags given explicitly win)")
    utils.add_common_training_flags(p)
    p.set_defaults(report_to="wandb")  # REPA-E's default tracker
    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, default="SiT-XL/2", choices=list(SiT_models), help="SiT size and patch (T and N are tiny sizes for CPU)")
    g.add_argument("--num-classes", type=int, default=1000, help="number of class labels (the null label for guidance is this id)")
    utils.add_sit_projector_flags(g)
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False, help="per-head LayerNorm on queries and keys")
    g.add_argument("--bn-momentum", type=float, default=0.1, help="momentum of the SiT's latent-normalising BatchNorm")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute SiT blocks in backward (memory)")
    g.add_argument("--vae-grad-checkpointing", action="store_true",
                   help="recompute the VAE encoder and decoder blocks in backward (most of the step's saved activations)")
    g = p.add_argument_group("tokenizer and discriminator")
    g.add_argument("--vae", type=str, default="f8d4", choices=sorted(VAE_PRESETS), help="VAE architecture preset")
    g.add_argument("--vae-ckpt", type=str, default=None, help="VAE state_dict (.pt/.safetensors)")
    g.add_argument("--vae-stats", type=str, default=None,
                   help="latent statistics file (default: <vae-ckpt without .pt>-latents-stats.pt)")
    g.add_argument("--random-init-vae", "--random-init", dest="random_init_vae", action="store_true",
                   help="start from a randomly initialised VAE (--random-init: cache_latents.py's name)")
    g.add_argument("--disc-pretrained-ckpt", type=str, default=None, help="discriminator weights to start from (e.g. <name>-discriminator-ckpt.pt)")
    g.add_argument("--loss-cfg-path", type=str, default="configs/l1_lpips_kl_gan.yaml", help="VAE loss config (REPA-E keys)")
    g.add_argument("--lpips-weights", type=str, default=None, help="local VGG16 weights for LPIPS (offline)")
    add_lpips_memory_flags(g)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=str, default="data", help="image folder with one subfolder per class, or a REPA-E images.h5 archive")
    g.add_argument("--resolution", type=int, default=256, help="training image size (ADM center crop)")
    g.add_argument("--skip-bad-images", action="store_true", help="skip and count unreadable images instead of stopping at the first")
    g = p.add_argument_group("learning rates and EMA")
    utils.add_lr_ema_flags(g, lr_help="SiT AdamW learning rate",
                           ema_help="EMA decay of the SiT (parameters and BatchNorm statistics)")
    g.add_argument("--vae-learning-rate", type=float, default=1e-4, help="VAE AdamW learning rate")
    g.add_argument("--disc-learning-rate", type=float, default=1e-4, help="discriminator AdamW learning rate")
    g = p.add_argument_group("loss")
    utils.add_flow_loss_flags(g)
    utils.add_repa_loss_flags(g, "dinov2-vit-b", enc_type_help="comma list of encoders, or 'none'",
                              proj_coeff_help="weight of the REPA loss in the SiT update")
    g.add_argument("--vae-align-proj-coeff", type=float, default=1.5, help="weight of the REPA loss in the VAE update")
    utils.add_sample_grid_flags(p)
    add_training_eval_flags(p)
    args = utils.finish_args(utils.parse_args_with_config(p, argv), "repae", mixed_precision_default="fp16")
    if args.eval_every > 0 and not args.eval_reference:
        p.error("--eval-every needs --eval-reference (a reference .npz)")
    return args


# ------------------------------------------------------------------------------------------------
# Construction
# ------------------------------------------------------------------------------------------------
def build_vae(args, logger):
    if args.vae_ckpt is None and not args.random_init_vae:
        raise SystemExit("--vae-ckpt is required (or pass --random-init-vae to start from random weights)")
    vae, stats = load_vae(args.vae, ckpt_path=args.vae_ckpt, stats_path=args.vae_stats)
    logger.info(f"VAE {args.vae}: {'random init' if args.vae_ckpt is None else args.vae_ckpt}"
                f"{'' if stats is None else ', with latent statistics'}")
    return vae, stats


def build_loss(args) -> ReconstructionLoss:
    """The VAE loss from --loss-cfg-path (REPA-E keys); --lpips-weights points LPIPS at local VGG weights,
    --lpips-lean-head / --lpips-lean-trunk / --lpips-grad-checkpointing set its backward memory."""
    cfg = utils.load_yaml(args.loss_cfg_path)
    if args.lpips_weights:
        losses = cfg["losses"] if "losses" in cfg else cfg
        losses["perceptual_vgg_weights"] = args.lpips_weights
    loss_fn = ReconstructionLoss(cfg, source=args.loss_cfg_path)
    set_memory_options(loss_fn, lean_head=args.lpips_lean_head, grad_checkpointing=args.lpips_grad_checkpointing,
                       lean_trunk=args.lpips_lean_trunk)
    return loss_fn


@torch.no_grad()
def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1], averaged over samples."""
    mse = ((x.float().clamp(-1, 1) - y.float().clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def main(args):
    run = utils.start_run(args, "train_repae")
    accelerator, logger, device, world, rank = run.accelerator, run.logger, run.device, run.world, run.rank
    exp_dir, local_bs = run.exp_dir, run.local_batch_size

    # ---------------- models
    vae, stats = build_vae(args, logger)
    if args.vae_grad_checkpointing:
        vae.set_grad_checkpointing(True)
    encoders = []
    if args.enc_type.lower() != "none":
        from models.encoders import load_encoders

        encoders = load_encoders(args.enc_type, device=device, resolution=args.resolution,
                                 random_init=args.random_init_encoders, weights_dir=args.encoder_weights_dir)
    z_dims = [e.embed_dim for e in encoders]
    latent_size = args.resolution // vae.downsample_factor
    sit = build_sit(args.model, input_size=latent_size, in_channels=vae.latent_channels,
                    num_classes=args.num_classes, class_dropout_prob=args.cfg_prob, z_dims=z_dims,
                    projector_dim=args.projector_dim, encoder_depth=args.encoder_depth, bn_momentum=args.bn_momentum,
                    fused_attn=args.fused_attn, qk_norm=args.qk_norm, path_type=args.path_type,
                    grad_checkpointing=args.grad_checkpointing)
    num_tokens = sit.x_embedder.num_patches
    for e in encoders:
        if e.num_tokens(args.resolution) != num_tokens:
            raise SystemExit(f"encoder {e.name} gives {e.num_tokens(args.resolution)} tokens at {args.resolution}px "
                             f"but {args.model} on {latent_size}x{latent_size} latents has {num_tokens}; "
                             f"change --model patch size, --vae or --resolution")
    if stats is not None:
        sit.init_bn(stats["latents_bias"], stats["latents_scale"], float(stats.get("bn_eps", 0.0)))
    else:
        logger.warning("no latent statistics file for the VAE (--vae-stats, or <vae-ckpt>-latents-stats.pt): the "
                       f"SiT's BatchNorm starts at mean 0, variance 1 and learns the statistics (momentum "
                       f"{args.bn_momentum})")
    # The original's SyncBatchNorm: the latent statistics are those of the global batch.
    sit.set_bn_sync(world > 1)
    # pos_embed trains in REPA-E (the original's requires_grad(model, True) before each SiT update
    # turns it on): make it trainable before DDP is built, so DDP averages its gradient too.
    sit.pos_embed.requires_grad_(True)
    loss_fn = build_loss(args)
    if args.disc_pretrained_ckpt:
        sd = discriminator_state_dict_from_checkpoint(utils.load_checkpoint_file(args.disc_pretrained_ckpt),
                                                      args.disc_pretrained_ckpt)
        utils.load_state_dict_strict(loss_fn.discriminator, sd, args.disc_pretrained_ckpt)
        logger.info(f"discriminator from {args.disc_pretrained_ckpt}")
    ema = copy.deepcopy(sit).eval()
    utils.requires_grad(ema, False)
    logger.info(f"SiT {args.model}: {sum(p.numel() for p in sit.parameters()) / 1e6:.2f}M params, latents "
                f"{vae.latent_channels}x{latent_size}x{latent_size}; VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M;"
                f" encoders {[e.name for e in encoders]}")

    disc_params = list(loss_fn.discriminator.parameters())
    opt = utils.adamw(sit.parameters(), args.learning_rate, args)
    opt_vae = utils.adamw(vae.parameters(), args.vae_learning_rate, args)
    opt_disc = utils.adamw(disc_params, args.disc_learning_rate, args)

    # ---------------- data
    dataset = build_image_dataset(args.data_dir, args.resolution, skip_bad_images=args.skip_bad_images)
    if getattr(dataset, "num_bad", 0):
        logger.info(f"skipped {dataset.num_bad} unreadable images, e.g. {dataset.bad_files[:3]}")
    if dataset.num_classes > args.num_classes:
        raise SystemExit(f"{args.data_dir} has {dataset.num_classes} classes but --num-classes is {args.num_classes}")
    sampler = ResumableDistributedSampler(len(dataset), local_bs, rank, world, seed=args.seed)
    loader = utils.training_loader(dataset, local_bs, sampler, args)
    logger.info(f"dataset {args.data_dir}: {len(dataset)} images, {dataset.num_classes} classes; "
                f"batch {args.batch_size} = {world} x {args.gradient_accumulation_steps} x {local_bs}")

    # ---------------- resume
    step, epoch, batch_pos = 0, 0, 0
    ckpt = utils.load_resume_checkpoint(run)
    if ckpt is not None:
        resume_path = run.resume_path
        utils.load_state_dict_strict(sit, ckpt["model"], f"{resume_path}['model']")
        utils.load_state_dict_strict(ema, ckpt["ema"], f"{resume_path}['ema']")
        utils.load_state_dict_strict(vae, ckpt["vae"], f"{resume_path}['vae']")
        utils.load_state_dict_strict(loss_fn, ckpt["discriminator"], f"{resume_path}['discriminator']")
        opt.load_state_dict(ckpt["opt"])
        opt_vae.load_state_dict(ckpt["opt_vae"])
        opt_disc.load_state_dict(ckpt["opt_disc"])
        step, epoch, batch_pos = utils.resume_position(run, ckpt)
    if args.compile:
        # In place (nn.Module.compile): state_dict keys stay the same and every caller, the
        # alignment pass through the frozen SiT included, runs the compiled network.
        for net in (sit, vae, loss_fn.perceptual_loss, loss_fn.discriminator):
            net.compile()
    if torch.cuda.is_available():  # NHWC convolutions are the tensor cores' native layout
        for net in (vae, loss_fn.perceptual_loss, loss_fn.discriminator):
            net.to(memory_format=torch.channels_last)
    model, vae, loss_fn, opt, opt_vae, opt_disc = accelerator.prepare(sit, vae, loss_fn, opt, opt_vae, opt_disc)
    sit_m, vae_m, loss_m = utils.unwrap(model), utils.unwrap(vae), utils.unwrap(loss_fn)
    ema = ema.to(device)
    if ckpt is None:
        # Every rank built its SiT from its own seed and DDP broadcast rank 0's: the EMA starts from
        # those synchronised weights (the original's update_ema(ema, model, decay=0)).
        ema.load_state_dict(sit_m.state_dict())
    for e in encoders:
        e.to(device)
    if ckpt is not None:
        utils.restore_scaler(run, ckpt)
        utils.restore_rng(run, ckpt)
        del ckpt

    def save_checkpoint():
        utils.save_training_checkpoint(run, step, {"epoch": epoch, "batch": batch_pos}, lambda: {
            "model": sit_m.state_dict(), "ema": ema.state_dict(), "vae": vae_m.state_dict(),
            "discriminator": loss_m.state_dict(), "opt": opt.optimizer.state_dict(),
            "opt_vae": opt_vae.optimizer.state_dict(), "opt_disc": opt_disc.optimizer.state_dict(),
            "latent_stats": ema.latent_stats(include_eps=True)}, keep=args.keep_checkpoints)

    # Fixed evaluation material (independent of the training RNG stream).
    eval_images = torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))]).to(device)
    latent_shape = (vae_m.latent_channels, latent_size, latent_size)

    @torch.no_grad()
    def eval_recon_psnr():
        vae_m.eval()
        x = eval_images.float() / 127.5 - 1
        r = vae_m.decode(vae_m.encode(x).mode())
        vae_m.train()
        return psnr(x, r)

    def ema_decoder() -> LatentDecoder:
        # the latent statistics move with the SiT's BatchNorm: read them from the EMA each time
        stats = ema.latent_stats(include_eps=True)
        return LatentDecoder(vae_m, stats["latents_bias"], 1 / stats["latents_scale"]).to(device)

    # Grids and evaluation share generate.py's index-keyed sampling (same noise and labels at every step).
    @torch.no_grad()
    def sample_grid():
        vae_m.eval()
        images = training_sample_grid(VelocityModel(ema), ema_decoder(), latent_shape, args.num_classes,
                                      args.num_sample_images, args.seed, args.sample_num_steps,
                                      args.sample_cfg_scale, device)
        vae_m.train()
        return images

    @torch.no_grad()
    def evaluate(at_step: int) -> dict:
        vae_m.eval()
        scores = evaluate_generation(VelocityModel(ema), ema_decoder(), latent_shape, args.num_classes, args, device,
                                     at_step, accelerator, logger)
        vae_m.train()
        return scores

    summary = {"start_step": step, "psnr_start": eval_recon_psnr(), "losses": {}, "evaluations": {}}
    logger.info(f"VAE reconstruction PSNR on {len(eval_images)} fixed images at step {step}: {summary['psnr_start']:.2f} dB")

    loss_kwargs = dict(weighting=args.weighting, path_type=args.path_type, prediction=args.prediction)
    model.train()
    vae.train()
    loss_fn.train()
    progress = tqdm(total=args.max_train_steps, initial=step, disable=not accelerator.is_main_process,
                    desc="train_repae", dynamic_ncols=True)
    data_iter = utils.infinite_epochs(loader, sampler, epoch, batch_pos)
    stop = utils.StopRequest().install()
    monitor = utils.StepMonitor(run, stop)
    speed = utils.Throughput(step, args.max_train_steps)
    try:
        while step < args.max_train_steps and epoch < args.epochs:
            epoch, batch_pos, (raw, labels) = next(data_iter)
            batch_pos += 1  # position of the NEXT micro-batch, what a checkpoint must record
            raw, labels = raw.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.no_grad(), accelerator.autocast():
                zs = [enc(raw).float() for enc in encoders]
            with accelerator.accumulate(model, vae, loss_fn):
                x = raw.float() / 127.5 - 1
                with accelerator.autocast():
                    posterior, z, recon = vae(x)

                # -- VAE update: the SiT is a frozen critic in eval mode (its BatchNorm must not move)
                utils.requires_grad(sit_m, False)
                sit_m.eval()
                with accelerator.autocast():
                    vae_loss, vae_logs = loss_m(x, recon, posterior, step, "generator")
                    align = sit_m(z, labels, zs, loss_kwargs=dict(loss_kwargs, align_only=True))
                vae_total = vae_loss + args.vae_align_proj_coeff * align["proj_loss"]
                accelerator.backward(vae_total)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(vae.parameters(), args.max_grad_norm)
                opt_vae.step()
                opt_vae.zero_grad(set_to_none=True)

                # -- discriminator update on the same pair (the generator pass kept D frozen)
                d_loss, d_logs = loss_fn(x, recon.detach(), posterior, step, "discriminator")
                accelerator.backward(d_loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(disc_params, args.max_grad_norm)
                opt_disc.step()
                opt_disc.zero_grad(set_to_none=True)

                # -- SiT update on the detached latent, reusing the alignment pass's t and noise
                utils.requires_grad(sit_m, True)
                sit_m.train()
                with accelerator.autocast():
                    out = model(z.detach(), labels, zs, loss_kwargs=dict(loss_kwargs, align_only=False),
                                time_input=align["time_input"], noises=align["noises"])
                sit_loss = out["denoising_loss"].mean() + args.proj_coeff * out["proj_loss"]
                accelerator.backward(sit_loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)

            speed.update(raw.shape[0] * world, step + accelerator.sync_gradients)
            if not accelerator.sync_gradients:
                continue
            utils.update_ema(ema, sit_m, args.ema_decay)
            utils.broadcast_buffers_from_main(accelerator, loss_m)
            step += 1
            if args.check_ranks_every > 0 and step % args.check_ranks_every == 0:
                utils.check_ranks_identical(accelerator, utils.training_state_tensors(
                    model=sit_m, ema=ema, vae=vae_m, loss=loss_m, opt=opt, opt_vae=opt_vae, opt_disc=opt_disc), step)

            losses = {"vae_loss": vae_loss.detach(), "align_proj_loss": align["proj_loss"].detach(),
                      "disc_loss": d_loss.detach(), "denoising_loss": out["denoising_loss"].mean().detach(),
                      "proj_loss": out["proj_loss"].detach()}
            logged = step % args.log_every == 0 or step == args.max_train_steps
            vals, stop_requested = monitor(losses, step, record=logged)
            if logged:
                vals["images_per_sec"] = speed.rate()
                accelerator.log(vals | {f"vae/{k}": v for k, v in utils.scalars_to_host(vae_logs).items()}, step=step)
                progress.set_postfix({k: f"{v:.4f}" for k, v in vals.items() if k != "images_per_sec"})
                logger.info(f"step {step:07d} " + " ".join(f"{k}={v:.4f}" for k, v in vals.items()))
            progress.update(1)

            if utils.should_run(step, args.sampling_steps, args.max_train_steps, first=True):
                if accelerator.is_main_process:
                    images = sample_grid()
                    utils.save_image_grid(images, exp_dir / "samples" / f"{step:07d}.png")
                    utils.log_images(accelerator, images, step)
                accelerator.wait_for_everyone()
            if utils.should_run(step, args.eval_every, args.max_train_steps):
                summary["evaluations"][step] = evaluate(step)
            if utils.checkpoint_or_stop(run, step, stop_requested, save_checkpoint):
                break
    finally:
        stop.restore()
        progress.close()

    summary["psnr_end"] = eval_recon_psnr()
    return utils.finish_run(run, summary, step, monitor, speed,
                            f": VAE PSNR {summary['psnr_start']:.2f} -> {summary['psnr_end']:.2f} dB")


if __name__ == "__main__":
    main(parse_args())
