"""Multi-fidelity trials: a candidate's recovery is scored at rungs and stopped there when it is clearly losing.

A trial's budget is its recovery (`finetune.steps`). At each rung (`search.rungs.steps`, recovery steps below the
budget) the candidate's hmean on the eval split is written to the study (`rung:<steps>`), and the candidate stops
when another trial of its cost scored at least `search.rungs.margin` higher at the same rung: in a projected space
a trial at the same target (FLOPs or predicted latency: they cost the same within the space's tolerance), in a free
space one that costs no more. It is told to Optuna as PRUNED (`stopped_at`), like a screened-out candidate: it counts
towards `search.n_trials` and the sampler learns to avoid its region, while the recovery steps and the guard it no
longer runs go to the next candidate.

Optuna's own pruners need `Trial.report`, which a multi-objective study (hmean and a cost) does not support, so the
rung scores are trial attributes and the rule is this module's; the trial is still told PRUNED.
Successive halving with a margin instead of a fixed fraction: with a dozen trials over three targets a rung holds
two to five scores, too few for "keep the top third" to mean anything, while a margin stops only the plans that
are clearly behind. Warm-start baselines and re-evaluations report their rungs (the seed rule's plan is the score
to beat) but are never stopped. Rungs are asynchronous (ASHA): a trial compares with whatever the others have
reported so far. Off by default: in the default study (60-step trials, candidates near the seed rule's plan) the
hmean after 20 steps varies with the recovery seed by 0.03-0.06 (0.006-0.013 after 60) and ranks plans unlike
their final hmean (README "The search", Rungs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import optuna
from omegaconf import DictConfig
from optuna.trial import TrialState

from search.attributes import TRIAL_RUNG_PREFIX, TRIAL_TARGET
from search.study import set_trial_attr
# Trials whose rung reports count: running ones too (asynchronous), not failed ones.
_REPORTING = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)


def rung_key(steps: int) -> str:
    return f"{TRIAL_RUNG_PREFIX}{steps}"


@dataclass(frozen=True)
class RungReport:
    """One trial's score at a rung, with what decides whom it competes with."""

    trial: int
    hmean: float
    cost: float
    target: float | None

    def to_json(self) -> dict[str, Any]:
        return {"hmean": self.hmean, "cost": self.cost}

    def competes_with(self, other: RungReport) -> bool:
        """`other` is a rival at equal or lower cost: the same target, or (free space) a cost no higher."""
        if self.target is not None or other.target is not None:
            return self.target == other.target
        return other.cost <= self.cost


@dataclass(frozen=True)
class RungRule:
    """`search.rungs`: recovery steps to score at, and how far behind the best rival a candidate stops."""

    steps: tuple[int, ...]
    margin: float

    @classmethod
    def from_config(cls, cfg: DictConfig) -> RungRule:
        return cls(steps=tuple(int(s) for s in cfg.search.rungs.steps), margin=float(cfg.search.rungs.margin))

    def active_steps(self, budget: int) -> tuple[int, ...]:
        """The rungs inside a recovery of `budget` steps."""
        return tuple(s for s in self.steps if s < budget)


def rung_reports(study: optuna.Study, steps: int) -> list[RungReport]:
    """Every report at rung `steps` so far (running, complete and stopped trials)."""
    key = rung_key(steps)
    out = []
    for t in study.get_trials(deepcopy=False, states=_REPORTING):
        value = t.user_attrs.get(key)
        if isinstance(value, Mapping):
            target = t.user_attrs.get(TRIAL_TARGET)
            out.append(RungReport(t.number, float(value["hmean"]), float(value["cost"]),
                                  None if target is None else float(target)))
    return out


def leader(report: RungReport, others: Sequence[RungReport]) -> RungReport | None:
    """The best-scoring rival of `report` among `others` (itself excluded), if any."""
    rivals = [o for o in others if o.trial != report.trial and report.competes_with(o)]
    return max(rivals, key=lambda o: o.hmean, default=None)


def behind(report: RungReport, others: Sequence[RungReport], margin: float) -> RungReport | None:
    """The rival that stops `report` (scored at least `margin` higher at the rung), or None."""
    best = leader(report, others)
    return best if best is not None and best.hmean >= report.hmean + margin else None


class RungJudge:
    """A study trial's rungs: records each score in the study and says whether the trial stops there."""

    def __init__(self, study: optuna.Study, number: int, rule: RungRule, target: float | None,
                 stoppable: bool) -> None:
        self.study, self.number, self.rule, self.target, self.stoppable = study, number, rule, target, stoppable

    def __call__(self, steps: int, hmean: float, cost: float) -> RungReport | None:
        """Record the trial's `hmean` at rung `steps` (its cost ratio `cost`); the rival that stops it, or None."""
        report = RungReport(self.number, hmean, cost, self.target)
        set_trial_attr(self.study, self.number, rung_key(steps), report.to_json())
        if not self.stoppable:
            return None
        return behind(report, rung_reports(self.study, steps), self.rule.margin)

