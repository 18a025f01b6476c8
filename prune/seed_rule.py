"""The seed recipe's pruning rule, as the baseline the search must beat.

PaddleOCR's `deploy/slim/prune` (PaddleSlim `sensitive_prune`) picks one loss threshold for all groups; each
group is pruned by the ratio at which its sensitivity curve reaches the threshold (linear interpolation between
measured ratios, as PaddleSlim's `get_ratios_by_loss`; a group whose first measured loss is already above the
threshold is left whole). The threshold is bisected until the plan removes a target share of the inference FLOPs.
PaddleSlim stops its bisection as soon as a FLOPs value repeats, which can land far from the target; this one
bisects on the real FLOPs of the applied plan until it is within `tolerance` of the target. The same bisection
aims at another cost given as a function of the pruned model (`cost`, e.g. the predicted latency ratio of
`prune.latency_model`): the rule stays PaddleOCR's, only what it is bisected on changes.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import paddle

from prune.budget import ModelCost
from prune.groups import ChannelGroup, discover_groups
from prune.measure import count_flops
from prune.plan import PruningPlan, apply_plan, make_plan
from prune.sensitivity import SensitivityTable
from train.errors import ConfigError


def ratios_at_threshold(table: SensitivityTable, threshold: float, max_ratio: float = 0.9) -> dict[str, float]:
    """Per group, the ratio where its monotone loss curve reaches `threshold` (groups not reached are omitted)."""
    ratios: dict[str, float] = {}
    grid = np.array(table.ratios, dtype=np.float64)
    for group in table.groups:
        losses = table.curve(group)
        below = np.nonzero(losses <= threshold)[0]
        if below.size == 0:
            continue
        i = int(below[-1])
        if i == len(grid) - 1 or losses[i + 1] == losses[i]:
            ratio = grid[i]
        else:
            ratio = grid[i] + (threshold - losses[i]) * (grid[i + 1] - grid[i]) / (losses[i + 1] - losses[i])
        ratios[group] = float(min(ratio, max_ratio))
    return ratios


@dataclass
class SeedRulePlan:
    """A seed-rule plan and how close it came: `flops_ratio` = pruned / unpruned inference FLOPs; `cost_ratio` the
    ratio of the cost it was bisected on (the FLOPs ratio unless another cost was given)."""

    plan: PruningPlan
    threshold: float
    target_reduction: float
    flops: int
    base_flops: int
    iterations: int
    cost_ratio: float

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.base_flops

    @property
    def reduction(self) -> float:
        return 1.0 - self.cost_ratio


def seed_rule_plan(
    model: paddle.nn.Layer,
    model_name: str,
    table: SensitivityTable,
    target_reduction: float,
    criterion: str = "fpgm",
    align: int = 1,
    input_size: tuple[int, int] = (640, 640),
    tolerance: float = 0.01,
    max_iterations: int = 40,
    groups: list[ChannelGroup] | None = None,
    cost: ModelCost | None = None,
    cost_name: str = "FLOPs",
) -> SeedRulePlan:
    """Bisect the loss threshold until the plan removes `target_reduction` (± `tolerance`) of inference FLOPs, or of
    `cost` (named `cost_name` in errors) when given.

    Raises ConfigError when the target is outside what the table allows (naming the reachable range) or when a
    jump in the cost curve (one group entering at its first measured ratio) straddles the tolerance band.
    """
    if not 0.0 < target_reduction < 1.0:
        raise ConfigError(f"seed-rule {cost_name} reduction target {target_reduction}: must be in (0, 1)")
    groups = discover_groups(model) if groups is None else groups
    base_flops = count_flops(model, input_size)

    def evaluate(threshold: float) -> tuple[PruningPlan, int, float]:
        candidate = copy.deepcopy(model)
        plan = make_plan(candidate, model_name, ratios_at_threshold(table, threshold), criterion, align, input_size,
                         groups)
        pruned = apply_plan(candidate, plan, groups)
        flops = count_flops(pruned, input_size)
        return plan, flops, flops / base_flops if cost is None else cost(pruned)

    def found(best: tuple, iteration: int) -> SeedRulePlan:
        plan, threshold, _, flops, ratio = best
        return SeedRulePlan(plan, threshold, target_reduction, flops, base_flops, iteration, ratio)

    low, high = 0.0, float(max(np.nanmax(table.curve(g)) for g in table.groups))
    plan, flops, ratio = evaluate(high)
    reduction = 1.0 - ratio
    if reduction < target_reduction - tolerance:
        raise ConfigError(f"seed rule cannot remove {target_reduction:.0%} of {cost_name}: pruning every group to its "
                          f"largest measured ratio removes {reduction:.1%}")
    best = (plan, high, reduction, flops, ratio)
    for iteration in range(1, max_iterations + 1):
        if abs(best[2] - target_reduction) <= tolerance:
            return found(best, iteration)
        threshold = (low + high) / 2
        plan, flops, ratio = evaluate(threshold)
        reduction = 1.0 - ratio
        if abs(reduction - target_reduction) < abs(best[2] - target_reduction):
            best = (plan, threshold, reduction, flops, ratio)
        if reduction < target_reduction:
            low = threshold
        else:
            high = threshold
    raise ConfigError(f"seed rule could not reach {target_reduction:.1%} ± {tolerance:.1%} {cost_name} reduction "
                      f"(closest: {best[2]:.1%} at threshold {best[1]:.4g}); the {cost_name} curve jumps there")
