"""The search space, shaped by the sensitivity prior: per group, whether it stays whole and how many channels it keeps.

Per prunable group the study suggests two parameters:

- ``skip_draw:<group>``, a uniform draw in [0, 1]; the group is left whole when the draw is below the group's
  prior skip probability (higher for more sensitive groups). Optuna's categorical distributions have uniform
  priors, so a True/False flag would be skipped half the time during random start-up; a draw compared with the
  prior probability skips each group exactly as often as the sensitivity table says, and TPE / NSGA-II model and
  recombine it like any other number.
- ``keep:<group>`` (only when not skipped), the channels kept, a multiple of ``align`` from ``min_keep`` to the
  largest multiple below the group's width. Integers keep the grid exact; Optuna's stepped floats round their
  upper bound through decimals and can lose the last grid point (``align / channels`` is rarely a short decimal).
  The plan's ratio is ``1 - keep / channels``; ``prune.plan.keep_count`` maps it back to exactly ``keep``.

``min_keep`` comes from the prior: the largest sensitivity ratio whose monotone loss stays within
``loss_budget``, rounded so the kept count is a multiple of ``align``, and widened to include every warm-start
plan, so the seed rule's baselines lie inside the space the sampler explores. Groups that cannot be cut at this
alignment, whose first measured ratio already exceeds the budget, or that are listed in ``always_skip`` are
fixed (never suggested). The space is stored in the study, so every invocation and worker searches the same one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import optuna

from prune.plan import PruningPlan, keep_count
from prune.sensitivity import SensitivityTable
from train.errors import ConfigError

SCHEMA_VERSION = 1
KEEP_PREFIX = "keep:"
SKIP_PREFIX = "skip_draw:"
# A skip draw at these values leaves a group whole / cuts it, whatever its prior probability (which lies in (0, 1)).
DRAW_SKIP = 0.0
DRAW_CUT = 1.0

FIXED_ALWAYS_SKIP = "always_skip"
FIXED_OVER_BUDGET = "the loss budget allows no aligned cut"
FIXED_TOO_NARROW = "too few channels to cut at this alignment"


@dataclass(frozen=True)
class GroupRange:
    """What the search may do to one group: keep `min_keep`..`max_keep` channels (step `align`) or skip it."""

    name: str
    channels: int
    min_keep: int
    max_keep: int
    skip_probability: float


@dataclass(frozen=True)
class Candidate:
    """One point of the space: channels kept per cut group, and the searchable groups drawn to stay whole."""

    kept: dict[str, int]
    skipped: tuple[str, ...]


@dataclass
class SearchSpace:
    """The searchable groups with their ranges, and why every other prunable group stays whole."""

    align: int
    loss_budget: float
    groups: list[GroupRange]
    fixed: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def channels(self) -> dict[str, int]:
        return {g.name: g.channels for g in self.groups}

    def ratios(self, candidate: Candidate) -> dict[str, float]:
        """Plan ratios of a candidate (cut groups only)."""
        channels = self.channels
        return {name: 1.0 - keep / channels[name] for name, keep in candidate.kept.items()}

    def skip_set(self, candidate: Candidate) -> list[str]:
        """Every group the candidate leaves whole by decision: drawn skips and the always-skip list."""
        always = [name for name, why in self.fixed.items() if why == FIXED_ALWAYS_SKIP]
        return sorted([*candidate.skipped, *always])

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SearchSpace:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(f"search space schema_version={data.get('schema_version')!r}: expected {SCHEMA_VERSION}")
        return cls(align=int(data["align"]), loss_budget=float(data["loss_budget"]),
                   groups=[GroupRange(**g) for g in data["groups"]], fixed=dict(data["fixed"]))


def _largest_cut_keep(channels: int, align: int) -> int:
    """Most channels a cut group keeps: the largest multiple of `align` below `channels` (0 if none)."""
    return (math.ceil(channels / align) - 1) * align


def _skip_probabilities(table: SensitivityTable, names: Sequence[str], low: float, high: float) -> dict[str, float]:
    """Linear in sensitivity rank: the least sensitive group gets `low`, the most sensitive `high`."""
    order = sorted(names, key=table.sensitivity)
    if len(order) == 1:
        return {order[0]: high}
    return {name: low + (high - low) * rank / (len(order) - 1) for rank, name in enumerate(order)}


def cut_counts(plan: PruningPlan) -> dict[str, int]:
    """Channels kept per group that `plan` really cuts (a ratio that rounds to the whole group cuts nothing)."""
    return {name: len(kept) for name, kept in plan.kept.items() if len(kept) < plan.channels[name]}


def build_space(table: SensitivityTable, align: int, loss_budget: float, always_skip: Sequence[str],
                skip_probability: tuple[float, float], warm_start: Sequence[Mapping[str, int]] = ()) -> SearchSpace:
    """The space for the prunable groups of `table` (see the module docstring).

    `always_skip`: structured group names never cut (an unknown name is a ConfigError listing the groups).
    `warm_start`: plans the space must contain, as channels kept per cut group (`cut_counts`).
    """
    names = table.groups
    unknown = [n for n in always_skip if n not in table.channels]
    if unknown:
        raise ConfigError(f"search.space.always_skip: {unknown[0]!r} is not a prunable group of {table.key.model}; "
                          f"groups: {', '.join(names)}")
    fixed: dict[str, str] = {}
    bounds: dict[str, int] = {}
    for name in names:
        channels = table.channels[name]
        if name in always_skip:
            fixed[name] = FIXED_ALWAYS_SKIP
            continue
        largest = _largest_cut_keep(channels, align)
        if largest < 1:
            fixed[name] = FIXED_TOO_NARROW
            continue
        ratio = table.max_ratio_under(name, loss_budget)
        min_keep = min([keep_count(channels, ratio, align) if ratio > 0 else channels,
                        *[plan[name] for plan in warm_start if name in plan]])
        if min_keep > largest:
            fixed[name] = FIXED_OVER_BUDGET
            continue
        bounds[name] = min_keep
    probabilities = _skip_probabilities(table, list(bounds), *skip_probability) if bounds else {}
    groups = [GroupRange(name, table.channels[name], bounds[name], _largest_cut_keep(table.channels[name], align),
                         probabilities[name]) for name in names if name in bounds]
    return SearchSpace(align=align, loss_budget=loss_budget, groups=groups, fixed=fixed)


def suggest(trial: optuna.Trial, space: SearchSpace) -> Candidate:
    """Draw a candidate through `trial` (define-by-run: `keep:` only for groups that are cut)."""
    kept: dict[str, int] = {}
    skipped: list[str] = []
    for group in space.groups:
        if trial.suggest_float(SKIP_PREFIX + group.name, 0.0, 1.0) < group.skip_probability:
            skipped.append(group.name)
            continue
        kept[group.name] = trial.suggest_int(KEEP_PREFIX + group.name, group.min_keep, group.max_keep,
                                             step=space.align)
    return Candidate(kept=kept, skipped=tuple(skipped))


def params_for(space: SearchSpace, kept: Mapping[str, int]) -> dict[str, float | int]:
    """The Optuna parameters that make `suggest` return the plan given as channels kept per cut group
    (`cut_counts`), for enqueuing warm-start trials. A cut group must be searchable, its count on the grid."""
    by_name = {g.name: g for g in space.groups}
    for name, keep in kept.items():
        group = by_name.get(name)
        if group is None:
            raise ConfigError(f"plan cuts group {name!r}, which the search space leaves whole "
                              f"({space.fixed.get(name, 'not a prunable group')})")
        if keep % space.align or not group.min_keep <= keep <= group.max_keep:
            raise ConfigError(f"plan keeps {keep} channels of group {name!r}; the space allows multiples of "
                              f"{space.align} in [{group.min_keep}, {group.max_keep}]")
    params: dict[str, float | int] = {}
    for group in space.groups:
        if group.name not in kept:
            params[SKIP_PREFIX + group.name] = DRAW_SKIP
            continue
        params[SKIP_PREFIX + group.name] = DRAW_CUT
        params[KEEP_PREFIX + group.name] = kept[group.name]
    return params
