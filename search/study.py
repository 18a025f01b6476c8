"""The Optuna study behind a search: storage, creation or resume, warm start, budget, stale trials, and what trials
carry.

The study is the single source of truth shared by the sweeper and the trial jobs (which may run in other
processes or on other hosts): the sweeper stores each trial's plan ratios as user attributes before launching it,
the job reads them back by trial number, and the sweeper records the job's metrics as user attributes when it
tells the result. Study-level user attributes hold what was fixed at creation (settings, search space, unpruned
reference measurement, MLflow parent run), so a resumed study searches the same space against the same reference.

Several workers may share one study (`search.heartbeat`, `search.heartbeat.Heartbeat`): each beats on the trials it
runs, and any worker fails another's trial whose heartbeat stopped, so a killed worker's budget is freed.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError
from optuna.trial import FrozenTrial, TrialState

from search.attributes import (FINISHED, STALE_REASON, STUDY_SPACE, STUDY_WARM_STARTED, TRIAL_BASELINE,
                               TRIAL_CONFIRMS, TRIAL_FAIL_REASON, TRIAL_HEARTBEAT, TRIAL_RATIOS, TRIAL_RECOVERY_SEED,
                               TRIAL_REEVAL_OF, TRIAL_RUN_ID, TRIAL_SKIP_SET, TRIAL_TARGET, WARM_START_ATTRS, Metric)
from search.config import Objective, mask_url
from search.pareto import TrialRecord
from search.reeval import SEED_METRICS, is_reeval
from train.errors import ConfigError

if TYPE_CHECKING:
    from search.heartbeat import Liveness

def storage_where(cfg: DictConfig) -> str:
    """Where the `storage` config points (its URL, masked, or its class), for messages; resolving it here makes an
    unset environment variable (`storage=postgres` without $SEARCH_STORAGE_URL) one ConfigError before anything is
    written."""
    try:
        return mask_url(str(cfg.get("url", cfg.get("_target_"))))
    except InterpolationResolutionError as exc:
        raise ConfigError(f"storage.url: {str(exc).splitlines()[0]}") from None


def storage_file(cfg: DictConfig) -> Path | None:
    """The local file a storage config keeps the study in (SQLite or journal), or None for a server."""
    url = str(cfg.get("url") or "")
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    backend = cfg.get("log_storage")
    if backend is not None and backend.get("file_path"):
        return Path(str(backend.file_path))
    return None


def make_storage(cfg: DictConfig) -> optuna.storages.BaseStorage:
    """The Optuna storage the `storage` config describes; ConfigError (one line) when it cannot be opened."""
    where = storage_where(cfg)
    for attempt in range(_CREATE_TABLE_ATTEMPTS):
        try:
            return instantiate(cfg)
        except Exception as exc:  # SQLAlchemy, driver and OS errors all mean the same thing to the user
            cause = exc.__cause__ or exc
            if _lost_table_creation_race(cause) and attempt + 1 < _CREATE_TABLE_ATTEMPTS:
                time.sleep(0.5 * (attempt + 1))
                continue
            message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise ConfigError(f"storage {where}: cannot open ({type(cause).__name__}: {mask_url(message)})") from None
    raise AssertionError("unreachable")


# Workers started together on an empty RDB all create Optuna's tables; all but one fail with a duplicate-object
# error (optuna/optuna#1092). Opening again then finds the tables: a few retries settle it.
_CREATE_TABLE_ATTEMPTS = 4


def _lost_table_creation_race(exc: BaseException) -> bool:
    return type(exc).__name__ in ("IntegrityError", "ProgrammingError") and (
        "already exists" in str(exc) or "duplicate" in str(exc).lower())


def constraint_items(attrs: Mapping[str, Any], constraints: Mapping[str, float | None]) -> dict[str, float]:
    """Optuna constraint values (<= 0 is feasible) for the configured limits, by limit name, from a trial's user
    attributes.

    A screened-out trial has no fine-tuned hmean; its screening hmean stands in. A trial without measured FLOPs
    (failed before measuring) violates every limit.
    """
    limits = {k: v for k, v in constraints.items() if v is not None}
    if Metric.FLOPS_RATIO not in attrs:
        return {k: 1.0 for k in limits}
    hmean = attrs.get(Metric.HMEAN, attrs.get(Metric.SCREEN_HMEAN, 0.0))
    values = {}
    if "max_flops_ratio" in limits:
        values["max_flops_ratio"] = float(attrs[Metric.FLOPS_RATIO]) - limits["max_flops_ratio"]
    if "max_latency_ratio" in limits:
        values["max_latency_ratio"] = float(attrs[Metric.LATENCY_RATIO]) - limits["max_latency_ratio"]
    if "min_hmean" in limits:
        values["min_hmean"] = limits["min_hmean"] - float(hmean)
    if "min_agreement" in limits:  # not measured (screened out, failed): not shown to generalize
        values["min_agreement"] = limits["min_agreement"] - float(attrs.get(Metric.AGREEMENT, 0.0))
    return values


def constraint_values(attrs: Mapping[str, Any], constraints: Mapping[str, float | None]) -> list[float]:
    """`constraint_items`' values."""
    return list(constraint_items(attrs, constraints).values())


