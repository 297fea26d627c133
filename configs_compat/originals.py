"""Translate the originals' own YAML files into our flags, per script.

Recognised (by their shape, see `detect_original`):
  rae-stage1       RAE `configs/stage1/{training,pretrained}/*.yaml`     -> train_stage1.py (--tokenizer rae)
  rae-stage2       RAE `configs/stage2/{training,sampling}/**/*.yaml`    -> train_ldm_only.py, generate.py
  lightningdit     LightningDiT `configs/*.yaml`                         -> train_ldm_only.py, generate.py
  ldm-autoencoder  VA-VAE `vavae/configs/*.yaml` (LDM style)             -> train_stage1.py (vavae; kl without use_vf)
  taming-vqgan     taming-transformers `configs/*_vqgan.yaml`            -> train_stage1.py (--tokenizer vqgan)

Every leaf key of the file is accounted for, or the file is refused with the keys named:
  * mapped onto a flag of the script (`flag`): its value becomes that flag's default;
  * fixed (`fixed`): a setting of which we implement exactly one value (e.g. `prediction:
    velocity`); that value is accepted, any other is refused with the reason;
  * no effect on THIS script (`unused`): e.g. the training section of a config given to
    generate.py, or Lightning's checkpoint `monitor`; listed in one notice.
Values the original counts in epochs (RAE's checkpoint interval and LR schedule) are kept in
epochs (`ConfigTranslation.epochs`) and turned into steps by the trainer once it knows the
epoch length (`utils.apply_config_epochs`). Relative paths are resolved against the working
directory, else against the folders above the YAML file (the original repository's root), as the
original scripts would find them when run from that root. Explicit flags always win: a value the
file gives is only a default, and `yields` drops a derived default (e.g. the file's model config)
when the user names the model explicitly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

_MISSING = object()
# The originals stop by epochs: our step limit must not stop them first.
UNLIMITED_STEPS = 10 ** 9


class OriginalConfigError(ValueError):
    """An original's config holds keys (or values) the target script does not understand."""


@dataclass
class ConfigTranslation:
    original: str
    values: Dict[str, Any] = field(default_factory=dict)  # {dest: value}
    epochs: Dict[str, float] = field(default_factory=dict)  # {dest: value in epochs}
    yields: Dict[str, Set[str]] = field(default_factory=dict)  # {dest: explicit dests that drop it}
    needs_explicit: Dict[str, str] = field(default_factory=dict)  # {dest: why the file's value cannot be used}
    unused: List[str] = field(default_factory=list)  # "key (why)" for keys without effect on this script

    def defaults(self, explicit: Iterable[str] = ()) -> Dict[str, Any]:
        """{dest: default} for argparse, given the dests the user set explicitly on the command line."""
        explicit = set(explicit)
        for dest, why in self.needs_explicit.items():
            if dest not in explicit:
                raise OriginalConfigError(why)
        out = {d: v for d, v in self.values.items() if not (self.yields.get(d, set()) & explicit)}
        epochs = {d: v for d, v in self.epochs.items() if d not in explicit}
        if epochs:
            out["config_epochs"] = epochs
        return out


def _flatten(node, prefix=""):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    return a == b


