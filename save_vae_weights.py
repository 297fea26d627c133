"""Export the tokenizer of a REPA-E or stage-1 (train_stage1.py) training checkpoint.

REPA-E checkpoints (train_repae.py) -> into --output-dir, in the original's key layout (the
original code loads them too):
  <name>.pt                      the VAE state_dict (ckpt["vae"]), loadable with --vae-ckpt
  <name>-latents-stats.pt        {latents_scale, latents_bias} [1, C, 1, 1] from the EMA SiT's
                                 BatchNorm, scale = running_var^-1/2 as the original (init_bn
                                 reads it back exactly; the BN adds its eps when normalising)
  <name>-discriminator-ckpt.pt   the discriminator's own state_dict (`main.*` keys), loadable
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
  python save_vae_weights.py --repae-ckpt exps/NAME/checkpoints/0400000.pt --vae-name e2e-vae --save-dir exps
      (REPA-E's names: writes exps/e2e-vae/e2e-vae.pt and its two companions)

`--format safetensors` writes the weights and the discriminator as `.safetensors` instead (tensors
only: a file that can never run code when loaded; every loader here reads it). The taming layout
becomes one flat state dict with `global_step` in the file's metadata. Latent statistics stay `.pt`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import utils
from models.autoencoder import build_vae
from models.vae_loading import save_latents_stats
from models.discriminators import discriminator_state_dict_from_checkpoint
from models.sit import bn_latent_stats
from models.tokenizers import describe_model, write_export_description


def save_weights(state: dict, path: Path, fmt: str = "pt", metadata: dict | None = None) -> Path:
    """Write a state dict as `path` (.pt, the originals' release format) or, with fmt
    "safetensors", as `path` with the suffix .safetensors (flat tensors only). Returns the path."""
    if fmt == "pt":
        utils.atomic_save(state if metadata is None else {"state_dict": state, **metadata}, path)
        return path
    from safetensors.torch import save as safetensors_bytes

    other = [k for k, v in state.items() if not torch.is_tensor(v)]
    if other:
        raise ValueError(f"{path.with_suffix('.safetensors')}: safetensors holds tensors only, but {other[:5]} are not")
    # clone: safetensors refuses tensors that share memory (tied weights)
    blob = safetensors_bytes({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
                             metadata={k: str(v) for k, v in (metadata or {}).items()})
    path = path.with_suffix(".safetensors")
    utils.atomic_write(path, lambda f: f.write(blob), "wb")
    return path


def latent_stats_from_ema(ema_state: dict) -> dict:
    """{latents_scale, latents_bias} of the EMA SiT's BatchNorm in REPA-E's convention
    (scale = running_var^-1/2, no eps), nothing else: the released files hold just these two."""
    for key in ("bn.running_mean", "bn.running_var"):
        if key not in ema_state:
            raise KeyError(f"EMA state has no '{key}': not a REPA-E SiT checkpoint")
    stats = bn_latent_stats(ema_state["bn.running_mean"], ema_state["bn.running_var"], 0.0)
    return {k: stats[k] for k in ("latents_scale", "latents_bias")}


def repae_description(ckpt: dict):
    """The REPA-E VAE's description: its `--vae` preset (REPA-E VAEs are RGB KL-VAEs)."""
    preset = (ckpt.get("args") or {}).get("vae")
    return None if preset is None else describe_model("kl", build_vae(preset))


def export(ckpt_path: str | Path, output_dir: str | Path, name: str, ckpt: dict | None = None, fmt: str = "pt") -> dict:
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
    paths["vae"] = save_weights(ckpt["vae"], paths["vae"], fmt)
    save_latents_stats(paths["stats"], **latent_stats_from_ema(ckpt["ema"]))
    paths["description"] = write_export_description(paths["vae"], repae_description(ckpt), stats=paths["stats"])
    # our checkpoints keep the whole loss module (keys `discriminator.main.*` + LeCam buffers); the
    # original's file is the bare discriminator state_dict
    disc = discriminator_state_dict_from_checkpoint(ckpt["discriminator"], f"{ckpt_path}['discriminator']")
    paths["discriminator"] = save_weights(dict(disc), paths["discriminator"], fmt)
    return paths


def export_stage1(ckpt: dict, ckpt_path, output_dir: str | Path, name: str, weights: str = "auto",
                  fmt: str = "pt") -> dict:
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
        paths["tokenizer"] = save_weights(sd, paths["tokenizer"], fmt)
    elif kind == "vqgan":
        disc = {f"loss.{k}": v for k, v in ckpt["loss"].items() if k.startswith("discriminator.")}
        paths["tokenizer"] = save_weights({**sd, **disc}, paths["tokenizer"], fmt, {"global_step": ckpt["steps"]})
    elif kind == "rae":
        paths["tokenizer"] = save_weights({k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")},
                                          paths["tokenizer"], fmt)
        if ckpt.get("latent_stats") is not None:
            paths["stats"] = output_dir / f"{name}-stats.pt"
            utils.atomic_save(ckpt["latent_stats"], paths["stats"])
    else:
        raise KeyError(f"{ckpt_path}: unknown tokenizer kind {kind!r}")
    paths["discriminator"] = save_weights(ckpt["loss"], paths["discriminator"], fmt)
    paths["description"] = write_export_description(paths["tokenizer"], ckpt.get("tokenizer_config"), paths.get("stats"))
    print(f"exported the {kind} tokenizer's {source} weights of step {ckpt['steps']}")
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="save_vae_weights.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=str, default=None, help="YAML file of flag values (flags given explicitly win)")
    p.add_argument("--ckpt", "--repae-ckpt", dest="ckpt", type=str, default=None,
                   help="checkpoint file (or use --exp-dir and --step; --repae-ckpt: REPA-E's name)")
    p.add_argument("--exp-dir", type=str, default=None, help="train_repae.py or train_stage1.py experiment folder")
    p.add_argument("--step", type=str, default="latest", help="step number or 'latest'")
    p.add_argument("--output-dir", type=str, default="pretrained", help="where the three files are written")
    p.add_argument("--save-dir", type=str, default=None,
                   help="REPA-E's layout: write into <save-dir>/<name>/ (overrides --output-dir)")
    p.add_argument("--name", "--vae-name", dest="name", type=str, default="e2e-vae",
                   help="file name stem of the exported files (--vae-name: REPA-E's name)")
    p.add_argument("--weights", type=str, default="auto", choices=["auto", "ema", "model"],
                   help="stage-1 runs: export the EMA (auto: when present) or the trained weights")
    p.add_argument("--format", type=str, default="pt", choices=["pt", "safetensors"],
                   help="file format of the exported weights: pt (the originals' release format) or safetensors (tensors only)")
    return p


def main(argv=None):
    p = build_parser()
    args = utils.parse_args_with_config(p, argv)
    if args.save_dir is not None:
        args.output_dir = str(Path(args.save_dir) / args.name)
    if args.ckpt is None:
        if args.exp_dir is None:
            p.error("give --ckpt (--repae-ckpt) or --exp-dir")
        ckpt_path = utils.resolve_resume(Path(args.exp_dir) / "checkpoints", args.step, "--step")
        if ckpt_path is None:
            p.error(f"no checkpoints in {Path(args.exp_dir) / 'checkpoints'}")
    else:
        ckpt_path = Path(args.ckpt)
    try:
        ckpt = utils.load_checkpoint_file(ckpt_path)
        if isinstance(ckpt, dict) and "tokenizer" in ckpt:
            paths = export_stage1(ckpt, ckpt_path, args.output_dir, args.name, args.weights, args.format)
        else:
            paths = export(ckpt_path, args.output_dir, args.name, ckpt, args.format)
    except (FileNotFoundError, KeyError, RuntimeError, ValueError) as e:
        p.error(str(e))
    for kind, path in paths.items():
        if path is not None:
            print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
