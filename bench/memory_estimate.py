"""Per-GPU memory of the published training configurations, counted on CPU without running them:
does the RAE XL recipe fit in 80 GB, and with which options?

  python bench/memory_estimate.py                 # RAE XL (64/GPU) and REPA-E XL (32/GPU), every option set
  python bench/memory_estimate.py --tiny          # the same at tiny sizes (~30 s per option set; tests/test_bench.py)
  python bench/memory_estimate.py --only rae-xl --precision bf16

Each network is built from the trainers' own builders (train_stage1's build_model / build_loss for
configs/stage1/rae_dinov2b_vitxl_256.yaml, train_repae's build_vae / build_sit / build_loss with
bench/train_repae_step.py's preset) on the meta device, so nothing is allocated, and its tensors
are then made fake CPU tensors (torch FakeTensorMode: shapes, dtypes and autograd, no data). The
step runs as the trainer runs it (its loss functions, autocast, the same phases) on the fake
tensors. Figures per configuration and option set (one JSON line each, bench/common.emit):

* state (exact, analytic): parameters by network and dtype, gradients of the trainable ones (fp32
  master weights under autocast), AdamW's two fp32 moments, the EMA copy, frozen networks, DDP's
  gradient buckets (one more fp32 copy of every DDP-wrapped trainable parameter when world > 1);
* saved activations: bytes of the distinct non-parameter storages autograd saves, per phase
  (generator / discriminator / SiT update), measured at REAL widths and resolution with the
  transformer depth at 2 and 3 and batch 2 and 3 (at 1, a size-1 dimension turns some copies into
  views: a batch of 1 saves less per sample), and extrapolated with the exact bilinear model
  bytes(D, B) = c0 + c1*D + (a + b*D)*B (D-linear: cast weight copies under autocast and
  per-sample activations of each block; B-linear: every per-sample tensor); the same counter at
  the published depth and batch directly (`saved_direct`) checks the extrapolation;
* peak_live: the largest sum of live tensor bytes produced inside the step (activations, their
  gradients, parameter gradients as they appear, temporaries), tracked op by op over the fake
  step at the published size; estimate = persistent state + peak_live.
These are counted lower bounds, not measured peaks (bench/README.md lists what is not modelled).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import yaml  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

GIB = 2**30
# The options each trainer offers against activation memory, and the option sets measured.
OPTION_SETS = {
    "rae": {"default": [], "grad-checkpointing": ["decoder"], "lpips-grad-checkpointing": ["lpips"],
            "all": ["decoder", "lpips"]},
    "repae": {"default": [], "grad-checkpointing": ["sit"], "vae-grad-checkpointing": ["vae"],
              "lpips-grad-checkpointing": ["lpips"], "all": ["sit", "vae", "lpips"]},
}


# ------------------------------------------------------------------------------------------------ counters
def _key(t: torch.Tensor) -> int:
    return StorageWeakRef(t.untyped_storage()).cdata


class SavedStorages:
    """Bytes of the distinct non-parameter storages autograd saves for backward inside the block
    (bench/common.SavedBytes, keyed by storage identity so fake tensors, whose storages have no
    address, are told apart)."""

    def __init__(self, params):
        self.params = {_key(p) for p in params}
        self.storages = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        if torch.is_tensor(t) and t.layout == torch.strided:
            k = _key(t)
            if k not in self.params and k not in self.storages:
                self.storages[k] = (t.untyped_storage().nbytes(), t)  # held: its identity stays unique
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self.storages = {k: (n, None) for k, (n, _) in self.storages.items()}

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.storages.values())


class LiveBytes(TorchDispatchMode):
    """Peak of the summed bytes of live storages produced by the ops run inside (a storage dies
    when no tensor refers to it any more); `phase` names where the peak was reached."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak, self.phase, self.peak_phase = {}, 0, 0, "", ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for k in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(k)[1]
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if torch.is_tensor(t) and t.layout == torch.strided:
                s = t.untyped_storage()
                ref = StorageWeakRef(s)
                if ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, s.nbytes())
                    self.current += s.nbytes()
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.phase
        return out


