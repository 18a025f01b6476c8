"""The seed recipe's threshold rule: PaddleSlim's interpolation, and a bisection that really hits the target (of
FLOPs, or of another cost such as a predicted latency)."""
from __future__ import annotations

import pytest

from prune.groups import discover_groups
from prune.latency_model import cost_features, latency_predictor
from prune.measure import count_flops
from prune.plan import apply_plan
from prune.seed_rule import ratios_at_threshold, seed_rule_plan
from prune.sensitivity import SensitivityKey, SensitivityTable
from train.errors import ConfigError
from train.weights import load_detector

SIZE = (320, 320)


def _table(losses: dict[str, list[float]], ratios: tuple[float, ...], channels: dict[str, int]) -> SensitivityTable:
    key = SensitivityKey("ppocrv4_det", "w", "d", "fpgm", "map_dice", ratios)
    return SensitivityTable(key=key, base=1.0, channels=channels,
                            losses={g: {f"{r:.4g}": v for r, v in zip(ratios, row)} for g, row in losses.items()})


def test_threshold_interpolates_like_paddleslim():
    table = _table({"a": [0.1, 0.3, 0.5], "b": [0.4, 0.6, 0.8], "c": [0.0, 0.2, 0.1]}, (0.2, 0.4, 0.6),
                   {"a": 8, "b": 8, "c": 8})
    ratios = ratios_at_threshold(table, 0.2)
    assert ratios["a"] == pytest.approx(0.3)     # halfway between (0.2, 0.1) and (0.4, 0.3)
    assert "b" not in ratios                      # first measured loss already above: left whole
    assert ratios["c"] == pytest.approx(0.6)     # monotone curve [0, 0.2, 0.2] stays within 0.2 to the end
    assert ratios_at_threshold(table, 1.0) == {"a": 0.6, "b": 0.6, "c": 0.6}


@pytest.fixture(scope="module")
def model_and_table():
    model = load_detector("ppocrv4_det", "pretrained")
    groups = discover_groups(model)
    prunable = [g for g in groups if g.prunable]
    ratios = (0.1, 0.3, 0.5, 0.7, 0.9)
    # A plausible table: groups differ in how fast their loss rises with the ratio.
    losses = {g.name: [min(1.0, r * (0.2 + 1.8 * i / len(prunable))) for r in ratios] for i, g in enumerate(prunable)}
    return model, groups, _table(losses, ratios, {g.name: g.channels for g in prunable})


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_bisection_lands_within_one_percent_of_the_flops_target(model_and_table, target):
    model, groups, table = model_and_table
    result = seed_rule_plan(model, "ppocrv4_det", table, target, align=8, input_size=SIZE, groups=groups)
    assert abs(result.reduction - target) <= 0.01
    # Measured again, independently, on a fresh copy of the pretrained model with the returned plan.
    fresh = load_detector("ppocrv4_det", "pretrained")
    pruned_flops = count_flops(apply_plan(fresh, result.plan), SIZE)
    assert pruned_flops == result.flops
    assert abs(1 - pruned_flops / count_flops(load_detector("ppocrv4_det", "pretrained"), SIZE) - target) <= 0.01
    assert all(len(kept) % 8 == 0 or len(kept) == result.plan.channels[g] for g, kept in result.plan.kept.items())


def test_unreachable_target_names_the_reachable_range(model_and_table):
    model, groups, table = model_and_table
    with pytest.raises(ConfigError, match="cannot remove 100% of FLOPs"):
        seed_rule_plan(model, "ppocrv4_det", table, 0.999, input_size=SIZE, groups=groups)


# A fit's shares where the convs' output volume counts most (as measured on PP-OCRv4 det, README "Predicting a
# plan's latency"): a prediction that does not follow FLOPs.
SHARES = {"fixed": 0.05, "dense": 0.3, "pointwise": 0.05, "depthwise": 0.0, "transposed": 0.05, "conv_output": 0.55}


def test_bisection_aims_at_another_cost_of_the_pruned_model(model_and_table):
    """Bisected on a predicted latency ratio, the rule lands on that cost, at another FLOPs than on FLOPs."""
    model, groups, table = model_and_table
    latency = latency_predictor(SHARES, cost_features(model, SIZE), SIZE)
    result = seed_rule_plan(model, "ppocrv4_det", table, 0.3, align=8, input_size=SIZE, groups=groups, cost=latency,
                            cost_name="latency")
    assert abs(result.reduction - 0.3) <= 0.01
    pruned = apply_plan(load_detector("ppocrv4_det", "pretrained"), result.plan)
    assert latency(pruned) == pytest.approx(result.cost_ratio) and count_flops(pruned, SIZE) == result.flops
    on_flops = seed_rule_plan(model, "ppocrv4_det", table, 0.3, align=8, input_size=SIZE, groups=groups)
    # The output volume shrinks slower than the FLOPs: -30% latency needs a higher threshold than -30% FLOPs.
    assert result.flops_ratio < result.cost_ratio and result.threshold > on_flops.threshold
    with pytest.raises(ConfigError, match="cannot remove 97% of latency"):
        seed_rule_plan(model, "ppocrv4_det", table, 0.97, input_size=SIZE, groups=groups, cost=latency,
                       cost_name="latency")
