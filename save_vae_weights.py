"""Export the tokenizer of a REPA-E or stage-1 (train_stage1.py) training checkpoint.

REPA-E checkpoints (train_repae.py) -> into --output-dir:
  <name>.pt                      the VAE state_dict (ckpt["vae"]), loadable with --vae-ckpt
  <name>-latents-stats.pt        latents_scale / latents_bias [1, C, 1, 1] from the EMA SiT's
                                 BatchNorm, scale = (running_var + eps)^-1/2 so that
                                 (z - bias) * scale is exactly eval-mode BN; `bn_eps` records it
  <name>-discriminator-ckpt.pt   the loss module state (discriminator + LeCam buffers), loadable
                                 with --disc-pretrained-ckpt

Stage-1 checkpoints (train_stage1.py; recognised by their 'tokenizer' entry) -> the ORIGINAL's
release format, from the EMA weights when the run kept an EMA (--weights model for the raw ones):
  kl / vavae  <name>.pt                     the AutoencoderKL state_dict (VA-VAE keys, linear_proj
                                            included); <name>-latents-stats.pt comes from cache_latents.py
  vqgan       <name>.pt                     taming layout {'state_dict': VQModel keys + loss.discriminator.*}
  rae         <name>.pt                     the decoder state_dict in the released key layout
              <name>-stats.pt               {mean, var} latent statistics, when the run had them
  all         <name>-discriminator-ckpt.pt  the loss module state (discriminator)

Beside the weights, `<name>.json` describes them (kind, architecture with channels and VF width,
statistics file): `--vae-ckpt <name>.pt` alone rebuilds the tokenizer in every consumer
(`models.tokenizers.load_tokenizer`). The weights file itself stays in the original's layout.

  python save_vae_weights.py --exp-dir exps/NAME --step 400000 --name e2e-vae --output-dir pretrained
"""
from __future__ import annotations

import argparse
from pathlib import Path


import utils
from models.autoencoder import build_vae, save_latents_stats
from models.tokenizers import describe_model, write_export_description
from models.sit import SIT_BN_EPS, bn_latent_stats

def latent_stats_from_ema(ema_state: dict) -> dict:
    for key in ("bn.running_mean", "bn.running_var"):
        if key not in ema_state:
            raise KeyError(f"EMA state has no '{key}': not a REPA-E SiT checkpoint")
    return bn_latent_stats(ema_state["bn.running_mean"], ema_state["bn.running_var"], SIT_BN_EPS)


def repae_description(ckpt: dict):
    """The REPA-E VAE's description: its `--vae` preset (REPA-E VAEs are RGB KL-VAEs)."""
    preset = (ckpt.get("args") or {}).get("vae")
    return None if preset is None else describe_model("kl", build_vae(preset))


def export(ckpt_path: str | Path, output_dir: str | Path, name: str, ckpt: dict | None = None) -> dict:
    ckpt = utils.load_checkpoint_file(ckpt_path) if ckpt is None else ckpt
    for key in ("vae", "ema", "discriminator"):
        if key not in ckpt:
            raise KeyError(f"{ckpt_path} has no '{key}' entry (has {sorted(ckpt)}): not a train_repae.py checkpoint")
    output_dir = Path(output_dir)
    paths = {
        "vae": output_dir / f"{name}.pt",
        "stats": output_dir / f"{name}-latents-stats.pt",
        "discriminator": output_dir / f"{name}-discriminator-ckpt.pt",
    }
    utils.atomic_save(ckpt["vae"], paths["vae"])
    save_latents_stats(paths["stats"], **latent_stats_from_ema(ckpt["ema"]))
    paths["description"] = write_export_description(paths["vae"], repae_description(ckpt), stats=paths["stats"])
    utils.atomic_save(ckpt["discriminator"], paths["discriminator"])
    return paths


def export_stage1(ckpt: dict, ckpt_path, output_dir: str | Path, name: str, weights: str = "auto") -> dict:
    """Write a train_stage1.py checkpoint's tokenizer in its original release format."""
    kind = ckpt["tokenizer"]
    for key in ("model", "loss"):
        if key not in ckpt:
            raise KeyError(f"{ckpt_path} has no '{key}' entry (has {sorted(ckpt)}): not a train_stage1.py checkpoint")
    if weights == "ema" and "ema" not in ckpt:
        raise KeyError(f"--weights ema: {ckpt_path} holds no EMA (the run had --ema-decay 0)")
    source = "ema" if weights in ("auto", "ema") and "ema" in ckpt else "model"
    sd = ckpt[source]
    output_dir = Path(output_dir)
    paths = {"tokenizer": output_dir / f"{name}.pt", "discriminator": output_dir / f"{name}-discriminator-ckpt.pt"}
    if kind in ("kl", "vavae"):
        utils.atomic_save(sd, paths["tokenizer"])
    elif kind == "vqgan":
        disc = {f"loss.{k}": v for k, v in ckpt["loss"].items() if k.startswith("discriminator.")}
        utils.atomic_save({"state_dict": {**sd, **disc}, "global_step": ckpt["steps"]}, paths["tokenizer"])
    elif kind == "rae":
        utils.atomic_save({k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}, paths["tokenizer"])
        if ckpt.get("latent_stats") is not None:
            paths["stats"] = output_dir / f"{name}-stats.pt"
            utils.atomic_save(ckpt["latent_stats"], paths["stats"])
    else:
        raise KeyError(f"{ckpt_path}: unknown tokenizer kind {kind!r}")
    utils.atomic_save(ckpt["loss"], paths["discriminator"])
    paths["description"] = write_export_description(paths["tokenizer"], ckpt.get("tokenizer_config"), paths.get("stats"))
    print(f"exported the {kind} tokenizer's {source} weights of step {ckpt['steps']}")
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(prog="save_vae_weights.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=str, default=None, help="YAML file of flag values (flags given explicitly win)")
    p.add_argument("--ckpt", type=str, default=None, help="checkpoint file (or use --exp-dir and --step)")
    p.add_argument("--exp-dir", type=str, default=None, help="train_repae.py or train_stage1.py experiment folder")
    p.add_argument("--step", type=str, default="latest", help="step number or 'latest'")
    p.add_argument("--output-dir", type=str, default="pretrained", help="where the three files are written")
    p.add_argument("--name", type=str, default="e2e-vae", help="file name stem of the exported files")
    p.add_argument("--weights", type=str, default="auto", choices=["auto", "ema", "model"],
                   help="stage-1 runs: export the EMA (auto: when present) or the trained weights")
    args = utils.parse_args_with_config(p, argv)
    if args.ckpt is None:
        if args.exp_dir is None:
            p.error("give --ckpt or --exp-dir")
        ckpt_path = utils.resolve_resume(Path(args.exp_dir) / "checkpoints", args.step, "--step")
        if ckpt_path is None:
            p.error(f"no checkpoints in {Path(args.exp_dir) / 'checkpoints'}")
    else:
        ckpt_path = Path(args.ckpt)
    try:
        ckpt = utils.load_checkpoint_file(ckpt_path)
        if isinstance(ckpt, dict) and "tokenizer" in ckpt:
            paths = export_stage1(ckpt, ckpt_path, args.output_dir, args.name, args.weights)
        else:
            paths = export(ckpt_path, args.output_dir, args.name, ckpt)
    except (FileNotFoundError, KeyError, RuntimeError) as e:
        p.error(str(e))
    for kind, path in paths.items():
        if path is not None:
            print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