# ------------------------------------------------------------------------------------------------ fake networks
def to_fake(modules, mode: FakeTensorMode) -> None:
    """Replace every meta parameter and buffer of `modules` by a fake CPU tensor of the same
    shape, dtype and requires_grad (no memory; autograd and autocast see a CPU tensor)."""
    for m in modules:
        for sub in m.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and not isinstance(p, FakeTensor):
                    sub._parameters[name] = nn.Parameter(FakeTensor(mode, p.data.to("meta"), torch.device("cpu")),
                                                         requires_grad=p.requires_grad)
            for name, b in list(sub._buffers.items()):
                if b is not None and not isinstance(b, FakeTensor):
                    sub._buffers[name] = FakeTensor(mode, b.to("meta"), torch.device("cpu"))


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def by_dtype(tensors) -> dict:
    out = {}
    for t in tensors:
        k = str(t.dtype).replace("torch.", "")
        out[k] = out.get(k, 0) + t.numel() * t.element_size()
    return out


def state_of(networks: dict, world: int) -> dict:
    """Persistent per-GPU state from {name: (module, trainable params, ddp_wrapped, has_ema)}:
    exact byte counts by part; `grads_by_phase` is added by the caller (grads are set to None after
    each optimizer step, so only one network's exist at a time)."""
    parts, params = {}, {}
    for name, (module, trainable, ddp, ema) in networks.items():
        tensors = list(module.parameters()) + [b for b in module.buffers()]
        ids = {id(p) for p in trainable}
        trainable_bytes = nbytes(trainable)
        parts[f"{name}.params"] = nbytes(tensors)
        parts[f"{name}.adamw_moments"] = 2 * sum(p.numel() * 4 for p in trainable)  # exp_avg, exp_avg_sq in fp32
        if ema:
            parts[f"{name}.ema"] = parts[f"{name}.params"]
        if ddp and world > 1:
            parts[f"{name}.ddp_buckets"] = trainable_bytes
        params[name] = dict(total=sum(p.numel() for p in module.parameters()),
                            trainable=sum(p.numel() for p in trainable),
                            frozen_bytes_by_dtype=by_dtype([p for p in module.parameters() if id(p) not in ids]),
                            trainable_bytes_by_dtype=by_dtype(trainable))
    return dict(parts=parts, persistent=sum(parts.values()), params=params)


def fit_bilinear(points: dict) -> tuple:
    """(c0, c1, a, b) of bytes = c0 + c1*D + (a + b*D)*B through four points {(D, B): bytes} on
    a grid D in {d1, d2}, B in {b1, b2} (exact: four unknowns, four points)."""
    (d1, d2), (b1, b2) = sorted({d for d, _ in points}), sorted({b for _, b in points})
    m11, m21, m12, m22 = points[d1, b1], points[d2, b1], points[d1, b2], points[d2, b2]
    b = (m22 - m21 - m12 + m11) / ((d2 - d1) * (b2 - b1))
    a = (m12 - m11) / (b2 - b1) - b * d1
    c1 = (m21 - m11) / (d2 - d1) - b * b1
    c0 = m11 - c1 * d1 - a * b1 - b * d1 * b1
    return c0, c1, a, b


def extrapolate(coef: tuple, depth: int, batch: int) -> int:
    c0, c1, a, b = coef
    return round(c0 + c1 * depth + (a + b * depth) * batch)


# ------------------------------------------------------------------------------------------------ RAE stage 1
def rae_args(tiny: bool, depth: int, batch: int, precision: str, options: list, tmp: Path):
    """train_stage1's arguments for the recipe (the bench's flags) with the decoder depth set."""
    import train_stage1
    from train_stage1_step import DINOV2_B_REG

    cfg_path = ROOT / "configs/stage1" / ("tiny_rae.yaml" if tiny else "rae_dinov2b_vitxl_256.yaml")
    cfg = yaml.safe_load(cfg_path.read_text())
    spec = dict(cfg["model_config"])
    spec.setdefault("encoder_config", DINOV2_B_REG)
    spec["decoder_config"] = dict(spec["decoder_config"], decoder_num_hidden_layers=depth)
    (tmp / "model.yaml").write_text(yaml.safe_dump(spec))
    (tmp / "disc.yaml").write_text(yaml.safe_dump({"pretrained": "random"}))
    flags = ["--config", str(cfg_path), "--model-config", str(tmp / "model.yaml"), "--data-dir", str(tmp),
             "--batch-size", str(batch), "--lpips-weights", "random", "--random-init-encoders", "--report-to", "none",
             "--mixed-precision", precision, "--eval-samples", "0"]
    if not tiny:
        flags += ["--disc-config", str(tmp / "disc.yaml")]
    flags += ["--grad-checkpointing"] * ("decoder" in options) + ["--lpips-grad-checkpointing"] * ("lpips" in options)
    return train_stage1.parse_args(flags)


