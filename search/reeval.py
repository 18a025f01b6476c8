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

Confirmation: the re-evaluated means still choose among plans by the seeds that ranked them, so a searched plan
can pass `search.select.min_gain` by luck (the study `v23`: +0.021 over its three seeds, -0.002 over three seeds
no study used; README "The search"). Once every re-evaluation has finished, if the choice would replace the seed
rule's plan with a searched one, both plans are recovered with `search.reeval.confirm_seeds` fresh seeds
(`finetune.seed` + `seeds` + 1, ...): trials that carry `confirms`, kept out of the plans' means, whose paired lead
the choice then requires to be at least `search.select.confirm_gain`. Planned once per budget (`confirm_n_trials`
in `STUDY_REEVAL`), run like the re-evaluations, and only when a searched plan would be chosen, so it costs a study
nothing otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import optuna
from optuna.trial import TrialState

from search.attributes import (BASELINE_UNPRUNED, FINISHED, STUDY_REEVAL, TRIAL_CONFIRMS, TRIAL_RECOVERY_SEED,
                               TRIAL_REEVAL_OF, Metric)
from search.pareto import TrialRecord, seed_rule_baseline, within_limits


@dataclass(frozen=True, order=True)
class ReevalJob:
    """Recover trial ``trial``'s plan again with recovery seed ``seed`` (``confirm``: as a confirmation)."""

    trial: int
    seed: int
    confirm: bool = False


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
    """The jobs planned for a budget of ``n_trials``, confirmations included (None: not planned yet)."""
    stored = study.user_attrs.get(STUDY_REEVAL)
    if not stored or stored.get("n_trials") != n_trials:
        return None
    return _jobs(stored)


def _jobs(stored: dict) -> list[ReevalJob]:
    return sorted([*(ReevalJob(int(t), int(s)) for t, s in stored.get("jobs", [])),
                   *(ReevalJob(int(t), int(s), confirm=True) for t, s in stored.get("confirm", []))])


def store_jobs(study: optuna.Study, n_trials: int, jobs: Sequence[ReevalJob]) -> list[ReevalJob]:
    """Store the plan for a budget of ``n_trials``, keeping the jobs of an earlier (smaller) budget: their trials
    exist and still count. Returns what the study holds now."""
    stored = study.user_attrs.get(STUDY_REEVAL) or {}
    earlier = [ReevalJob(int(t), int(s)) for t, s in stored.get("jobs", [])]
    merged = sorted(set(earlier) | set(jobs))
    study.set_user_attr(STUDY_REEVAL, {**stored, "n_trials": n_trials,
                                       "jobs": [[j.trial, j.seed] for j in merged]})
    return _jobs(study.user_attrs[STUDY_REEVAL])


def confirmation_planned(study: optuna.Study, n_trials: int) -> bool:
    """Whether the confirmation of the budget of ``n_trials`` was planned (with or without jobs)."""
    return (study.user_attrs.get(STUDY_REEVAL) or {}).get("confirm_n_trials") == n_trials


def confirm_jobs(searched: int, rule: int, seeds: int, first_seed: int) -> list[ReevalJob]:
    """Both plans, each with recovery seeds ``first_seed`` .. ``first_seed + seeds - 1``: the same seeds, so the
    lead is paired (the same crops in the same order for both)."""
    return [ReevalJob(n, first_seed + k, confirm=True) for n in (searched, rule) for k in range(seeds)]


def store_confirmation(study: optuna.Study, n_trials: int, jobs: Sequence[ReevalJob]) -> list[ReevalJob]:
    """Store the confirmation planned for a budget of ``n_trials`` (keeping an earlier budget's); returns every job
    the study holds now. Two workers that plan it at once plan the same jobs from the same finished trials."""
    stored = study.user_attrs.get(STUDY_REEVAL) or {}
    earlier = {(int(t), int(s)) for t, s in stored.get("confirm", [])}
    merged = sorted(earlier | {(j.trial, j.seed) for j in jobs})
    study.set_user_attr(STUDY_REEVAL, {**stored, "confirm": [list(j) for j in merged], "confirm_n_trials": n_trials})
    return _jobs(study.user_attrs[STUDY_REEVAL])


def job_of(attrs: dict) -> ReevalJob | None:
    if not is_reeval(attrs):
        return None
    return ReevalJob(int(attrs[TRIAL_REEVAL_OF]), int(attrs[TRIAL_RECOVERY_SEED]), bool(attrs.get(TRIAL_CONFIRMS)))


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
