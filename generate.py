"""Sample a trained latent diffusion transformer for FID: distributed, resumable, index-keyed.

  torchrun --nproc_per_node 8 generate.py --exp-dir exps/NAME --ckpt-step 400000 --recipe repae-sde-250 --eval --ref-batch VIRTUAL_imagenet256_labeled.npz
  accelerate launch --multi_gpu generate.py ...      |      python generate.py ...   (one process)
  REPA-E's own command works as is: its names (--exp-path, --train-steps, --pproc-batch-size, --tf32)
  are aliases of ours and its defaults hold (--cfg-scale 1.5, 128 per process, equal labels).

Model sources
* `--exp-dir` of `train_repae.py` (SiT + its tuned VAE and latent statistics) or of
  `train_ldm_only.py` (SiT / LightningDiT / DiT^DH: the checkpoint's `model_config` rebuilds the
  network, its `latent_stats` {mean, std} denormalise, its `tokenizer` record names the tokenizer,
  rebuilt from the run's flags or from --tokenizer/--vae/--vae-ckpt/--rae-config, and refused when
  its weight fingerprint differs from the recorded one). EMA weights unless --no-ema.
* `--ckpt FILE --model NAME`, the released checkpoints:
  - REPA-E SiT (`--vae f8d4 --vae-ckpt e2e-vae.pt`, statistics from the checkpoint, --vae-stats or
    the SiT's BatchNorm);
  - the ORIGINAL SiT / DiT-style releases (final layer with 2C outputs, `learn_sigma`: the first C
    are used; no projectors, no BatchNorm: give --vae-stats or --latent-scale 0.18215 for SD-VAE);
  - hustvl LightningDiT (`--model LightningDiT-XL/1 --tokenizer vavae --vae vavae-f16d32
    --vae-ckpt vavae.pt --vae-stats latents_stats.pt` with {mean, std} [1, 32, 1, 1];
    `--recipe lightningdit-euler-250`, `--cfg-legacy-channels` for the original's CFG on the
    first 3 channels only);
  - RAE DiT^DH / LightningDiT (`--model DiTDH-XL --tokenizer rae --rae-config cfg.yaml`,
    per-position {mean, var} statistics (std = sqrt(var + 1e-5)) from the config or --vae-stats;
    `--recipe rae-ddt-ode-50`).
  Network options (qk-norm, SwiGLU, RMSNorm, RoPE, Gaussian-Fourier time, learn_sigma, projector
  widths, label table size) are read off the state_dict, which is then loaded strictly.

Time convention. The samplers work in the toolkit's convention (t = 1 noise, v = eps - x);
networks trained with t = 1 as DATA (target x - eps) are evaluated as -net(x, 1 - t, y)
(`models.diffusion.VelocityModel(data_at_one=True)`), chosen by --time-convention (auto: data-at-1
for hustvl LightningDiT and for learn_sigma SiT releases, noise-at-1 otherwise).
Verified here: the adapter itself (an analytic field integrated both ways gives the same
endpoint, tests/test_generate.py) and hustvl LightningDiT's convention (its spec: x_t = t x1 +
(1 - t) eps). ASSUMED, not checked against released weights (no network here): that the original
SiT release was trained with SiT's default linear ICPlan, x_t = t x1 + (1 - t) x0 (t = 1 data),
target x1 - x0 — if samples of such a checkpoint are noise, try --time-convention noise-at-1.

Guidance: classifier-free (`--cfg-scale` inside [--guidance-low, --guidance-high] of noise time,
the batch doubled only there) or autoguidance (`--guidance autoguidance --guide-ckpt FILE
--guide-model NAME` or `--guide-exp-dir DIR`): v = g + s (m - g) with the main and the guide
model each run once per step on the conditional rows only (RAE's sampler runs both on a doubled
batch and discards half). `--time-grid rae` integrates on RAE's grid shift(1 - linspace(0, 0.999,
K)) (K = --num-steps points) with `--shift auto` = sqrt(C h w / 4096).

Randomness is keyed by sample index, never by rank: sample i's initial noise, label and SDE noise
come from a counter-based generator (splitmix64 + Box-Muller) of (seed, i, stream, element),
drawn for the whole batch at once. The images are therefore identical for any number of
processes, any batch size and on CPU or GPU (up to the model's floating point).

Output: `<sample-dir>/<folder>/{index:06d}.png` (written atomically; `<folder>` is REPA-E's
EXP_STEP_cfgS-LOW-HIGH-labelsampling-L for an experiment), the folder's `sampling_config.json` (a
folder holding samples of another configuration — sampler, model family, time convention, guide,
tokenizer fingerprint, uint8 conversion... — is refused), `labels.npy` / `labels.csv` (every
sample's class) and `<sample-dir>/<folder>.npz` with `arr_0` uint8 [N, H, W, 3] (1-channel
tokenizers: [N, H, W, 1]) for the ADM evaluator, exactly samples 0..N-1. Images are truncated to
uint8 as the originals (`--uint8-conversion round` rounds). A restarted run only generates the
missing indices. `--classes` / `--samples-per-class` choose the labels by class name or id. `--eval` computes FID/sFID/IS/KID/precision/recall in-process (evaluation.metrics, the
same code the trainers call). Trainers sample for periodic FID through `samplers.sample_for_eval`,
the function this script's loop runs; the models come from `models.loading`, the guidance and the
index-keyed randomness from `samplers`.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

import utils
from evaluation.metrics import barrier, broadcast_object, dist_info, evaluate_samples
from models.lightningdit import LEGACY_CFG_CHANNELS
from models.loading import experiment_class_names, load_guide, load_models
from sampling import cli
from sampling.output import FeatureStore, PNGWriter, batch_hooks, extractor_identity
from samplers import class_label_table, index_labels, prepare_decoder, sample_for_eval, sampler_kwargs_from_args

PNG_RE = re.compile(r"^(\d{6,})\.png$")
RNG_VERSION = "splitmix64-boxmuller-v1"
# Keys of sampling_config.json that do not change the images (may differ between runs).
NON_IDENTITY_KEYS = {"num_fid_samples", "per_proc_batch_size", "world_size", "created"}


# ------------------------------------------------------------------------------------------------
# Output folder: identity check, resume scan, npz
# ------------------------------------------------------------------------------------------------
def sampling_identity(args, info) -> dict:
    """Everything that changes the images. Keys introduced after the first release (family, time
    convention, tokenizer fingerprint, time grid, legacy CFG channels, guidance) are written only
    when they differ from the REPA-E SiT defaults, so older folders still resume; a folder made
    with any of them set is refused by a run without it and vice versa."""
    cfg = {
        "checkpoint": info["checkpoint"], "use_ema": not args.no_ema, "model": args.model, "resolution": args.resolution,
        "num_classes": args.num_classes,
        "vae": info["vae"] if info.get("tokenizer_fingerprint") else args.vae, "vae_weights": info.get("vae_weights", info.get("vae")), "latent_stats": info["latent_stats"],
        "mode": args.mode, "solver": args.solver if args.mode == "ode" else "euler-maruyama", "num_steps": args.num_steps,
        "cfg_scale": args.cfg_scale, "guidance_low": args.guidance_low, "guidance_high": args.guidance_high,
        "shift": args.shift, "path_type": args.path_type, "label_sampling": args.label_sampling, "seed": args.global_seed,
        "mixed_precision": args.mixed_precision, "rng": RNG_VERSION,
        # always written: folders from before truncation became the default hold rounded images
        "uint8_conversion": args.uint8_conversion,
    }
    if args.mode == "sde":
        cfg["t_last"] = args.t_last
    if args.mode == "ode" and args.solver == "dopri5":
        cfg.update(rtol=args.rtol, atol=args.atol)
    if info.get("family", "sit") != "sit":
        cfg["family"] = info["family"]
    if info.get("data_at_one"):
        cfg["time_convention"] = "data-at-1"
    if info.get("tokenizer_fingerprint"):
        cfg["tokenizer_fingerprint"] = info["tokenizer_fingerprint"]
    if args.time_grid != "uniform":
        cfg["time_grid"] = args.time_grid
    if args.cfg_legacy_channels:
        cfg["cfg_channels"] = LEGACY_CFG_CHANNELS
    if args.decode_precision != "fp32":
        cfg["decode_precision"] = args.decode_precision
    if info.get("guide"):
        cfg["guidance"] = "autoguidance"
        cfg["guide"] = info["guide"]
    if args.classes or args.samples_per_class:  # a label table replaces label_sampling
        cfg["classes"] = list(args.classes) if args.classes else "all"
        cfg["samples_per_class"] = args.samples_per_class
    return cfg


def default_folder_name(args, info) -> str:
    """REPA-E's name for an experiment folder (`--exp-path`), so the `.npz` lands where its users'
    scripts look; for a checkpoint file, a name that spells out the sampler."""
    labels = f"labelsampling-{args.label_sampling}"
    if args.classes or args.samples_per_class:
        chosen = list(args.classes) if args.classes else []
        ids = "-".join(str(c) for c in chosen) if len(chosen) <= 8 else f"{len(chosen)}"
        labels = f"classes-{ids or 'all'}" + (f"-per-class-{args.samples_per_class}" if args.samples_per_class else "")
    if args.exp_dir and "step" in info:
        return (f"{Path(args.exp_dir).resolve().name}_{info['step']:07d}_cfg{float(args.cfg_scale)}"
                f"-{float(args.guidance_low)}-{float(args.guidance_high)}-{labels}")
    ckpt = f"{info['step']:07d}" if "step" in info else Path(info["checkpoint"]).stem
    solver = args.solver if args.mode == "ode" else "sde"
    guide = f"-ag-{info['guide']['model']}" if info.get("guide") else ""
    name = (f"{args.model.replace('/', '-')}-{ckpt}-size-{args.resolution}-{solver}-{args.num_steps}"
            f"{'-raegrid' if args.time_grid == 'rae' else ''}"
            f"-cfg-{args.cfg_scale}-{args.guidance_low}-{args.guidance_high}{guide}-shift-{args.shift:g}"
            f"-{labels.replace('labelsampling-', '')}-seed-{args.global_seed}")
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def check_or_write_config(folder: Path, identity: dict, extra: dict) -> None:
    """Refuse a folder whose stored configuration differs; otherwise (re)write it. Rank 0 only."""
    cfg_file = folder / "sampling_config.json"
    if cfg_file.is_file():
        old = json.loads(cfg_file.read_text())
        diffs = [f"{k}: stored {old.get(k)!r} vs now {v!r}" for k, v in identity.items()
                 if k not in NON_IDENTITY_KEYS and old.get(k) != v]
        diffs += [f"{k}: stored {old[k]!r} vs now (absent)" for k in old if k not in identity and k not in NON_IDENTITY_KEYS]
        if diffs:
            raise SystemExit(f"{folder} holds samples from a different sampling configuration; refusing to mix them:\n  "
                             + "\n  ".join(diffs) + "\nchoose another --sample-dir/--folder-name or delete the folder")
    elif folder.is_dir() and any(PNG_RE.match(p.name) for p in folder.iterdir()):
        raise SystemExit(f"{folder} holds PNG samples but no sampling_config.json: cannot tell their configuration; "
                         f"refusing to mix them (choose another --sample-dir/--folder-name)")
    folder.mkdir(parents=True, exist_ok=True)
    utils.remove_stale_temp_files(folder)  # interrupted writes of an earlier run (rank 0, before any rank writes)
    utils.atomic_write_text(json.dumps(identity | extra, indent=2, sort_keys=True) + "\n", cfg_file)


def finished_indices(folder: Path, n: int) -> set:
    done = set()
    for p in folder.iterdir():
        m = PNG_RE.match(p.name)
        if m and int(m.group(1)) < n:
            done.add(int(m.group(1)))
    return done


def npz_image_count(path: Path) -> Optional[int]:
    """Number of images in an `.npz`'s arr_0, read from its header; None when there is no
    readable file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape = read(f)[0]
            return int(shape[0]) if shape else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def reference_for_eval(args, sample_file: Path):
    """--ref-batch as given, or --ref-dir read as a dataset at the resolution of the samples
    (`sample_file`) through the training readers (a folder of class folders, an archive)."""
    if args.ref_batch:
        return args.ref_batch
    from PIL import Image

    from datasources import build_image_dataset, image_channels_on_disk

    with Image.open(sample_file) as im:
        resolution = im.size[0]
    return build_image_dataset(args.ref_dir, resolution, channels=image_channels_on_disk(Path(args.ref_dir)) or 3)


