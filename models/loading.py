"""Loading a diffusion transformer and its tokenizer for sampling (generate.py, bench/sample.py
and the tests): `load_models` builds a `SamplingSetup` (velocity field, `LatentDecoder` of
normalised latents, latent shape, label count) from an experiment folder of train_repae.py or
train_ldm_only.py or from a released checkpoint of any family (REPA-E SiT, the original SiT,
hustvl LightningDiT, RAE DiT^DH / LightningDiT; generate.py's docstring lists the sources and the
time conventions); `load_guide` the autoguidance guide; `experiment_class_names` the class names
the run was trained on. Network options are read off the state_dict, which is loaded strictly."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import utils
from models.autoencoder import VAE_PRESETS, build_vae
from models.vae_loading import load_latents_stats, load_vae, vae_state_dict_from_checkpoint
from models.diffusion import DIFFUSION_MODELS, VelocityModel, build_diffusion_model, default_time_convention, \
    model_family
from models.sit import SIT_SIZES, SiT_models, bn_latent_stats


class LatentDecoder(nn.Module):
    """Normalised latents [B, C, h, w] -> images [B, 3, H, W] in about [-1, 1]: z * std + mean
    (statistics [C, 1, 1], [1, C, 1, 1] or [C, h, w]), then the tokenizer's / VAE's `decode`."""

    def __init__(self, tokenizer: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.tokenizer = tokenizer
        self.register_buffer("mean", torch.as_tensor(mean).float().clone())
        self.register_buffer("std", torch.as_tensor(std).float().clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(z * self.std + self.mean)


class SamplingSetup:
    """What sampling needs: the velocity field (main model, and the guide if any), the decoder of
    normalised latents, the latent shape, the label count, a default sampling shift and `info`
    (sources and identities recorded in sampling_config.json)."""

    def __init__(self, model: VelocityModel, decoder: LatentDecoder, latent_shape: Sequence[int], num_classes: int,
                 info: dict, default_shift: Optional[float] = None):
        self.model, self.decoder, self.guide = model, decoder, None
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.num_classes, self.info, self.default_shift = int(num_classes), info, default_shift


def _checkpoint_weights(obj, path, use_ema: bool) -> dict:
    """The network's state_dict from a released / trained checkpoint: obj['ema'] (or 'model'),
    or obj itself; a DDP 'module.' prefix is removed."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state_dict or a dict with 'ema'/'model', got {type(obj).__name__}")
    sd = None
    for key in (("ema", "model") if use_ema else ("model", "ema")):
        if key in obj and isinstance(obj[key], dict):
            sd = obj[key]
            break
    if sd is None:
        sd = obj
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not any(k.startswith(("x_embedder.", "s_embedder.")) for k in sd):
        raise KeyError(f"{path}: no diffusion-transformer weights (no 'ema'/'model' entry and no x_embedder.* keys; "
                       f"has {sorted(obj)[:10]})")
    return sd


def default_data_at_one(name: str, options: dict) -> bool:
    """t = 1 is data for hustvl LightningDiT (sinusoidal time) and for learn_sigma SiT releases
    (the original SiT); noise for REPA-E SiT, RAE LightningDiT (Gaussian-Fourier) and DiT^DH."""
    if model_family(name) == "sit":
        return bool(options.get("learn_sigma", False))
    return default_time_convention(name, options)


def resolve_time_convention(flag: Optional[str], default: bool) -> bool:
    if flag in (None, "auto"):
        return default
    if flag not in ("data-at-1", "noise-at-1"):
        raise ValueError(f"--time-convention must be auto, data-at-1 or noise-at-1, got {flag!r}")
    return flag == "data-at-1"


