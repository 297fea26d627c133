"""Data sources: one module per kind of data the scripts read, plus the samplers and views on top.

| module | what it reads or provides |
|---|---|
| `images` | decoding, channel conversion and cropping shared by every image source (ADM center crop, short-side resize) |
| `image_folder` | `ImageFolderDataset`: ImageNet layout (one subfolder per class) or a flat folder of images |
| `h5` | `H5ArchiveDataset`: the REPA-E archive (`images.h5` + `images_h5.json`); `write_h5_archive` |
| `edm` | `EDMImageDataset`: EDM / REPA `dataset_tool.py` output, a folder or `.zip` with `dataset.json` |
| `archive` | `ArchiveDataset`: the sharded uint8 (or PNG) training archive `preprocessing.py` writes; class maps |
| `build` | `build_image_dataset`: picks the reader from what a folder holds |
| `views` | `CropFlip`, `ClipFrames`, `RGBView`: index-keyed crops / flips, clip frames, RGB views; load size in pixels or x resolution |
| `video` | `VideoClipDataset` and the video <-> image batch reshapes |
| `sampler` | `ResumableDistributedSampler`: seeded per-epoch order that can restart mid-epoch |
| `procedural` | `make_procedural_dataset`: the built-in class-conditional dataset of the demo and the tests |
| `latents` | `LatentShardDataset`: the latent shards `cache_latents.py` writes (checked header, positional row reads) |
| `latent_writer` | the writer side of a latent folder: shards, `tokenizer.json`, exact statistics (`save_shard`, `compute_folder_stats`) |

Why not `data/`: by the REPA-E convention users keep their preprocessed data in `./data` at the
repository root (`--data-dir data`, `preprocessing.py --output-path data`, and `.gitignore`
ignores `data/`), so a package of that name would collide with the user's data. `datasets` is
taken by the Hugging Face library.

The scripts import the public names from here (`from datasources import build_image_dataset`).
"""
from datasources.archive import (ARCHIVE_FORMAT, ARCHIVE_VERSION, ArchiveDataset, check_archive_shard, is_archive,
                                 load_class_to_idx, read_npy_header, save_class_to_idx)
from datasources.build import build_image_dataset
from datasources.edm import EDMImageDataset
from datasources.h5 import H5ArchiveDataset, write_h5_archive
from datasources.image_folder import ImageFolderDataset
from datasources.images import (CROP_MODES, HIGH_BIT_MODES, IMAGE_EXTENSIONS, UPSAMPLED, center_crop_arr,
                                convert_image, cv2_resize_linear, load_image, note_upsampled,
                                resize_short_side, resize_short_side_bicubic)
from datasources.latent_writer import (LATENT_DTYPES, check_existing_info, compute_folder_stats, finalize_moments,
                                       latent_moments, merge_moments, save_shard, shard_problem, write_info)
from datasources.latents import (LATENT_INFO_FILE, LATENT_SHARD_DIR, LATENT_STATS_FILE, LatentBatch,
                                 LatentShardDataset, collate_latents, latent_flip_choice, latent_shard_path,
                                 latent_shard_range, map_shard_arrays, num_latent_shards, read_shard_header)
from datasources.procedural import make_procedural_dataset
from datasources.sampler import ResumableDistributedSampler
from datasources.video import VideoClipDataset, flatten_video_batch, unflatten_video_batch
from datasources.views import (ClipFrames, CropFlip, RGBView, image_channels_on_disk, load_size_arg,
                               resolve_load_size)

__all__ = [
    "ARCHIVE_FORMAT", "ARCHIVE_VERSION", "ArchiveDataset", "check_archive_shard", "is_archive", "load_class_to_idx",
    "read_npy_header", "save_class_to_idx", "build_image_dataset", "EDMImageDataset", "H5ArchiveDataset",
    "write_h5_archive", "ImageFolderDataset", "CROP_MODES", "HIGH_BIT_MODES", "IMAGE_EXTENSIONS", "UPSAMPLED",
    "center_crop_arr", "convert_image", "cv2_resize_linear", "load_image", "note_upsampled", "resize_short_side",
    "resize_short_side_bicubic", "LATENT_INFO_FILE",
    "LATENT_SHARD_DIR", "LATENT_STATS_FILE", "LatentBatch", "LatentShardDataset", "collate_latents",
    "latent_flip_choice", "latent_shard_path", "latent_shard_range", "map_shard_arrays", "num_latent_shards",
    "read_shard_header", "LATENT_DTYPES", "check_existing_info", "compute_folder_stats", "finalize_moments",
    "latent_moments", "merge_moments", "save_shard", "shard_problem", "write_info", "make_procedural_dataset",
    "ResumableDistributedSampler", "VideoClipDataset",
    "flatten_video_batch", "unflatten_video_batch", "ClipFrames", "CropFlip", "RGBView", "image_channels_on_disk",
    "load_size_arg", "resolve_load_size",
]
