"""generate.py's output off the device's path and the sampling speed options: the background PNG
writer (bounded, errors reach the caller with the file name, files finished before the .npz), the
streamed Inception features (equal to the after-the-fact evaluation, resumable, computed from the
files for samples without them), bf16 decode, the compiled guided field, and bench/sample.py
reading recipes without importing the generate.py script."""
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import generate
import samplers
import utils
from evaluation.inception import InceptionFeatures, build_inception
from evaluation.metrics import compute_features
from sampling.output import FEATURE_FOLDER, STORED_FEATURES, FeatureStore, PNGWriter
from tests.test_generate import base_args, make_experiment

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    return make_experiment(tmp_path_factory.mktemp("out"))


# ------------------------------------------------------------------------------------------ writer
def test_writer_writes_in_the_background_bounded_and_in_order(tmp_path, monkeypatch):
    real = utils.atomic_save_png
    threads, in_flight, most = set(), [0], [0]
    lock = threading.Lock()

    def slow_save(array, path):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        threads.add(threading.current_thread().name)
        time.sleep(0.02)
        real(array, path)
        with lock:
            in_flight[0] -= 1

    monkeypatch.setattr(utils, "atomic_save_png", slow_save)
    done = []
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 8, 8, 3), dtype=np.uint8)
    with PNGWriter(tmp_path, workers=2, max_pending=2) as writer:
        for b in range(3):
            chunk = [4 * b + j for j in range(4)]
            # `then` runs once the batch's files all exist (the features follow their PNGs)
            writer.write(chunk, images[b], lambda chunk=chunk: done.append(all((tmp_path / f"{i:06d}.png").is_file()
                                                                                for i in chunk)))
            assert len(writer.pending) <= 2
    assert done == [True, True, True]
    assert sorted(writer.written) == list(range(12)) and all(t.startswith("png-writer") for t in threads)
    assert most[0] == 2  # two encodes ran at once
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "000005.png")), images[1][1])
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp file


@pytest.mark.parametrize("workers", [0, 2])
def test_writer_error_reaches_the_caller_with_the_file_name(tmp_path, workers):
    (tmp_path / "000001.png").mkdir()  # the rename onto it fails
    arr = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(OSError, match="000001.png"):
        with PNGWriter(tmp_path, workers=workers) as writer:
            writer.write([0, 1], arr)


# ------------------------------------------------------------------------------------------ streamed --eval
def _reference(tmp_path):
    from PIL import Image

    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    return ref


def test_streamed_eval_equals_the_after_the_fact_evaluation_and_resumes(exp, tmp_path):
    out = tmp_path / "s"
    ev = ["--num-steps", "1", "--cfg-scale", "1.5", "--eval", "--ref-dir", str(_reference(tmp_path)),
          "--random-init-inception", "--metrics", "fid,sfid,is", "--inception-image-size", "75",
          "--inception-chunk", "4", "--inception-batch-size", "3"]
    first = generate.main(base_args(exp, out, *ev, "--num-fid-samples", "6"))
    folder = out / "run"
    files = sorted((folder / FEATURE_FOLDER).glob("*.npz"))
    assert first["generated"] == 6 and len(files) == 2  # one file per batch of 4
    # the stored features are those of the written PNGs, bit for bit (fp32)
    extractor = InceptionFeatures(build_inception(random_init=True), 75, 4)
    store = FeatureStore(folder, extractor, {})
    stored, missing = store.load(6)
    assert len(missing) == 0
    again = compute_features([folder / f"{i:06d}.png" for i in range(6)], extractor, STORED_FEATURES, batch_size=5)
    for f in STORED_FEATURES:
        assert torch.equal(stored[f], again[f]), f
    # resumed to 10: 4 new samples streamed, the 6 earlier ones read from their stored features
    resumed = generate.main(base_args(exp, out, *ev, "--num-fid-samples", "10"))
    assert resumed["generated"] == 4 and len(list((folder / FEATURE_FOLDER).glob("*.npz"))) == 3
    after = generate.main(base_args(exp, out, *ev, "--num-fid-samples", "10", "--no-stream-eval"))
    assert after["generated"] == 0
    for k in ("fid", "sfid", "is"):
        assert resumed["metrics"][k] == after["metrics"][k], k
    # samples without stored features (an older folder): computed from their files, then stored
    for p in files:
        p.unlink()
    rebuilt = generate.main(base_args(exp, out, *ev, "--num-fid-samples", "10"))
    assert {k: rebuilt["metrics"][k] for k in ("fid", "sfid", "is")} == {k: after["metrics"][k] for k in ("fid", "sfid", "is")}
    assert FeatureStore(folder, extractor, {}).load(10)[1].size == 0
    # features of another extractor are discarded, not mixed in
    record = json.loads((folder / FEATURE_FOLDER / "extractor.json").read_text())
    assert record["image_size"] == 75 and record["chunk_size"] == 4 and record["random_init"] is True
    FeatureStore(folder, extractor, dict(record, image_size=80)).prepare()
    assert not list((folder / FEATURE_FOLDER).glob("*.npz"))


