"""preprocessing.py and the archive / EDM / video readers: exact pixels, labels, determinism across
worker counts, resume, refusal of mixed arguments, bad input, 1-channel, PNG encoding."""
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasources import (ArchiveDataset, EDMImageDataset, ImageFolderDataset, VideoClipDataset,
                         build_image_dataset, flatten_video_batch, load_image, unflatten_video_batch, write_h5_archive)
from preprocessing import main as preprocessing_main, preprocess

ROOT = Path(__file__).resolve().parents[1]
RES = 16


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Non-ImageNet class names, non-square images of several sizes (the crop has work to do)."""
    root = tmp_path_factory.mktemp("src") / "imgs"
    rng = np.random.default_rng(0)
    sizes = [(37, 29), (20, 50), (64, 40), (16, 16), (33, 90)]
    for c, name in enumerate(["user_00", "user_07", "zeta"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            h, w = sizes[(c * 3 + i) % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"img_{i}.png")
    return root


@pytest.fixture(scope="module")
def archive(source, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("arch") / "raw"
    preprocess(source, dest, resolution=RES, workers=1, shard_size=4, progress=False)
    return dest


def test_archive_pixels_labels_and_mapping(source, archive):
    index = json.loads((archive / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [4, 4, 1] and index["num_images"] == 9
    assert index["class_to_idx"] == {"user_00": 0, "user_07": 1, "zeta": 2}
    assert json.loads((archive / "class_to_idx.json").read_text()) == index["class_to_idx"]
    ds = build_image_dataset(archive, RES)
    assert isinstance(ds, ArchiveDataset) and len(ds) == 9 and ds.num_classes == 3 and ds.channels == 3
    files = sorted(source.rglob("*.png"))
    for i, f in enumerate(files):
        x, y = ds[i]
        assert x.dtype == torch.uint8 and torch.equal(x, load_image(f, RES))
        assert y == index["class_to_idx"][f.parent.name]
    remapped = ArchiveDataset(archive, class_to_idx={"user_00": 5, "user_07": 0, "zeta": 1})
    assert remapped[0][1] == 5 and remapped[8][1] == 1 and remapped.num_classes == 6
    with pytest.raises(ValueError, match="--resolution"):
        build_image_dataset(archive, 2 * RES)


def test_worker_count_does_not_change_bytes(source, archive, tmp_path):
    preprocess(source, tmp_path / "w2", resolution=RES, workers=2, shard_size=4, progress=False)
    assert _files(tmp_path / "w2") == _files(archive)


def test_resume_rewrites_only_missing_or_broken_shards(source, archive, tmp_path):
    dest = tmp_path / "resume"
    shutil.copytree(archive, dest)
    (dest / "images-00001.npy").unlink()
    (dest / "index.json").unlink()
    shard2 = dest / "images-00002.npy"
    shard2.write_bytes(shard2.read_bytes()[:-10])  # a truncated file under its final name
    kept = dest / "images-00000.npy"
    mtime = kept.stat().st_mtime_ns
    preprocess(source, dest, resolution=RES, workers=1, shard_size=4, progress=False)
    assert kept.stat().st_mtime_ns == mtime
    assert _files(dest) == _files(archive)


def test_different_arguments_refuse(source, archive, tmp_path):
    dest = tmp_path / "again"
    shutil.copytree(archive, dest)
    with pytest.raises(ValueError, match="different arguments.*resolution"):
        preprocess(source, dest, resolution=RES // 2, shard_size=4, progress=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        preprocess(source, tmp_path / "foreign", resolution=RES, progress=False)


def test_h5_and_edm_sources_give_the_same_archive(source, archive, tmp_path):
    files = sorted(source.rglob("*.png"))
    classes = {"user_00": 0, "user_07": 1, "zeta": 2}
    flat = tmp_path / "edm"
    labels = []
    for i, f in enumerate(files):
        rel = f"{i // 4:05d}/img{i:08d}.png"
        (flat / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, flat / rel)
        labels.append([rel, classes[f.parent.name]])
    (flat / "dataset.json").write_text(json.dumps({"labels": labels}))
    with zipfile.ZipFile(tmp_path / "edm.zip", "w") as zf:
        for p in sorted(flat.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(flat).as_posix())
    write_h5_archive(flat, tmp_path / "h5")
    reference = _files(archive)
    for src in (tmp_path / "edm.zip", tmp_path / "h5", flat):
        dest = tmp_path / f"out_{src.name}"
        index = preprocess(src, dest, resolution=RES, shard_size=4, progress=False)
        out = _files(dest)
        for name in ["labels.npy"] + [f"images-0000{k}.npy" for k in range(3)]:
            assert out[name] == reference[name], (src, name)
        assert index["class_to_idx"] == {"0": 0, "1": 1, "2": 2}
    zipped = build_image_dataset(tmp_path / "edm.zip", RES)
    assert isinstance(zipped, EDMImageDataset) and torch.equal(zipped[3][0], load_image(files[3], RES))
    assert zipped[8][1] == 2 and isinstance(build_image_dataset(flat, RES), EDMImageDataset)


def test_bad_image_stops_with_its_name_or_is_skipped(source, tmp_path):
    src = tmp_path / "bad"
    shutil.copytree(source, src)
    (src / "user_07" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(OSError, match="broken.png"):
        preprocess(src, tmp_path / "stop", resolution=RES, shard_size=4, workers=2, progress=False)
    assert not (tmp_path / "stop" / "index.json").exists()
    index = preprocess(src, tmp_path / "skip", resolution=RES, shard_size=4, skip_bad_images=True, progress=False)
    assert index["num_images"] == 9 and index["num_bad"] == 1 and "broken.png" in index["bad_images"][0]["file"]
    assert [s["count"] for s in index["shards"]] == [3, 4, 2]  # broken.png was 4th: boundaries stay the source's
    ds = ArchiveDataset(tmp_path / "skip")
    good = [f for f in ImageFolderDataset(src, RES).files if f.name != "broken.png"]
    assert all(torch.equal(ds[i][0], load_image(f, RES)) for i, f in enumerate(good))


def test_one_channel_and_png_encoding(source, archive, tmp_path):
    files = sorted(source.rglob("*.png"))
    preprocess(source, tmp_path / "gray", resolution=RES, channels=1, encoding="png", shard_size=4, progress=False)
    gray = ArchiveDataset(tmp_path / "gray")
    assert gray.channels == 1 and gray[0][0].shape == (1, RES, RES)
    assert all(torch.equal(gray[i][0], load_image(f, RES, channels=1)) for i, f in enumerate(files))
    with pytest.raises(ValueError, match="index.json.*--channels 3"):
        ArchiveDataset(tmp_path / "gray", channels=3)
    preprocess(source, tmp_path / "png", resolution=RES, encoding="png", shard_size=4, progress=False)
    png, raw = ArchiveDataset(tmp_path / "png"), ArchiveDataset(archive)
    assert png.encoding == "png" and all(torch.equal(png[i][0], raw[i][0]) for i in range(len(raw)))
    assert np.array_equal(png.labels, raw.labels)


def test_truncated_or_missing_shard_is_named(archive, tmp_path):
    dest = tmp_path / "cut"
    shutil.copytree(archive, dest)
    shard = dest / "images-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-RES])
    with pytest.raises(OSError, match="images-00001.npy.*truncated"):
        ArchiveDataset(dest)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="images-00001.npy"):
        build_image_dataset(dest, RES)


def test_source_errors_and_cli(source, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        preprocess(tmp_path / "empty", tmp_path / "o1", resolution=RES, progress=False)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown source type"):
        preprocess(tmp_path / "notes.txt", tmp_path / "o2", resolution=RES, progress=False)
    run = subprocess.run([sys.executable, str(ROOT / "preprocessing.py"), "--source", str(source), "--dest",
                          str(tmp_path / "cli"), "--resolution", str(RES), "--workers", "1", "--max-images", "5",
                          "--shard-size", "2"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    index = json.loads((tmp_path / "cli" / "index.json").read_text())
    assert index["num_images"] == 5 and [s["count"] for s in index["shards"]] == [2, 2, 1]
    with pytest.raises(SystemExit, match="--source not found"):
        preprocessing_main(["--source", str(tmp_path / "missing"), "--dest", str(tmp_path / "o3")])


# --------------------------------------------------------------------------------------------
# Video clips
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("video")
    rng = np.random.default_rng(1)
    (root / "walk" / "clip_a").mkdir(parents=True)
    for t in range(6):  # frame folder, 20x24 frames: cropped to RES
        frame = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(frame).save(root / "walk" / "clip_a" / f"{t:03d}.png")
    np.save(root / "walk" / "clip_b.npy", rng.integers(0, 256, (5, RES, RES, 3), dtype=np.uint8))
    (root / "run").mkdir()
    np.save(root / "run" / "clip_c.npy", rng.integers(0, 256, (7, 30, 20, 3), dtype=np.uint8))
    return root


def test_video_clips_shapes_labels_and_frames(videos):
    ds = VideoClipDataset(videos, num_frames=3, resolution=RES, stride=2)
    assert len(ds) == 3 and ds.class_to_idx == {"run": 0, "walk": 1}
    assert [ds[i][1] for i in range(3)] == [0, 1, 1]
    for i in range(3):
        x, _ = ds[i]
        assert x.dtype == torch.uint8 and x.shape == (3, RES, RES, 3)
        assert torch.equal(x, VideoClipDataset(videos, 3, RES, stride=2)[i][0])  # index-keyed start
    s = ds.window_start(2)  # clip_b.npy is stored at RES: frames are the stored ones
    stored = torch.from_numpy(np.load(videos / "walk" / "clip_b.npy"))
    assert torch.equal(ds[2][0], stored[s: s + 5: 2])
    s = ds.window_start(1)  # clip_a: frame images through load_image
    frames = sorted((videos / "walk" / "clip_a").iterdir())
    assert torch.equal(ds[1][0][1], load_image(frames[s + 2], RES).permute(1, 2, 0))
    gray = VideoClipDataset(videos, 2, RES, channels=1)
    assert gray[0][0].shape == (2, RES, RES, 1)
    with pytest.raises(ValueError, match="clip_a has 6 frames.*2 clips too short"):
        VideoClipDataset(videos, num_frames=4, resolution=RES, stride=2)


def test_flatten_video_batch_round_trip(videos):
    loader = torch.utils.data.DataLoader(VideoClipDataset(videos, 3, RES), batch_size=2)
    video, _ = next(iter(loader))
    assert video.shape == (2, 3, RES, RES, 3)
    flat = flatten_video_batch(video)
    assert flat.shape == (6, 3, RES, RES) and torch.equal(flat[4], video[1, 1].permute(2, 0, 1))
    assert torch.equal(unflatten_video_batch(flat, 3), video)
    with pytest.raises(ValueError, match="frames"):
        flatten_video_batch(flat)
