"""Per-group sensitivity: how much a metric drops when one channel group alone is pruned by each ratio.

The loss is PaddleSlim's `(base - pruned) / (base + 1e-3)`. The table is the search's prior, so it is cached on
disk (JSON, keyed by weights, probe data, criterion, metric and ratios), written after every single evaluation so
a killed scan resumes without recomputing anything, and a cache file that does not parse or does not carry the
expected key is reported and rebuilt, never trusted. Raw values are kept; `curve()` makes them monotone in the
ratio (pruning more never helps) before they are used as a prior.

Two metrics: `hmean` (the detection metric, as the seed recipe uses) and the fast default `map_dice`, the Dice
agreement between the pruned and the unpruned model's binarized probability maps, which needs no labels and no
post-processing. `benchmarks/sensitivity_metrics.py` measures how well it ranks groups like hmean does.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import paddle
from tqdm import tqdm

from prune.groups import ChannelGroup, discover_groups
from prune.plan import apply_plan, make_plan, weights_hash
from omegaconf import DictConfig

from train.cli import print_warning
from train.data.dataset import DetDataset, build_split
from train.data.source import DataSource
from train.data.unlabeled import resolve_unlabeled, unlabeled_eval_set
from train.errors import ConfigError
from train.evaluation import evaluate_detector, predict_maps
from train.postprocess import DBPostProcess

SCHEMA_VERSION = 1
METRICS = ("map_dice", "hmean")
LOSS_EPS = 1e-3


def relative_loss(base: float, pruned: float) -> float:
    """PaddleSlim's sensitivity loss: the metric's relative drop (negative when pruning helps)."""
    return (base - pruned) / (base + LOSS_EPS)


def ratio_label(ratio: float) -> str:
    """JSON keys for ratios: short and stable (0.1 -> "0.1")."""
    return f"{ratio:.4g}"


@dataclass(frozen=True)
class SensitivityKey:
    """Everything a sensitivity table depends on; its digest names the cache file."""

    model: str
    weights_hash: str
    data_hash: str
    criterion: str
    metric: str
    ratios: tuple[float, ...]

    def digest(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class CorruptCache(Exception):
    """A cache file that cannot be trusted (unparsable, other schema, other key, non-finite values)."""


@dataclass
class SensitivityTable:
    """Raw losses per prunable group and ratio (missing entries: not measured yet)."""

    key: SensitivityKey
    base: float
    channels: dict[str, int]
    losses: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ratios(self) -> tuple[float, ...]:
        return self.key.ratios

    @property
    def groups(self) -> list[str]:
        return list(self.channels)

    def has(self, group: str, ratio: float) -> bool:
        return ratio_label(ratio) in self.losses.get(group, {})

    def is_complete(self) -> bool:
        return all(self.has(g, r) for g in self.channels for r in self.ratios)

    def raw(self, group: str) -> np.ndarray:
        measured = self.losses.get(group, {})
        return np.array([measured.get(ratio_label(r), np.nan) for r in self.ratios], dtype=np.float64)

    def curve(self, group: str) -> np.ndarray:
        """The loss curve made monotone non-decreasing in the ratio (running maximum of the raw values)."""
        return np.fmax.accumulate(self.raw(group))

    def sensitivity(self, group: str) -> float:
        """One number per group for ordering: the mean of its monotone curve."""
        return float(np.nanmean(self.curve(group)))

    def most_sensitive_first(self) -> list[str]:
        return sorted(self.channels, key=self.sensitivity, reverse=True)

    def max_ratio_under(self, group: str, budget: float) -> float:
        """The largest grid ratio whose monotone loss stays within `budget` (0.0 when even the first does not)."""
        allowed = [r for r, loss in zip(self.ratios, self.curve(group)) if loss <= budget]
        return max(allowed, default=0.0)

    def to_json(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "key": asdict(self.key), "base": self.base,
                "channels": self.channels, "losses": self.losses, "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: dict) -> SensitivityTable:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise CorruptCache(f"schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
        try:
            key = SensitivityKey(**{**data["key"], "ratios": tuple(data["key"]["ratios"])})
            table = cls(key=key, base=float(data["base"]),
                        channels={str(k): int(v) for k, v in data["channels"].items()},
                        losses={str(g): {str(r): float(v) for r, v in row.items()}
                                for g, row in data["losses"].items()},
                        seconds=float(data.get("seconds", 0.0)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptCache(f"malformed table ({type(exc).__name__}: {exc})") from None
        values = [table.base] + [v for row in table.losses.values() for v in row.values()]
        if not all(math.isfinite(v) for v in values):
            raise CorruptCache("non-finite value")
        if set(table.losses) - set(table.channels):
            raise CorruptCache("losses for groups the table does not list")
        return table

    def save(self, path: Path) -> None:
        """Atomic write: a kill mid-write leaves the previous complete file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, key: SensitivityKey) -> SensitivityTable:
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCache(f"unreadable ({type(exc).__name__}: {exc})") from None
        if not isinstance(data, dict):
            raise CorruptCache("not a JSON object")
        table = cls.from_json(data)
        if table.key != key:
            raise CorruptCache("its key does not match the file name (edited or copied from another scan)")
        return table


