"""The Optuna study behind a search: storage, creation or resume, warm start, counting, and what trials carry.

The study is the single source of truth shared by the sweeper and the trial jobs (which may run in other
processes or on other hosts): the sweeper stores each trial's plan ratios as user attributes before launching it,
the job reads them back by trial number, and the sweeper records the job's metrics as user attributes when it
tells the result. Study-level user attributes hold what was fixed at creation (settings, search space, unpruned
reference measurement, MLflow parent run), so a resumed study searches the same space against the same reference.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState

from search.config import Objective
from search.pareto import TrialRecord
from train.errors import ConfigError

# Study user attributes.
STUDY_SETTINGS = "settings"
STUDY_SPACE = "space"
STUDY_REFERENCE = "reference"
STUDY_PARENT_RUN = "mlflow_parent_run_id"
STUDY_WARM_STARTED = "warm_started"
STUDY_CHOSEN = "chosen_trial"

# Trial user attributes.
TRIAL_RATIOS = "ratios"
TRIAL_SKIP_SET = "skip_set"
TRIAL_BASELINE = "baseline"
TRIAL_TARGET = "target_reduction"
TRIAL_RUN_ID = "mlflow_run_id"
TRIAL_SCREENED_OUT = "screened_out"
TRIAL_FAIL_REASON = "fail_reason"

BASELINE_SEED_RULE = "seed_rule"
BASELINE_UNPRUNED = "unpruned"

# Screened-out candidates are told as PRUNED: they count towards the budget, samplers learn to avoid their
# region, and they stay off Optuna's own Pareto front (`study.best_trials`) as they were never fine-tuned.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def mask_url(url: str) -> str:
    """`url` with any password replaced by `***` (for messages and logs)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def make_storage(cfg: DictConfig) -> optuna.storages.BaseStorage:
    """The Optuna storage the `storage` config describes; ConfigError (one line) when it cannot be opened."""
    where = mask_url(str(cfg.get("url", cfg.get("_target_"))))
    try:
        return instantiate(cfg)
    except Exception as exc:  # SQLAlchemy, driver and OS errors all mean the same thing to the user
        cause = exc.__cause__ or exc
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(f"storage {where}: cannot open ({type(cause).__name__}: {mask_url(message)})") from None


def constraint_values(attrs: Mapping[str, Any], constraints: Mapping[str, float | None]) -> list[float]:
    """Optuna constraint values (<= 0 is feasible) for the configured limits, from a trial's user attributes.

    A screened-out trial has no fine-tuned hmean; its screening hmean stands in.
    """
    hmean = attrs.get("hmean", attrs.get("screen_hmean", 0.0))
    values = []
    if constraints.get("max_flops_ratio") is not None:
        values.append(float(attrs["flops_ratio"]) - constraints["max_flops_ratio"])
    if constraints.get("max_latency_ratio") is not None:
        values.append(float(attrs["latency_ratio"]) - constraints["max_latency_ratio"])
    if constraints.get("min_hmean") is not None:
        values.append(constraints["min_hmean"] - float(hmean))
    return values


def constraints_func(constraints: Mapping[str, float | None]) -> Callable[[FrozenTrial], list[float]] | None:
    """The sampler's `constraints_func` for the configured limits, or None when there are none."""
    if all(v is None for v in constraints.values()):
        return None
    limits = dict(constraints)

    def evaluate(trial: FrozenTrial) -> list[float]:
        if "flops_ratio" not in trial.user_attrs:  # failed before measuring: infeasible
            return [1.0] * len([v for v in limits.values() if v is not None])
        return constraint_values(trial.user_attrs, limits)

    return evaluate


def open_study(storage: optuna.storages.BaseStorage, name: str, objectives: Sequence[Objective],
               sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """Create the study, or load it when it exists (resume)."""
    study = optuna.create_study(storage=storage, study_name=name, directions=[o.direction for o in objectives],
                                sampler=sampler, load_if_exists=True)
    if study.metric_names is None:
        study.set_metric_names([o.metric for o in objectives])
    return study


def load_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise ConfigError(f"search.study_name={name!r}: no such study in the storage") from None


@dataclass
class WarmStart:
    """A trial to enqueue before sampling: its parameters and the user attributes that tag it."""

    params: dict[str, float | int]
    user_attrs: dict[str, Any] = field(default_factory=dict)


def enqueue_warm_start(study: optuna.Study, trials: Sequence[WarmStart]) -> int:
    """Enqueue `trials` unless this study already has (returns how many were enqueued)."""
    if study.user_attrs.get(STUDY_WARM_STARTED):
        return 0
    for trial in trials:
        study.enqueue_trial(trial.params, user_attrs=trial.user_attrs, skip_if_exists=True)
    study.set_user_attr(STUDY_WARM_STARTED, True)
    return len(trials)


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards `search.n_trials`: complete and screened-out ones (failures do not)."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


@dataclass(frozen=True)
class TrialSpec:
    """What a trial job needs to know about its trial."""

    number: int
    ratios: dict[str, float]
    skip_set: list[str]
    baseline: str
    target_reduction: float | None


def trial_spec(study: optuna.Study, number: int) -> TrialSpec:
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials) or TRIAL_RATIOS not in trials[number].user_attrs:
        raise ConfigError(f"trial.number={number}: study {study.study_name!r} has no such prepared trial")
    attrs = trials[number].user_attrs
    return TrialSpec(number=number, ratios={k: float(v) for k, v in json.loads(attrs[TRIAL_RATIOS]).items()},
                     skip_set=list(attrs.get(TRIAL_SKIP_SET, [])), baseline=attrs.get(TRIAL_BASELINE, ""),
                     target_reduction=attrs.get(TRIAL_TARGET))


def screening_points(study: optuna.Study, cost_metric: str) -> list[tuple[float, float]]:
    """(screening hmean, cost ratio) of every finished trial that was screened."""
    return [(float(t.user_attrs["screen_hmean"]), float(t.user_attrs[cost_metric]))
            for t in study.get_trials(deepcopy=False, states=FINISHED)
            if "screen_hmean" in t.user_attrs and cost_metric in t.user_attrs]


def trial_records(study: optuna.Study, constraints: Mapping[str, float | None]) -> list[TrialRecord]:
    """Every complete trial as a `TrialRecord` (feasibility from the current constraints)."""
    records = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        records.append(TrialRecord(
            number=t.number, hmean=float(a["hmean"]), precision=float(a["precision"]), recall=float(a["recall"]),
            flops_ratio=float(a["flops_ratio"]), latency_ratio=float(a["latency_ratio"]), params=int(a["params"]),
            run_id=str(a.get(TRIAL_RUN_ID, "")), baseline=a.get(TRIAL_BASELINE, ""),
            target_reduction=a.get(TRIAL_TARGET),
            feasible=all(v <= 0 for v in constraint_values(a, constraints))))
    return records
