"""What a search config means and whether it can work: objectives, value checks, and the settings a study freezes.

Every check here runs before any model is loaded, so a mistyped override costs a second, not a sensitivity scan.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prune.criteria import CRITERIA
from prune.latency import check_rounds
from prune.latency_model import check_blocks
from prune.sensitivity import check_settings as check_sensitivity_settings
from search.attributes import Metric
from search.workers import resolve_workers
from train.errors import ConfigError


def mask_url(url: str) -> str:
    """`url` with any password replaced by `***` (for messages and logs)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


@dataclass(frozen=True)
class Objective:
    """One study objective: its config name, Optuna direction and the trial metric that is its value."""

    name: str
    direction: str
    metric: str


# Costs are ratios to the unpruned model (pruned / unpruned), so values read the same on any model and input size.
OBJECTIVES: dict[str, Objective] = {
    "hmean": Objective("hmean", "maximize", Metric.HMEAN),
    "flops": Objective("flops", "minimize", Metric.FLOPS_RATIO),
    "latency": Objective("latency", "minimize", Metric.LATENCY_RATIO),
}

# Config sections whose values decide what a trial's numbers mean. A study remembers them at creation and refuses
# to resume under different ones (the numbers would not be comparable); everything else (budget, sampler,
# screening, selection, tracking) may change between invocations.
FROZEN_SECTIONS = ("model", "data", "postprocess", "prune", "sensitivity", "finetune", "measure")
FROZEN_SEARCH_KEYS = ("objectives", "targets", "space", "warm_start")
# Where a cache lives does not change its content (it is keyed by content), and it follows $OCRDET_CACHE_DIR; the
# teacher's engine computes the same targets up to float rounding.
_UNFROZEN_LEAVES = ("cache_dir", "pool_cache_dir", "teacher_program")


COSTS = ("flops", "latency")  # what search.targets can bound
_TARGET = re.compile(rf"^\s*({'|'.join(COSTS)})\s*(?:<=|:)\s*([0-9.eE+-]+)\s*$")


@dataclass(frozen=True)
class Targets:
    """`search.targets` read: the cost every target bounds, and each target as a reduction of it (1 - the ratio)."""

    cost: str
    reductions: list[float]


def parse_targets(values: Any, key: str = "search.targets") -> Targets:
    """`search.targets`: plain numbers are FLOPs reductions (0.5: half the FLOPs); `latency<=0.6` (or `latency:0.6`,
    which needs no quotes on the command line) bounds the latency ratio, `flops<=0.5` the FLOPs ratio. One cost per
    study: candidates of one target compare at equal cost, and equal means one kind of cost."""
    costs, reductions = set(), []
    for value in values:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            cost, reduction = "flops", float(value)
            if not 0.0 < reduction < 1.0:
                raise ConfigError(f"{key}: {value} is not a FLOPs reduction in (0, 1)")
        else:
            match = _TARGET.match(str(value))
            try:
                ratio = float(match.group(2)) if match else float("nan")
            except ValueError:
                ratio = float("nan")
            if not 0.0 < ratio < 1.0:
                raise ConfigError(f"{key}: {value!r} is not a target: a FLOPs reduction in (0, 1), or "
                                  "latency<=R / flops<=R (also latency:R) with a ratio R in (0, 1)")
            cost, reduction = match.group(1), 1.0 - ratio
        costs.add(cost)
        reductions.append(round(reduction, 6))
    if len(costs) > 1:
        raise ConfigError(f"{key}={list(values)}: targets of one study bound one cost (FLOPs or latency), not both")
    return Targets(cost=costs.pop() if costs else "flops", reductions=reductions)