class _Reader:
    """Walks one config: every leaf key must be consumed by flag / fixed / unused / subtree."""

    def __init__(self, cfg: dict, path, prog: str, original: str):
        self.cfg, self.path, self.prog = cfg, Path(path), prog
        self.leaves = dict(_flatten(cfg))
        self.used: Set[str] = set()
        self.out = ConfigTranslation(original)

    # ---- access ---------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.leaves or any(k.startswith(key + ".") for k in self.leaves)

    def get(self, key: str, default=_MISSING):
        if key in self.leaves:
            self.used.add(key)
            return self.leaves[key]
        if default is _MISSING:
            self.error(key, "is required here")
        return default

    def subtree(self, key: str) -> dict:
        """The mapping under `key`, every leaf marked consumed (its reader checks the keys)."""
        node = self.cfg
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        self.used.update(k for k in self.leaves if k == key or k.startswith(key + "."))
        return dict(node) if isinstance(node, dict) else {}

    def error(self, key: str, message: str):
        raise OriginalConfigError(f"{self.path}: key '{key}' {message} "
                                  f"({self.out.original} config read by {self.prog})")

    def path_value(self, value) -> str:
        """A path from the file: as given when it exists from here, else under the folders above
        the YAML (the original repository's root), else as given (the reader will name it)."""
        p = Path(str(value)).expanduser()
        if p.is_absolute() or p.exists():
            return str(p)
        for parent in self.path.resolve().parents:
            if (parent / p).exists():
                return str(parent / p)
        return str(value)

    # ---- consumers ------------------------------------------------------------------------
    def flag(self, key: str, dest: str, convert: Optional[Callable] = None, epochs: bool = False):
        """Map `key` onto the flag `dest` (converted); returns the value or _MISSING when absent."""
        if key not in self.leaves:
            return _MISSING
        value = self.get(key)
        if value is None:
            self.error(key, f"has no value (it sets --{dest.replace('_', '-')})")
        value = convert(value) if convert is not None else value
        (self.out.epochs if epochs else self.out.values)[dest] = value
        return value

    def set(self, dest: str, value, yields: Iterable[str] = ()):
        self.out.values[dest] = value
        if yields:
            self.out.yields[dest] = set(yields)

    def fixed(self, key: str, allowed: tuple, why: str):
        """A setting we implement with exactly the values `allowed`."""
        if key not in self.leaves:
            return
        value = self.get(key)
        if not any(_same(value, a) for a in allowed):
            self.error(key, f"= {value!r} is not supported ({why}; accepted: {', '.join(map(repr, allowed))})")

    def unused(self, key: str, why: str):
        """Understood, no effect on this script (whole subtrees allowed)."""
        hit = [k for k in self.leaves if k == key or k.startswith(key + ".")]
        if hit:
            self.used.update(hit)
            self.out.unused.append(f"{key} ({why})")

    def first(self, *keys: str) -> Optional[str]:
        return next((k for k in keys if k in self.leaves), None)

    def finish(self) -> ConfigTranslation:
        left = sorted(set(self.leaves) - self.used)
        if left:
            raise OriginalConfigError(
                f"{self.path}: {self.prog} does not understand key{'s' if len(left) > 1 else ''} "
                f"{', '.join(repr(k) for k in left)} ({self.out.original} config); remove "
                f"{'them' if len(left) > 1 else 'it'} or give the equivalent flags")
        return self.out


# ------------------------------------------------------------------------------------------------
# Detection
# ------------------------------------------------------------------------------------------------
def detect_original(cfg: dict) -> Optional[str]:
    """Which original wrote `cfg` (see the module docstring), or None for our own flag files."""
    if not isinstance(cfg, dict):
        return None
    if isinstance(cfg.get("stage_1"), dict):
        return "rae-stage2" if "stage_2" in cfg else "rae-stage1"
    model = cfg.get("model")
    if isinstance(model, dict):
        if "model_type" in model and isinstance(cfg.get("transport", cfg.get("sample")), dict):
            return "lightningdit"
        target = str(model.get("target", ""))
        if target.startswith("ldm.models.autoencoder"):
            return "ldm-autoencoder"
        if target.startswith("taming.models.vqgan"):
            return "taming-vqgan"
    return None


def translate_original(cfg: dict, path, prog: str) -> Optional[ConfigTranslation]:
    """The translation of an original's config for `prog` (e.g. "train_stage1.py"), None when
    `cfg` is not an original's (it is then read as our own {flag: value} file)."""
    kind = detect_original(cfg)
    if kind is None:
        return None
    readers = _TRANSLATORS[kind]
    if prog not in readers:
        raise OriginalConfigError(f"{path} is a {kind} config (the original's); {prog} does not read it: use it with "
                                  f"{' / '.join(sorted(readers))}")
    r = _Reader(cfg, path, prog, kind)
    readers[prog](r)
    return r.finish()


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------
def _betas(r: _Reader, key: str):
    value = r.get(key, None)
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        r.error(key, f"= {value!r}: expected [beta1, beta2]")
    r.set("adam_beta1", float(value[0]))
    r.set("adam_beta2", float(value[1]))


