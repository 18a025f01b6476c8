"""Turn a `data` config into label files on disk: the synthetic set is generated (cached), a user's is checked.

Both kinds end as the same `DataSource`, so everything downstream reads PaddleOCR label files the one way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from train.data.dataset import DetDataset, build_split
from train.data.synthetic import SyntheticSpec, ensure_synthetic_dataset, label_path, shifted_eval_spec
from train.data.unlabeled import UnlabeledPools, resolve_unlabeled  # noqa: F401  (registers the data.pool schema)
from train.errors import ConfigError, DataError
from train.schema import register_config_schema


# `data.generator` in conf/data/synthetic.yaml is the SyntheticSpec schema: Hydra validates its overrides (unknown
# field, wrong type) before any work starts.
register_config_schema(SyntheticSpec, group="data/generator", name="synthetic")


@dataclass(frozen=True)
class DataSource:
    """Where a dataset's images and its two label files are."""

    root: Path
    train_label_file: Path | None
    eval_label_file: Path


def _required(cfg: DictConfig, key: str) -> str:
    try:
        value = cfg[key]
    except MissingMandatoryValue:
        raise ConfigError(f"data.{key} is not set: pass data.{key}=<path>") from None
    if value is None:
        raise ConfigError(f"data.{key} is not set: pass data.{key}=<path>")
    return str(value)


def _label_file(path: str, root: Path) -> Path:
    """A relative label path is taken from the working directory when it exists there, else from `root`."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return root / candidate


def synthetic_spec(cfg: DictConfig) -> SyntheticSpec:
    """The `SyntheticSpec` a synthetic data config describes (`generator` fields, `shifted` variant)."""
    spec = SyntheticSpec.from_config(cfg.generator)
    return shifted_eval_spec(spec) if cfg.get("shifted", False) else spec


def resolve_data(cfg: DictConfig, progress: bool = True) -> DataSource:
    """Locate (or, for the synthetic set, generate) the dataset a `data` config names."""
    if cfg.get("generator") is not None:
        spec = synthetic_spec(cfg)
        root = ensure_synthetic_dataset(Path(_required(cfg, "cache_dir")).expanduser() / spec.hash(), spec,
                                        progress=progress)
        return DataSource(root, label_path(root, "train") if spec.n_train else None, label_path(root, "eval"))
    root = Path(_required(cfg, "root")).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a directory")
    train = None if OmegaConf.is_missing(cfg, "train_label_file") else cfg.get("train_label_file")
    return DataSource(
        root,
        None if train is None else _label_file(str(train), root),
        _label_file(_required(cfg, "label_file"), root),
    )


def build_dataset(cfg: DictConfig, source: DataSource, mode: Literal["train", "eval"], seed: int = 0) -> DetDataset:
    """The train or eval split of `source` with the transforms the `data` config sets."""
    if mode == "train":
        if source.train_label_file is None:
            raise ConfigError("this dataset has no train split: set data.train_label_file=<path>")
        return build_split(source.root, source.train_label_file, "train", crop_size=cfg.train.crop_size,
                           augment=cfg.train.augment, seed=seed, on_error=cfg.on_error)
    return build_split(source.root, source.eval_label_file, "eval", limit_side_len=cfg.eval.limit_side_len,
                       limit_type=cfg.eval.limit_type, on_error=cfg.on_error)
