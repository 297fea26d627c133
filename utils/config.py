"""Command-line configuration: `--config FILE.yaml` merged under explicit flags (our own
{flag: value} files and the originals' configs through configs_compat), flag types checked the
same way for both, the flag groups the trainers share and the parse-time defaults (precision,
compile) with their notices."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from utils.io import atomic_write_text


def load_yaml(path: str | os.PathLike) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def positive_int(text) -> int:
    """argparse type: an integer >= 1 (counts, sizes and periods where 0 means nothing happens)."""
    import argparse

    value = _strict_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text) -> int:
    """argparse type: an integer >= 0."""
    import argparse

    value = _strict_int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _strict_int(text) -> int:
    import argparse

    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


class OneDefaultHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` states each option's default once: options whose help already says what the
    default is (or whose default is None, i.e. resolved at run time) get no second '(default: X)'."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def config_value(action, value, key: str, source: str):
    """A config value checked as the flag itself would be: through the action's type (a YAML
    `2.5` for an integer flag is refused, a YAML `1e-4` string becomes a float) and its choices.
    Errors name `source` (the file), the key and the flag."""
    def bad(why):
        return ValueError(f"{source}: key '{key}' ({action.option_strings[0] if action.option_strings else action.dest}): {why}")

    if value is None:
        return None
    if action.nargs == 0:  # store_true / store_false / BooleanOptionalAction
        if not isinstance(value, bool):
            raise bad(f"expected true or false, got {value!r}")
        return value
    if isinstance(value, list) and action.nargs not in (None, "?"):
        return [_config_value_one(action, v, bad) for v in value]
    return _config_value_one(action, value, bad)


def _config_value_one(action, value, bad):
    import argparse

    if isinstance(value, (dict, list)):
        if action.type in (None, str):
            return value  # structured values some scripts take as they are
        raise bad(f"expected one value, got {value!r}")
    if action.type in (int, positive_int, non_negative_int) and isinstance(value, (bool, float)):
        raise bad(f"expected an integer, got {value!r}")
    if action.type is float and isinstance(value, bool):
        raise bad(f"expected a number, got {value!r}")
    if action.type is not None:
        try:
            value = action.type(str(value))  # exactly what the same text on the command line gives
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise bad(str(e) or f"invalid value {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise bad(f"{value!r} is not one of {list(action.choices)}")
    return value


def parse_args_with_config(parser, argv=None):
    """argparse with `--config FILE.yaml`: the file's keys are defaults, explicit flags win.

    Keys may be written with hyphens or underscores; an unknown key or a value its flag would
    refuse is an error naming the file and the key.
    """
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None, help='YAML file of flag values')
    known, _ = pre.parse_known_args(argv)
    if known.config:
        apply_config_file(parser, known.config, argv)
    return parser.parse_args(argv)


def apply_config_file(parser, path, argv=None) -> None:
    """Set `parser`'s defaults from a YAML file: an original's config (RAE, LightningDiT, taming:
    translated key by key) or a file of our flags, keyed by any of a flag's names, hyphens or
    underscores, each value checked as the flag itself would be. Raises ValueError naming the
    file and the key."""
    cfg = load_yaml(path)
    original = original_config_defaults(cfg, path, parser, argv)
    if original is not None:
        parser.set_defaults(**original)
        return
    actions = {}
    for a in parser._actions:  # a dest's main flag first (aliases such as --per-class-sampling after it)
        if a.option_strings:
            actions.setdefault(a.dest, a)
    defaults = {}
    for k, v in cfg.items():
        dest = str(k).replace("-", "_")
        alias = parser._option_string_actions.get("--" + str(k).replace("_", "-"))
        if dest not in actions and alias is not None:  # a flag's other name (e.g. random-init-vae)
            dest = alias.dest
        if dest not in actions or dest in ("config", "recipe"):
            raise ValueError(f"{path}: unknown key '{k}' (not a flag of {parser.prog})")
        defaults[dest] = config_value(actions[dest], v, k, path)
    parser.set_defaults(**defaults)


def explicit_dests(parser, argv=None) -> set:
    """The dests of the flags written on the command line `argv` (argparse's unique prefixes too)."""
    argv = sys.argv[1:] if argv is None else argv
    options = parser._option_string_actions
    out = set()
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        hits = {options[name].dest} if name in options else \
            {a.dest for o, a in options.items() if parser.allow_abbrev and o.startswith(name)}
        if len(hits) == 1:
            out |= hits
    return out


def original_config_defaults(cfg: dict, path, parser, argv=None):
    """When `cfg` is one of the originals' own YAML files (RAE, LightningDiT / VA-VAE, taming), its
    translation for this script (configs_compat) as argparse defaults; None for our own
    {flag: value} files. Explicit flags win over every value the file gives."""
    from configs_compat import translate_original

    translation = translate_original(cfg, path, parser.prog)
    if translation is None:
        return None
    defaults = translation.defaults(explicit_dests(parser, argv))
    actions = {}
    for action in parser._actions:  # of several flags of one dest, check with the one taking a value
        if action.dest not in actions or (actions[action.dest].nargs == 0 and action.nargs != 0):
            actions[action.dest] = action
    lacking = sorted(set(defaults) - set(actions) - {"config_epochs"})
    if lacking:  # a translator written for flags this script does not have
        raise ValueError(f"{path}: the {translation.original} config sets {lacking}, which {parser.prog} has no flag for")
    for dest in set(defaults) & set(actions):  # checked as the flag itself would check them (choices)
        defaults[dest] = config_value(actions[dest], defaults[dest], f"-> --{dest.replace('_', '-')}", path)
    if translation.unused and os.environ.get("RANK", "0") == "0":
        print(f"{path}: read as the original's {translation.original} config; without effect on {parser.prog}: "
              f"{'; '.join(translation.unused)}", file=sys.stderr)
    return defaults


def apply_config_epochs(args, steps_per_epoch: int, logger=None) -> None:
    """Turn the settings an original's config counts in epochs (RAE: checkpoint interval, LR
    schedule; `args.config_epochs`) into steps, once the trainer knows the epoch length."""
    for dest, epochs in (getattr(args, "config_epochs", None) or {}).items():
        steps = round(float(epochs) * steps_per_epoch)
        setattr(args, dest, max(steps, 1) if dest == "checkpointing_steps" else steps)
        if logger is not None:
            logger.info(f"--{dest.replace('_', '-')} {getattr(args, dest)} ({epochs:g} epochs of {steps_per_epoch} steps, "
                        f"from --config)")


def write_args_json(args, path: str | os.PathLike) -> None:
    atomic_write_text(json.dumps(vars(args), indent=2, sort_keys=True, default=str) + "\n", path)


def add_common_training_flags(p) -> None:
    """Experiment, resume, precision and optimiser flags every trainer shares (official REPA-E
    names); trainers add their own groups."""
    import argparse

    g = p.add_argument_group("experiment and logging")
    g.add_argument("--output-dir", type=str, default="exps", help="folder holding experiment folders")
    g.add_argument("--exp-name", type=str, required=False, default=None, help="experiment folder name under --output-dir")
    g.add_argument("--logging-dir", type=str, default="logs", help="tracker log folder inside the experiment folder")
    g.add_argument("--report-to", type=str, default="tensorboard", choices=["tensorboard", "wandb", "none"], help="experiment tracker (wandb: run folder <exp>/wandb, run name = --exp-name; offline without a wandb login)")
    g.add_argument("--wandb-history-path", type=str, default=None, help="an earlier run's wandb run folder (or a file holding its run id): this run continues that wandb history")
    g.add_argument("--sampling-steps", type=non_negative_int, default=10000, help="write a sample / reconstruction grid every N steps (0: never)")
    g.add_argument("--log-every", type=positive_int, default=1, help="log losses every N steps (0: never)")
    g.add_argument("--resume-step", type=int, default=0, help="continue from checkpoints/NNNNNNN.pt (0: fresh)")
    g.add_argument("--resume", type=str, default=None, help="'latest' or a step; overrides --resume-step")
    g.add_argument("--continue-train-exp-dir", type=str, default=None, help="experiment folder whose checkpoint --resume-step / --resume loads (REPA-E's meaning; default <output-dir>/<exp-name>); new checkpoints go to <output-dir>/<exp-name>")
    g.add_argument("--keep-checkpoints", type=non_negative_int, default=0, help="keep only the newest N checkpoints (0: all)")
    g.add_argument("--check-ranks-every", type=non_negative_int, default=0,
                   help="debugging: every N steps verify that all processes hold bit-identical models, EMA, "
                        "discriminator and optimizer states, and stop naming those that differ (0: off)")
    g = p.add_argument_group("precision and speed")
    g.add_argument("--allow-tf32", action=argparse.BooleanOptionalAction, default=True, help="allow TF32 matmuls and convolutions on Ampere+ GPUs (on by default, as REPA-E)")
    # None = not given: the launcher's setting, then the script's default (REPA-E: fp16) applies.
    g.add_argument("--mixed-precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="autocast precision; when not given, `accelerate launch --mixed_precision` wins, else the "
                        "script's default (REPA-E trainers: fp16; off on CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the training step's networks and losses (default: on with a GPU, as REPA-E; off on CPU)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=1400, help="stop after this many epochs")
    g.add_argument("--max-train-steps", type=positive_int, default=400000, help="stop after this many optimisation steps")
    g.add_argument("--checkpointing-steps", type=positive_int, default=50000, help="write a checkpoint every N steps (and at the end)")
    g.add_argument("--gradient-accumulation-steps", type=positive_int, default=1, help="micro-batches accumulated per optimisation step")
    g.add_argument("--batch-size", type=positive_int, default=256, help="global batch (split over processes and accumulation)")
    g.add_argument("--num-workers", type=non_negative_int, default=4, help="data loader worker processes per rank")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam-weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--adam-epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0: off)")
    g.add_argument("--seed", type=int, default=0, help="global seed (each rank derives its own stream)")


# The flag groups of the diffusion trainers (train_repae.py, train_ldm_only.py): each defined once,
# with what differs per script (a default, the family-specific part of a help text) as a parameter.
def add_sit_projector_flags(g) -> None:
    """SiT architecture flags of the REPA projectors (REPA-E names)."""
    import argparse

    g.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=True, help="accepted for compatibility; attention always uses SDPA")
    g.add_argument("--encoder-depth", type=int, default=8, help="SiT block after which the REPA projectors read features")
    g.add_argument("--projector-dim", type=int, default=2048, help="hidden width of the REPA projector MLPs")