class Probe(Protocol):
    """Scores a model on the probe images; higher is better."""

    metric: str

    def score(self, model: paddle.nn.Layer) -> float: ...


def _binarize(maps: np.ndarray, thresh: float) -> np.ndarray:
    return maps > thresh


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks; two empty masks agree perfectly."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


class MapDiceProbe:
    """Agreement of binarized probability maps with the unpruned model's (base score 1.0 by construction)."""

    metric = "map_dice"

    def __init__(self, dataset: DetDataset, images: int, reference: paddle.nn.Layer, thresh: float = 0.3):
        self.inputs = [dataset[i]["image"] for i in range(min(images, len(dataset)))]
        self.thresh = thresh
        self.reference = [_binarize(predict_maps(reference, x), thresh) for x in self.inputs]

    def score(self, model: paddle.nn.Layer) -> float:
        model.eval()
        return float(np.mean([dice(_binarize(predict_maps(model, x), self.thresh), ref)
                              for x, ref in zip(self.inputs, self.reference)]))


class HmeanProbe:
    """hmean on the probe images, with the full DB post-processing and IoU metric."""

    metric = "hmean"

    def __init__(self, dataset: DetDataset, images: int, postprocess: DBPostProcess):
        self.dataset, self.images, self.postprocess = dataset, images, postprocess

    def score(self, model: paddle.nn.Layer) -> float:
        return evaluate_detector(model, self.dataset, self.postprocess, self.images, progress=False).hmean


def build_probe(metric: str, dataset: DetDataset, images: int, model: paddle.nn.Layer,
                postprocess: DBPostProcess) -> Probe:
    if metric == "map_dice":
        return MapDiceProbe(dataset, images, model, postprocess.thresh)
    if metric == "hmean":
        return HmeanProbe(dataset, images, postprocess)
    raise ConfigError(f"sensitivity.metric={metric!r}: known metrics are {', '.join(METRICS)}")


def probe_fingerprint(dataset: DetDataset, images: int, resize: Sequence[object]) -> str:
    """Hash of what the probe sees: the first `images` items' image bytes and labels, and the resize settings."""
    digest = hashlib.sha256(json.dumps([str(v) for v in resize]).encode())
    for item in dataset.items[:images]:
        digest.update(item.image_path.read_bytes())
        digest.update(json.dumps([[r.points.tolist(), r.ignore] for r in item.regions]).encode())
    return digest.hexdigest()[:16]


def check_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(r) for r in ratios)
    if not values:
        raise ConfigError("sensitivity.ratios is empty")
    bad = [r for r in values if not 0.0 < r < 1.0]
    if bad:
        raise ConfigError(f"sensitivity.ratios {bad}: every ratio must be in (0, 1)")
    if list(values) != sorted(set(values)):
        raise ConfigError(f"sensitivity.ratios {list(values)}: must be strictly increasing")
    return values


def open_table(cache_file: Path, key: SensitivityKey, channels: dict[str, int]) -> SensitivityTable:
    """The cached table for `key` (possibly partial), or a fresh one; a corrupt file is reported and set aside."""
    if cache_file.exists():
        try:
            table = SensitivityTable.load(cache_file, key)
            if table.channels == channels:
                return table
            reason = "its groups differ from the model's"
        except CorruptCache as exc:
            reason = str(exc)
        aside = cache_file.with_name(f"{cache_file.name}.corrupt-{int(time.time())}")
        os.replace(cache_file, aside)
        print_warning(f"sensitivity cache {cache_file} is corrupt ({reason}): moved to {aside.name}, rebuilding")
    return SensitivityTable(key=key, base=math.nan, channels=channels)