def _init_from(r: _Reader, key: str):
    """Released weights to start from: they belong to the file's model, so an explicit --model
    (or --model-config) drops them too."""
    if r.flag(key, "init_from", r.path_value) is not _MISSING:
        r.out.yields["init_from"] = {"model", "model_config"}


def _precision(value) -> str:
    return {"32": "no", "16": "fp16", "16-mixed": "fp16", "bf16": "bf16", "bf16-mixed": "bf16"}.get(str(value), None)


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
    mode = r.flag("sampler.mode", "mode", lambda v: str(v).lower())
    if mode is not _MISSING and mode not in ("ode", "sde"):
        r.error("sampler.mode", f"= {mode!r}: ODE or SDE")
    method = r.flag("sampler.params.sampling_method", "solver", lambda v: str(v).lower())
    if method is not _MISSING and method not in ("euler", "heun", "dopri5"):
        r.error("sampler.params.sampling_method", f"= {method!r}: known euler, heun, dopri5")
    r.flag("sampler.params.num_steps", "num_steps", int)
    r.flag("sampler.params.atol", "atol", float)
    r.flag("sampler.params.rtol", "rtol", float)
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
    mode = r.flag("sample.mode", "mode", lambda v: str(v).lower())
    if mode is not _MISSING and mode not in ("ode", "sde"):
        r.error("sample.mode", f"= {mode!r}: ODE or SDE")
    method = r.flag("sample.sampling_method", "solver", lambda v: str(v).lower())
    if method is not _MISSING and method not in ("euler", "heun", "dopri5"):
        r.error("sample.sampling_method", f"= {method!r}: known euler, heun, dopri5")
    r.flag("sample.atol", "atol", float)
    r.flag("sample.rtol", "rtol", float)
    r.flag("sample.num_sampling_steps", "num_steps", int)
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
# LDM-style autoencoders (VA-VAE) and taming VQGAN
# ------------------------------------------------------------------------------------------------
def _model_params(r: _Reader, keys: Iterable[str]) -> dict:
    """`model.params` minus the loss config: the network config for --model-config."""
    params = {}
    for k in keys:
        if r.has(f"model.params.{k}"):
            params[k] = r.subtree(f"model.params.{k}") if isinstance(r.cfg["model"]["params"][k], dict) \
                else r.get(f"model.params.{k}")
    return params


def _lightning_data(r: _Reader):
    r.fixed("data.target", ("main.DataModuleFromConfig",), "one training and one validation set")
    devices = r.get("lightning.trainer.devices", 1) or 1
    nodes = r.get("lightning.trainer.num_nodes", 1) or 1
    devices = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
    accumulate = r.flag("lightning.trainer.accumulate_grad_batches", "gradient_accumulation_steps", int)
    accumulate = 1 if accumulate is _MISSING else accumulate
    # the original's batch_size is per GPU: keep its global batch (the optimisation it published)
    r.flag("data.params.batch_size", "batch_size", lambda v: int(v) * devices * int(nodes) * accumulate)
    r.flag("lightning.trainer.gradient_clip_val", "max_grad_norm", float)
    r.flag("data.params.num_workers", "num_workers", int)
    r.fixed("data.params.wrap", (True, False), "epoch wrapping of the dataset")
    r.unused("lightning.trainer.strategy", "DDP through Accelerate")
    r.fixed("lightning.trainer.accelerator", ("gpu", "cuda", "auto", "cpu"), "the device comes from accelerate")
    epochs = r.flag("lightning.trainer.max_epochs", "epochs", int)
    if epochs is not _MISSING:
        r.set("max_train_steps", UNLIMITED_STEPS)
    r.flag("lightning.trainer.precision", "mixed_precision", _precision)
    if r.out.values.get("mixed_precision", "no") is None:
        r.error("lightning.trainer.precision", "is not one of 32, 16, bf16")


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
        else:
            r.unused(f"{s}.params.config.size", "evaluation at --resolution")


