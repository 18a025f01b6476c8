"""Plans by channel counts, and their cost: what projecting a candidate onto a FLOPs or latency target needs.

Which channels a group keeps does not change the pruned model's cost, only how many, so the cost of a candidate
given as channels kept per group is measured on a plan that keeps each group's first channels (no ranking).
FLOPs are the real count (`prune.measure.count_flops` of the applied plan), the one every trial reports; another
cost is any function of the pruned model, e.g. `prune.latency_model.LatencyModel.predict`.
"""
from __future__ import annotations

import copy
from typing import Callable, Mapping

import paddle

from prune.groups import ChannelGroup, discover_groups
from prune.measure import count_flops
from prune.plan import PruningPlan, apply_plan
from train.errors import ConfigError

ModelCost = Callable[[paddle.nn.Layer], float]  # a pruned model -> its cost / the unpruned model's (1.0 for it)


def plan_of_counts(model_name: str, kept: Mapping[str, int], channels: Mapping[str, int], align: int,
                   input_size: tuple[int, int]) -> PruningPlan:
    """A plan keeping the first `kept[g]` channels of every group `g` (counts on the `align` grid, below the
    group's width); for measuring a cost, never for pruning trained weights."""
    for name, keep in kept.items():
        if name not in channels or not 0 < keep < channels[name] or keep % align:
            raise ConfigError(f"group {name!r}: cannot keep {keep} channels (of {channels.get(name)}, align {align})")
    return PruningPlan(model=model_name, input_size=tuple(input_size), criterion="l1",  # type: ignore[arg-type]
                       ratios={n: 1.0 - k / channels[n] for n, k in kept.items()},
                       kept={n: list(range(k)) for n, k in kept.items()}, channels=dict(channels),
                       weights_hash="counts-only", align=align)


class CostOfCounts:
    """Cost ratio (pruned / unpruned) of `model` cut to given channel counts per group, at `input_size`: the FLOPs
    ratio, or `cost` of the pruned model (a ratio to the unpruned model, 1.0 for it)."""

    def __init__(self, model: paddle.nn.Layer, model_name: str, align: int, input_size: tuple[int, int],
                 groups: list[ChannelGroup] | None = None,
                 cost: ModelCost | None = None):
        self.model = model
        self.model_name = model_name
        self.align = align
        self.input_size = tuple(input_size)
        self.groups = discover_groups(model) if groups is None else groups
        self.channels = {g.name: g.channels for g in self.groups if g.prunable}
        if cost is None:
            base = count_flops(model, self.input_size)
            cost = lambda pruned: count_flops(pruned, self.input_size) / base  # noqa: E731
        self.cost = cost

    def __call__(self, kept: Mapping[str, int]) -> float:
        if not kept:
            return 1.0
        plan = plan_of_counts(self.model_name, kept, self.channels, self.align, self.input_size)
        return self.cost(apply_plan(copy.deepcopy(self.model), plan, self.groups))