def shard_file(cache_file: Path, worker: str) -> Path:
    """Where a helping worker keeps what it measured of `cache_file`'s table (merged into it by the builder)."""
    return cache_file.with_name(f"{cache_file.name}.{worker}.part")


def _shards(cache_file: Path) -> list[Path]:
    return sorted(cache_file.parent.glob(f"{cache_file.name}.*.part"))


def _merge_measured(table: SensitivityTable, paths: Sequence[Path]) -> None:
    """Add to `table` the entries that the tables in `paths` (same key) hold and it lacks; unreadable files (being
    replaced, or from another scan) add nothing."""
    for path in paths:
        try:
            other = SensitivityTable.load(path, table.key)
        except CorruptCache:
            continue
        for group, row in other.losses.items():
            if group in table.channels:
                for label, loss in row.items():
                    table.losses.setdefault(group, {}).setdefault(label, loss)


def compute_sensitivity(
    model: paddle.nn.Layer,
    model_name: str,
    probe: Probe,
    key: SensitivityKey,
    cache_file: Path,
    groups: list[ChannelGroup] | None = None,
    progress: bool = True,
    helper: str | None = None,
) -> SensitivityTable:
    """Fill (or finish) the sensitivity table of `model`'s prunable groups; saved after every evaluation.

    Each evaluation prunes a copy of `model` (filters ranked on its current, trained weights) by one group and
    one ratio, scores it with `probe`, and records the relative loss.

    Several processes can share one scan: the builder (`helper=None`) goes through the (group, ratio) pairs from
    the first, each `helper` (a worker name) from the last, writing to its own `shard_file`; before every
    evaluation each one takes in what the others measured and skips it, a helper stops where it meets done work,
    and the builder merges the shards into the cache file at the end and removes them. Evaluations are
    deterministic at a given thread count, so who measured what does not change the table.
    """
    groups = discover_groups(model) if groups is None else groups
    prunable = [g for g in groups if g.prunable]
    channels = {g.name: g.channels for g in prunable}
    table = open_table(cache_file, key, channels) if helper is None else \
        SensitivityTable(key=key, base=math.nan, channels=channels)
    own_file = cache_file if helper is None else shard_file(cache_file, helper)
    others = (lambda: _shards(cache_file)) if helper is None else \
        (lambda: [cache_file, *(path for path in _shards(cache_file) if path != own_file)])
    _merge_measured(table, others())
    todo = [(g, r) for g in prunable for r in key.ratios if not table.has(g.name, r)]
    if helper is not None:
        todo.reverse()
    if math.isnan(table.base) and (todo or helper is None):
        table.base = probe.score(model)
        table.save(own_file)
    started = time.perf_counter()
    for group, ratio in tqdm(todo, desc="sensitivity" if helper is None else f"sensitivity ({helper})",
                             unit="eval", disable=not progress or not todo, dynamic_ncols=True):
        _merge_measured(table, others())
        if table.has(group.name, ratio):
            if helper is not None:
                break  # met the builder: the rest is done or being done
            continue
        candidate = copy.deepcopy(model)
        plan = make_plan(candidate, model_name, {group.name: ratio}, key.criterion, groups=groups)
        apply_plan(candidate, plan, groups)
        loss = relative_loss(table.base, probe.score(candidate))
        table.losses.setdefault(group.name, {})[ratio_label(ratio)] = loss
        table.seconds += time.perf_counter() - started
        started = time.perf_counter()
        table.save(own_file)
    if helper is None:
        shards = _shards(cache_file)
        _merge_measured(table, shards)
        table.save(cache_file)
        for path in shards:
            path.unlink(missing_ok=True)
    elif own_file.exists() and _holds_all(cache_file, table):  # the builder merged everything (or measured it too)
        own_file.unlink(missing_ok=True)
    return table


def _holds_all(cache_file: Path, table: SensitivityTable) -> bool:
    try:
        merged = SensitivityTable.load(cache_file, table.key)
    except CorruptCache:
        return False
    return all(label in merged.losses.get(group, {}) for group, row in table.losses.items() for label in row)


def sensitivity_key(model: paddle.nn.Layer, model_name: str, dataset: DetDataset, images: int,
                    resize: Sequence[object], criterion: str, metric: str, ratios: Sequence[float]) -> SensitivityKey:
    if metric not in METRICS:
        raise ConfigError(f"sensitivity.metric={metric!r}: known metrics are {', '.join(METRICS)}")
    if images < 1:
        raise ConfigError(f"sensitivity.images={images}: need at least 1 probe image")
    return SensitivityKey(model=model_name, weights_hash=weights_hash(model),
                          data_hash=probe_fingerprint(dataset, images, resize), criterion=criterion, metric=metric,
                          ratios=check_ratios(ratios))