def objectives(names: list[str]) -> list[Objective]:
    """The configured objectives; `hmean` plus at least one cost, each named once."""
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise ConfigError(f"search.objectives: unknown objective {unknown[0]!r}; known: {', '.join(OBJECTIVES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"search.objectives={list(names)}: each objective at most once")
    if "hmean" not in names or len(names) < 2:
        raise ConfigError(f"search.objectives={list(names)}: needs hmean and at least one of flops, latency")
    return [OBJECTIVES[n] for n in names]


def _positive_or_null(cfg: DictConfig, section: str, key: str) -> None:
    value = cfg[key]
    if value is not None and not value > 0:
        raise ConfigError(f"search.{section}.{key}={value}: must be > 0 or null")


def check_search_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first search setting that cannot work."""
    search = cfg.search
    objectives(list(search.objectives))
    if search.n_trials < 1:
        raise ConfigError(f"search.n_trials={search.n_trials}: must be >= 1")
    resolve_workers(search.workers)
    if search.max_failures < 1:
        raise ConfigError(f"search.max_failures={search.max_failures}: must be >= 1")
    check_out_dir(cfg.out_dir)
    check_sensitivity_settings(cfg.sensitivity)
    prune = cfg.prune
    if prune.criterion not in CRITERIA:
        raise ConfigError(f"prune.criterion={prune.criterion!r}: known criteria are {', '.join(CRITERIA)}")
    if prune.align < 1:
        raise ConfigError(f"prune.align={prune.align}: must be >= 1")
    if len(prune.input_size) != 2 or min(prune.input_size) < 32:
        raise ConfigError(f"prune.input_size={list(prune.input_size)}: need [height, width], each >= 32")
    measure = cfg.measure
    for key, low in (("threads", 1), ("warmup", 0), ("runs", 1)):
        if measure[key] < low:
            raise ConfigError(f"measure.{key}={measure[key]}: must be >= {low}")
    check_rounds(measure.min_rounds, measure.max_rounds, measure.tolerance)
    parse_targets(search.targets)
    for target in search.warm_start.seed_rule_targets:
        if not 0.0 < target < 1.0:
            raise ConfigError(f"search.warm_start.seed_rule_targets: {target} is not a FLOPs reduction in (0, 1)")
    if search.latency_model.plans < 3:
        raise ConfigError(f"search.latency_model.plans={search.latency_model.plans}: need at least 3 measured plans")
    check_blocks(search.latency_model.blocks, "search.latency_model.blocks")
    if not 0.0 < search.warm_start.tolerance < 1.0:
        raise ConfigError(f"search.warm_start.tolerance={search.warm_start.tolerance}: must be in (0, 1)")
    space = search.space
    if not space.loss_budget > 0:
        raise ConfigError(f"search.space.loss_budget={space.loss_budget}: must be > 0")
    if not 0.0 < space.max_offset <= 4.0:
        raise ConfigError(f"search.space.max_offset={space.max_offset}: must be in (0, 4] (log2 of a count's "
                          "deviation from the seed rule's)")
    if not 0.0 < space.tolerance < 0.5:
        raise ConfigError(f"search.space.tolerance={space.tolerance}: must be in (0, 0.5)")
    low, high = space.skip_probability
    if not 0.0 < low <= high < 1.0:
        raise ConfigError(f"search.space.skip_probability=[{low}, {high}]: need 0 < low <= high < 1")
    screening = search.screening
    if screening.margin < 0:
        raise ConfigError(f"search.screening.margin={screening.margin}: must be >= 0")
    if screening.bn_batches < 0 or screening.max_images < 1:
        raise ConfigError(f"search.screening: bn_batches={screening.bn_batches} must be >= 0 and "
                          f"max_images={screening.max_images} >= 1")
    check_rungs(cfg)
    for key in ("top", "seeds", "confirm_seeds"):
        if search.reeval[key] is None or search.reeval[key] < 0:
            raise ConfigError(f"search.reeval.{key}={search.reeval[key]}: must be >= 0")
    for key in ("max_flops_ratio", "max_latency_ratio", "min_hmean"):
        _positive_or_null(search.constraints, "constraints", key)
    for key in ("max_flops_ratio", "max_latency_ratio"):
        _positive_or_null(search.select, "select", key)
    if search.select.min_gain is None or search.select.min_gain < 0:
        raise ConfigError(f"search.select.min_gain={search.select.min_gain}: must be >= 0 (0: the highest hmean "
                          "wins, however small its lead over the seed rule's plan)")
    if search.select.confirm_gain is None:
        raise ConfigError("search.select.confirm_gain=null: must be a number (the lead a searched plan must keep on "
                          "the confirmation seeds; search.reeval.confirm_seeds=0 turns the confirmation off)")
    min_agreement = search.select.min_agreement
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise ConfigError(f"search.select.min_agreement={min_agreement}: must be in [0, 1] or null")
    if min_agreement is not None and cfg.data.get("unlabeled_eval") is None:
        raise ConfigError("search.select.min_agreement needs the guard's images: set data.unlabeled_eval (builtin or "
                          "a folder of your images), or search.select.min_agreement=null")


def check_rungs(cfg: DictConfig) -> None:
    """ConfigError for rungs that cannot work: increasing step counts >= 1 and a margin >= 0. A rung at or past
    `finetune.steps` is not one (the trial is scored at its end anyway): tiny recoveries simply have none."""
    rungs = cfg.search.rungs
    steps = list(rungs.steps)
    if any(int(s) < 1 for s in steps) or sorted(set(steps)) != steps:
        raise ConfigError(f"search.rungs.steps={steps}: need increasing recovery step counts >= 1")
    if not rungs.margin >= 0:
        raise ConfigError(f"search.rungs.margin={rungs.margin}: must be >= 0")


def check_out_dir(out_dir: str | Path, key: str = "out_dir") -> None:
    """`out_dir` can be created (or is a folder) and written to; checked without creating anything."""
    path = Path(out_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}={out_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={out_dir}: {existing} is not writable")


def study_constraints(cfg: DictConfig) -> dict[str, float | None]:
    """What makes a trial feasible: `search.constraints` plus the generalization guard's
    `search.select.min_agreement` (a trial the guard rejects is off the front, never chosen, and the sampler is told,
    through Optuna's constraints, to look elsewhere)."""
    return {**OmegaConf.to_container(cfg.search.constraints), "min_agreement": cfg.search.select.min_agreement}


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = node


def task_config(cfg: DictConfig) -> DictConfig:
    """`cfg` without Hydra's own node: the sweeper's config carries it, and parts of it resolve only inside a job."""
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as dotted keys -> values (lists stay lists), without Hydra's own node."""
    container = OmegaConf.to_container(task_config(cfg), resolve=True)
    out: dict[str, Any] = {}
    _flatten(container, "", out)
    return out


def frozen_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings a study is created with and must be resumed with (see FROZEN_SECTIONS)."""
    flat = flat_config(cfg)
    prefixes = tuple(f"{s}." for s in FROZEN_SECTIONS) + tuple(f"search.{k}" for k in FROZEN_SEARCH_KEYS)
    return {k: v for k, v in sorted(flat.items())
            if k.startswith(prefixes) and k.rsplit(".", 1)[-1] not in _UNFROZEN_LEAVES}


def check_same_settings(stored: dict[str, Any], current: dict[str, Any], study_name: str) -> None:
    """ConfigError naming the first setting that differs from the study's (a resumed study must not drift)."""
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        if json.dumps(old) != json.dumps(new):
            raise ConfigError(f"{key}={json.dumps(new)}, but study {study_name!r} was created with "
                              f"{json.dumps(old)}: pass {key}={json.dumps(old)} to resume it, or set "
                              "search.study_name=<new name> for a new study")