def rae_networks(args, device):
    """(model, loss_fn, trainable, disc_params, state networks) as train_stage1.main builds them."""
    from loss.stage1 import build_loss
    from models.stage1 import build_model, trainable_parameters

    with device:
        model = build_model(args)
        if args.grad_checkpointing:
            model.decoder.set_grad_checkpointing(True)
        trainable = trainable_parameters(args, model)
        loss_fn, _ = build_loss(args, 3)
    disc_params = [p for p in loss_fn.discriminator.parameters() if p.requires_grad]
    nets = {"tokenizer": (model, trainable, True, args.ema_decay > 0),
            "loss (LPIPS + discriminator)": (loss_fn, disc_params, False, False)}
    return model, loss_fn, trainable, disc_params, nets


def rae_step(args, model, loss_fn, trainable, disc_params, autocast, batch: int, counters) -> dict:
    """One train_stage1 step of the RAE in the full GAN phase (generator update with the adaptive
    weight, then the discriminator update), each update's saved bytes counted."""
    from loss.stage1 import discriminator_objective, generator_objective
    from models.stage1 import TrainForward

    fwd = TrainForward("rae", model).train()
    loss_fn.train()
    epoch = max(args.disc_start_epoch, args.disc_update_start_epoch)
    raw = torch.randint(0, 256, (batch, 3, args.resolution, args.resolution), dtype=torch.uint8)
    x = raw.float() / 127.5 - 1
    saved = {}
    with counters("generator") as c:
        with autocast():
            out = fwd(x)
        g_loss, _ = generator_objective("rae", loss_fn, x, out, 0, epoch, model.decoder.decoder_pred.weight, None,
                                        None, autocast)
    saved["generator"] = c.total
    g_loss.backward()
    for p in trainable:
        p.grad = None
    with counters("discriminator") as c:
        d_loss, _ = discriminator_objective("rae", loss_fn, model, x, out, 0, autocast)
    saved["discriminator"] = c.total
    d_loss.backward()
    for p in disc_params:
        p.grad = None
    return saved


# ------------------------------------------------------------------------------------------------ REPA-E
def repae_args(tiny: bool, depth: int, batch: int, precision: str, options: list):
    """train_repae's arguments for bench/train_repae_step.py's preset, SiT depth and batch set."""
    import train_repae
    from train_repae_step import PRESETS

    flags = list(PRESETS["tiny" if tiny else "xl"])
    flags[flags.index("--batch-size") + 1] = str(batch)
    flags[flags.index("--mixed-precision") + 1] = precision
    flags += ["--random-init-vae", "--random-init-encoders", "--lpips-weights", "random", "--report-to", "none",
              "--num-classes", "10" if tiny else "1000"]
    flags += ["--grad-checkpointing"] * ("sit" in options) + ["--vae-grad-checkpointing"] * ("vae" in options)
    flags += ["--lpips-grad-checkpointing"] * ("lpips" in options)
    args = train_repae.parse_args(flags)
    args.sit_depth = depth
    return args


def repae_networks(args, device):
    """(vae, encoders, sit, loss_fn, state networks) as train_repae.main builds them, with the SiT at
    `args.sit_depth` blocks (its encoder_depth capped to it)."""
    import train_repae
    from models.encoders import load_encoders
    from models.sit import build_sit

    with device:
        vae, _ = train_repae.build_vae(args, logging.getLogger("memory_estimate"))
        if args.vae_grad_checkpointing:
            vae.set_grad_checkpointing(True)
        encoders = load_encoders(args.enc_type, device=device, resolution=args.resolution,
                                 random_init=args.random_init_encoders)
        sit = build_sit(args.model, input_size=args.resolution // vae.downsample_factor, in_channels=vae.latent_channels,
                        num_classes=args.num_classes, class_dropout_prob=args.cfg_prob, z_dims=[e.embed_dim for e in encoders],
                        projector_dim=args.projector_dim, encoder_depth=min(args.encoder_depth, args.sit_depth),
                        depth=args.sit_depth, bn_momentum=args.bn_momentum, fused_attn=args.fused_attn,
                        qk_norm=args.qk_norm, path_type=args.path_type, grad_checkpointing=args.grad_checkpointing)
        sit.pos_embed.requires_grad_(True)
        loss_fn = train_repae.build_loss(args)
    nets = {"sit": (sit, list(sit.parameters()), True, True), "vae": (vae, list(vae.parameters()), True, False),
            "loss (LPIPS + discriminator)": (loss_fn, list(loss_fn.discriminator.parameters()), True, False),
            "encoders": (nn.ModuleList(encoders), [], False, False)}
    return vae, encoders, sit, loss_fn, nets