SPLITS = ("unlabeled", "train", "eval")


def check_probe(split: str, metric: str) -> None:
    """A known split and metric, and labels where the metric needs them."""
    if split not in SPLITS:
        raise ConfigError(f"sensitivity.split={split!r}: use one of {', '.join(SPLITS)}")
    if metric not in METRICS:
        raise ConfigError(f"sensitivity.metric={metric!r}: known metrics are {', '.join(METRICS)}")
    if split == "unlabeled" and metric != "map_dice":
        raise ConfigError(f"sensitivity.metric={metric} needs labels: use sensitivity.split=train or eval, or "
                          "sensitivity.metric=map_dice")


def check_settings(scfg: DictConfig) -> None:
    """Every `sensitivity.*` value of an app config, before anything is loaded or written."""
    check_probe(scfg.split, scfg.metric)
    if scfg.images < 1:
        raise ConfigError(f"sensitivity.images={scfg.images}: need at least 1 probe image")
    if scfg.limit_side_len < 32:
        raise ConfigError(f"sensitivity.limit_side_len={scfg.limit_side_len}: must be >= 32")
    check_ratios(scfg.ratios)


def probe_images(cfg: DictConfig, source: DataSource, split: str, metric: str, images: int,
                 resize: tuple[int, str]) -> DetDataset:
    """The images a sensitivity scan probes, resized for test.

    ``unlabeled`` (default): ``images`` files spread evenly over the recovery pool (``data.unlabeled``: the
    built-in pool's photos, hard negatives and text on photos, or the user's own images). A group whose cut
    barely moves the teacher's map on the generator's clean renders can matter a lot on real backgrounds: a seed
    rule plan at -50% FLOPs from this table reached teacher agreement 0.68 on the guard images and 0.59 on
    ``shifted_v1`` after 60 recovery steps (mean of 2 seeds), the same rule from a table probed on synthetic train
    images 0.59 and 0.53, at a larger 0.51x FLOPs (README "Generalization"). ``train``/``eval``: the first
    ``images`` of that labelled split (``metric=hmean`` needs labels).
    """
    check_probe(split, metric)
    if split == "unlabeled":
        pool = resolve_unlabeled(cfg.data, progress=cfg.get("progress", True)).recovery
        if not pool:
            raise ConfigError("sensitivity.split=unlabeled needs the recovery images (data.unlabeled): set it, or "
                              "sensitivity.split=train")
        step = max(1, len(pool) // images)
        return unlabeled_eval_set(list(pool)[::step][:images], resize[0], resize[1])
    label_file = source.train_label_file if split == "train" else source.eval_label_file
    if label_file is None:
        raise ConfigError("sensitivity.split=train but the dataset has no train split: set data.train_label_file "
                          "or sensitivity.split=eval")
    return build_split(source.root, label_file, "eval", limit_side_len=resize[0], limit_type=resize[1],
                       on_error=cfg.data.on_error)


def table_for_config(cfg: DictConfig, model: paddle.nn.Layer, source: DataSource,
                     groups: list[ChannelGroup] | None = None,
                     helper: str | None = None) -> tuple[SensitivityTable, Path]:
    """The sensitivity table an app config asks for (groups `sensitivity`, `model`, `prune`, `postprocess`,
    `data`), from its cache or measured now, and the cache file. `python -m prune.sensitivity` and the search
    both come here, so either reuses the other's scan."""
    scfg = cfg.sensitivity
    check_settings(scfg)
    resize = (scfg.limit_side_len, "max")
    probe_set = probe_images(cfg, source, scfg.split, scfg.metric, scfg.images, resize)
    key = sensitivity_key(model, cfg.model.name, probe_set, scfg.images, resize, cfg.prune.criterion, scfg.metric,
                          scfg.ratios)
    probe = build_probe(scfg.metric, probe_set, scfg.images, model, DBPostProcess(**cfg.postprocess))
    cache_file = Path(scfg.cache_dir) / f"{cfg.model.name}-{key.digest()}.json"
    return compute_sensitivity(model, cfg.model.name, probe, key, cache_file, groups, progress=cfg.progress,
                               helper=helper), cache_file