def add_flow_loss_flags(g, path_type_help: str = "interpolant between data and noise",
                        weighting_choices=("uniform", "lognormal"), weighting_help: str = "training time distribution") -> None:
    """Flow-matching loss flags (REPA-E names): interpolant, target, label dropout, time distribution."""
    g.add_argument("--path-type", type=str, default="linear", choices=["linear", "cosine"], help=path_type_help)
    g.add_argument("--prediction", type=str, default="v", choices=["v"], help="network target (velocity)")
    g.add_argument("--cfg-prob", type=float, default=0.1, help="label dropout probability for classifier-free guidance")
    g.add_argument("--weighting", type=str, default="uniform", choices=list(weighting_choices), help=weighting_help)


def add_repa_loss_flags(g, enc_type_default, enc_type_help: str, proj_coeff_help: str) -> None:
    """REPA alignment flags (REPA-E names): the encoders, their weights, the loss weight."""
    g.add_argument("--enc-type", type=str, default=enc_type_default, help=enc_type_help)
    g.add_argument("--random-init-encoders", action="store_true", help="encoders with random weights (offline tests)")
    g.add_argument("--encoder-weights-dir", type=str, default=None, help="local folder of encoder weights")
    g.add_argument("--proj-coeff", type=float, default=0.5, help=proj_coeff_help)


