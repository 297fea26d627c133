"""Datasets: ADM crop, folder and archive readers, bad input, resumable sampler, built-in data."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from datasources import (H5ArchiveDataset, ImageFolderDataset, ResumableDistributedSampler, build_image_dataset,
                         center_crop_arr, make_procedural_dataset, write_h5_archive)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_procedural_dataset(root / "imgs", num_classes=3, per_class=4, resolution=24, seed=0)


def test_center_crop_shapes():
    img = Image.fromarray(np.random.randint(0, 255, (300, 500, 3), dtype=np.uint8))
    assert center_crop_arr(img, 64).shape == (64, 64, 3)
    small = Image.fromarray(np.random.randint(0, 255, (20, 30, 3), dtype=np.uint8))
    assert center_crop_arr(small, 32).shape == (32, 32, 3)


def test_folder_dataset_labels_and_shapes(folder):
    ds = ImageFolderDataset(folder, 16)
    assert len(ds) == 12 and ds.num_classes == 3
    x, y = ds[5]
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and y == 1
    remapped = ImageFolderDataset(folder, 16, class_to_idx={"class_00": 2, "class_01": 0, "class_02": 1})
    assert remapped[0][1] == 2


def test_procedural_dataset_is_deterministic(tmp_path):
    a = make_procedural_dataset(tmp_path / "a", num_classes=2, per_class=2, resolution=16, seed=3)
    b = make_procedural_dataset(tmp_path / "b", num_classes=2, per_class=2, resolution=16, seed=3)
    for f in sorted(a.rglob("*.png")):
        assert np.array_equal(np.array(Image.open(f)), np.array(Image.open(b / f.relative_to(a))))


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_image_dataset(tmp_path / "nope", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        build_image_dataset(tmp_path / "empty", 16)


def test_bad_image_named_or_skipped(tmp_path, folder):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(folder, root)
    bad = root / "class_01" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = ImageFolderDataset(root, 16)
    idx = [str(f) for f in ds.files].index(str(bad))
    with pytest.raises(OSError, match="broken.png"):
        ds[idx]
    skipping = ImageFolderDataset(root, 16, skip_bad_images=True)
    assert skipping.num_bad == 1 and len(skipping) == 12 and "broken.png" in skipping.bad_files[0]


def test_h5_archive_roundtrip(tmp_path, folder):
    flat = tmp_path / "flat"
    labels = []
    for i, f in enumerate(sorted(folder.rglob("*.png"))):
        rel = f"{i // 8:05d}/img{i:08d}.png"
        (flat / rel).parent.mkdir(parents=True, exist_ok=True)
        (flat / rel).write_bytes(f.read_bytes())
        labels.append([rel, int(f.parent.name.split("_")[1])])
    (flat / "dataset.json").write_text(json.dumps({"labels": labels}))
    write_h5_archive(flat, tmp_path / "arch")
    ds = build_image_dataset(tmp_path / "arch", 24)
    assert isinstance(ds, H5ArchiveDataset) and len(ds) == 12 and ds.num_classes == 3
    x, y = ds[11]
    assert x.shape == (3, 24, 24) and y == 2


def test_sampler_resume_and_rank_split():
    full = list(ResumableDistributedSampler(103, 4, rank=0, world_size=1, seed=7))
    s = ResumableDistributedSampler(103, 4, rank=0, world_size=1, seed=7)
    s.set_position(0, 10)
    assert list(s) == full[40:]
    ranks = [list(ResumableDistributedSampler(103, 4, rank=r, world_size=2, seed=7)) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) == len(ranks[1]) == 48
    s.set_position(1, 0)
    assert list(s) != full  # a new permutation per epoch
    with pytest.raises(ValueError, match="batch"):
        ResumableDistributedSampler(3, 4)


def test_short_side_load_keeps_the_aspect_and_feeds_random_crops(tmp_path):
    from PIL import Image

    from datasources import ImageFolderDataset, build_image_dataset
    from datasources import CropFlip

    (tmp_path / "a").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "a" / "wide.png")
    ds = build_image_dataset(tmp_path, 32, crop="short-side-cv2-linear")
    assert isinstance(ds, ImageFolderDataset) and tuple(ds[0][0].shape) == (3, 32, 48)
    crops = CropFlip(ds, 32, random=True, seed=0)
    lefts = set()
    for epoch in range(12):
        crops.set_epoch(epoch)
        img = crops[0][0]
        assert tuple(img.shape) == (3, 32, 32)
        full = ds[0][0]
        lefts |= {x for x in range(17) if torch.equal(full[:, :, x:x + 32], img)}
    assert len(lefts) > 3  # the crop moves along the long side
    with pytest.raises(ValueError, match="short-side"):
        build_image_dataset(tmp_path, 32, crop="short-side-x")


# ---- short-side resampling: the originals' own, bit for bit --------------------------------------
# (source H, W) -> (output H, W): down- and upscaling, odd sizes, one axis unchanged, a single
# row / column, and the exact 2x downscale OpenCV sends to its INTER_AREA fast path
RESIZE_CASES = [((37, 53), (100, 143)), ((301, 450), (256, 383)), ((513, 700), (256, 349)), ((17, 29), (40, 68)),
                ((512, 768), (256, 384)), ((100, 64), (57, 64)), ((1, 7), (3, 5)), ((9, 1), (4, 2)), ((2, 3), (5, 7)),
                ((75, 99), (25, 33))]


@pytest.mark.parametrize("channels", [1, 3])
def test_cv2_resize_linear_is_bit_exact_with_opencv(channels):
    import cv2

    from datasources import cv2_resize_linear

    rng = np.random.default_rng(channels)
    for (h, w), (dh, dw) in RESIZE_CASES:
        img = rng.integers(0, 256, (h, w, channels)[:2 if channels == 1 else 3], dtype=np.uint8)
        ours = cv2_resize_linear(img, dw, dh)
        theirs = cv2.resize(img, (dw, dh), interpolation=cv2.INTER_LINEAR)
        assert ours.dtype == np.uint8 and ours.shape == theirs.shape, ((h, w), (dh, dw))
        assert np.array_equal(ours, theirs), ((h, w), (dh, dw), int((ours != theirs).sum()))


def test_short_side_resizes_follow_albumentations_and_torchvision():
    """cv2-linear: albumentations SmallestMaxSize (sides scaled and rounded, OpenCV bilinear, an
    image already at the size untouched); pil-bicubic: torchvision Resize(size) on a PIL image
    (long side truncated, PIL bicubic)."""
    import cv2
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from datasources import resize_short_side, resize_short_side_bicubic

    rng = np.random.default_rng(0)
    for h, w in ((333, 500), (500, 333), (61, 45), (256, 300), (20, 31)):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(arr)
        scale = 256 / min(h, w)
        size = (round(w * scale), round(h * scale))  # albumentations' rounding: 333x500 -> 256x384
        expected = arr if scale == 1 else cv2.resize(arr, size, interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(resize_short_side(img, 256), expected), (h, w)
        torch_ref = np.asarray(TF.resize(img, 256, interpolation=InterpolationMode.BICUBIC))
        assert np.array_equal(resize_short_side_bicubic(img, 256), torch_ref), (h, w)
    # 500 x 333 -> 384: albumentations rounds the long side to 577, torchvision truncates to 576
    img = Image.fromarray(rng.integers(0, 256, (333, 500), dtype=np.uint8))
    assert resize_short_side(img, 384).shape == (384, 577) and resize_short_side_bicubic(img, 384).shape == (384, 576)