# ------------------------------------------------------------------------------------------ decode, compile
def _tiny_field():
    from models.diffusion import VelocityModel, build_diffusion_model

    torch.manual_seed(0)
    net = build_diffusion_model("SiT-N/2", (4, 8, 8), 10, 0.1, z_dims=[32], encoder_depth=2)
    with torch.no_grad():  # adaLN-Zero starts as the zero map: give the network some output
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return VelocityModel(net.eval())


def test_bf16_decode_runs_and_is_close_to_fp32():
    from models.autoencoder import build_vae
    from models.loading import LatentDecoder

    torch.manual_seed(0)
    decoder = LatentDecoder(build_vae("tiny-f4d4").eval(), torch.zeros(4, 1, 1), torch.ones(4, 1, 1))
    decoder = samplers.prepare_decoder(decoder, "cpu")
    kw = dict(mode="ode", solver="euler", num_steps=2, cfg_scale=1.0)
    args = (_tiny_field(), decoder, (4, 8, 8), 10, torch.arange(4), 0, kw, "cpu")
    fp32 = samplers.sample_batch(*args).int()
    bf16 = samplers.sample_batch(*args, decode_precision="bf16").int()
    diff = (fp32 - bf16).abs().float()
    assert diff.max() > 0  # the decode did run in bf16
    assert diff.mean() < 2.0 and diff.max() <= 16, (diff.mean(), diff.max())
    with pytest.raises(ValueError, match="--decode-precision"):
        samplers.sample_batch(*args, decode_precision="fp8")


def test_compiled_guided_field_is_one_graph_per_shape_and_equals_eager():
    """--compile compiles the whole guided evaluation (cat, network, CFG combine): one graph for
    the guided [2n] and one for the unguided [n] rows, reused by every step and batch. Inductor
    takes minutes on this CPU, so the graphs run through a recording backend (the captured FX
    graphs executed as they are); the CUDA figures come from bench/sample.py --compile-mode."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = _tiny_field()
    kw = dict(mode="ode", solver="heun", num_steps=4, cfg_scale=2.0, guidance_low=0.0, guidance_high=0.6,
              cfg_channels=3)
    z, y = torch.randn(4, 4, 8, 8), torch.arange(4)
    with torch.no_grad():
        eager = samplers.run_sampler(model, z, y, kw)
        for _ in range(2):  # a second batch: no new graph
            compiled = samplers.run_sampler(model, z, y, dict(kw, compile_mode="default",
                                                              compile_backend=recording_backend))
            torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    assert len(graphs) == 2, [g.graph for g in graphs]
    assert samplers.sampler_kwargs_from_args(generate.parse_args(["--compile", "--compile-mode", "reduce-overhead"])
                                             )["compile_mode"] == "reduce-overhead"
    assert samplers.sampler_kwargs_from_args(generate.parse_args([]))["compile_mode"] is None


def test_bench_reads_recipes_without_importing_generate():
    code = ("import sys; sys.path.insert(0, 'bench'); import sample; "
            "assert 'generate' not in sys.modules, 'bench/sample.py imports generate.py'; "
            "from sampling.cli import parse_args; a = parse_args(['--recipe', 'repae-sde-250']); "
            "assert (a.mode, a.num_steps, a.cfg_scale) == ('sde', 250, 2.5)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