def set_constraints(trial: optuna.trial.Trial, constraints: Mapping[str, float | None]) -> None:
    """The trial's constraint values, set before it is told, where the samplers read them (`Trial.set_constraint`,
    which replaced the samplers' deprecated `constraints_func` in Optuna 5)."""
    for key, value in constraint_items(trial.user_attrs, constraints).items():
        trial.set_constraint(key, value)


def open_study(storage: optuna.storages.BaseStorage, name: str,
               objectives: Sequence[Objective]) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists (resume, or another worker created it); True when created here.

    Creating a study is atomic in every Optuna storage, so of several workers started together exactly one gets
    True: the one that builds the prior.
    """
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=[o.direction for o in objectives])
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage), False
    study.set_metric_names([o.metric for o in objectives])
    return study, True


def claim_creation(storage: optuna.storages.BaseStorage, study: optuna.Study, attempt: int) -> bool:
    """Claim the rebuilding of `study`'s prior after its builder stopped (attempt `attempt`); True when won.

    Study creation is the one compare-and-set every Optuna storage offers, so each takeover attempt creates an
    empty marker study `<name>.takeover-<study id>-<attempt>`; of the workers that find the same stale builder,
    only one creates it. (The id keeps markers of a deleted and re-created study from blocking the new one.)
    """
    marker = f"{study.study_name}.takeover-{study._study_id}-{attempt}"  # noqa: SLF001 (no public id)
    try:
        optuna.create_study(storage=storage, study_name=marker)
    except optuna.exceptions.DuplicatedStudyError:
        return False
    return True


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


def _budget_trials(study: optuna.Study, states: Sequence[TrialState]) -> list[FrozenTrial]:
    """The trials in ``states`` that count towards `search.n_trials` (re-evaluations come on top: `search.reeval`)."""
    return [t for t in study.get_trials(deepcopy=False, states=tuple(states)) if not is_reeval(t.user_attrs)]


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards `search.n_trials`: complete and screened-out ones (failures do not)."""
    return len(_budget_trials(study, FINISHED))


@dataclass(frozen=True)
class Budget:
    """Where the study stands against `search.n_trials`: finished trials, and running ones (any worker's)."""

    finished: int
    running: int

    @classmethod
    def of(cls, study: optuna.Study) -> Budget:
        trials = _budget_trials(study, (*FINISHED, TrialState.RUNNING))
        running = sum(t.state == TrialState.RUNNING for t in trials)
        return cls(finished=len(trials) - running, running=running)


