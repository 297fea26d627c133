"""generate.py's sample-folder output beside the sampling loop, so the device never waits for it:

* `PNGWriter`: PNG encoding and atomic writes on a small thread pool (PIL's zlib releases the GIL
  for most of the encoding), at most `max_pending` batches in flight, so batch k + 1 samples while
  batch k is written; an error of a write reaches the main thread with the file's name;
* `FeatureStore`: the Inception features of each sampled batch (`--eval`), computed on the device
  right after the decode and stored per batch beside the PNGs, so the evaluation reads features
  instead of re-reading 50k PNGs, and an interrupted run keeps what it computed.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import utils
from evaluation.inception import InceptionFeatures


class PNGWriter:
    """Writes batches of uint8 images as `{index:06d}.png` (atomically: utils.atomic_save_png).

    `workers` threads encode and write in the background (0: inline, the original behaviour);
    `write` blocks only while `max_pending` batches are still being written, which bounds the
    memory. `then` (per batch) runs in the caller's thread once all of that batch's files exist
    (generate.py stores the batch's features there, so stored features never outlive their PNGs).
    `close()` (also on leaving a `with` block) waits for every file and raises the first error."""

    def __init__(self, folder: Path, workers: int = 4, max_pending: int = 2):
        self.folder, self.max_pending = Path(folder), max(1, int(max_pending))
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="png-writer") if workers > 0 else None
        self.pending: Deque[Tuple[List[Future], Optional[Callable[[], None]]]] = collections.deque()
        self.written: List[int] = []

    def _save(self, index: int, image: np.ndarray) -> int:
        path = self.folder / f"{index:06d}.png"
        try:  # [H, W, C], C = 3 or 1 (written as a grayscale PNG)
            utils.atomic_save_png(image[..., 0] if image.shape[-1] == 1 else image, path)
        except Exception as e:  # noqa: BLE001 - re-raised in the main thread, naming the file
            raise OSError(f"writing sample {path} failed: {e}") from e
        return index

    def write(self, chunk: Sequence[int], images: np.ndarray, then: Optional[Callable[[], None]] = None) -> None:
        """Queue `images` [b, H, W, C] uint8 as the files of sample indices `chunk`."""
        if self.pool is None:
            self.written.extend(self._save(int(i), a) for i, a in zip(chunk, images))
            if then is not None:
                then()
            return
        self._finish(block=False)
        while len(self.pending) >= self.max_pending:
            self._finish_oldest()
        self.pending.append(([self.pool.submit(self._save, int(i), a) for i, a in zip(chunk, images)], then))

    def _finish_oldest(self) -> None:
        futures, then = self.pending.popleft()
        self.written.extend(f.result() for f in futures)  # re-raises a write's error here
        if then is not None:
            then()

    def _finish(self, block: bool) -> None:
        """Retire the batches at the head of the queue that are done (all of them when `block`)."""
        while self.pending and (block or all(f.done() for f in self.pending[0][0])):
            self._finish_oldest()

    def close(self) -> None:
        if self.pool is not None:
            try:
                self._finish(block=True)
            finally:
                self.pool.shutdown(wait=True, cancel_futures=True)
                self.pool = None

    def __enter__(self) -> "PNGWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self.pool is not None:  # leave no write running behind an error (finished files are whole)
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


# Every feature the metrics read: FID / KID / precision-recall (pool), sFID (spatial), IS (logits).
# Extracting all of them costs what the logits alone cost, so a later --metrics choice finds them.
STORED_FEATURES = ("pool", "spatial", "logits_unbiased")
FEATURE_FOLDER = "inception_features"


class FeatureStore:
    """Inception features of the samples in `<folder>/inception_features/`, keyed by sample index.

    One `.npz` per sampled batch (int64 `indices` and float32 `pool`, `spatial`, `logits_unbiased`,
    written atomically after the batch's PNGs exist), named so that a later run's files sort after
    an earlier run's (a later file wins for an index both hold). `extractor.json` records what the
    features depend on (Inception weights, input size, chunk size, device type): a folder whose
    record differs is cleared by `prepare` and its features recomputed from the PNGs. Features are
    computed with `InceptionFeatures` exactly as evaluation.metrics.compute_features does (fixed
    chunks: an image's features do not depend on its batch), so the metrics equal the ones computed
    from the files after the fact."""

    def __init__(self, folder: Path, extractor: InceptionFeatures, identity: dict, rank: int = 0):
        self.dir = Path(folder) / FEATURE_FOLDER
        self.extractor, self.identity = extractor, dict(identity, features=list(STORED_FEATURES))
        self.run = f"{time.time_ns():020d}-r{rank}"
        self.count = 0

    def prepare(self) -> None:
        """Rank 0, before any rank writes: clear features of another extractor, record this one."""
        record = self.dir / "extractor.json"
        if self.dir.is_dir() and (not record.is_file() or json.loads(record.read_text()) != self.identity):
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        utils.remove_stale_temp_files(self.dir)
        utils.atomic_write_text(json.dumps(self.identity, indent=2, sort_keys=True) + "\n", record)

    def compute(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """uint8 [b, C, H, W] on the extractor's device -> {name: float32 [b, D]} on the CPU."""
        from evaluation.metrics import batch_features

        return batch_features(self.extractor, images, STORED_FEATURES)

    def save(self, indices: Sequence[int], feats: Dict[str, torch.Tensor]) -> None:
        arrays = {f: feats[f].numpy() for f in STORED_FEATURES}
        arrays["indices"] = np.asarray(list(indices), dtype=np.int64)
        self.count += 1
        utils.atomic_write(self.dir / f"{self.run}-{self.count:06d}.npz", lambda f: np.savez(f, **arrays), "wb")

    def load(self, n: int) -> Tuple[Dict[str, torch.Tensor], np.ndarray]:
        """The stored features of samples 0..n-1 ({name: float32 [n, D]}, rows of missing samples
        zero) and the indices that have none."""
        feats: Dict[str, Optional[np.ndarray]] = {f: None for f in STORED_FEATURES}
        have = np.zeros(n, dtype=bool)
        for path in sorted(self.dir.glob("*.npz")) if self.dir.is_dir() else []:
            try:
                with np.load(path, allow_pickle=False) as data:
                    idx = data["indices"]
                    keep = idx < n
                    for f in STORED_FEATURES:
                        rows = data[f]
                        if feats[f] is None:
                            feats[f] = np.zeros((n, rows.shape[1]), dtype=np.float32)
                        feats[f][idx[keep]] = rows[keep]
            except (OSError, KeyError, ValueError) as e:
                raise ValueError(f"stored Inception features {path} are unreadable ({e}); delete the file "
                                 f"(its samples' features are then recomputed from the PNGs)") from e
            have[idx[keep]] = True
        out = {f: torch.from_numpy(a) for f, a in feats.items() if a is not None}
        return out, np.flatnonzero(~have)

    def complete(self, n: int, batch_size: int, progress: bool = False) -> Dict[str, torch.Tensor]:
        """Collective: the features of samples 0..n-1 on rank 0 ({} on the others): the stored
        ones, plus those of samples without stored features (an earlier run's PNGs) computed from
        their files over all ranks and stored, so the next evaluation finds them."""
        from evaluation.metrics import broadcast_object, compute_features, dist_info

        rank = dist_info()[0]
        feats, missing = self.load(n) if rank == 0 else ({}, None)
        missing = broadcast_object(None if missing is None else missing.tolist())
        if missing:
            files = [self.dir.parent / f"{i:06d}.png" for i in missing]
            extra = compute_features(files, self.extractor, STORED_FEATURES, batch_size, progress, what="samples")
            if rank == 0:
                for f in STORED_FEATURES:
                    if f not in feats:
                        feats[f] = torch.zeros((n, extra[f].shape[1]), dtype=torch.float32)
                    feats[f][missing] = extra[f]
                self.save(missing, extra)
        return feats


def batch_hooks(writer: PNGWriter, store: Optional[FeatureStore]) -> Tuple[Optional[Callable], Callable]:
    """samplers.sample_for_eval's (on_decoded, on_batch) for generate.py's output: the batch's
    features computed on the device right after its decode (when `store` is given), then its PNGs
    handed to `writer`, the features stored once those files exist."""
    decoded: Dict[str, Dict[str, torch.Tensor]] = {}

    def on_decoded(chunk: List[int], images: torch.Tensor) -> None:  # uint8 [b, C, H, W] on the device
        decoded["features"] = store.compute(images)

    def on_batch(chunk: List[int], images: np.ndarray) -> None:  # uint8 [b, H, W, C] on the host
        feats = decoded.pop("features", None)
        writer.write(chunk, images, None if feats is None else (lambda: store.save(chunk, feats)))

    return (on_decoded if store is not None else None), on_batch


def extractor_identity(weights: Optional[str], random_init: bool, extractor: InceptionFeatures,
                       device: torch.device) -> dict:
    """What stored features depend on (FeatureStore's extractor.json)."""
    weights_id = None
    if weights:
        st = os.stat(weights)
        weights_id = {"path": str(Path(weights).resolve()), "bytes": st.st_size}
    return {"weights": weights_id, "random_init": bool(random_init), "image_size": int(extractor.image_size),
            "chunk_size": int(extractor.chunk_size), "device": torch.device(device).type}