def resolve_classes(spec: str, names: Dict[int, str], num_classes: int) -> List[int]:
    """--classes "user_03,user_17" or "3,17" -> ids; an unknown name is refused, listing the known ones."""
    by_name = {v: k for k, v in sorted(names.items(), reverse=True)}
    ids = []
    for token in (t.strip() for t in str(spec).split(",")):
        if not token:
            continue
        if token in by_name:
            ids.append(by_name[token])
        elif token.lstrip("-").isdigit() and 0 <= int(token) < num_classes:
            ids.append(int(token))
        else:
            known = ", ".join(names[i] for i in sorted(names)[:20]) + (" ..." if len(names) > 20 else "")
            raise SystemExit(f"--classes: unknown class {token!r} (the model has {num_classes} classes: {known}; "
                             f"--class-to-idx FILE names them)")
    if not ids:
        raise SystemExit(f"--classes {spec!r}: no class given")
    return ids


def write_labels(folder: Path, labels: np.ndarray, names: Dict[int, str]) -> None:
    """`labels.npy` (int64 [N]) and `labels.csv` (index, class id, class name, file) beside the
    PNGs, so the samples can serve as labelled training data."""
    import csv
    import io

    utils.atomic_write(folder / "labels.npy", lambda f: np.save(f, np.asarray(labels, dtype=np.int64)), "wb")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "class_id", "class_name", "file"])
    for i, y in enumerate(labels.tolist()):
        w.writerow([i, y, names.get(int(y), str(y)), f"{i:06d}.png"])
    utils.atomic_write_text(buf.getvalue(), folder / "labels.csv")