def over_budget(study: optuna.Study, number: int, n_trials: int) -> bool:
    """True when trial `number` (just asked, running) would exceed `n_trials`.

    Asking is not atomic: two workers that both saw room for one more trial both get one. The rule that settles
    it without a lock: trials rank by number (the storage assigns numbers in creation order), and a trial fits
    when the finished trials plus the running trials before it leave room. The highest-numbered kept trial saw
    every lower one, so no more than `n_trials` are kept, and the lowest-numbered contender keeps its place.
    (The one interleaving this cannot rank: a trial enqueued again by `give_up` in the milliseconds between
    another worker's search for enqueued trials and its creation of a new one, then asked after both.)
    """
    ahead = sum(1 for t in _budget_trials(study, (*FINISHED, TrialState.RUNNING))
                if t.state != TrialState.RUNNING or t.number < number)
    return ahead >= n_trials


def set_trial_attr(study: optuna.Study, number: int, key: str, value: Any) -> None:
    """Set a user attribute of trial `number` from any process.

    Optuna's public setter is on the live `Trial` object, which only the process that asked the trial holds; a trial
    job in another process (or this worker, for another worker's trial) goes through the storage. Raises
    `optuna.exceptions.UpdateFinishedTrialError` once the trial has finished.
    """
    trial = study.get_trials(deepcopy=False)[number]  # trials are listed by number, 0..n-1
    study._storage.set_trial_user_attr(trial._trial_id, key, value)  # noqa: SLF001 (see above)


def last_heartbeat(trial: FrozenTrial) -> float:
    """When the worker running `trial` last showed it was alive (its start, until the first beat)."""
    beat = trial.user_attrs.get(TRIAL_HEARTBEAT)
    if beat is not None:
        return float(beat)
    return trial.datetime_start.timestamp() if trial.datetime_start else time.time()


def give_up(study: optuna.Study, number: int, reason: str) -> FrozenTrial | None:
    """Fail running trial `number` with `reason` (a failure does not count towards the budget) and, if it was an
    enqueued warm-start trial, enqueue its plan again: the baselines must each run once.

    None when the trial finished meanwhile: told by its own worker, or given up by another worker. Finishing a
    trial is atomic in the storage, so of several workers giving up the same trial exactly one gets it back.
    """
    try:
        set_trial_attr(study, number, TRIAL_FAIL_REASON, reason)
        told = study.tell(number, state=TrialState.FAIL)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError):  # ValueError: "Cannot tell a FAIL trial"
        return None
    fixed = told.system_attrs.get("fixed_params")  # how Optuna marks a trial that enqueue_trial created
    if fixed is not None:
        study.enqueue_trial(fixed, user_attrs={k: v for k, v in told.user_attrs.items() if k in WARM_START_ATTRS})
    return told