def repae_step(args, vae, encoders, sit, loss_fn, autocast, batch: int, counters) -> dict:
    """One train_repae step (VAE update with the frozen SiT's alignment pass, discriminator update,
    SiT update), each update's saved bytes counted."""
    import utils

    vae.train()
    loss_fn.train()
    raw = torch.randint(0, 256, (batch, 3, args.resolution, args.resolution), dtype=torch.uint8)
    labels = torch.randint(0, args.num_classes, (batch,))
    loss_kwargs = dict(weighting=args.weighting, path_type=args.path_type, prediction=args.prediction)
    with torch.no_grad(), autocast():
        zs = [enc(raw).float() for enc in encoders]
    x = raw.float() / 127.5 - 1
    saved = {}
    with counters("vae") as c:
        with autocast():
            posterior, z, recon = vae(x)
        utils.requires_grad(sit, False)
        sit.eval()
        with autocast():
            vae_loss, _ = loss_fn(x, recon, posterior, 0, "generator")
            align = sit(z, labels, zs, loss_kwargs=dict(loss_kwargs, align_only=True))
        vae_total = vae_loss + args.vae_align_proj_coeff * align["proj_loss"]
    saved["vae"] = c.total
    vae_total.backward()
    for p in vae.parameters():
        p.grad = None
    with counters("discriminator") as c:
        d_loss, _ = loss_fn(x, recon.detach(), posterior, 0, "discriminator")
    saved["discriminator"] = c.total
    d_loss.backward()
    for p in loss_fn.parameters():
        p.grad = None
    utils.requires_grad(sit, True)
    sit.train()
    with counters("sit") as c:
        with autocast():
            out = sit(z.detach(), labels, zs, loss_kwargs=dict(loss_kwargs, align_only=False),
                      time_input=align["time_input"], noises=align["noises"])
        sit_loss = out["denoising_loss"].mean() + args.proj_coeff * out["proj_loss"]
    saved["sit"] = c.total
    sit_loss.backward()
    for p in sit.parameters():
        p.grad = None
    return saved


# ------------------------------------------------------------------------------------------------ driver
KINDS = {
    # kind: (its trainer's arguments, its networks, its step)
    "rae": (rae_args, rae_networks, rae_step),
    "repae": (repae_args, repae_networks, repae_step),
}
GRAD_OWNER = {"generator": "tokenizer", "discriminator": "loss (LPIPS + discriminator)", "vae": "vae", "sit": "sit"}


def autocast_factory(precision: str):
    """The trainers' `accelerator.autocast` for --mixed-precision `precision`, on CPU."""
    if precision == "no":
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return lambda: torch.autocast("cpu", dtype=dtype)


def measure(kind: str, tiny: bool, depth: int, batch: int, precision: str, options: list, fake: bool = True,
            world: int = 1, track_live: bool = True) -> dict:
    """One step of `kind` at (transformer depth, per-GPU batch): saved bytes per phase, the live
    peak, and the exact state. fake=False runs real tensors (tiny sizes only: the check of the
    fake count)."""
    make_args, make_networks, step = KINDS[kind]
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    device = torch.device("meta" if fake else "cpu")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:  # the RAE's model / discriminator YAMLs live here while building
        args = (make_args(tiny, depth, batch, precision, options, Path(tmp)) if kind == "rae"
                else make_args(tiny, depth, batch, precision, options))
        built = make_networks(args, device)
    nets = built[-1]
    state = state_of(nets, world)
    if fake:
        to_fake([m for m, *_ in nets.values()], mode)
    params = [p for m, *_ in nets.values() for p in m.parameters()]
    live = LiveBytes()

    def counters(phase):
        live.phase = phase
        return SavedStorages(params)

    with mode if fake else contextlib.nullcontext(), live if track_live else contextlib.nullcontext():
        if kind == "rae":
            model, loss_fn, _, disc_params, _ = built
            trainable = nets["tokenizer"][1]
            saved = step(args, model, loss_fn, trainable, disc_params, autocast_factory(precision), batch, counters)
        else:
            vae, encoders, sit, loss_fn, _ = built
            saved = step(args, vae, encoders, sit, loss_fn, autocast_factory(precision), batch, counters)
    grads = {ph: nbytes(nets[GRAD_OWNER[ph]][1]) for ph in saved}
    return dict(saved=saved, grads=grads, peak_live=live.peak, peak_phase=live.peak_phase, state=state)