def write_npz(folder: Path, n: int) -> Path:
    """Stack {0..n-1}.png into `<folder>.npz` (arr_0 uint8 [N, H, W, C], C = 3, or 1 for
    1-channel tokenizers), atomically."""
    from PIL import Image
    from tqdm.auto import tqdm

    out = folder.with_name(folder.name + ".npz")
    arr = None
    for i in tqdm(range(n), desc="building .npz", dynamic_ncols=True):
        with Image.open(folder / f"{i:06d}.png") as im:
            a = np.asarray(im if im.mode in ("L", "RGB") else im.convert("RGB"))
        if a.ndim == 2:
            a = a[..., None]
        if arr is None:
            arr = np.empty((n, *a.shape), dtype=np.uint8)
        arr[i] = a
    tmp = out.with_name(f".{out.stem}.tmp.npz")
    with open(tmp, "wb") as f:
        np.savez(f, arr_0=arr)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------------------
# CLI (sampling.cli: one definition of the flags, read by bench/sample.py too)
# ------------------------------------------------------------------------------------------------
def build_parser():
    """generate.py's parser (the flags are defined in sampling.cli)."""
    return cli.build_parser(description=__doc__.split("\n\n")[0])


def parse_args(argv=None):
    """Defaults < --recipe file < --config file < explicit flags (sampling.cli.parse_args)."""
    return cli.parse_args(argv, description=__doc__.split("\n\n")[0])