def build_net_from_state_dict(name: str, sd: dict, latent_shape: Sequence[int], num_classes: Optional[int],
                              source: str, encoder_depth: int = 8, path_type: str = "linear"):
    """(net, options, num_classes) for a released / trained state_dict. Options the weights decide
    (SiT projector widths, qk-norm and learn_sigma; LightningDiT / DiT^DH qk-norm, SwiGLU, RMSNorm,
    RoPE, shift-free adaLN, Gaussian-Fourier time, pos_embed) are read off the keys and shapes;
    the state_dict is then loaded strictly by the caller."""
    family = model_family(name)
    c, h, w = (int(v) for v in latent_shape)
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    if num_classes is None:
        num_classes = rows - 1  # released class-conditional models carry the null row
    if rows not in (num_classes, num_classes + 1):
        raise ValueError(f"{source}: label table has {rows} rows, not --num-classes {num_classes} (+1 null row)")
    dropout = 0.1 if rows == num_classes + 1 else 0.0
    embed = "s_embedder.proj.weight" if family == "ddt" else "x_embedder.proj.weight"
    in_ch, patch = sd[embed].shape[1], sd[embed].shape[-1]
    if in_ch != c:
        raise ValueError(f"{source}: {name} takes {in_ch} latent channels but the tokenizer gives {c}")
    out = sd["final_layer.linear.weight"].shape[0]
    learn_sigma = out == 2 * patch * patch * c
    qk_norm = "blocks.0.attn.q_norm.weight" in sd
    if family == "sit":
        z_dims, j = [], 0
        while f"projectors.{j}.4.weight" in sd:
            z_dims.append(sd[f"projectors.{j}.4.weight"].shape[0])
            j += 1
        depth = SIT_SIZES[name.split("-")[1].split("/")[0]]["depth"]
        options = dict(z_dims=z_dims, projector_dim=sd["projectors.0.0.weight"].shape[0] if z_dims else 2048,
                       encoder_depth=min(int(encoder_depth), depth), path_type=path_type, qk_norm=qk_norm,
                       learn_sigma=learn_sigma)
    else:
        hidden = sd["blocks.0.adaLN_modulation.1.weight"].shape[1]
        options = dict(use_qknorm=qk_norm, use_swiglu="blocks.0.mlp.w12.weight" in sd,
                       use_rmsnorm="blocks.0.norm1.weight" in sd,
                       wo_shift=sd["blocks.0.adaLN_modulation.1.weight"].shape[0] == 4 * hidden)
        if family == "lightningdit":
            options.update(use_rope="feat_rope.freqs_cos" in sd, use_gembed="t_embedder.W" in sd,
                           learn_sigma=learn_sigma)
        else:
            options.update(use_rope="enc_feat_rope.freqs_cos" in sd, use_pos_embed="pos_embed" in sd)
    net = build_diffusion_model(name, (c, h, w), num_classes, dropout, **options)
    return net, options, num_classes


def fill_sit_bn(sd: dict, model, stats: Optional[dict]) -> dict:
    """SiT / REPA checkpoints may have no input BatchNorm: fill it from the latent statistics (it is
    not used at sampling time, only loaded strictly)."""
    if "bn.running_mean" in sd or not hasattr(model, "bn"):
        return sd
    sd = dict(sd)
    c = model.in_channels
    bias = stats["latents_bias"].reshape(-1) if stats is not None else torch.zeros(c)
    scale = stats["latents_scale"].reshape(-1) if stats is not None else torch.ones(c)
    sd["bn.running_mean"] = bias.float()
    sd["bn.running_var"] = 1.0 / scale.float().pow(2)
    sd["bn.num_batches_tracked"] = torch.tensor(0)
    return sd


