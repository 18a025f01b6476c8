"""Paddle dataset and loaders over validated label records, for DB training and evaluation.

Train items are dicts of equal-shape float32 arrays (image and the four DB targets), so the default batching
applies. Eval images keep their own aspect ratio, so eval runs one image per batch; the ragged ground-truth
polygons never enter a tensor: an eval item carries its ``index`` and the caller asks
:meth:`DetDataset.ground_truth` for the original-size regions.
"""

from __future__ import annotations

from itertools import count
from pathlib import Path
from typing import Iterator, Literal, Sequence

import cv2
import numpy as np
import paddle

from train.data.labels import LabeledImage, TextRegion, read_label_file
from train.data.transforms import Compose, Sample, build_eval_transform, build_train_transform, make_sample
from train.errors import ConfigError, DataError

Mode = Literal["train", "eval"]
TRAIN_KEYS = ("image", "shrink_map", "shrink_mask", "threshold_map", "threshold_mask")
EVAL_KEYS = ("image", "shape", "index")


def read_image(path: Path) -> np.ndarray:
    """Decode an image as 3-channel BGR uint8, as PaddleOCR's ``DecodeImage(img_mode='BGR')``."""
    try:
        data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e.strerror}") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise DataError(f"cannot decode image {path} (corrupt or not an image)")
    return image


class DetDataset(paddle.io.Dataset):
    """DB detection samples built from ``items`` by ``transform``.

    Each sample's randomness comes from a generator seeded with (seed, epoch, index): the same sample is
    reproduced in any worker process and on resume, and every epoch sees fresh augmentation once
    :meth:`set_epoch` is called. (A sum like seed + epoch + index would repeat across epochs.)
    """

    def __init__(self, items: Sequence[LabeledImage], mode: Mode, transform: Compose, seed: int = 0):
        if mode not in ("train", "eval"):
            raise ConfigError(f"dataset mode={mode!r} must be 'train' or 'eval'")
        if not items:
            raise DataError("dataset has no labelled images")
        super().__init__()
        self.items = list(items)
        self.mode = mode
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream; call before iterating (worker processes copy the dataset then)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> Sample:
        """The full transformed sample, polygons included (what ``__getitem__`` selects from)."""
        item = self.items[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        sample = make_sample(read_image(item.image_path), item.regions)
        return self.transform(sample, rng)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        sample = self.load(index)
        if self.mode == "train":
            return {key: sample[key].astype(np.float32, copy=False) for key in TRAIN_KEYS}
        return {
            "image": sample["image"].astype(np.float32, copy=False),
            "shape": sample["shape"].astype(np.float32, copy=False),
            "index": np.array(index, dtype=np.int64),
        }

    def ground_truth(self, index: int) -> list[TextRegion]:
        """The labelled regions of item ``index`` in original image coordinates, for the detection metric."""
        return self.items[index].regions


def collate(batch: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack per-key arrays into a batch; mismatched shapes mean eval was given a batch size above 1."""
    out = {}
    for key in batch[0]:
        arrays = [b[key] for b in batch]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ConfigError(
                f"cannot batch '{key}' arrays of shapes {sorted(shapes)}: eval images keep their own size, "
                "use batch_size=1"
            )
        out[key] = np.stack(arrays)
    return out


def build_loader(
    dataset: DetDataset,
    batch_size: int,
    shuffle: bool | None = None,
    num_workers: int = 0,
    drop_last: bool = False,
) -> paddle.io.DataLoader:
    """A DataLoader for ``dataset``; eval is forced to one image per batch (images differ in shape).

    ``shuffle`` defaults to True for train and False for eval.
    """
    if dataset.mode == "eval" and batch_size != 1:
        raise ConfigError(f"eval batch_size={batch_size}: eval images keep their own size, use 1")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    return paddle.io.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=dataset.mode == "train" if shuffle is None else shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate,
    )


def endless_batches(
    dataset: DetDataset, batch_size: int, num_workers: int = 0
) -> Iterator[dict[str, paddle.Tensor]]:
    """Shuffled train batches as paddle tensors, epoch after epoch, with fresh augmentation every epoch."""
    loader = build_loader(dataset, batch_size, num_workers=num_workers, drop_last=len(dataset) >= batch_size)
    for epoch in count():
        dataset.set_epoch(epoch)
        for batch in loader:
            yield {key: value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value)
                   for key, value in batch.items()}


def mixed_batches(
    parts: Sequence[tuple[DetDataset, int]], num_workers: int = 0
) -> Iterator[dict[str, paddle.Tensor]]:
    """Batches that take ``n`` samples from each ``(dataset, n)`` part (parts with n = 0 are left out), joined
    along the batch axis: every batch has the same mix, so no step sees only one kind of image."""
    streams = [endless_batches(dataset, n, num_workers) for dataset, n in parts if n > 0]
    if not streams:
        raise ConfigError("mixed_batches: every part has 0 samples per batch")
    while True:
        pieces = [next(stream) for stream in streams]
        yield pieces[0] if len(pieces) == 1 else {key: paddle.concat([p[key] for p in pieces]) for key in pieces[0]}


def build_split(
    root: str | Path,
    label_file: str | Path | Sequence[str | Path],
    mode: Mode,
    crop_size: int = 640,
    augment: bool = True,
    limit_side_len: int = 960,
    limit_type: str = "max",
    seed: int = 0,
    on_error: Literal["raise", "skip"] = "raise",
) -> DetDataset:
    """Read one or more label files under ``root`` and wrap them with the mode's PaddleOCR transform.

    Meant as a Hydra ``_target_``: train uses ``crop_size``/``augment``, eval ``limit_side_len``/``limit_type``.
    """
    files = [label_file] if isinstance(label_file, (str, Path)) else list(label_file)
    if not files:
        raise ConfigError("label_file list is empty")
    items = [item for f in files for item in read_label_file(f, root, on_error=on_error)]
    if mode == "train":
        transform = build_train_transform(crop_size=crop_size, augment=augment)
    elif mode == "eval":
        transform = build_eval_transform(limit_side_len=limit_side_len, limit_type=limit_type)
    else:
        raise ConfigError(f"dataset mode={mode!r} must be 'train' or 'eval'")
    return DetDataset(items, mode, transform, seed=seed)
