"""The search space, shaped by the sensitivity prior and the seed rule's plans.

Every prunable group has bounds: it keeps a multiple of ``align`` channels from ``min_keep`` to the largest
multiple below its width, or stays whole. ``min_keep`` comes from the prior: the largest sensitivity ratio whose
monotone loss stays within ``loss_budget``, rounded so the kept count is a multiple of ``align``, and widened to
include every warm-start plan, so the seed rule's baselines lie inside the space the sampler explores. Groups
that cannot be cut at this alignment, whose first measured ratio already exceeds the budget, or that are listed
in ``always_skip`` are fixed (never suggested). The space is stored in the study, so every invocation and worker
searches the same one. Within the bounds, a candidate is drawn one of two ways.

**Projected onto cost targets** (``search.targets``, the default): candidates of one target compare at equal
cost. The space's ``cost`` is FLOPs (the default) or latency (its ratio predicted by a fit of
`prune.latency_model`, stored in ``cost_model``). The study suggests a ``target`` (a reduction of that cost) and,
per searchable group, ``offset:<group>``, a log2 deviation in [-max_offset, max_offset] from the seed rule's plan at
that target (its *centre*: the channels the seed rule keeps, the width for a group it leaves whole). The channels
kept are ``centre * 2**offset * scale`` on the grid, within the bounds (past ``max_keep`` the group stays whole), and
one ``scale`` for all groups is bisected until the plan's cost ratio lies in [1 - target - tolerance, 1 - target]:
on target, never over it (`project`).
Offsets of 0 give the seed rule's own plan, so the sampler starts at the rule's plans and explores deviations
from them, rather than random plans at random costs.
With ``keep_rule_whole``, the groups the seed rule's plan at a target leaves whole stay whole in that target's
candidates: the sampler only redistributes the cuts among the groups the rule cuts. One scale for every group
otherwise cuts them too as soon as it drops below one (a stage-2 conv at 0.75 of its width), and a cut there ends
the run of layers recovery leaves as the teacher's (`train.recovery.untouched_prefix`).

**Free** (no targets): per group, two parameters.

- ``skip_draw:<group>``, a uniform draw in [0, 1]; the group is left whole when the draw is below the group's
  prior skip probability (higher for more sensitive groups). Optuna's categorical distributions have uniform
  priors, so a True/False flag would be skipped half the time during random start-up; a draw compared with the
  prior probability skips each group exactly as often as the sensitivity table says, and TPE / NSGA-II model and
  recombine it like any other number.
- ``keep:<group>`` (only when not skipped), the channels kept. Integers keep the grid exact; Optuna's stepped
  floats round their upper bound through decimals and can lose the last grid point (``align / channels`` is
  rarely a short decimal). The plan's ratio is ``1 - keep / channels``; ``prune.plan.keep_count`` maps it back
  to exactly ``keep``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import optuna

from prune.plan import PruningPlan, keep_count
from prune.sensitivity import SensitivityTable
from train.errors import ConfigError

SCHEMA_VERSION = 2
KEEP_PREFIX = "keep:"
SKIP_PREFIX = "skip_draw:"
TARGET_PARAM = "target"
OFFSET_PREFIX = "offset:"
PROJECTION_STEPS = 40  # bisection steps on log2(scale) in [-8, 8]: far below one channel's FLOPs
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
    """One point of the space: channels kept per cut group, and the searchable groups drawn to stay whole.
    A projected candidate also has its `target` (a reduction of the space's cost) and the cost ratio it was
    projected to."""

    kept: dict[str, int]
    skipped: tuple[str, ...]
    target: float | None = None
    cost_ratio: float | None = None


@dataclass
class SearchSpace:
    """The searchable groups with their ranges, and why every other prunable group stays whole."""

    align: int
    loss_budget: float
    groups: list[GroupRange]
    fixed: dict[str, str] = field(default_factory=dict)
    targets: list[float] = field(default_factory=list)           # reductions of `cost`; empty: a free space
    centres: dict[str, dict[str, int]] = field(default_factory=dict)  # per target (`target_key`): kept per group
    max_offset: float = 0.5
    tolerance: float = 0.01
    cost: str = "flops"                                          # what the targets bound: flops or latency
    cost_model: dict = field(default_factory=dict)               # latency: the fit (LatencyModel.stored())
    keep_rule_whole: bool = False                                # projected: what a centre leaves whole stays so
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
                   groups=[GroupRange(**g) for g in data["groups"]], fixed=dict(data["fixed"]),
                   targets=[float(t) for t in data["targets"]],
                   centres={k: {g: int(n) for g, n in c.items()} for k, c in data["centres"].items()},
                   max_offset=float(data["max_offset"]), tolerance=float(data["tolerance"]),
                   cost=str(data.get("cost", "flops")), cost_model=dict(data.get("cost_model", {})),
                   keep_rule_whole=bool(data.get("keep_rule_whole", False)))


def target_key(target: float) -> str:
    """How a target names its centre in `SearchSpace.centres` (JSON keys are strings)."""
    return f"{target:g}"


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
                skip_probability: tuple[float, float], warm_start: Sequence[Mapping[str, int]] = (),
                centres: Mapping[float, Mapping[str, int]] | None = None, max_offset: float = 0.5,
                tolerance: float = 0.01, cost: str = "flops", cost_model: Mapping | None = None,
                keep_rule_whole: bool = False) -> SearchSpace:
    """The space for the prunable groups of `table` (see the module docstring).

    `always_skip`: structured group names never cut (an unknown name is a ConfigError listing the groups).
    `warm_start`: plans the space must contain, as channels kept per cut group (`cut_counts`).
    `centres`: per target (a reduction of `cost`), the seed rule's plan there (channels kept per cut group): a
    projected space; None: a free one. The centres are part of the warm start too. `cost_model`: what predicts a
    latency cost (`prune.latency_model.LatencyModel.stored()`). `keep_rule_whole`: the module docstring.
    """
    centres = dict(centres or {})
    warm_start = [*warm_start, *centres.values()]
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
    return SearchSpace(align=align, loss_budget=loss_budget, groups=groups, fixed=fixed,
                       targets=sorted(centres),
                       centres={target_key(t): {g.name: int(c.get(g.name, g.channels)) for g in groups}
                                for t, c in centres.items()},
                       max_offset=max_offset, tolerance=tolerance, cost=cost, cost_model=dict(cost_model or {}),
                       keep_rule_whole=keep_rule_whole)


CostRatio = Callable[[Mapping[str, int]], float]  # channels kept per cut group -> pruned / unpruned cost


def suggest(trial: optuna.Trial, space: SearchSpace, cost_ratio: CostRatio | None = None,
            projected: bool = True) -> Candidate:
    """Draw a candidate through `trial`: projected onto a target with `cost_ratio` (`prune.budget.CostOfCounts` of
    the space's cost) when the space has targets, else free (define-by-run: `keep:` only for groups that are cut).
    `projected=False` takes the drawn shape at scale 1 as it is: the seed rule's baselines are its own plans, a
    little off target or not."""
    if space.targets:
        if cost_ratio is None:
            raise ValueError("a projected search space needs the cost ratio of a plan (cost_ratio)")
        target = float(trial.suggest_categorical(TARGET_PARAM, space.targets))
        offsets = {g.name: trial.suggest_float(OFFSET_PREFIX + g.name, -space.max_offset, space.max_offset)
                   for g in space.groups}
        return project(space, target, offsets, cost_ratio, to_target=projected)
    kept: dict[str, int] = {}
    skipped: list[str] = []
    for group in space.groups:
        if trial.suggest_float(SKIP_PREFIX + group.name, 0.0, 1.0) < group.skip_probability:
            skipped.append(group.name)
            continue
        kept[group.name] = trial.suggest_int(KEEP_PREFIX + group.name, group.min_keep, group.max_keep,
                                             step=space.align)
    return Candidate(kept=kept, skipped=tuple(skipped))


def counts_at(space: SearchSpace, centre: Mapping[str, int], offsets: Mapping[str, float],
              scale: float) -> dict[str, int]:
    """Channels kept per cut group at `scale`: `centre * 2**offset * scale` on the grid, within the bounds (a group
    whose count passes `max_keep` stays whole; with `space.keep_rule_whole`, so does one the centre leaves whole,
    unless the centre cuts nothing at all)."""
    kept: dict[str, int] = {}
    whole = {g.name for g in space.groups if centre[g.name] >= g.channels}
    fixed = whole if space.keep_rule_whole and len(whole) < len(space.groups) else set()
    for group in space.groups:
        if group.name in fixed:
            continue
        raw = centre[group.name] * 2.0 ** offsets.get(group.name, 0.0) * scale
        keep = max(group.min_keep, space.align * round(raw / space.align))
        if keep <= group.max_keep:
            kept[group.name] = keep
    return kept


def project(space: SearchSpace, target: float, offsets: Mapping[str, float], cost_ratio: CostRatio,
            to_target: bool = True) -> Candidate:
    """The candidate of shape `offsets` at `target`, with its cost ratio in [1 - target - tolerance, 1 - target].

    One scale for every group's count is bisected (the module docstring); scale 1 is tried first, so the centre
    itself (offsets 0) stays the seed rule's plan when that is on target (`to_target=False` keeps scale 1
    wherever its cost is). The cost curve of one scale is a
    staircase whose steps can be wider than the band (a narrow high-resolution group of the neck or head going
    from 16 channels to whole moves PP-OCRv4's FLOPs by up to 6%), so the largest plan under the budget is then
    filled up one grid step at a time, the groups furthest below their scaled counts first (`_fill`). If even
    the smallest plan of the space costs more than the target, that plan is the candidate."""
    goal = 1.0 - target
    centre = space.centres[target_key(target)]

    def candidate(kept: dict[str, int], ratio: float) -> Candidate:
        return Candidate(kept=kept, skipped=tuple(g.name for g in space.groups if g.name not in kept),
                         target=target, cost_ratio=ratio)

    kept = counts_at(space, centre, offsets, 1.0)
    ratio = cost_ratio(kept)
    if not to_target or goal - space.tolerance <= ratio <= goal:
        return candidate(kept, ratio)
    low, high = (-8.0, 0.0) if ratio > goal else (0.0, 8.0)
    best = None if ratio > goal else (kept, ratio)
    for _ in range(PROJECTION_STEPS):
        middle = (low + high) / 2
        kept = counts_at(space, centre, offsets, 2.0 ** middle)
        ratio = cost_ratio(kept)
        if ratio <= goal:
            low, best = middle, (kept, ratio)
            if ratio >= goal - space.tolerance:
                return candidate(kept, ratio)
        else:
            high = middle
    if best is None:
        kept = counts_at(space, centre, offsets, 2.0 ** -8.0)
        return candidate(kept, cost_ratio(kept))
    wanted = {g.name: centre[g.name] * 2.0 ** (offsets.get(g.name, 0.0) + high) for g in space.groups}
    return candidate(*_fill(space, *best, wanted, goal, cost_ratio))


def _fill(space: SearchSpace, kept: dict[str, int], ratio: float, wanted: Mapping[str, float], goal: float,
          cost_ratio: CostRatio) -> tuple[dict[str, int], float]:
    """Grow `kept` (cost `ratio` <= `goal`) one grid step per group, most wanted first (`wanted`: unrounded
    counts of the first scale over the budget), while the cost stays <= `goal`, until it reaches the band."""
    by_name = {g.name: g for g in space.groups}
    grown = True
    while grown and ratio < goal - space.tolerance:
        grown = False
        order = sorted(kept, key=lambda name: (kept[name] - wanted[name]) / by_name[name].channels)
        for name in order:
            trial = dict(kept)
            if kept[name] + space.align <= by_name[name].max_keep:
                trial[name] = kept[name] + space.align
            else:
                del trial[name]  # the next step up is the whole group
            trial_ratio = cost_ratio(trial)
            if trial_ratio <= goal:
                kept, ratio, grown = trial, trial_ratio, True
                if ratio >= goal - space.tolerance:
                    break
    return kept, ratio


def params_for_target(space: SearchSpace, target: float) -> dict[str, float]:
    """The Optuna parameters of a projected space's centre at `target` (the seed rule's plan there)."""
    if target_key(target) not in space.centres:
        raise ConfigError(f"target {target:g} is not a target of the search space ({space.targets})")
    return {TARGET_PARAM: target, **{OFFSET_PREFIX + g.name: 0.0 for g in space.groups}}


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