def stats_mean_std(stats: dict, eps: float, source: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) from {latents_scale, latents_bias} (REPA-E), {mean, std} (hustvl) or {mean, var}
    (RAE: std = sqrt(var + eps))."""
    if "latents_scale" in stats and "latents_bias" in stats:
        return stats["latents_bias"].float(), 1.0 / stats["latents_scale"].float()
    if "mean" in stats and "std" in stats:
        return torch.as_tensor(stats["mean"]).float(), torch.as_tensor(stats["std"]).float()
    if "mean" in stats and "var" in stats:
        return torch.as_tensor(stats["mean"]).float(), (torch.as_tensor(stats["var"]).float() + eps).sqrt()
    raise KeyError(f"{source}: latent statistics need latents_scale/latents_bias, mean/std or mean/var (has {sorted(stats)})")


def _build_tokenizer(kind, name, ckpt, stats, config, random_init, seed, what):
    from models.tokenizers import build_tokenizer

    if ckpt is None and config is None and not random_init:
        raise SystemExit(f"{what}: give the tokenizer weights (--vae-ckpt, or --rae-config for RAE)")
    return build_tokenizer(kind, name=name, ckpt=ckpt, stats=stats, config=config, random_init=bool(random_init),
                           seed=int(seed))


def _load_sit(args, obj, sd, ckpt_path, info, logger, exp_stats: Optional[str] = None) -> SamplingSetup:
    """REPA-E SiT (experiment or release) and the original learn_sigma SiT releases, with a VAE.
    `exp_stats`: the experiment's initial statistics file, used only when the checkpoint has none."""
    if args.vae not in VAE_PRESETS:
        raise KeyError(f"--vae {args.vae!r} unknown; choose one of {sorted(VAE_PRESETS)}")
    # Tokenizer: the checkpoint's own (REPA-E end-to-end) or --vae-ckpt.
    if isinstance(obj, dict) and isinstance(obj.get("vae"), dict) and not args.vae_ckpt_override:
        vae = build_vae(args.vae)
        utils.load_state_dict_strict(vae, vae_state_dict_from_checkpoint(obj["vae"], vae), f"{ckpt_path}['vae']")
        stats = None
        info["vae"] = f"{ckpt_path}['vae']"
    elif args.vae_ckpt:
        vae, stats = load_vae(args.vae, ckpt_path=args.vae_ckpt, stats_path=args.vae_stats or exp_stats)
        info["vae"] = str(args.vae_ckpt)
    elif args.random_init_vae:
        seed = int(args.tokenizer_seed or 0)
        with torch.random.fork_rng(devices=[]):  # seeded weights, the global RNG untouched
            torch.manual_seed(seed)
            vae = build_vae(args.vae)
        stats, info["vae"] = None, f"random-init seed {seed}"
    else:
        raise SystemExit(f"{ckpt_path} holds no VAE: pass --vae-ckpt (and --vae-stats)")

    # Latent statistics: explicit file > --latent-scale > the checkpoint's > the run's initial file or
    # the VAE's file > the SiT's BatchNorm.
    if args.vae_stats:
        stats = load_latents_stats(args.vae_stats, channels=vae.latent_channels)
        info["latent_stats"] = str(args.vae_stats)
    elif args.latent_scale is not None:
        c = vae.latent_channels
        stats = {"latents_scale": torch.full((1, c, 1, 1), float(args.latent_scale)), "latents_bias": torch.zeros(1, c, 1, 1)}
        info["latent_stats"] = f"scale {args.latent_scale:g}"
    elif isinstance(obj, dict) and isinstance(obj.get("latent_stats"), dict):
        stats = {k: torch.as_tensor(v).float() for k, v in obj["latent_stats"].items()}
        info["latent_stats"] = f"{ckpt_path}['latent_stats']"
    elif isinstance(obj, dict) and isinstance(obj.get("vae"), dict) and "bn.running_var" in sd:
        stats = bn_latent_stats(sd["bn.running_mean"], sd["bn.running_var"])  # REPA-E: the EMA SiT's BatchNorm
        info["latent_stats"] = "SiT BatchNorm"
    elif exp_stats:
        stats = load_latents_stats(exp_stats, channels=vae.latent_channels)
        info["latent_stats"] = str(exp_stats)
    elif stats is not None:
        info["latent_stats"] = "beside --vae-ckpt"
    elif "bn.running_var" in sd:
        stats = bn_latent_stats(sd["bn.running_mean"], sd["bn.running_var"])
        info["latent_stats"] = "SiT BatchNorm"
    else:
        raise SystemExit("no latent statistics: pass --vae-stats (a -latents-stats.pt file) or --latent-scale")

    if args.model not in SiT_models:
        raise KeyError(f"--model {args.model!r} unknown; choose one of {', '.join(DIFFUSION_MODELS)}")
    f = vae.downsample_factor
    latent_shape = (vae.latent_channels, args.resolution // f, args.resolution // f)
    sit, options, num_classes = build_net_from_state_dict(args.model, sd, latent_shape, args.num_classes, str(ckpt_path),
                                                          int(args.encoder_depth), args.path_type)
    utils.load_state_dict_strict(sit, fill_sit_bn(sd, sit, stats), f"{ckpt_path} (SiT weights)")
    data_at_one = resolve_time_convention(args.time_convention, default_data_at_one(args.model, options))
    info.update(family="sit", data_at_one=data_at_one, learn_sigma=options["learn_sigma"])
    args.num_classes = num_classes
    logger(f"SiT {args.model} from {ckpt_path} ({'EMA' if not args.no_ema else 'raw'} weights"
           f"{', learn_sigma: first C channels' if options['learn_sigma'] else ''}, t = 1 is "
           f"{'data' if data_at_one else 'noise'}), VAE {args.vae} from {info['vae']}, latent statistics from "
           f"{info['latent_stats']}")
    decoder = LatentDecoder(vae.eval(), stats["latents_bias"].float(), 1.0 / stats["latents_scale"].float())
    return SamplingSetup(VelocityModel(sit.eval(), data_at_one), decoder, latent_shape, num_classes, info)


def _load_release(args, sd, ckpt_path, info, logger) -> SamplingSetup:
    """A released LightningDiT (hustvl, RAE) or DiT^DH checkpoint with its tokenizer."""
    from models.tokenizers import read_export_description

    family = model_family(args.model)
    described = args.vae_ckpt is not None and read_export_description(args.vae_ckpt) is not None  # NAME.json says
    kind = args.tokenizer or (None if described else "rae" if family == "ddt" or "t_embedder.W" in sd else "vavae")
    name = args.vae or ("vavae-f16d32" if kind == "vavae" and not described else None)
    seed = int(args.tokenizer_seed or 0)
    tok = _build_tokenizer(kind, name, args.vae_ckpt, args.vae_stats, args.rae_config, args.random_init_vae,
                           seed, f"--model {args.model}")
    kind = tok.kind
    if tok.stats is None:
        raise SystemExit(f"tokenizer {kind}/{tok.name}: no latent statistics; pass --vae-stats "
                         f"({'{mean, var} per position' if kind == 'rae' else '{mean, std} [1, C, 1, 1]'})")
    mean, std = stats_mean_std(tok.stats, float(getattr(tok.model, "eps", 1e-5)), "--vae-stats")
    latent_shape = tok.latent_shape(args.resolution)
    net, options, num_classes = build_net_from_state_dict(args.model, sd, latent_shape, args.num_classes, str(ckpt_path))
    utils.load_state_dict_strict(net, sd, f"{ckpt_path} ({args.model} weights)")
    data_at_one = resolve_time_convention(args.time_convention, default_data_at_one(args.model, options))
    info.update(family=family, data_at_one=data_at_one, vae=f"{kind}:{tok.name}",
                tokenizer_fingerprint=tok.fingerprint(),
                latent_stats=str(args.vae_stats) if args.vae_stats else "tokenizer's statistics")
    info["vae_weights"] = str(args.vae_ckpt or args.rae_config or f"random-init seed {seed}")
    args.num_classes = num_classes
    logger(f"{args.model} from {ckpt_path} (options {options}, t = 1 is {'data' if data_at_one else 'noise'}), "
           f"tokenizer {kind}/{tok.name} ({tok.fingerprint()}), latents {list(latent_shape)}")
    return SamplingSetup(VelocityModel(net.eval(), data_at_one), LatentDecoder(tok.eval(), mean, std), latent_shape,
                         num_classes, info)


def _ldm_network(obj, ckpt_path, use_ema: bool):
    """(net, model_config) of a train_ldm_only.py checkpoint, loaded strictly."""
    mc = obj["model_config"]
    net = build_diffusion_model(mc["name"], mc["latent_shape"], mc["num_classes"], mc.get("class_dropout_prob", 0.1),
                                **mc.get("options", {}))
    key = "ema" if use_ema else "model"
    if key not in obj:
        raise KeyError(f"{ckpt_path}: no '{key}' weights")
    utils.load_state_dict_strict(net, obj[key], f"{ckpt_path}['{key}']")
    return net.eval(), mc


def _load_ldm_experiment(args, obj, ckpt_path, info, logger) -> SamplingSetup:
    """A train_ldm_only.py checkpoint: model_config, latent_stats, tokenizer record and run args."""
    mc = obj["model_config"]
    if args.model and args.model != mc["name"]:
        raise SystemExit(f"--model {args.model}: {ckpt_path} holds a {mc['name']}")
    net, mc = _ldm_network(obj, ckpt_path, not args.no_ema)
    record = dict(obj.get("tokenizer") or {})
    run = dict(obj.get("args") or {})
    kind = args.tokenizer or record.get("kind")
    ckpt = args.vae_ckpt or (None if args.random_init_vae else run.get("vae_ckpt"))
    config = args.rae_config or run.get("rae_config")
    random_init = args.random_init_vae or (ckpt is None and bool(run.get("random_init_vae")))
    seed = args.tokenizer_seed if args.tokenizer_seed is not None else run.get("seed", 0)
    tok = _build_tokenizer(kind, args.vae or record.get("name"), ckpt, args.vae_stats if kind == "rae" else None,
                           config if kind == "rae" else None, random_init, seed, f"--exp-dir {args.exp_dir}")
    want, have = record.get("fingerprint"), tok.fingerprint()
    if want and want != have:
        raise SystemExit(f"tokenizer fingerprint mismatch: {ckpt_path} was trained on latents of tokenizer "
                         f"{record.get('kind')}/{record.get('name')} with fingerprint {want}, but the tokenizer given "
                         f"(--tokenizer/--vae/--vae-ckpt/--rae-config/--random-init-vae: {kind}/{tok.name} from "
                         f"{ckpt or config or f'random init seed {seed}'}) has fingerprint {have}; its samples "
                         f"would decode to garbage")
    ls = obj.get("latent_stats")
    if not isinstance(ls, dict) or "mean" not in ls or "std" not in ls:
        raise KeyError(f"{ckpt_path}: no latent_stats {{mean, std}} (not a train_ldm_only.py checkpoint?)")
    data_at_one = resolve_time_convention(args.time_convention, bool(mc.get("data_at_one", False)))
    args.model, args.num_classes = mc["name"], int(mc["num_classes"])
    args.resolution = args.resolution or int(record.get("resolution", 0)) or None
    info.update(family=mc.get("family", model_family(mc["name"])), data_at_one=data_at_one, vae=f"{kind}:{tok.name}",
                vae_weights=str(ckpt or config or f"random-init seed {seed}"), tokenizer_fingerprint=have,
                latent_stats=f"{ckpt_path}['latent_stats'] ({ls.get('mode', 'channel')})")
    logger(f"{mc['name']} from {ckpt_path} ({'EMA' if not args.no_ema else 'raw'} weights, t = 1 is "
           f"{'data' if data_at_one else 'noise'}), tokenizer {kind}/{tok.name} ({have}), latents {mc['latent_shape']}")
    decoder = LatentDecoder(tok.eval(), ls["mean"], ls["std"])
    return SamplingSetup(VelocityModel(net, data_at_one), decoder, mc["latent_shape"], mc["num_classes"], info,
                         default_shift=mc.get("sample_shift"))


def _experiment_checkpoint(exp_dir, step, flag: str):
    exp = Path(exp_dir)
    args_file = exp / "args.json"
    if not args_file.is_file():
        raise FileNotFoundError(f"{flag} {exp}: no args.json")
    ckpt_path = utils.resolve_resume(exp / "checkpoints", step or "latest", f"{flag.replace('exp-dir', 'ckpt-step')}")
    if ckpt_path is None:
        raise FileNotFoundError(f"{flag} {exp}: no checkpoints in {exp / 'checkpoints'}")
    return json.loads(args_file.read_text()), ckpt_path


def load_models(args, logger) -> SamplingSetup:
    """The sampling setup from --exp-dir/--ckpt-step or --ckpt/--model (see the module docstring)."""
    info, exp_stats = {}, None
    if args.exp_dir:
        exp_args, ckpt_path = _experiment_checkpoint(args.exp_dir, args.ckpt_step, "--exp-dir")
        info["step"] = int(ckpt_path.stem)
        info["checkpoint"] = str(Path(ckpt_path).resolve())
        obj = utils.load_checkpoint_file(ckpt_path)
        if isinstance(obj, dict) and "model_config" in obj:
            return _load_ldm_experiment(args, obj, ckpt_path, info, logger)
        for k in ("model", "resolution", "num_classes", "path_type", "qk_norm", "encoder_depth", "vae"):
            if getattr(args, k) is None and k in exp_args:
                setattr(args, k, exp_args[k])
        if args.vae_ckpt is None:
            args.vae_ckpt = exp_args.get("vae_ckpt")
        # the run's --vae-stats file only initialised training: the checkpoint's trained (EMA
        # BatchNorm) statistics win over it, as in REPA-E's generate.py; an explicit flag wins over both
        exp_stats = exp_args.get("vae_stats")
    else:
        if not args.ckpt:
            raise SystemExit("give --exp-dir (with --ckpt-step) or --ckpt")
        ckpt_path = Path(args.ckpt)
        info["checkpoint"] = str(ckpt_path.resolve())
        obj = utils.load_checkpoint_file(ckpt_path)
        if isinstance(obj, dict) and "model_config" in obj:  # a train_ldm_only.py checkpoint given as a file
            return _load_ldm_experiment(args, obj, ckpt_path, info, logger)
    args.model = args.model or "SiT-XL/2"
    args.resolution = args.resolution or 256
    args.path_type = args.path_type or "linear"
    args.encoder_depth = args.encoder_depth or 8
    if args.model not in DIFFUSION_MODELS:
        raise KeyError(f"--model {args.model!r} unknown; choose one of: {', '.join(DIFFUSION_MODELS)}")
    sd = _checkpoint_weights(obj, ckpt_path, not args.no_ema)
    if model_family(args.model) != "sit":
        return _load_release(args, sd, ckpt_path, info, logger)
    args.vae = args.vae or "f8d4"
    return _load_sit(args, obj, sd, ckpt_path, info, logger, exp_stats)


def load_guide(args, setup: SamplingSetup, logger) -> Tuple[VelocityModel, dict]:
    """The autoguidance guide from --guide-exp-dir [--guide-ckpt-step] or --guide-ckpt --guide-model,
    in the toolkit's convention; it must share the main model's latents and labels."""
    if args.guide_exp_dir:
        _, path = _experiment_checkpoint(args.guide_exp_dir, args.guide_ckpt_step, "--guide-exp-dir")
    else:
        path = Path(args.guide_ckpt)
    obj = utils.load_checkpoint_file(path)
    if isinstance(obj, dict) and "model_config" in obj:
        net, mc = _ldm_network(obj, path, not args.no_ema)
        name, default = mc["name"], bool(mc.get("data_at_one", False))
        if tuple(mc["latent_shape"]) != setup.latent_shape:
            raise SystemExit(f"guide {path}: latents {mc['latent_shape']} differ from the main model's {list(setup.latent_shape)}")
    else:
        name = args.guide_model
        if not name:
            raise SystemExit(f"--guide-ckpt {path}: pass --guide-model (e.g. DiTDH-S)")
        sd = _checkpoint_weights(obj, path, not args.no_ema)
        net, options, _ = build_net_from_state_dict(name, sd, setup.latent_shape, setup.num_classes, f"guide {path}")
        utils.load_state_dict_strict(net, fill_sit_bn(sd, net, None), f"guide {path}")
        net, default = net.eval(), default_data_at_one(name, options)
    if int(net.num_classes) != setup.num_classes:
        raise SystemExit(f"guide {path}: {net.num_classes} classes, the main model {setup.num_classes}")
    data_at_one = resolve_time_convention(args.guide_time_convention, default)
    ident = {"checkpoint": str(Path(path).resolve()), "model": name, "use_ema": not args.no_ema,
             "time_convention": "data-at-1" if data_at_one else "noise-at-1"}
    logger(f"autoguidance guide {name} from {path} (t = 1 is {'data' if data_at_one else 'noise'})")
    return VelocityModel(net, data_at_one), ident


def experiment_class_names(args, num_classes: int) -> Dict[int, str]:
    """{id: name} of the classes the model was trained on: --class-to-idx, else what the run's data
    records (latents' tokenizer.json, an archive's index.json, or the sorted class folders of an
    image folder, numbered as the dataset numbers them); ids without a name are named by their id."""
    from datasources import LATENT_INFO_FILE, is_archive, load_class_to_idx

    mapping = load_class_to_idx(args.class_to_idx, "--class-to-idx") if args.class_to_idx else None
    run = {}
    if mapping is None and args.exp_dir and (Path(args.exp_dir) / "args.json").is_file():
        run = json.loads((Path(args.exp_dir) / "args.json").read_text())
        if run.get("class_to_idx"):
            mapping = load_class_to_idx(run["class_to_idx"], f"{args.exp_dir}/args.json class_to_idx")
    roots = [run.get("latents_dir")]
    if run.get("data_dir") and run.get("vae_latents_name"):
        roots.append(str(Path(run["data_dir"]) / run["vae_latents_name"]))
    roots.append(run.get("data_dir"))
    for root in (Path(r) for r in roots if r and mapping is None):
        if (root / LATENT_INFO_FILE).is_file():
            mapping = json.loads((root / LATENT_INFO_FILE).read_text()).get("class_to_idx")
        elif is_archive(root):
            mapping = json.loads((root / "index.json").read_text()).get("class_to_idx")
        elif root.is_dir():
            dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            mapping = {d.name: i for i, d in enumerate(dirs)} or None
    names = {}
    for name, i in sorted((mapping or {}).items(), key=lambda kv: (int(kv[1]), kv[0])):
        names.setdefault(int(i), str(name))  # several names merged into one id: the first names it
    return {i: names.get(i, str(i)) for i in range(int(num_classes))}