def published(kind: str, tiny: bool) -> dict:
    """The published depth and per-GPU batch, and the SiT block count each REPA-E phase runs."""
    if kind == "rae":
        return dict(depth=4, batch=5) if tiny else dict(depth=28, batch=64)
    return dict(depth=4, batch=5, encoder_depth=2) if tiny else dict(depth=28, batch=32, encoder_depth=8)


def phase_depth(kind: str, phase: str, pub: dict) -> int:
    """Transformer blocks a phase runs at the published size: REPA-E's alignment pass (VAE update)
    stops after block encoder_depth; the discriminator update runs no SiT / decoder block that saves."""
    if kind == "repae" and phase == "vae":
        return pub["encoder_depth"]
    return pub["depth"]


# Depths and batches measured for the fit: not 1, where a size-1 dimension makes some reshapes views
# instead of copies (a batch of 1 saves less per sample than any larger batch).
FIT_AT = (2, 3)


def estimate(kind: str, tiny: bool, precision: str, option_set: str, world: int) -> dict:
    """Saved bytes per phase extrapolated from depth x batch in FIT_AT to the published size, the
    direct count there (fake), the state and the estimated peak."""
    options = OPTION_SETS[kind][option_set]
    pub = published(kind, tiny)
    points = {(d, b): measure(kind, tiny, d, b, precision, options, world=world, track_live=False)
              for d in FIT_AT for b in FIT_AT}
    phases = list(next(iter(points.values()))["saved"])
    coef = {ph: fit_bilinear({k: v["saved"][ph] for k, v in points.items()}) for ph in phases}
    saved = {ph: extrapolate(coef[ph], phase_depth(kind, ph, pub), pub["batch"]) for ph in phases}
    line = dict(kind=kind, option_set=option_set, options=options, precision=precision, world=world,
                depth=pub["depth"], batch=pub["batch"], saved_extrapolated=saved,
                saved_per_block_per_sample={ph: c[3] for ph, c in coef.items()},
                saved_per_sample_rest={ph: c[2] for ph, c in coef.items()})
    full = measure(kind, tiny, pub["depth"], pub["batch"], precision, options, world=world)
    state, grads = full["state"], full["grads"]
    lower = {ph: state["persistent"] + grads[ph] + saved[ph] for ph in phases}
    line.update(saved_direct=full["saved"], peak_live=full["peak_live"], peak_phase=full["peak_phase"],
                state_parts=state["parts"], params=state["params"], persistent_state=state["persistent"],
                grads_by_phase=grads, lower_bound_by_phase=lower, lower_bound_gib=max(lower.values()) / GIB,
                estimate_gib=(state["persistent"] + max(full["peak_live"], *(grads[ph] + saved[ph] for ph in phases))) / GIB)
    return line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny configurations (~30 s per option set; what the tests run)")
    p.add_argument("--only", choices=["rae-xl", "repae-xl"], default=None, help="one configuration (default: both)")
    p.add_argument("--precision", choices=["no", "fp16", "bf16"], action="append", default=None,
                   help="autocast precision (repeatable; default: bf16 for RAE, fp16 and bf16 for REPA-E)")
    p.add_argument("--option-set", action="append", default=None,
                   help="option sets to count (repeatable; default: all; RAE: "
                        f"{', '.join(OPTION_SETS['rae'])}; REPA-E: {', '.join(OPTION_SETS['repae'])})")
    p.add_argument("--world", type=int, default=8, help="processes of the published run (DDP buckets when > 1)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    from common import emit

    kinds = {"rae-xl": "rae", "repae-xl": "repae"}
    lines = []
    for name in ([args.only] if args.only else list(kinds)):
        kind = kinds[name]
        precisions = args.precision or (["bf16"] if kind == "rae" else ["fp16", "bf16"])
        for precision in precisions:
            for option_set in (args.option_set or list(OPTION_SETS[kind])):
                if option_set not in OPTION_SETS[kind]:
                    p.error(f"--option-set {option_set}: not one of {sorted(OPTION_SETS[kind])} for {name}")
                est = estimate(kind, args.tiny, precision, option_set, args.world)
                est["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
                lines.append(emit("memory_estimate", ("tiny-" if args.tiny else "") + name, **est))
    return lines


if __name__ == "__main__":
    main()
