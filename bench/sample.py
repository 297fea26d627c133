"""Sampling throughput through generate.py's code path (`samplers.sample_batch`: index-keyed noise,
guidance wrapper, sampler, denormalisation and decode) with the published sampling recipes of
configs/sampling/ run unchanged (read by sampling.cli.parse_args, generate.py's own parser, as
`generate.py --recipe NAME`), at generate.py's batch (--per-proc-batch-size, 64 per GPU). One step =
one batch sampled and decoded; with --output, one batch of generate.py's loop (samplers.sample_for_eval
handing the batch to the PNG output, written inline or by the background writer, and with
--stream-eval the batch's Inception features computed and stored).

  python bench/sample.py [--model SiT-XL/2 | LightningDiT-XL/1 | DiTDH-XL] [--recipe NAME]
                         [--mixed-precision bf16] [--compile [--compile-mode reduce-overhead]]
                         [--decode-precision bf16] [--output {inline,writer} [--stream-eval]] [--tiny]

Models and recipes (random weights: throughput does not depend on the values):
  SiT-XL/2           REPA-E SiT, f8d4 VAE latents [4, 32, 32]: repae-sde-250 (SDE 250, CFG 2.5 on t <= 0.75,
                     the published gFID 1.26) and repae-ode-50 (the same with --mode ode --num-steps 50)
  LightningDiT-XL/1  VA-VAE f16d32 latents [32, 16, 16]: lightningdit-euler-250
  DiTDH-XL           RAE DINOv2-B latents [768, 16, 16], ViT-XL pixel decoder: rae-ddt-ode-50 (unguided) and
                     rae-ddt-autoguidance (DiTDH-S guide)
Without CUDA (or with --tiny) a tiny model of the same family runs (N sizes, small latents, batch
8) with the same recipes. Prints one JSON line per recipe (bench/common.py says what each figure
counts).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StepProbe, add_probe_flags, record  # noqa: E402
from models.autoencoder import build_vae  # noqa: E402
from models.diffusion import VelocityModel, build_diffusion_model  # noqa: E402
from models.loading import LatentDecoder  # noqa: E402
from models.rae import RAEDecoder  # noqa: E402
from samplers import COMPILE_MODES, DECODE_PRECISIONS, prepare_decoder, sample_batch, sample_for_eval  # noqa: E402
from samplers import sampler_kwargs_from_args  # noqa: E402
# generate.py's parser: the recipes and defaults read exactly as `generate.py --recipe NAME`
from sampling.cli import parse_args as generate_args  # noqa: E402
from transport import shift_from_dims  # noqa: E402

# name -> CUDA latents and tokenizer, tiny stand-ins, and the recipes: (label, generate.py flags)
MODELS = {
    "SiT-XL/2": dict(latents=(4, 32, 32), vae="f8d4", cpu_model="SiT-N/2", cpu_latents=(4, 8, 8), cpu_vae="tiny-f4d4",
                     recipes={"repae-sde-250": ["--recipe", "repae-sde-250"],
                              "repae-ode-50": ["--recipe", "repae-sde-250", "--mode", "ode", "--num-steps", "50"]}),
    "LightningDiT-XL/1": dict(latents=(32, 16, 16), vae="vavae-f16d32", cpu_model="LightningDiT-N/1",
                              cpu_latents=(32, 2, 2), cpu_vae="tiny-f16d32",
                              recipes={"lightningdit-euler-250": ["--recipe", "lightningdit-euler-250"]}),
    "DiTDH-XL": dict(latents=(768, 16, 16), vae="rae-vit-xl", cpu_model="DiTDH-N", cpu_latents=(32, 4, 4),
                     cpu_vae="rae-tiny", guide="DiTDH-S", cpu_guide="DiTDH-N",
                     recipes={"rae-ddt-ode-50": ["--recipe", "rae-ddt-ode-50"],
                              "rae-ddt-autoguidance": ["--recipe", "rae-ddt-autoguidance"]}),
}


class _RAEPixelDecoder(nn.Module):
    """The RAE pixel decoder alone (the frozen encoder plays no part in sampling), latents
    [B, C, h, w] -> [-1, 1]: the cost of `Tokenizer.decode` for kind rae."""

    def __init__(self, channels: int, grid: int, xl: bool):
        super().__init__()
        size = dict(hidden_size=1152, depth=28, num_heads=16, mlp_dim=4096) if xl else \
            dict(hidden_size=32, depth=1, num_heads=2, mlp_dim=64)
        self.decoder = RAEDecoder(grid * grid, channels, 16 if xl else 8, **size)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        tokens = z.flatten(2).transpose(1, 2)  # [B, N, C]
        return self.decoder(tokens) * 2 - 1


def build_velocity(name: str, latents, num_classes: int, device) -> VelocityModel:
    opts = dict(z_dims=[768], encoder_depth=8 if name.endswith("XL/2") else 2) if name.startswith("SiT") else {}
    net = build_diffusion_model(name, latents, num_classes, 0.1, **opts)
    return VelocityModel(net.to(device).eval(), data_at_one=name.startswith("LightningDiT"))


def _output_step(stack, args, tiny, model, decoder, latents, classes, bs, gen, kw, device, amp):
    """One batch of generate.py's loop: sample_for_eval handing the batch to the PNG writer (and,
    with --stream-eval, its features to the FeatureStore), as generate.main wires them. Batch k
    takes indices k*bs.. so each step writes new files; the writer is closed (drained) at the end."""
    import itertools
    import tempfile

    from evaluation.inception import InceptionFeatures, build_inception
    from sampling.output import FeatureStore, PNGWriter, batch_hooks

    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-sample-")))
    writer = stack.enter_context(PNGWriter(folder, args.png_writers if args.output == "writer" else 0))
    store = None
    if args.stream_eval:
        # tiny: a small input and a chunk of one batch (CPU time); the protocol otherwise
        extractor = InceptionFeatures(build_inception(random_init=True), *((75, bs) if tiny else (299, 50))).to(device)
        store = FeatureStore(folder, extractor, {})
        store.prepare()
    on_decoded, on_batch = batch_hooks(writer, store)
    batches = itertools.count()

    def step():
        start = next(batches) * bs
        sample_for_eval(model, decoder, latents, classes, start + bs, gen.global_seed, bs, kw, device,
                        label_sampling=gen.label_sampling, autocast_dtype=amp, indices=range(start, start + bs),
                        on_batch=on_batch, gather=False, decode_precision=args.decode_precision,
                        on_decoded=on_decoded)

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="SiT-XL/2", choices=list(MODELS), help="stage-2 model family to time")
    p.add_argument("--recipe", default=None, help="one of the model's recipes (default: all of them)")
    p.add_argument("--batch-size", type=int, default=None, help="default: generate.py's --per-proc-batch-size (8 tiny)")
    p.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                   help="default: generate.py's (no)")
    p.add_argument("--compile", action="store_true", help="compile the guided field as generate.py --compile does")
    p.add_argument("--compile-mode", default=None, choices=list(COMPILE_MODES), help="as generate.py's (implies --compile)")
    p.add_argument("--decode-precision", default="fp32", choices=list(DECODE_PRECISIONS), help="as generate.py's")
    p.add_argument("--output", default="none", choices=["none", "inline", "writer"],
                   help="also write each batch's PNGs (to a temporary folder): inline, or by the background writer")
    p.add_argument("--png-writers", type=int, default=4, help="threads of --output writer (generate.py's default)")
    p.add_argument("--stream-eval", action="store_true",
                   help="with --output: Inception features of each batch stored beside its PNGs (random weights)")
    p.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                   help="tiny sizes (default: on without CUDA)")
    add_probe_flags(p)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    tiny = (not cuda) if args.tiny is None else args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    spec = MODELS[args.model]
    model_name = spec["cpu_model"] if tiny else args.model
    latents = spec["cpu_latents"] if tiny else spec["latents"]
    vae_name = spec["cpu_vae"] if tiny else spec["vae"]
    recipes = spec["recipes"]
    if args.recipe is not None and args.recipe not in recipes:
        p.error(f"--recipe {args.recipe}: {args.model} has {sorted(recipes)}")
    classes = 10 if tiny else 1000

    c = latents[0]
    tok = _RAEPixelDecoder(c, latents[1], xl=not tiny) if vae_name.startswith("rae") else build_vae(vae_name)
    decoder = prepare_decoder(LatentDecoder(tok.eval(), torch.zeros(c, 1, 1), torch.ones(c, 1, 1)), device)
    if args.stream_eval and args.output == "none":
        p.error("--stream-eval needs --output inline or writer")
    args.compile = args.compile or args.compile_mode is not None
    model = build_velocity(model_name, latents, classes, device)
    guide = build_velocity(spec["cpu_guide"] if tiny else spec["guide"], latents, classes, device) \
        if "guide" in spec else None
    lines = []
    for name, flags in recipes.items():
        if args.recipe not in (None, name):
            continue
        gen = generate_args(flags + (["--compile"] + (["--compile-mode", args.compile_mode] if args.compile_mode else [])
                                     if args.compile else []))
        kw = sampler_kwargs_from_args(gen)
        kw["path_type"] = gen.path_type or "linear"  # generate.py's resolution of its defaults
        if gen.shift == "auto":
            kw["shift"] = shift_from_dims(c * latents[1] * latents[2])
        if gen.guidance == "autoguidance":
            kw["guide"] = guide
        precision = args.mixed_precision or gen.mixed_precision
        amp = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        bs = args.batch_size or (8 if tiny else gen.per_proc_batch_size)
        probe = StepProbe(args.warmup, args.steps)
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if args.output == "none":
                idx = torch.arange(bs)
                probe.run(lambda: sample_batch(model, decoder, latents, classes, idx, gen.global_seed, kw, device,
                                               gen.label_sampling, amp, decode_precision=args.decode_precision))
            else:
                probe.run(_output_step(stack, args, tiny, model, decoder, latents, classes, bs, gen, kw, device, amp))
        lines.append(record("sample", f"{name} ({model_name} on {'x'.join(map(str, latents))}, decode {vae_name})",
                            bs, probe, recipe=name, model=model_name, tiny=tiny, mixed_precision=precision,
                            compile=args.compile and (args.compile_mode or "default"),
                            decode_precision=args.decode_precision, output=args.output,
                            png_writers=args.png_writers if args.output == "writer" else 0,
                            stream_eval=args.stream_eval))
    return lines


if __name__ == "__main__":
    main()