def setup_distributed(device_arg: Optional[str]):
    """torchrun / accelerate launch set WORLD_SIZE, RANK, LOCAL_RANK; one process otherwise."""
    use_cpu = device_arg == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") \
        or not torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        if not use_cpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="gloo" if use_cpu else "nccl")
    if device_arg:
        device = torch.device(device_arg if device_arg != "cuda" else f"cuda:{local_rank}")
    else:
        device = torch.device("cpu") if use_cpu else torch.device("cuda", local_rank)
    return device


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = setup_distributed(args.device)
    rank, world = dist_info()
    log = (lambda msg: print(f"[generate] {msg}", flush=True)) if rank == 0 else (lambda msg: None)
    if device.type == "cuda" and args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.eval and not (args.ref_batch or args.ref_dir):
        raise SystemExit("--eval needs --ref-batch (a reference .npz) or --ref-dir (an image folder or archive)")
    if args.ref_batch and args.ref_dir:
        raise SystemExit("give one reference: --ref-batch or --ref-dir, not both")
    for flag, path in (("--ref-batch", args.ref_batch), ("--ref-dir", args.ref_dir)):
        if path and not Path(path).exists():
            raise SystemExit(f"{flag} {path}: no such file or folder")
    has_guide = bool(args.guide_ckpt or args.guide_exp_dir)
    if args.guidance == "autoguidance" and not has_guide:
        raise SystemExit("--guidance autoguidance needs a guide: --guide-ckpt FILE --guide-model NAME or --guide-exp-dir DIR")
    if has_guide and args.guidance != "autoguidance":
        args.guidance = "autoguidance"  # a guide given means autoguidance (--cfg-scale is its scale)

    setup = load_models(args, log)
    guide = None
    if has_guide:
        guide, setup.info["guide"] = load_guide(args, setup, log)
    if args.shift is None:
        args.shift = float(setup.default_shift) if setup.default_shift is not None else 1.0
    elif args.shift == "auto":
        from transport import shift_from_dims

        args.shift = shift_from_dims(int(np.prod(setup.latent_shape)))
    args.path_type = args.path_type or "linear"
    class_names = experiment_class_names(args, setup.num_classes)
    label_table = None
    if args.classes or args.samples_per_class:
        chosen = resolve_classes(args.classes, class_names, setup.num_classes) if args.classes \
            else list(range(setup.num_classes))
        if args.samples_per_class:
            args.num_fid_samples = args.samples_per_class * len(chosen)
        label_table = class_label_table(chosen, args.num_fid_samples, args.samples_per_class)
        args.classes = chosen  # ids: part of the folder's identity
        log(f"classes {', '.join(f'{c} ({class_names.get(c, c)})' for c in chosen)}: "
            f"{args.num_fid_samples} samples" + (f", {args.samples_per_class} per class" if args.samples_per_class else ""))
    model, decoder = setup.model.to(device), prepare_decoder(setup.decoder, device)
    if guide is not None:
        guide = guide.to(device)
    extractor = store = None
    if args.eval:
        from evaluation.inception import InceptionFeatures, build_inception

        extractor = InceptionFeatures(build_inception(args.inception_weights, random_init=args.random_init_inception),
                                      args.inception_image_size, args.inception_chunk).to(device)
    amp = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]

    # ---- output folder (rank 0 decides; everyone scans before anyone writes)
    sample_dir = Path(args.sample_dir)
    folder = sample_dir / (args.folder_name or default_folder_name(args, setup.info))
    identity = sampling_identity(args, setup.info)
    if args.eval and args.stream_eval:  # features of each batch on the device, stored beside its PNGs
        store = FeatureStore(folder, extractor, extractor_identity(args.inception_weights, args.random_init_inception,
                                                                   extractor, device), rank)
    error = None
    if rank == 0:
        try:
            check_or_write_config(folder, identity, {"num_fid_samples": args.num_fid_samples, "world_size": world,
                                                     "per_proc_batch_size": args.per_proc_batch_size})
            if store is not None:
                store.prepare()
        except SystemExit as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise SystemExit(error)
    n = args.num_fid_samples
    done = finished_indices(folder, n)
    barrier()
    todo = [i for i in range(n) if i not in done]
    if label_table is None and args.label_sampling == "equal" and n % args.num_classes:
        log(f"note: {n} samples over {args.num_classes} classes: counts differ by one between classes")
    guidance = (f"autoguidance {args.cfg_scale}" if guide is not None else f"cfg {args.cfg_scale}") + \
        f" in [{args.guidance_low}, {args.guidance_high}]"
    log(f"{folder}: {len(done)} of {n} samples exist, {len(todo)} to generate on {world} process(es) "
        f"({args.mode}{'' if args.mode == 'sde' else '/' + args.solver}, {args.num_steps} steps, {args.time_grid} grid, "
        f"{guidance}, shift {args.shift:g}, device {device})")

    kw = sampler_kwargs_from_args(args)
    kw["guide"] = guide
    t0 = time.time()
    with PNGWriter(folder, args.png_writers) as writer:  # every file finished on leaving (before the .npz)
        on_decoded, on_batch = batch_hooks(writer, store)  # PNGs written while the next batch samples
        sample_for_eval(model, decoder, setup.latent_shape, setup.num_classes, n, args.global_seed,
                        args.per_proc_batch_size, kw, device, label_sampling=args.label_sampling, autocast_dtype=amp,
                        labels=label_table, indices=todo, on_batch=on_batch, gather=False, progress=rank == 0,
                        uint8_conversion=args.uint8_conversion, decode_precision=args.decode_precision,
                        on_decoded=on_decoded)
    elapsed = time.time() - t0
    barrier()
    result = {"folder": str(folder), "generated": len(todo), "existing": len(done), "seconds": elapsed,
              "samples_per_s": len(todo) / max(elapsed, 1e-9)}
    npz = folder.with_name(folder.name + ".npz")
    # a folder may hold more samples than asked for (an earlier, larger run): the .npz holds exactly
    # samples 0..n-1, rewritten whenever it holds another count
    if rank == 0 and not args.no_npz and (todo or npz_image_count(npz) != n):
        npz = write_npz(folder, n)
        log(f"wrote {npz} (arr_0 [{n}, H, W, C])")
    if rank == 0:
        labels = label_table[:n] if label_table is not None else \
            index_labels(args.global_seed, torch.arange(n), setup.num_classes, args.label_sampling)
        write_labels(folder, labels.numpy(), class_names)
        log(f"wrote {folder / 'labels.npy'} and {folder / 'labels.csv'} (class of every sample)")
    barrier()
    if not args.no_npz:
        result["npz"] = str(npz)
    if args.eval:
        from evaluation.metrics import format_scores

        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        if store is not None:  # the streamed features; an earlier run's samples without them from their files
            images, feats = None, store.complete(n, args.inception_batch_size, progress=rank == 0)
        else:  # --no-stream-eval: every sample read back from the .npz / PNGs
            images, feats = (str(npz) if not args.no_npz else [folder / f"{i:06d}.png" for i in range(n)]), None
        scores = evaluate_samples(images, reference_for_eval(args, folder / "000000.png"), inception=extractor,
                                  metrics=metrics, batch_size=args.inception_batch_size, device=device,
                                  progress=rank == 0, features=feats)
        result["metrics"] = scores
        if rank == 0:
            ref = {"ref_batch": str(args.ref_batch)} if args.ref_batch else {"ref_dir": str(args.ref_dir)}
            utils.atomic_write_text(json.dumps({**ref, **scores}, indent=2) + "\n", folder / "metrics.json")
            log("metrics: " + format_scores(scores))
    log(f"done: {result['generated']} generated in {elapsed:.1f}s ({result['samples_per_s']:.2f} samples/s)")
    return result


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
