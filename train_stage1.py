"""Stage 1: train an image tokenizer (KL-VAE, VA-VAE, VQGAN or RAE) with its GAN.

  accelerate launch train_stage1.py --tokenizer vavae --config configs/stage1/vavae_f16d32_stage1.yaml \
      --data-dir DATA --exp-name NAME

One optimisation step, for every kind:
  1. generator update: x -> tokenizer -> x_hat; the kind's loss in generator mode
       kl / vavae  VAVAELoss: nll (L1 + LPIPS) + KL + adaptive-weight GAN (+ VF alignment of the
                   projected latent with frozen foundation features resized to the latent grid)
       vqgan       VQLPIPSLoss: nll (L1 + LPIPS) + adaptive-weight GAN + codebook loss
       rae         RAELoss: L1 + LPIPS + adaptive-weight GAN through DiffAug (frozen encoder with
                   noise augmentation; only the decoder trains)
  2. discriminator update on the same batch (rae: a fresh eval-mode reconstruction, noise off),
     once the discriminator has started, every --disc-every steps; its gradients are averaged
     over ranks explicitly (the loss module is not wrapped in DDP);
  3. EMA of the tokenizer (optional; default on for the RAE recipes).
Each optimizer has its own LR schedule on its own clock (its own count of steps taken).
Evaluation (PSNR, SSIM, LPIPS, rFID through evaluation.reconstruction.reconstruction_metrics; codebook
usage and perplexity for VQ) runs on --eval-data-dir or a seeded held-out slice of the training
data, on the EMA model when there is one, with RAE noise off. Checkpoints hold everything needed
to continue bit-for-bit (models, EMA, both optimizers and schedulers, discriminator, RNG of every
rank, data position); export with save_vae_weights.py.
What differs per family lives beside the family: models/stage1.py (networks), loss/stage1.py (losses).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

import utils
from datasources import (
    ClipFrames,
    CropFlip,
    ResumableDistributedSampler,
    RGBView,
    VideoClipDataset,
    build_image_dataset,
    flatten_video_batch,
    image_channels_on_disk,
    is_archive,
    load_class_to_idx,
    load_size_arg,
    resolve_load_size,
    save_class_to_idx,
)
from evaluation.inception import add_inception_flags
from loss.perceptual import add_lpips_memory_flags
from loss.stage1 import build_loss, build_optimizers, discriminator_objective, generator_objective, loss_global_steps
from models.stage1 import (
    FSDP_UNITS,
    KIND_DEFAULTS,
    TOKENIZERS,
    GrayTokenizer,
    TrainForward,
    build_foundation,
    build_model,
    check_fsdp,
    check_model,
    codebook_counts,
    codebook_size,
    codebook_stats,
    init_from,
    make_ema,
    model_in_channels,
    trainable_parameters,
)
from utils import fsdp


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train_stage1.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=str, default=None, help="YAML file of flag values (flags given explicitly win)")
    utils.add_common_training_flags(p)
    # Stage-1 defaults differ from the diffusion trainers': per-kind betas, no clipping, no compile.
    p.set_defaults(adam_beta1=None, adam_beta2=None, max_grad_norm=0.0, compile=False, batch_size=32,
                   checkpointing_steps=5000, sampling_steps=1000)
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", type=str, required=False, default=None, choices=TOKENIZERS + ("vq",),
                   help="what to train (vq: the same as vqgan, the other scripts' name of the kind)")
    g.add_argument("--model", type=str, default=None,
                   help="preset: VAE_PRESETS (kl/vavae), VQ_PRESETS (vqgan) or RAE_PRESETS (rae); default per kind")
    g.add_argument("--model-config", default=None,
                   help="LDM (kl/vavae) / taming (vqgan) / RAE model config: a YAML/JSON file, or a mapping in --config")
    g.add_argument("--in-channels", type=int, default=None, help="image channels (1 for spectrograms: in = out channels)")
    g.add_argument("--init-from", type=str, default=None,
                   help="start from released weights: VA-VAE/LDM .ckpt (state_dict), taming VQGAN .ckpt, RAE decoder file")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute decoder (and encoder) blocks in backward")
    g.add_argument("--ema-decay", type=float, default=None, help="EMA of the tokenizer (0: off; default per kind)")
    fsdp.add_fsdp_flag(g)
    g = p.add_argument_group("loss (kl / vavae / vqgan)")
    g.add_argument("--disc-start", type=int, default=None, help="step at which the GAN term and discriminator updates start")
    g.add_argument("--lightning-global-step", action="store_true",
                   help="count --disc-start as the originals' Lightning global_step does with two optimizers (the "
                        "generator at 2 x step, the discriminator at 2 x step + 1; its optimizer steps every batch, "
                        "with a zero loss before the start), so an original's value applies verbatim")
    g.add_argument("--disc-weight", type=float, default=None, help="GAN weight (times the adaptive weight)")
    g.add_argument("--disc-factor", type=float, default=1.0, help="disc_factor after --disc-start")
    g.add_argument("--disc-every", type=int, default=1, help="update the discriminator every N steps")
    g.add_argument("--disc-loss", type=str, default="hinge", choices=["hinge", "vanilla"], help="discriminator loss")
    g.add_argument("--disc-num-layers", type=int, default=3, help="PatchGAN layers")
    g.add_argument("--disc-ndf", type=int, default=64, help="PatchGAN base width")
    g.add_argument("--use-actnorm", action="store_true", help="PatchGAN with ActNorm instead of BatchNorm")
    g.add_argument("--kl-weight", type=float, default=1e-6, help="KL weight (kl / vavae)")
    g.add_argument("--perceptual-weight", type=float, default=1.0, help="LPIPS weight")
    g.add_argument("--codebook-weight", type=float, default=1.0, help="VQ codebook loss weight")
    g.add_argument("--lpips-weights", type=str, default="imagenet", help="LPIPS VGG trunk: imagenet, a local file, or random")
    add_lpips_memory_flags(g)
    g = p.add_argument_group("VF alignment (vavae)")
    g.add_argument("--vf-model", type=str, default="dinov2-vit-l", help="frozen foundation model (models.encoders name)")
    g.add_argument("--vf-weight", type=float, default=0.1, help="VF loss weight")
    g.add_argument("--adaptive-vf", action=argparse.BooleanOptionalAction, default=True, help="adaptive VF weight at the encoder's last layer")
    g.add_argument("--cos-margin", type=float, default=0.5, help="marginal cosine margin")
    g.add_argument("--distmat-margin", type=float, default=0.25, help="distance-matrix margin")
    g.add_argument("--cos-weight", type=float, default=1.0, help="weight of the cosine term")
    g.add_argument("--distmat-weight", type=float, default=1.0, help="weight of the distance-matrix term")
    g.add_argument("--vf-legacy-input", action=argparse.BooleanOptionalAction, default=True,
                   help="feed the foundation model the unnormalised [-1, 1] image bilinearly resized, as the original "
                        "VA-VAE; --no-vf-legacy-input feeds it ImageNet-normalised bicubic input")
    g.add_argument("--encoder-weights-dir", type=str, default=None, help="local folder of foundation-model weights")
    g.add_argument("--random-init-encoders", action="store_true", help="foundation / RAE encoder with random weights (tests)")
    g = p.add_argument_group("VQ (vqgan)")
    g.add_argument("--quantizer", type=str, default=None, choices=["vq2", "ema"], help="gradient codebook or EMA codebook")
    g.add_argument("--n-embed", type=int, default=None, help="codebook size (default: the preset's)")
    g.add_argument("--vq-beta", type=float, default=0.25, help="commitment weight")
    g.add_argument("--vq-legacy", action=argparse.BooleanOptionalAction, default=True, help="taming's legacy beta placement")
    g.add_argument("--vq-ema-decay", type=float, default=0.99, help="EMA codebook decay")
    g.add_argument("--dead-code-restart", action="store_true", help="EMA codebook: restart codes whose usage fell below the threshold")
    g.add_argument("--dead-code-threshold", type=float, default=1e-3, help="EMA usage below which a code is dead")
    g.add_argument("--scale-lr", action="store_true", help="taming rule: lr = accumulation x processes x micro-batch x --learning-rate")
    g = p.add_argument_group("RAE")
    g.add_argument("--noise-tau", type=float, default=None, help="training noise tau (default: the config's)")
    g.add_argument("--gan-weight", type=float, default=None, help="GAN weight (default --disc-weight of the kind: 0.75)")
    g.add_argument("--disc-start-epoch", type=int, default=8, help="epoch from which the GAN term is used")
    g.add_argument("--disc-update-start-epoch", type=int, default=6, help="epoch from which the discriminator trains")
    g.add_argument("--rae-loss-full-precision", action="store_true",
                   help="RAE: run LPIPS and the DINO discriminator in float32 outside autocast (default: under "
                        "--mixed-precision, as the original)")
    g.add_argument("--diffaug-policy", type=str, default="translation,color",
                   help="DiffAug policy, applied in the order given (the original: translation, then colour)")
    g.add_argument("--disc-config", default=None, help="DINO discriminator config (mapping in --config, or 'tiny')")
    g = p.add_argument_group("optimisers and schedules")
    g.add_argument("--optimizer", type=str, default=None, choices=["adam", "adamw"], help="default per kind")
    g.add_argument("--learning-rate", type=float, default=None, help="tokenizer LR (default per kind)")
    g.add_argument("--disc-learning-rate", type=float, default=None, help="discriminator LR (default: --learning-rate)")
    g.add_argument("--disc-lr-horizon", type=str, default="run", choices=["run", "disc-steps"],
                   help="discriminator schedule: 'run' = the generator's schedule counted in the discriminator's own "
                        "steps, so a late start never reaches the final LR (the originals); 'disc-steps' = fitted to "
                        "its own number of updates")
    g.add_argument("--lr-schedule", type=str, default="constant", choices=["constant", "cosine", "linear"], help="LR schedule of both optimizers")
    g.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warmup steps (each optimizer on its own clock)")
    g.add_argument("--lr-warmup-epochs", type=float, default=None, help="warmup in epochs (overrides --lr-warmup-steps)")
    g.add_argument("--lr-decay-start", type=int, default=0, help="'linear' schedule: step where decay starts")
    g.add_argument("--lr-final-ratio", type=float, default=0.0, help="final LR / base LR")
    g.add_argument("--lr-total-steps", type=int, default=None,
                   help="schedule horizon (default: the run's last step); fix it when a run is later extended")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=str, default="data", help="image folder (any class naming), archive, images.h5, or clips")
    g.add_argument("--resolution", type=int, default=256, help="training crop size")
    g.add_argument("--load-size", type=load_size_arg, default=None,
                   help="images are loaded at this size (--load-mode), then cropped to --resolution (--crop); "
                        "pixels, or a multiple of --resolution such as 1.5x (RAE's rule)")
    g.add_argument("--load-mode", type=str, default="adm", choices=["adm", "short-side"],
                   help="how images are loaded at --load-size before the crop: ADM center crop, or the "
                        "originals' aspect-preserving short-side resize (image folders only)")
    g.add_argument("--crop", type=str, default="random", choices=["random", "center"],
                   help="training crop: random offsets (RandomCrop) or the centre (taming's custom data: CenterCrop)")
    g.add_argument("--short-side-resize", type=str, default=None, choices=["cv2-linear", "pil-bicubic"],
                   help="--load-mode short-side resampling: albumentations' OpenCV bilinear (taming, VA-VAE; "
                        "kl/vavae/vqgan default) or torchvision's PIL bicubic (RAE; rae default)")
    g.add_argument("--hflip", action="store_true", help="random horizontal flips")
    g.add_argument("--no-augment", action="store_true", help="no crop or flip (spectrograms)")
    g.add_argument("--convert-channels", action="store_true", help="convert images to --in-channels instead of refusing a mismatch")
    g.add_argument("--video-frames", type=int, default=0, help="read clips of T frames and flatten (batch, frames) to frames")
    g.add_argument("--video-stride", type=int, default=1, help="frame stride inside a clip window")
    g.add_argument("--class-to-idx", type=str, default=None, help="JSON {class folder: id} remapping the labels (custom data)")
    g.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images instead of stopping")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    g.add_argument("--eval-data-dir", type=str, default=None,
                   help="evaluation images, e.g. the ImageNet validation folder of the papers' rFID (default: "
                        "--eval-samples images of --data-dir that also train, unless --eval-holdout)")
    g.add_argument("--eval-holdout", action="store_true",
                   help="without --eval-data-dir: remove the evaluation images from the training data")
    g.add_argument("--eval-samples", type=int, default=1000, help="images evaluated (0: no evaluation)")
    g.add_argument("--eval-batch-size", type=int, default=32, help="evaluation batch per process")
    g.add_argument("--eval-metrics", type=str, default="rfid,psnr,ssim,lpips", help="comma list of rfid, psnr, ssim, lpips")
    add_inception_flags(g)
    g.add_argument("--num-recon-images", type=int, default=8, help="pairs in each reconstruction grid")
    args = fsdp.finish_args_with_fsdp(utils.parse_args_with_config(p, argv), "stage1", mixed_precision_default="no")
    return resolve_defaults(args)


def resolve_defaults(args):
    """Fill the flags left unset with the kind's published values (KIND_DEFAULTS) and check them."""
    if args.tokenizer is None:
        raise SystemExit("--tokenizer is required (kl, vavae, vqgan, rae)")
    if args.tokenizer == "vq":
        args.tokenizer = "vqgan"
    check_fsdp(args)
    for k, v in KIND_DEFAULTS[args.tokenizer].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.disc_learning_rate is None:
        args.disc_learning_rate = args.learning_rate
    if args.gan_weight is None:
        args.gan_weight = args.disc_weight
    args.load_size = resolve_load_size(args.load_size, args.resolution)
    if args.no_augment:
        args.load_size, args.hflip = None, False
    if args.load_size is not None and args.load_size < args.resolution:
        raise SystemExit(f"--load-size {args.load_size} is smaller than --resolution {args.resolution}")
    if args.disc_every < 1:
        raise SystemExit(f"--disc-every must be >= 1, got {args.disc_every}")
    if args.eval_holdout and args.eval_data_dir:
        raise SystemExit("--eval-holdout takes the evaluation images out of --data-dir; it cannot be combined "
                         "with --eval-data-dir")
    if args.lightning_global_step and args.tokenizer == "rae":
        raise SystemExit("--lightning-global-step counts --disc-start; RAE starts its GAN by epoch "
                         "(--disc-start-epoch / --disc-update-start-epoch)")
    return args


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def build_data(args, data_dir: str, channels: int, load_size: int, what: str):
    """The base dataset at `load_size` (images or clips) after the channel check."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise FileNotFoundError(f"data folder not found: {data_dir} (check {what})")
    on_disk = image_channels_on_disk(data_dir) if data_dir.is_dir() else None
    if on_disk is not None and on_disk != channels and not (args.convert_channels and not is_archive(data_dir)):
        raise SystemExit(f"{what} {data_dir} holds {on_disk}-channel images but the tokenizer takes "
                         f"--in-channels {channels}; pass --in-channels {on_disk}"
                         f"{'' if is_archive(data_dir) else ' or --convert-channels'}")
    if args.video_frames > 0:
        return VideoClipDataset(data_dir, args.video_frames, load_size, channels, args.video_stride, args.seed)
    # evaluation images: the ADM protocol
    crop = f"short-side-{args.short_side_resize}" if what == "--data-dir" and args.load_mode != "adm" else "adm"
    return build_image_dataset(data_dir, load_size, channels, skip_bad_images=args.skip_bad_images, crop=crop,
                               class_to_idx=load_class_to_idx(args.class_to_idx))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def main(args):
    kind = args.tokenizer
    run = utils.start_run(args, f"train_stage1_{kind}")
    accelerator, logger, device, world, rank = run.accelerator, run.logger, run.device, run.world, run.rank
    exp_dir, local_bs = run.exp_dir, run.local_batch_size

    # ---------------- models
    foundation = build_foundation(args, device)  # vavae: the frozen VF target; None otherwise
    model = build_model(args, vf_dim=foundation.embed_dim if foundation is not None else None)
    latent_grid = check_model(args, model, foundation)  # (h, w) of the latents; None for rae
    in_channels = model_in_channels(kind, model)
    if args.in_channels is None:
        args.in_channels = in_channels
    if args.init_from:
        init_from(args, model, logger)
    if args.grad_checkpointing:
        (model.decoder if kind == "rae" else model).set_grad_checkpointing(True)
    trainable = trainable_parameters(args, model)

    # ---------------- loss (LPIPS shared with evaluation)
    loss_fn, lpips_net = build_loss(args, in_channels)
    loss_fn = loss_fn.to(device)
    disc_params = [p for p in loss_fn.discriminator.parameters() if p.requires_grad]

    # ---------------- data
    load_size = args.load_size or args.resolution
    base = build_data(args, args.data_dir, in_channels, load_size, "--data-dir")
    if getattr(base, "num_bad", 0):
        logger.info(f"skipped {base.num_bad} unreadable images, e.g. {base.bad_files[:3]}")
    if accelerator.is_main_process and getattr(base, "class_to_idx", None):
        save_class_to_idx(base.class_to_idx, exp_dir / "class_to_idx.json")
    unit = f"clips of {args.video_frames} frames" if args.video_frames else "images"
    holdout = min(args.eval_samples, len(base) // 2) if args.eval_holdout and args.eval_samples > 0 else 0
    order = torch.randperm(len(base), generator=torch.Generator().manual_seed(args.seed)).tolist()
    train_base = Subset(base, sorted(order[holdout:])) if holdout else base
    train_ds = CropFlip(train_base, args.resolution, random=args.crop == "random", hflip=args.hflip, seed=args.seed)
    eval_ds = None
    if args.eval_samples > 0:
        # rFID protocol: evaluation images are the ADM crop at --resolution, never the training load
        # (e.g. RAE's Resize(384), whose centre 256 would be a zoomed-in view)
        eval_source = base if args.eval_data_dir or (load_size == args.resolution and args.load_mode == "adm") else \
            build_data(args, args.data_dir, in_channels, args.resolution, "--data-dir (evaluation)")
        if args.eval_data_dir:
            eval_base = build_data(args, args.eval_data_dir, in_channels, args.resolution, "--eval-data-dir")
            logger.info(f"evaluation on --eval-data-dir {args.eval_data_dir}: {len(eval_base)} {unit}")
        elif holdout:
            eval_base = Subset(eval_source, sorted(order[:holdout]))
            logger.info(f"--eval-holdout: {holdout} {unit} of --data-dir {args.data_dir} held out for evaluation, "
                        f"{len(train_base)} {unit} left for training")
        else:
            # Every rank picks the same seeded subset (the evaluation shards it); these images also train.
            eval_base = Subset(eval_source, sorted(order[:min(args.eval_samples, len(base))]))
            logger.info(f"evaluation on {len(eval_base)} of the {len(base)} training {unit} of --data-dir "
                        f"{args.data_dir} (not held out: pass --eval-data-dir, e.g. the validation images of the "
                        f"papers' rFID, or --eval-holdout)")
        eval_ds = CropFlip(eval_base, args.resolution, random=False)
        if args.video_frames > 0:
            eval_ds = ClipFrames(eval_ds, args.video_frames)
        if len(eval_ds) > args.eval_samples:
            eval_ds = Subset(eval_ds, range(args.eval_samples))
    sampler = ResumableDistributedSampler(len(train_ds), local_bs, rank, world, seed=args.seed)
    loader = utils.training_loader(train_ds, local_bs, sampler, args)
    steps_per_epoch = max(sampler.batches_per_epoch // args.gradient_accumulation_steps, 1)
    utils.apply_config_epochs(args, steps_per_epoch, logger)
    total_steps = args.lr_total_steps or min(args.max_train_steps, args.epochs * steps_per_epoch)
    logger.info(f"{kind} tokenizer {args.model_config and 'from --model-config' or args.model}: "
                f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trainable params, discriminator "
                f"{sum(p.numel() for p in disc_params) / 1e6:.2f}M; data {args.data_dir}: {len(train_ds)} {unit} "
                f"for training, {len(eval_ds) if eval_ds is not None else 0} {'frames' if args.video_frames else 'images'} "
                f"evaluated; "
                f"batch {args.batch_size} = {world} x {args.gradient_accumulation_steps} x {local_bs}")

    # ---------------- resume: the weights first (--fsdp shards them, then the optimizer is built over the shards)
    step, epoch, batch_pos = 0, 0, 0
    ckpt = utils.load_resume_checkpoint(run)
    if ckpt is not None:
        utils.load_state_dict_strict(model, ckpt["model"], f"{run.resume_path}['model']")
        utils.load_state_dict_strict(loss_fn, ckpt["loss"], f"{run.resume_path}['loss']")
    ema = make_ema(args, model, ckpt, run.resume_path)
    template = None  # --fsdp: the tokenizer's architecture on the meta device (for its gathered copies)
    if args.fsdp:
        template = fsdp.shard_for_training(model, ema, accelerator, args.mixed_precision, ckpt is None, *FSDP_UNITS[kind])
        trainable = trainable_parameters(args, model)  # the shards that replaced the parameters

    # ---------------- optimisers and schedules (each on its own clock)
    opt, opt_disc, sched, sched_disc = build_optimizers(args, trainable, disc_params, world, local_bs, steps_per_epoch,
                                                        total_steps, logger)
    if ckpt is not None:
        fsdp.load_full_optimizer_state(opt, ckpt["opt"])
        opt_disc.load_state_dict(ckpt["opt_disc"])
        sched.load_state_dict(ckpt["sched"])
        sched_disc.load_state_dict(ckpt["sched_disc"])
        step, epoch, batch_pos = utils.resume_position(run, ckpt)
    fwd = TrainForward(kind, model)
    if args.compile:
        fwd = torch.compile(fwd)
    # --fsdp: the model is already sharded (prepare would wrap it in DDP)
    fwd, opt, opt_disc = (fwd, *accelerator.prepare(opt, opt_disc)) if args.fsdp else accelerator.prepare(fwd, opt, opt_disc)
    model = utils.unwrap(fwd).model
    if ema is not None and not args.fsdp:
        ema.to(device)
        if ckpt is None:  # from the weights DDP broadcast from rank 0 (--fsdp: shard_for_training did)
            ema.load_state_dict(model.state_dict())
    if ckpt is not None:
        utils.restore_scaler(run, ckpt)
        utils.restore_rng(run, ckpt)
        del ckpt
    # The discriminator is not wrapped in DDP: gradients are averaged by hand, and its state is
    # rank 0's at the start, and its buffers (BatchNorm statistics of the local batches) after
    # every step, as DDP's buffer broadcast does for the originals. ActNorm initialises its
    # parameters from the first local batch: those are broadcast until every ActNorm is set.
    from models.discriminators import ActNorm

    disc = loss_fn.discriminator
    disc_state = list(disc.state_dict(keep_vars=True).values())  # DINO: the heads only (the backbone is constant)
    disc_buffers = [t for t in disc_state if not isinstance(t, nn.Parameter)]
    actnorms = [m for m in disc.modules() if isinstance(m, ActNorm)]
    actnorm_pending = bool(actnorms)
    utils.broadcast_from_main(disc_state, accelerator)

    from models.tokenizers import describe_model

    description = describe_model(kind, model)  # what the export's NAME.json says (save_vae_weights.py)

    def save_checkpoint():
        # collective under --fsdp: the shards are gathered into full CPU tensors on the main process
        model_sd, ema_sd, opt_sd = (x if x is None else fsdp.full_state_dict(x, run.is_main) for x in (model, ema, opt.optimizer))

        def state():
            out = {"model": model_sd, "loss": loss_fn.state_dict(), "opt": opt_sd,
                   "opt_disc": opt_disc.optimizer.state_dict(), "sched": sched.state_dict(),
                   "sched_disc": sched_disc.state_dict(), "tokenizer": kind, "tokenizer_config": description}
            if ema is not None:
                out["ema"] = ema_sd
            if kind == "rae" and model.latent_stats() is not None:
                out["latent_stats"] = model.latent_stats()
            return out

        utils.save_training_checkpoint(run, step, {"epoch": epoch, "batch": batch_pos}, state, keep=args.keep_checkpoints)

    # ---------------- evaluation
    metrics = [m.strip() for m in args.eval_metrics.split(",") if m.strip()]
    extractor = None
    if eval_ds is not None and "rfid" in metrics:
        from evaluation.metrics import get_extractor

        extractor = get_extractor(weights_path=args.inception_weights, device=device, image_size=args.inception_image_size,
                                  random_init=args.random_init_inception)
    grid_images = None
    if eval_ds is not None:
        grid_images = torch.stack([eval_ds[i][0] for i in range(min(args.num_recon_images, len(eval_ds)))])

    def eval_tokenizer():
        """The tokenizer evaluated: the EMA when there is one (noise off: Tokenizer never adds it);
        collective under --fsdp (a gathered, unsharded copy)."""
        from models.tokenizers import Tokenizer

        net = ema if ema is not None else model
        net = fsdp.full_copy(net, template) if args.fsdp else net
        return net, Tokenizer({"vqgan": "vq"}.get(kind, kind), net, kind)

    @torch.no_grad()
    def recon_grid(at_step: int, net, tok) -> None:
        """Main process: PNG grid of (input | reconstruction) pairs of fixed evaluation images."""
        was_training = net.training
        tok.eval()
        x = grid_images.to(device)
        rec = tok.reconstruct(x)  # [N, C, H, W] in about [-1, 1]
        pairs = torch.cat([x.float() / 255, (rec.float().clamp(-1, 1) + 1) / 2], dim=3)  # 1-channel data: grey PNG
        utils.save_image_grid(pairs.cpu(), exp_dir / "samples" / f"recon_{at_step:07d}.png")
        utils.log_images(accelerator, pairs.cpu(), at_step, "reconstructions")
        net.train(was_training)
        model.train()

    @torch.no_grad()
    def evaluate(at_step: int) -> dict:
        """Collective. PSNR / SSIM / LPIPS / rFID on the evaluation set through the shared code
        path (+ codebook usage and perplexity for VQ) and a reconstruction grid."""
        from evaluation.metrics import format_scores, local_indices
        from evaluation.reconstruction import reconstruction_metrics

        net, tok = eval_tokenizer()
        was_training = net.training
        ds, scored = eval_ds, tok
        if in_channels == 1:  # LPIPS / Inception are RGB networks: compare the grey image repeated
            ds, scored = RGBView(eval_ds), GrayTokenizer(tok)
        res = reconstruction_metrics(scored, ds, inception=extractor, metrics=metrics, batch_size=args.eval_batch_size,
                                     device=device, lpips=lpips_net if lpips_net is not None else "random")
        if kind == "vqgan":  # histogram of code ids over the evaluation set, summed over ranks
            counts = codebook_counts(net, eval_ds, local_indices(len(eval_ds)), args.eval_batch_size, device)
            res.update({k: float(v) for k, v in codebook_stats(accelerator.reduce(counts, reduction="sum")).items()})
        net.train(was_training)
        model.train()
        if accelerator.is_main_process:
            recon_grid(at_step, net, tok)
        accelerator.wait_for_everyone()
        summary["evaluations"][str(at_step)] = res
        # The metrics may carry notes (e.g. a random Inception's): numbers go to the tracker.
        accelerator.log({f"eval/{k}": v for k, v in res.items() if isinstance(v, (int, float))}, step=at_step)
        logger.info(f"eval at step {at_step} ({'EMA' if ema is not None else 'model'}): " + format_scores(res))
        return res

    # ---------------- loop
    summary = {"start_step": step, "tokenizer": kind, "evaluations": {}}
    # --fsdp: a function, read after the forward, when the root holds the gathered weight the graph uses
    last_layer = (lambda: model.decoder.decoder_pred.weight) if kind == "rae" else model.get_last_layer()
    enc_last_layer = model.get_encoder_last_layer() if kind == "vavae" else None
    fwd.train()
    loss_fn.train()
    progress = tqdm(total=min(args.max_train_steps, args.epochs * steps_per_epoch), initial=step,
                    disable=not accelerator.is_main_process,
                    desc=f"train_stage1 {kind}", dynamic_ncols=True)
    data_iter = utils.infinite_epochs(loader, sampler, epoch, batch_pos)
    stop = utils.StopRequest().install()
    monitor = utils.StepMonitor(run, stop)
    speed = utils.Throughput(step, args.max_train_steps)
    try:
        while step < args.max_train_steps and epoch < args.epochs:
            epoch, batch_pos, (raw, _labels) = next(data_iter)
            batch_pos += 1  # position of the NEXT micro-batch, what a checkpoint must record
            raw = raw.to(device, non_blocking=True)
            if raw.ndim == 5:  # clips (B, T, H, W, C) -> frames (B*T, C, H, W)
                raw = flatten_video_batch(raw)
            if raw.shape[1] != in_channels:
                raise SystemExit(f"{args.data_dir} yields {raw.shape[1]}-channel images but --in-channels is {in_channels}")
            x = raw.float() / 127.5 - 1  # [B, C, H, W] in [-1, 1]
            g_step, d_step = loss_global_steps(args, step)
            use_d = (loss_fn.update_discriminator(epoch) if kind == "rae" else d_step >= args.disc_start) \
                and step % args.disc_every == 0
            with accelerator.accumulate(fwd):
                fsdp.set_gradient_sync(model, accelerator.sync_gradients)  # --fsdp: as DDP's no_sync
                # -- generator update
                with accelerator.autocast():
                    out = fwd(x)
                aux = foundation(x, latent_grid) if kind == "vavae" else None
                g_loss, logs = generator_objective(kind, loss_fn, x, out, g_step, epoch, last_layer, enc_last_layer,
                                                   aux, accelerator.autocast)
                accelerator.backward(g_loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                opt.step()
                if accelerator.sync_gradients:
                    sched.step()
                opt.zero_grad(set_to_none=True)

                # -- discriminator update
                d_loss = torch.zeros((), device=device)
                if use_d:
                    d_loss, d_logs = discriminator_objective(kind, loss_fn, model, x, out, d_step, accelerator.autocast)
                    logs.update(d_logs)
                    accelerator.backward(d_loss)
                    if accelerator.sync_gradients:
                        utils.allreduce_grads(disc_params, accelerator)
                        if args.max_grad_norm > 0:
                            torch.nn.utils.clip_grad_norm_(disc_params, args.max_grad_norm)
                    opt_disc.step()
                    if accelerator.sync_gradients:
                        sched_disc.step()
                    opt_disc.zero_grad(set_to_none=True)
                elif args.lightning_global_step and d_step < args.disc_start:
                    # Lightning steps both optimizers on every batch; before disc_start the
                    # discriminator's loss is 0, so Adam only counts steps (moments stay 0, weights
                    # do not move), which sets the bias correction of its first real updates.
                    for p in disc_params:
                        p.grad = torch.zeros_like(p)
                    opt_disc.step()
                    if accelerator.sync_gradients:
                        sched_disc.step()
                    opt_disc.zero_grad(set_to_none=True)

            speed.update(raw.shape[0] * world, step + accelerator.sync_gradients)
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                utils.update_ema(ema, model, args.ema_decay)
            step += 1
            if step == summary["start_step"] + 1:  # of the trained network (RAE: the decoder)
                part = FSDP_UNITS.get(kind, ("",))[0]
                logger.info(fsdp.state_bytes_line(model.get_submodule(part), ema and ema.get_submodule(part), opt, args.fsdp))
            if world > 1:
                utils.broadcast_from_main(disc_state if actnorm_pending else disc_buffers, accelerator)
                actnorm_pending = actnorm_pending and not all(int(m.initialized) for m in actnorms)
            if args.check_ranks_every > 0 and step % args.check_ranks_every == 0:
                utils.check_ranks_identical(accelerator, utils.training_state_tensors(
                    model=model, **({"ema": ema} if ema is not None else {}), discriminator=disc,
                    opt=opt, opt_disc=opt_disc), step)

            losses = {"g_loss": g_loss.detach(), "d_loss": d_loss.detach()}
            if kind == "vqgan":  # this batch's code usage (averaged over ranks with the losses)
                losses.update(codebook_stats(torch.bincount(out["indices"].detach(), minlength=codebook_size(model))))
            logged = step % args.log_every == 0 or step == args.max_train_steps
            vals, stop_requested = monitor(losses, step, record=logged)
            if logged:
                vals.update(lr=sched.get_last_lr()[0], disc_lr=sched_disc.get_last_lr()[0], images_per_sec=speed.rate())
                accelerator.log(vals | utils.scalars_to_host(logs),
                                step=step)
                progress.set_postfix({k: f"{v:.4f}" for k, v in vals.items() if k in losses})
                logger.info(f"step {step:07d} epoch {epoch} " + " ".join(f"{k}={v:.4g}" for k, v in vals.items()))
            progress.update(1)

            if eval_ds is not None and args.eval_every > 0 and step % args.eval_every == 0 and step != args.max_train_steps:
                evaluate(step)
            elif eval_ds is not None and utils.should_run(step, args.sampling_steps, args.max_train_steps) \
                    and step != args.max_train_steps:
                net_tok = eval_tokenizer()  # collective under --fsdp
                if accelerator.is_main_process:
                    recon_grid(step, *net_tok)
                accelerator.wait_for_everyone()
            if utils.checkpoint_or_stop(run, step, stop_requested, save_checkpoint):
                break
    finally:
        stop.restore()
        progress.close()

    summary["final_eval"] = evaluate(step) if eval_ds is not None and step > summary["start_step"] else None
    return utils.finish_run(run, summary, step, monitor, speed)


if __name__ == "__main__":
    main(parse_args())
