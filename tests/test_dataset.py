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
    ds = build_image_dataset(tmp_path, 32, crop="short-side")
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
