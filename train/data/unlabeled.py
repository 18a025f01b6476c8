"""Unlabelled images from the `data` config: what recovery distils on and what the generalization guard scores on.

`data.unlabeled` (recovery) and `data.unlabeled_eval` (the guard) each take ``builtin`` (the generated pool of
`train.data.pool`, its ``recovery`` and held-out ``guard`` split), a folder or glob of the user's own images, or
null (none). A user folder is checked when the config is resolved: an empty folder, a glob that matches nothing or
a file OpenCV cannot read is an error naming it (``data.unlabeled_on_error=skip`` skips unreadable files and
warns with their count). The two pools must not share a file: the guard has to measure images recovery never saw.
"""
from __future__ import annotations

import glob
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
from omegaconf import DictConfig

from train.data.dataset import DetDataset
from train.data.labels import LabeledImage
from train.data.pool import PoolSpec, ensure_pool, pool_images
from train.data.transforms import build_eval_transform, build_unlabeled_transform
from train.errors import ConfigError, DataError
from train.schema import register_config_schema

BUILTIN = "builtin"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pbm", ".pgm", ".ppm")


register_config_schema(PoolSpec, group="data/pool", name="builtin")  # data.pool.* overrides checked by Hydra


@dataclass(frozen=True)
class UnlabeledPools:
    """Image files of the recovery pool and of the guard pool (None: not configured)."""

    recovery: list[Path] | None
    guard: list[Path] | None


def user_images(pattern: str, key: str, on_error: str = "raise",
                on_error_key: str = "data.unlabeled_on_error") -> list[Path]:
    """The readable image files of a folder (its files with image suffixes, sorted), a file or a glob, checked by
    header before anything is done with them. ``key``/``on_error_key``: the config keys messages name."""
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"{on_error_key}={on_error!r}: expected raise or skip")
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{key}={pattern}: the folder has no image files ({', '.join(IMAGE_SUFFIXES[:4])}, ...)")
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{key}={pattern}: no such folder or file, and no file matches it as a glob")
    unreadable = {f for f in files if not cv2.haveImageReader(str(f))}
    readable = [f for f in files if f not in unreadable]
    if unreadable:
        bad = next(f for f in files if f in unreadable)
        if on_error == "raise":
            raise DataError(f"{key}: cannot read image {bad} (empty, corrupt or not an image); pass "
                            f"{on_error_key}=skip to skip such files")
        print(f"warning: {key}: skipped {len(unreadable)} unreadable file(s) of {len(files)}, "
              f"the first {bad}", file=sys.stderr)
        if not readable:
            raise DataError(f"{key}={pattern}: none of its {len(files)} files is a readable image")
    return readable


def resolve_unlabeled(cfg: DictConfig, progress: bool = True) -> UnlabeledPools:
    """Locate (or, for the built-in pool, generate) the recovery and guard images a `data` config names."""
    on_error = cfg.get("unlabeled_on_error", "raise")
    pools: dict[str, list[Path] | None] = {}
    for key, split in (("unlabeled", "recovery"), ("unlabeled_eval", "guard")):
        value = cfg.get(key)
        if value is None:
            pools[split] = None
        elif str(value) == BUILTIN:
            spec = PoolSpec.from_config(cfg.pool)
            root = ensure_pool(Path(cfg.pool_cache_dir).expanduser() / spec.hash(), spec, progress=progress)
            images = [root / image.path for image in pool_images(root, split)]
            if not images:
                raise ConfigError(f"data.{key}=builtin: data.pool.n_{split}=0 images")
            pools[split] = images
        else:
            pools[split] = user_images(str(value), f"data.{key}", on_error)
    if pools["recovery"] and pools["guard"]:
        shared = set(p.resolve() for p in pools["recovery"]) & set(p.resolve() for p in pools["guard"])
        if shared:
            raise ConfigError(f"data.unlabeled and data.unlabeled_eval share {len(shared)} image(s), e.g. "
                              f"{sorted(shared)[0]}: the guard must score images recovery never sees")
    return UnlabeledPools(recovery=pools["recovery"], guard=pools["guard"])


def _items(paths: list[Path]) -> list[LabeledImage]:
    return [LabeledImage(image_path=p, regions=[], label_file=p, line_no=0) for p in paths]


def unlabeled_train_set(paths: list[Path], crop_size: int, augment: bool = True, seed: int = 0) -> DetDataset:
    """Train-mode crops of unlabelled images: batchable with the labelled train split, with empty DB targets."""
    return DetDataset(_items(paths), "train", build_unlabeled_transform(crop_size, augment), seed=seed)


def unlabeled_eval_set(paths: list[Path], limit_side_len: int, limit_type: str) -> DetDataset:
    """Eval-mode (resize-for-test) unlabelled images; ``ground_truth`` is empty for every one."""
    return DetDataset(_items(paths), "eval", build_eval_transform(limit_side_len, limit_type))