def fail_stale_trials(study: optuna.Study, liveness: Liveness) -> list[FrozenTrial]:
    """Give up every running trial whose worker stopped beating (killed, host lost); returns those given up here
    (another worker may be doing the same, and a slow worker may still finish its trial meanwhile)."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if liveness.is_stale(last_heartbeat(trial)):
            told = give_up(study, trial.number, STALE_REASON)
            if told is not None:
                failed.append(told)
    return failed


@dataclass(frozen=True)
class TrialSpec:
    """What a trial job needs to know about its trial."""

    number: int
    ratios: dict[str, float]
    skip_set: list[str]
    baseline: str
    target_reduction: float | None
    reeval_of: int | None = None        # a re-evaluation of that trial's plan (search.reeval) ...
    recovery_seed: int | None = None    # ... recovered with this finetune.seed
    confirms: bool = False              # ... as a confirmation of its lead (or the seed rule's) on a fresh seed


def trial_spec(study: optuna.Study, number: int) -> TrialSpec:
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials) or TRIAL_RATIOS not in trials[number].user_attrs:
        raise ConfigError(f"trial.number={number}: study {study.study_name!r} has no such prepared trial")
    attrs = trials[number].user_attrs
    return TrialSpec(number=number, ratios={k: float(v) for k, v in json.loads(attrs[TRIAL_RATIOS]).items()},
                     skip_set=list(attrs.get(TRIAL_SKIP_SET, [])), baseline=attrs.get(TRIAL_BASELINE, ""),
                     target_reduction=attrs.get(TRIAL_TARGET), reeval_of=attrs.get(TRIAL_REEVAL_OF),
                     recovery_seed=attrs.get(TRIAL_RECOVERY_SEED), confirms=bool(attrs.get(TRIAL_CONFIRMS)))


def screening_points(study: optuna.Study, cost_metric: str) -> list[tuple[float, float]]:
    """(screening hmean, cost ratio) of every finished trial that was screened."""
    return [(float(t.user_attrs[Metric.SCREEN_HMEAN]), float(t.user_attrs[cost_metric]))
            for t in study.get_trials(deepcopy=False, states=FINISHED)
            if Metric.SCREEN_HMEAN in t.user_attrs and cost_metric in t.user_attrs]


def trial_records(study: optuna.Study, constraints: Mapping[str, float | None]) -> list[TrialRecord]:
    """Every complete trial as a `TrialRecord` (feasibility from the current constraints).

    A trial whose plan was re-evaluated (`search.reeval`) has its accuracy figures (`SEED_METRICS`) averaged over
    its own recovery and its complete re-evaluations, `seeds` and `hmean_sd` set, and its feasibility judged on
    the means; each re-evaluation is also a record of its own (`reeval_of`), with its single seed's figures. A
    confirmation's hmean goes to its trial's `confirm_hmeans` instead, never into the means.
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    target_cost = study.user_attrs.get(STUDY_SPACE, {}).get("cost", "flops")
    seeds: dict[int, list[Mapping[str, Any]]] = {}
    confirmations: dict[int, list[tuple[int, float]]] = {}
    for t in complete:
        if is_reeval(t.user_attrs):
            of = int(t.user_attrs[TRIAL_REEVAL_OF])
            if t.user_attrs.get(TRIAL_CONFIRMS):
                confirmations.setdefault(of, []).append((int(t.user_attrs[TRIAL_RECOVERY_SEED]),
                                                         float(t.user_attrs[Metric.HMEAN])))
            else:
                seeds.setdefault(of, []).append(t.user_attrs)
    records = []
    for t in complete:
        a = dict(t.user_attrs)
        runs = [t.user_attrs, *seeds.get(t.number, [])] if not is_reeval(a) else [t.user_attrs]
        for name in SEED_METRICS:
            values = [float(r[name]) for r in runs if name in r]
            if values:
                a[name] = float(np.mean(values))
        hmeans = [float(r[Metric.HMEAN]) for r in runs]
        records.append(TrialRecord(
            number=t.number, hmean=float(a[Metric.HMEAN]), precision=float(a[Metric.PRECISION]),
            recall=float(a[Metric.RECALL]), flops_ratio=float(a[Metric.FLOPS_RATIO]),
            latency_ratio=float(a[Metric.LATENCY_RATIO]), params=int(a[Metric.PARAMS]),
            run_id=str(a.get(TRIAL_RUN_ID, "")), baseline=a.get(TRIAL_BASELINE, ""),
            target_reduction=a.get(TRIAL_TARGET), target_cost=target_cost,
            agreement=float(a.get(Metric.AGREEMENT, math.nan)), false_boxes=float(a.get(Metric.FALSE_BOXES, math.nan)),
            feasible=all(v <= 0 for v in constraint_values(a, constraints)), seeds=len(runs),
            hmean_sd=float(np.std(hmeans, ddof=1)) if len(runs) > 1 else math.nan,
            reeval_of=a.get(TRIAL_REEVAL_OF), confirms=bool(a.get(TRIAL_CONFIRMS)),
            confirm_hmeans=tuple(sorted(confirmations.get(t.number, [])))))
    return records
