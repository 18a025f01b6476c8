"""Re-evaluation: before the choice, the best plans are recovered again with other recovery seeds.

Why: one brief recovery's seed spread is as large as the differences between the plans a study ranks (the seed
rule's −50% plan after 60 steps, recovery seeds 0-3: hmean 0.934 / 0.940 / 0.920 / 0.973; README "Search"), so the
trial with the highest single-seed hmean is often the luckiest draw rather than the best plan. Once the study has
its `search.n_trials`, the `search.reeval.top` best feasible trials within the select limits are recovered again
with `search.reeval.seeds` more recovery seeds (`finetune.seed` + 1, + 2, ...), each as a trial of its own that
carries `reeval_of` and `recovery_seed`. The workers run them like any trial (in parallel, with heartbeats, and
resumably: a job whose trial failed or went stale is open again), and the study's records average each plan's
accuracy over its seeds (`search.study.trial_records`), so the front and the choice go by the mean.

The jobs are planned once per budget and stored in the study (`STUDY_REEVAL`): every worker that reaches the end of
the budget computes the same plan from the same finished trials, so writing it twice is harmless. Two workers that
ask the same job at once keep the lower-numbered trial (the rule `search.study.over_budget` uses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import optuna
from optuna.trial import TrialState

from search.attributes import (BASELINE_UNPRUNED, FINISHED, STUDY_REEVAL, TRIAL_RECOVERY_SEED, TRIAL_REEVAL_OF,
                               Metric)
from search.pareto import TrialRecord, seed_rule_baseline, within_limits


@dataclass(frozen=True, order=True)
class ReevalJob:
    """Recover trial ``trial``'s plan again with recovery seed ``seed``."""

    trial: int
    seed: int


def is_reeval(attrs: dict) -> bool:
    """Whether a trial's user attributes mark it as a re-evaluation (it does not count towards n_trials)."""
    return attrs.get(TRIAL_REEVAL_OF) is not None


def plan_jobs(records: Sequence[TrialRecord], top: int, seeds: int, base_seed: int,
              max_flops_ratio: float | None, max_latency_ratio: float | None) -> list[ReevalJob]:
    """The ``top`` feasible trials by hmean within the select limits, and with limits the seed rule's best plan
    there (the baseline the choice compares them with, `search.pareto.select`: on the same seeds it is paired),
    each with recovery seeds ``base_seed`` + 1 .. + ``seeds``. Only plans that cut something: an uncut model is not
    recovered, so a seed changes nothing."""
    eligible = [r for r in records if r.feasible and r.reeval_of is None and r.baseline != BASELINE_UNPRUNED
                and r.flops_ratio < 1.0 and within_limits(r, max_flops_ratio, max_latency_ratio)]
    best = sorted(eligible, key=lambda r: (-r.hmean, r.number))[:top]
    limited = max_flops_ratio is not None or max_latency_ratio is not None  # else the choice is the knee: no baseline
    rule = seed_rule_baseline(records, max_flops_ratio, max_latency_ratio) if limited else None
    if top > 0 and rule is not None and all(r.number != rule.number for r in best):
        best.append(rule)
    return [ReevalJob(r.number, base_seed + k) for r in best for k in range(1, seeds + 1)]


def planned_jobs(study: optuna.Study, n_trials: int) -> list[ReevalJob] | None:
    """The jobs planned for a budget of ``n_trials`` (None: not planned yet)."""
    stored = study.user_attrs.get(STUDY_REEVAL)
    if not stored or stored.get("n_trials") != n_trials:
        return None
    return [ReevalJob(int(t), int(s)) for t, s in stored["jobs"]]


def store_jobs(study: optuna.Study, n_trials: int, jobs: Sequence[ReevalJob]) -> list[ReevalJob]:
    """Store the plan for a budget of ``n_trials``, keeping the jobs of an earlier (smaller) budget: their trials
    exist and still count. Returns what the study holds now."""
    stored = study.user_attrs.get(STUDY_REEVAL) or {}
    earlier = [ReevalJob(int(t), int(s)) for t, s in stored.get("jobs", [])]
    merged = sorted(set(earlier) | set(jobs))
    study.set_user_attr(STUDY_REEVAL, {"n_trials": n_trials, "jobs": [[j.trial, j.seed] for j in merged]})
    return merged


def job_of(attrs: dict) -> ReevalJob | None:
    return ReevalJob(int(attrs[TRIAL_REEVAL_OF]), int(attrs[TRIAL_RECOVERY_SEED])) if is_reeval(attrs) else None


def claimed_jobs(study: optuna.Study) -> dict[ReevalJob, TrialState]:
    """Each job some running or finished trial holds, with that trial's state (finished wins over running)."""
    held: dict[ReevalJob, TrialState] = {}
    for trial in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)):
        job = job_of(trial.user_attrs)
        if job is not None and held.get(job) not in FINISHED:
            held[job] = trial.state
    return held


def taken_earlier(study: optuna.Study, number: int, job: ReevalJob) -> bool:
    """Whether a lower-numbered running or finished trial holds ``job`` (then trial ``number`` gives it back)."""
    return any(t.number < number and job_of(t.user_attrs) == job
               for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))


SEED_METRICS = (Metric.HMEAN, Metric.PRECISION, Metric.RECALL, Metric.AGREEMENT, Metric.FALSE_BOXES)
"""A plan's accuracy figures, averaged over its recovery seeds; its costs are the original trial's."""