def _disc_in_channels(r: _Reader, p: str, model: dict):
    k = f"{p}.disc_in_channels"
    if k in r.leaves:
        images = int(model.get("ddconfig", {}).get("in_channels", 3))
        r.fixed(k, (images,), "the discriminator sees the images (ddconfig.in_channels)")


def _taming_vqgan(r: _Reader):
    r.fixed("model.target", ("taming.models.vqgan.VQModel",), "the VQGAN with taming's VectorQuantizer2")
    r.set("tokenizer", "vqgan")
    model = _model_params(r, ("embed_dim", "n_embed", "ddconfig", "remap", "sane_index_shape"))
    r.set("model_config", model, yields=("model",))
    r.unused("model.params.monitor", "Lightning's best-checkpoint metric; every checkpoint is kept")
    _init_from(r, "model.params.ckpt_path")
    # taming's main.py: lr = accumulate_grad_batches * n_gpus * batch_size * base_learning_rate
    if r.flag("model.base_learning_rate", "learning_rate", float) is not _MISSING:
        r.set("scale_lr", True)
    lc = "model.params.lossconfig"
    r.fixed(f"{lc}.target", ("taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",),
            "LPIPS + PatchGAN + codebook loss")
    p = f"{lc}.params"
    for key, dest, conv in (("disc_start", "disc_start", int), ("disc_weight", "disc_weight", float),
                            ("codebook_weight", "codebook_weight", float), ("disc_factor", "disc_factor", float),
                            ("disc_num_layers", "disc_num_layers", int), ("disc_ndf", "disc_ndf", int),
                            ("perceptual_weight", "perceptual_weight", float), ("use_actnorm", "use_actnorm", bool),
                            ("disc_loss", "disc_loss", str)):
        r.flag(f"{p}.{key}", dest, conv)
    r.fixed(f"{p}.pixelloss_weight", (1.0,), "L1 weight 1")
    r.fixed(f"{p}.disc_conditional", (False,), "an unconditional PatchGAN")
    _disc_in_channels(r, p, model)
    _lightning_data(r)
    for split in ("train", "validation"):
        s = f"data.params.{split}"
        target = str(r.get(f"{s}.target", ""))
        for size_key in (f"{s}.params.size", f"{s}.params.config.size", f"{s}.params.crop_size"):
            if split == "train":
                r.flag(size_key, "resolution", int)
            else:
                r.unused(size_key, "evaluation at --resolution")
        if split == "train" and target not in ("taming.data.custom.CustomTrain", "taming.data.imagenet.ImageNetTrain",
                                               "taming.data.faceshq.FacesHQTrain"):
            r.error(f"{s}.target", f"= {target!r}: known CustomTrain, ImageNetTrain, FacesHQTrain")
        lst = r.get(f"{s}.params.{'training' if split == 'train' else 'test'}_images_list_file", None)
        if lst is not None and split == "train":
            r.out.needs_explicit["data_dir"] = (
                f"{r.path}: data.params.train.params.training_images_list_file ({lst}) lists taming's training "
                f"images; we read image folders and archives: pass --data-dir FOLDER (those images)")
        elif lst is not None:
            r.out.unused.append(f"{s}.params.test_images_list_file (give --eval-data-dir FOLDER; default: a "
                                f"held-out slice of --data-dir)")


_TRANSLATORS: Dict[str, Dict[str, Callable[[_Reader], None]]] = {
    "rae-stage1": {"train_stage1.py": _rae_stage1},
    "rae-stage2": {"train_ldm_only.py": _rae_stage2_train, "generate.py": _rae_stage2_sample},
    "lightningdit": {"train_ldm_only.py": _lightningdit_train, "generate.py": _lightningdit_sample},
    "ldm-autoencoder": {"train_stage1.py": _ldm_autoencoder},
    "taming-vqgan": {"train_stage1.py": _taming_vqgan},
}
