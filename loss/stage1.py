"""The objective of each tokenizer family as train_stage1.py trains it (the network side is
`models/stage1.py`):

  kl / vavae  loss.reconstruction.VAVAELoss: L1 + LPIPS + KL + adaptive-weight PatchGAN (+ VF)
  vqgan       loss.reconstruction.VQLPIPSLoss: L1 + LPIPS + adaptive-weight PatchGAN + codebook
  rae         loss.rae.RAELoss: L1 + LPIPS + adaptive-weight DINO GAN through DiffAug

the clock its GAN runs on: global steps (kl / vavae / vqgan, optionally counted as Lightning
does) or epochs (rae), and the two players' optimizers and LR schedules, each on its own clock. It
lives in loss/ beside the losses it configures.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import utils
from models.stage1 import read_mapping
from utils.fsdp import reshard


def build_loss(args, in_channels: int) -> tuple:
    """(the family's loss with its discriminator, the LPIPS network shared with evaluation or None)."""
    from loss.perceptual import LPIPS, set_memory_options
    from loss.rae import RAELoss
    from loss.reconstruction import VAVAELoss, VQLPIPSLoss

    kind = args.tokenizer
    # The discriminator (and any random loss network) from one seed, not the per-rank stream:
    # every rank and every world size starts from the same discriminator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1)
        lpips_net = LPIPS(vgg_weights=args.lpips_weights) if args.perceptual_weight > 0 or "lpips" in args.eval_metrics else None
        perceptual = RepeatChannels(lpips_net) if lpips_net is not None and args.perceptual_weight > 0 else None
        if kind in ("kl", "vavae"):
            loss_fn = VAVAELoss(disc_start=args.disc_start, kl_weight=args.kl_weight, disc_num_layers=args.disc_num_layers,
                                disc_in_channels=in_channels, disc_factor=args.disc_factor, disc_weight=args.disc_weight,
                                perceptual_weight=args.perceptual_weight, use_actnorm=args.use_actnorm,
                                disc_loss=args.disc_loss, vf_weight=args.vf_weight, adaptive_vf=args.adaptive_vf,
                                cos_margin=args.cos_margin, distmat_margin=args.distmat_margin,
                                distmat_weight=args.distmat_weight, cos_weight=args.cos_weight, disc_ndf=args.disc_ndf,
                                perceptual=perceptual)
        elif kind == "vqgan":
            loss_fn = VQLPIPSLoss(disc_start=args.disc_start, codebook_weight=args.codebook_weight,
                                  disc_num_layers=args.disc_num_layers, disc_in_channels=in_channels,
                                  disc_factor=args.disc_factor, disc_weight=args.disc_weight,
                                  perceptual_weight=args.perceptual_weight, use_actnorm=args.use_actnorm,
                                  disc_ndf=args.disc_ndf, disc_loss=args.disc_loss, perceptual=perceptual)
        else:
            from models.discriminators import DINO_DISC_TINY

            disc_cfg = DINO_DISC_TINY if args.disc_config == "tiny" else read_mapping(args.disc_config, "--disc-config")
            loss_fn = RAELoss(discriminator=dict(disc_cfg) if disc_cfg else None, perceptual_weight=args.perceptual_weight,
                              gan_weight=args.gan_weight, disc_start_epoch=args.disc_start_epoch,
                              disc_update_start_epoch=args.disc_update_start_epoch,
                              diffaug_policy=args.diffaug_policy, disc_loss=args.disc_loss,
                              perceptual=perceptual if perceptual is not None else None,
                              vgg_weights=args.lpips_weights, full_precision=args.rae_loss_full_precision)
    set_memory_options(loss_fn, lean_head=args.lpips_lean_head, grad_checkpointing=args.lpips_grad_checkpointing,
                       lean_trunk=args.lpips_lean_trunk)
    return loss_fn, lpips_net


class RepeatChannels(nn.Module):
    """Wrap an RGB distance (LPIPS) so 1-channel images are repeated to 3 channels first."""

    def __init__(self, distance: nn.Module):
        super().__init__()
        self.distance = distance

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.distance(x, y)


def generator_objective(kind: str, loss_fn: nn.Module, x: torch.Tensor, out: dict, g_step: int, epoch: int,
                        last_layer, enc_last_layer, aux_feature, autocast) -> tuple:
    """(loss, logs) of the tokenizer's update: each family's loss called as its original calls it.
    `out` is `models.stage1.TrainForward`'s output; `aux_feature` the frozen foundation model's
    features (vavae) or None; `autocast` the step's autocast context factory. `last_layer` may be a
    function returning it, called after the forward: under --fsdp the weight the graph used is the
    gathered one the sharded root holds then (the full tensor, so the adaptive weight's gradient
    norms are the full ones, from this process's batch, as under DDP)."""
    if callable(last_layer):
        last_layer = last_layer()
    if kind in ("kl", "vavae"):
        return loss_fn(x, out["recon"], out["posterior"], 0, g_step, last_layer=last_layer, z=out.get("z_proj"),
                       aux_feature=aux_feature, enc_last_layer=enc_last_layer)
    if kind == "vqgan":
        return loss_fn(out["qloss"], x, out["recon"], 0, g_step, last_layer=last_layer)
    with autocast():  # RAE: the loss runs under the step's autocast, as the original's (see RAELoss)
        return loss_fn.generator_loss(x, out["recon"], last_layer, epoch)


def discriminator_objective(kind: str, loss_fn: nn.Module, model: nn.Module, x: torch.Tensor, out: dict, d_step: int,
                            autocast) -> tuple:
    """(loss, logs) of the discriminator's update on the step's reconstruction (detached); RAE
    reconstructs afresh in eval mode (noise off), under autocast as the original does."""
    if kind == "rae":
        with torch.no_grad(), autocast():
            model.eval()
            fake = model((x + 1) / 2) * 2 - 1
            model.train()
        reshard(model)  # --fsdp: no backward follows to free the root's gathered weights
        with autocast():
            return loss_fn.discriminator_loss(x, fake)
    if kind == "vqgan":
        return loss_fn(out["qloss"], x, out["recon"].detach(), 1, d_step)
    return loss_fn(x, out["recon"].detach(), out["posterior"], 1, d_step)


def loss_global_steps(args, step: int) -> tuple:
    """(generator, discriminator) global_step given to the loss at optimisation step `step`
    (0-based). Lightning, which the VA-VAE original trains with, advances global_step once per
    optimizer, so its disc_start=5001 switches the GAN term on at batch 2501 and the
    discriminator loss at batch 2500 (its second optimizer step)."""
    if args.lightning_global_step:
        return 2 * step, 2 * step + 1
    return step, step


def first_disc_step(args, steps_per_epoch: int) -> int:
    """The first optimisation step that steps the discriminator's optimizer (its schedule's clock
    starts there); with --lightning-global-step it steps from the first batch, as Lightning."""
    if args.tokenizer == "rae":
        return args.disc_update_start_epoch * steps_per_epoch
    return 0 if args.lightning_global_step else max(args.disc_start, 0)


def make_optimizer(params, lr: float, args) -> torch.optim.Optimizer:
    """--optimizer (adam / adamw) over `params` with the --adam-* flags."""
    if args.optimizer == "adamw":
        return utils.adamw(params, lr, args, betas=(args.adam_beta1, args.adam_beta2))
    return torch.optim.Adam(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                            weight_decay=args.adam_weight_decay, fused=torch.cuda.is_available() or None)


def build_schedulers(opt, opt_disc, args, total_steps: int, warmup: int, disc_first: int) -> tuple:
    """The two LR schedules, each stepped on its own optimizer's clock. With --disc-lr-horizon run
    (the originals) the discriminator's schedule is the generator's, so one that starts at epoch 6
    of 16 ends 10 epochs into a 16-epoch decay (RAE: 8.2e-5, not the final 2e-5)."""
    sched = utils.lr_scheduler(opt, schedule=args.lr_schedule, warmup_steps=warmup, decay_start=args.lr_decay_start,
                               total_steps=total_steps, final_ratio=args.lr_final_ratio)
    if args.disc_lr_horizon == "run":
        decay_start, horizon = args.lr_decay_start, total_steps
    else:
        decay_start = max(args.lr_decay_start - disc_first, 0)
        horizon = max(1, len(range(disc_first, total_steps, args.disc_every)))
    sched_disc = utils.lr_scheduler(opt_disc, schedule=args.lr_schedule, warmup_steps=warmup, decay_start=decay_start,
                                    total_steps=horizon, final_ratio=args.lr_final_ratio)
    return sched, sched_disc


def build_optimizers(args, trainable, disc_params, world: int, local_bs: int, steps_per_epoch: int, total_steps: int,
                     logger) -> tuple:
    """(opt, opt_disc, sched, sched_disc): the tokenizer's and the discriminator's optimizers at
    their LRs (--scale-lr: taming's rule, the same factor for both) and their schedules."""
    lr = args.learning_rate
    if args.scale_lr:
        lr = args.gradient_accumulation_steps * world * local_bs * args.learning_rate
        logger.info(f"--scale-lr: lr = {args.gradient_accumulation_steps} x {world} x {local_bs} x "
                    f"{args.learning_rate:.2e} = {lr:.2e}")
    disc_lr = args.disc_learning_rate * (lr / args.learning_rate)  # scaled by the same rule
    opt = make_optimizer(trainable, lr, args)
    opt_disc = make_optimizer(disc_params, disc_lr, args)
    warmup = (round(args.lr_warmup_epochs * steps_per_epoch) if args.lr_warmup_epochs is not None
              else args.lr_warmup_steps)
    return (opt, opt_disc) + build_schedulers(opt, opt_disc, args, total_steps, warmup,
                                              first_disc_step(args, steps_per_epoch))