def add_lr_ema_flags(g, lr_help: str, ema_help: str) -> None:
    """The trained network's AdamW learning rate and its EMA decay."""
    g.add_argument("--learning-rate", type=float, default=1e-4, help=lr_help)
    g.add_argument("--ema-decay", type=float, default=0.9999, help=ema_help)


def add_sample_grid_flags(p):
    """The "sample grids" group (Euler steps, guidance scale, grid size); returns it for the
    script's own additions."""
    g = p.add_argument_group("sample grids")
    g.add_argument("--sample-num-steps", type=int, default=50, help="Euler steps for the sample grids")
    g.add_argument("--sample-cfg-scale", type=float, default=1.0, help="guidance scale for the sample grids")
    g.add_argument("--num-sample-images", type=int, default=16, help="images per sample grid")
    return g


# One-line notices about defaults switched at parse time; start_run writes them to the log.
DEFAULT_NOTICES: list = []


def _notice(text: str, echo: bool = True) -> None:
    DEFAULT_NOTICES.append(text)
    if echo and int(os.environ.get("RANK", "0")) == 0:
        print(f"[notice] {text}", flush=True)


def resolve_precision_defaults(args, mixed_precision_default: str = "fp16") -> None:
    """Fill `--mixed-precision` and `--compile` when they were not given (None).

    Precision: a launcher setting (`accelerate launch --mixed_precision X`, exported as
    ACCELERATE_MIXED_PRECISION) wins over the script default. The launcher exports 'no' also when
    nothing was set, so 'no' from it cannot be told apart from its own default and the script
    default stands (pass --mixed-precision no for full precision). fp16 autocast needs a GPU and
    torch.compile on CPU mostly costs compile time, so without CUDA both are switched off with a
    notice (never silently)."""
    cuda = torch.cuda.is_available()
    DEFAULT_NOTICES.clear()  # only this parse's notices reach the run's log
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if getattr(args, "mixed_precision", "no") is not None and launcher not in ("", "no", args.mixed_precision):
        _notice(f"--mixed-precision {args.mixed_precision} given: accelerate launch's {launcher} is overridden")
    if getattr(args, "mixed_precision", "no") is None:
        if launcher and launcher != "no":
            args.mixed_precision = launcher
            _notice(f"mixed precision {launcher} from `accelerate launch --mixed_precision` (no --mixed-precision flag given)")
        else:
            args.mixed_precision = mixed_precision_default
            said = f"'{launcher}', also its default when nothing is set" if launcher else "nothing"
            _notice(f"mixed precision {mixed_precision_default}: the script default (no --mixed-precision flag; "
                    f"accelerate launch said {said})", echo=False)
    if args.mixed_precision == "fp16" and not cuda:
        _notice("no GPU: --mixed-precision fp16 switched off (full precision on CPU)")
        args.mixed_precision = "no"
    if getattr(args, "compile", False) is None:
        args.compile = cuda
        if not cuda:
            _notice("no GPU: --compile switched off (pass --compile to force torch.compile on CPU)")


def finish_args(args, default_exp_name: str, mixed_precision_default: str = "no"):
    """Post-parse fix-ups shared by the trainers; `mixed_precision_default` is the script's own
    default when neither the flag nor the launcher sets one."""
    if args.resume is None and args.resume_step:
        args.resume = str(args.resume_step)
    if args.exp_name is None:
        args.exp_name = default_exp_name
    resolve_precision_defaults(args, mixed_precision_default)
    return args
