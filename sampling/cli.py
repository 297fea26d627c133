"""generate.py's command line as a module, so that other code reads a sampling recipe exactly as
`generate.py --recipe NAME` does without importing the script (bench/sample.py does):

* `build_parser` / `parse_args`: every flag of generate.py, defaults < --recipe < --config <
  explicit flags, the combinations the types cannot refuse refused (`check_args`);
* `add_sampler_flags`: the guidance and sampler flag groups (the one definition of those flags);
  `samplers.sampler_kwargs_from_args` turns them into `run_sampler` keywords;
* `list_recipes` / `RECIPE_DIR`: the named recipes of configs/sampling/.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

import utils
from evaluation.inception import add_inception_flags
from evaluation.metrics import ALL_METRICS, UINT8_CONVERSIONS
from models.autoencoder import VAE_PRESETS
from samplers import COMPILE_MODES, DECODE_PRECISIONS

RECIPE_DIR = Path(__file__).resolve().parents[1] / "configs" / "sampling"


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """generate.py's parser (`description`: the first paragraph of its --help)."""
    p = argparse.ArgumentParser(prog="generate.py", description=description,
                                formatter_class=utils.OneDefaultHelpFormatter)
    p.add_argument("--config", type=str, default=None, help="YAML of flag values (explicit flags win)")
    p.add_argument("--recipe", type=str, default=None,
                   help=f"named sampling recipe: configs/sampling/NAME.yaml ({', '.join(list_recipes()) or 'none'})")
    g = p.add_argument_group("model source")
    g.add_argument("--exp-path", "--exp-dir", dest="exp_dir", type=str, default=None, metavar="DIR",
                   help="experiment folder (args.json + checkpoints/); --exp-path is REPA-E's name")
    g.add_argument("--train-steps", "--ckpt-step", dest="ckpt_step", type=str, default=None, metavar="STEP",
                   help="training step of the checkpoint in --exp-path (default: latest); --train-steps is REPA-E's name")
    g.add_argument("--ckpt", type=str, default=None, help="explicit checkpoint (state_dict or dict with ema/model) of --model")
    g.add_argument("--no-ema", action="store_true", help="use the raw 'model' weights instead of 'ema'")
    g.add_argument("--model", type=str, default=None,
                   help="SiT-XL/2, LightningDiT-XL/1, DiTDH-XL ... (default: from the experiment or SiT-XL/2)")
    g.add_argument("--resolution", type=int, default=None, help="image size (default: from the experiment or the checkpoint)")
    g.add_argument("--num-classes", type=int, default=None, help="default: from args.json or the label table")
    g.add_argument("--path-type", type=str, default=None, choices=["linear", "cosine"], help="REPA-E SiT interpolant (default: from the experiment; the SDE's score needs it)")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None, help="SiT qk-norm (default: read off the checkpoint)")
    g.add_argument("--encoder-depth", type=int, default=None, help="REPA-E SiT projector depth (default: from the experiment)")
    g.add_argument("--time-convention", type=str, default="auto", choices=["auto", "data-at-1", "noise-at-1"],
                   help="how the network reads t (auto: the experiment's; data-at-1 for hustvl LightningDiT and "
                        "learn_sigma SiT releases, noise-at-1 otherwise)")
    g.add_argument("--tokenizer", type=str, default=None, choices=["kl", "vavae", "vq", "rae"],
                   help="tokenizer kind (default: the experiment's; vavae for LightningDiT, rae for DiT^DH releases)")
    g.add_argument("--vae", type=str, default=None, help=f"VAE / tokenizer preset ({', '.join(sorted(VAE_PRESETS))})")
    g.add_argument("--vae-ckpt", type=str, default=None, help="tokenizer weights (default: the experiment's)")
    g.add_argument("--vae-stats", type=str, default=None,
                   help="latent statistics file: latents_scale/bias (REPA-E), mean/std (hustvl) or mean/var (RAE)")
    g.add_argument("--latent-scale", type=float, default=None, help="constant latent scale, no bias (SD-VAE: 0.18215)")
    g.add_argument("--rae-config", type=str, default=None, help="RAE config (tokenizer rae)")
    g.add_argument("--random-init-vae", "--random-init", dest="random_init_vae", action="store_true",
                   help="tokenizer with seeded random weights (tests; --random-init: cache_latents.py's name)")
    g.add_argument("--tokenizer-seed", type=int, default=None, help="seed of --random-init-vae (default: the run's seed)")
    g.add_argument("--vae-ckpt-override", action="store_true", help="use --vae-ckpt even if the checkpoint holds a VAE")
    add_sampler_flags(p)
    g = p.add_argument_group("output and speed")
    g.add_argument("--num-fid-samples", type=utils.positive_int, default=50000, help="number of samples to generate")
    g.add_argument("--pproc-batch-size", "--per-proc-batch-size", dest="per_proc_batch_size", type=utils.positive_int, default=128, metavar="N",
                   help="sampling batch per process (--pproc-batch-size is REPA-E's name)")
    g.add_argument("--sample-dir", type=str, default="samples", help="parent folder of the sample folder and its .npz")
    g.add_argument("--folder-name", type=str, default=None,
                   help="sample folder name (default: REPA-E's EXP_STEP_cfgS-LOW-HIGH-labelsampling-L for --exp-path, "
                        "else derived from the configuration)")
    g.add_argument("--no-npz", action="store_true", help="do not write the .npz of all samples")
    g.add_argument("--uint8-conversion", type=str, default="truncate", choices=list(UINT8_CONVERSIONS),
                   help="decoded [-1, 1] -> uint8: truncate as the originals (published FIDs) or round to the nearest level")
    g.add_argument("--mixed-precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="autocast precision of the network")
    g.add_argument("--allow-tf32", "--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="allow TF32 matmuls and convolutions on Ampere+ GPUs (--tf32 is REPA-E's name)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the guided field (cond/uncond batch, network, guidance) as one graph per step")
    g.add_argument("--compile-mode", type=str, default=None, choices=list(COMPILE_MODES), metavar="MODE",
                   help="torch.compile mode of --compile: reduce-overhead (CUDA graphs of the fixed-shape batches), "
                        "max-autotune, or default (torch's, also when not given)")
    g.add_argument("--decode-precision", type=str, default="fp32", choices=list(DECODE_PRECISIONS),
                   help="tokenizer decode in fp32 (the originals') or under bf16 autocast (faster; other images)")
    g.add_argument("--png-writers", type=int, default=4, metavar="N",
                   help="threads that encode and write the PNGs while the next batch samples (0: inline after each batch)")
    g.add_argument("--device", type=str, default=None, help="default: cuda when available")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="compute metrics of the samples against --ref-batch")
    g.add_argument("--ref-batch", type=str, default=None, help="reference .npz (arr_0 images and/or mu, sigma)")
    g.add_argument("--ref-dir", type=str, default=None,
                   help="reference images for --eval: an image folder (class folders too) or a preprocessing.py "
                        "archive, read at the samples' resolution (instead of --ref-batch)")
    g.add_argument("--metrics", type=str, default=",".join(ALL_METRICS), help=f"comma list of {ALL_METRICS}")
    g.add_argument("--inception-batch-size", type=utils.positive_int, default=100,
                   help="images read per batch when --eval computes features from files (the features do not "
                        "depend on it: Inception runs in fixed --inception-chunk chunks)")
    add_inception_flags(g)
    g.add_argument("--inception-chunk", type=int, default=50, help="fixed Inception batch (figures depend on it at ~1e-6)")
    g.add_argument("--stream-eval", action=argparse.BooleanOptionalAction, default=True,
                   help="Inception features of each batch right after its decode, stored in <folder>/inception_features/ "
                        "(--no-stream-eval: read every sample back after sampling)")
    return p


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """The guidance and sampler flag groups (one definition, read by `samplers.sampler_kwargs_from_args`)."""
    g = p.add_argument_group("guidance")
    g.add_argument("--guidance", type=str, default="cfg", choices=["cfg", "autoguidance"],
                   help="what --cfg-scale scales: classifier-free guidance or autoguidance by --guide-*")
    g.add_argument("--guide-ckpt", type=str, default=None, help="autoguidance: guide checkpoint (with --guide-model)")
    g.add_argument("--guide-model", type=str, default=None, help="autoguidance: guide architecture, e.g. DiTDH-S")
    g.add_argument("--guide-exp-dir", type=str, default=None, help="autoguidance: guide experiment folder")
    g.add_argument("--guide-ckpt-step", type=str, default=None, help="step in --guide-exp-dir (default: latest)")
    g.add_argument("--guide-time-convention", type=str, default="auto", choices=["auto", "data-at-1", "noise-at-1"], help="how the guide network reads t (as --time-convention)")
    g.add_argument("--cfg-legacy-channels", action=argparse.BooleanOptionalAction, default=False,
                   help="hustvl LightningDiT's CFG on latent channels 0..2 only (reproduces its published FIDs)")
    g = p.add_argument_group("sampler")
    g.add_argument("--mode", type=str, default="ode", choices=["ode", "sde"], help="ode (probability flow) or sde (Euler-Maruyama)")
    g.add_argument("--solver", type=str, default="euler", choices=["euler", "heun", "dopri5"], help="ODE solver")
    g.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False,
                   help="same as --solver heun (REPA-E's flag; ODE only)")
    g.add_argument("--num-steps", type=utils.positive_int, default=50, help="sampler steps (time points for --time-grid rae)")
    g.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale, 1 for none (REPA-E's default 1.5)")
    g.add_argument("--guidance-low", type=float, default=0.0, help="guidance only for noise times t >= this")
    g.add_argument("--guidance-high", type=float, default=1.0, help="guidance only for noise times t <= this (REPA-E's recipe: 0.75)")
    g.add_argument("--shift", type=_shift_value, default=None,
                   help="noise-time shift: a number (LightningDiT's data-time 0.3 = 1/0.3 here) or 'auto' "
                        "(RAE: sqrt(C*h*w / 4096)); default: the experiment's sampling shift or 1")
    g.add_argument("--time-grid", type=str, default="uniform", choices=["uniform", "rae"],
                   help="uniform: linspace(1, 0, steps + 1); rae: RAE's shift(1 - linspace(0, 0.999, steps)) (ODE)")
    g.add_argument("--t-last", type=float, default=0.04, help="SDE: last stochastic time before the final mean step")
    g.add_argument("--rtol", type=float, default=1e-5, help="dopri5 relative tolerance")
    g.add_argument("--atol", type=float, default=1e-5, help="dopri5 absolute tolerance")
    g.add_argument("--label-sampling", type=str, default="equal", choices=["random", "equal"],
                   help="random labels, or equal (REPA-E's default): the same count per class, exact for any world size")
    g.add_argument("--per-class-sampling", dest="label_sampling", action="store_const", const="equal",
                   default=argparse.SUPPRESS, help="earlier REPA-E name of --label-sampling equal")
    g.add_argument("--no-per-class-sampling", dest="label_sampling", action="store_const", const="random",
                   default=argparse.SUPPRESS, help="earlier REPA-E name of --label-sampling random")
    g.add_argument("--classes", type=str, default=None,
                   help="comma list of classes to sample, by name (the training data's class folders) or id; "
                        "cycled over --num-fid-samples unless --samples-per-class is given")
    g.add_argument("--samples-per-class", type=utils.positive_int, default=None,
                   help="N samples of each class of --classes (or of every class), in class blocks; sets --num-fid-samples")
    g.add_argument("--class-to-idx", type=str, default=None,
                   help="JSON {class name: id} for --classes and labels.csv (default: the experiment's data, "
                        "archive or latents record)")
    g.add_argument("--global-seed", "--seed", dest="global_seed", type=int, default=0, help="seed of the index-keyed noise and labels")

def _shift_value(v):
    if str(v).lower() == "auto":
        return "auto"
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shift must be a number or 'auto', got {v!r}") from None


def list_recipes() -> List[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")) if RECIPE_DIR.is_dir() else []


def parse_args(argv=None, description: Optional[str] = None):
    """generate.py's arguments: defaults < --recipe file < --config file < explicit flags."""
    parser = build_parser(description)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", type=str, default=None, help="named sampling recipe from configs/sampling/")
    pre.add_argument("--config", type=str, default=None, help="YAML file of flag values (explicit flags win)")
    known, _ = pre.parse_known_args(argv)
    files = []
    if known.recipe:
        path = Path(known.recipe) if known.recipe.endswith(".yaml") else RECIPE_DIR / f"{known.recipe}.yaml"
        if not path.is_file():
            raise SystemExit(f"--recipe {known.recipe}: no {path} (known recipes: {', '.join(list_recipes())})")
        files.append(path)
    if known.config:
        files.append(Path(known.config))
    for path in files:  # the config file's values override the recipe's
        try:
            utils.apply_config_file(parser, path, argv)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    args = parser.parse_args(argv)
    check_args(args)
    if args.heun:
        args.solver = "heun"
    return args


def check_args(args) -> None:
    """Refuse combinations the flags' types cannot (counts are `utils.positive_int`, on the command
    line and in --config / --recipe files alike)."""
    if args.heun and args.mode != "ode":
        raise SystemExit(f"--heun is an ODE solver: it cannot be combined with --mode {args.mode}")
    if args.png_writers < 0:
        raise SystemExit(f"--png-writers must be >= 0 (0: write inline), got {args.png_writers}")
