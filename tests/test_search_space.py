"""The search space from the sensitivity prior: bounds, alignment, skip priors, always-skip, warm-start round trip."""
from __future__ import annotations

import optuna
import pytest

from prune.groups import discover_groups
from prune.plan import keep_count, make_plan
from prune.sensitivity import SensitivityKey, SensitivityTable
from search.space import (FIXED_ALWAYS_SKIP, FIXED_OVER_BUDGET, FIXED_TOO_NARROW, KEEP_PREFIX, SKIP_PREFIX,
                          Candidate, SearchSpace, build_space, params_for, suggest)
from train.errors import ConfigError
from train.weights import load_detector

RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _table(losses: dict[str, list[float]], channels: dict[str, int]) -> SensitivityTable:
    key = SensitivityKey("ppocrv4_det", "w", "d", "fpgm", "map_dice", RATIOS)
    return SensitivityTable(key=key, base=1.0, channels=channels,
                            losses={g: {f"{r:.4g}": v for r, v in zip(RATIOS, row)} for g, row in losses.items()})


@pytest.fixture
def table() -> SensitivityTable:
    return _table(
        {
            "robust": [0.0, 0.05, 0.1, 0.2, 0.4],      # within a 0.3 budget up to 0.7
            "sensitive": [0.1, 0.6, 0.9, 0.9, 0.9],    # within 0.3 only at 0.1
            "bumpy": [0.05, 0.4, 0.2, 0.9, 0.9],       # the monotone curve is [.05, .4, .4, .9, .9]
            "hopeless": [0.5, 0.9, 0.9, 0.9, 0.9],     # over budget already at 0.1
            "narrow": [0.0, 0.0, 0.0, 0.0, 0.0],       # 6 channels: nothing to cut at align 8
            "stem": [0.0, 0.0, 0.0, 0.0, 0.0],
            "odd": [0.0, 0.0, 0.0, 0.1, 0.2],          # 20 channels: cut keeps 16 or 8
        },
        {"robust": 96, "sensitive": 96, "bumpy": 96, "hopeless": 64, "narrow": 6, "stem": 16, "odd": 20},
    )


def _space(table: SensitivityTable, **kwargs) -> SearchSpace:
    args = dict(align=8, loss_budget=0.3, always_skip=["stem"], skip_probability=(0.1, 0.5))
    args.update(kwargs)
    return build_space(table, **args)


def test_bounds_follow_the_monotone_curve_and_are_aligned(table):
    space = _space(table)
    ranges = {g.name: (g.min_keep, g.max_keep) for g in space.groups}
    assert ranges["robust"] == (keep_count(96, 0.7, 8), 88) == (32, 88)
    assert ranges["sensitive"] == (keep_count(96, 0.1, 8), 88) == (88, 88)
    assert ranges["bumpy"] == (88, 88)                 # raw 0.5 is within budget, the monotone curve is not
    assert ranges["odd"] == (8, 16)                                           # ceil(20 / 8) - 1 blocks of 8
    for group in space.groups:
        assert group.min_keep % 8 == 0 and group.max_keep % 8 == 0 and group.max_keep < group.channels
    assert space.fixed == {"hopeless": FIXED_OVER_BUDGET, "narrow": FIXED_TOO_NARROW, "stem": FIXED_ALWAYS_SKIP}


def test_more_sensitive_groups_are_more_likely_skipped(table):
    probability = {g.name: g.skip_probability for g in _space(table).groups}
    assert probability["sensitive"] == pytest.approx(0.5)
    assert min(probability.values()) == pytest.approx(0.1)
    assert probability["sensitive"] > probability["bumpy"] > probability["robust"]


def test_unknown_always_skip_name_is_an_error_naming_it(table):
    with pytest.raises(ConfigError, match=r"always_skip: 'backbone\.conv9' is not a prunable group"):
        _space(table, always_skip=["backbone.conv9"])


def test_warm_start_plans_widen_the_bounds(table):
    space = _space(table, warm_start=[{"sensitive": 16, "hopeless": 32}])
    ranges = {g.name: (g.min_keep, g.max_keep) for g in space.groups}
    assert ranges["sensitive"] == (16, 88)
    assert ranges["hopeless"] == (32, 56)
    assert "hopeless" not in space.fixed


def test_json_round_trip(table):
    space = _space(table)
    assert SearchSpace.from_json(space.to_json()) == space


def test_suggested_counts_are_on_the_grid_and_replay_through_keep_count(table):
    space = _space(table)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        candidate = suggest(study.ask(), space)
        channels = space.channels
        assert set(candidate.kept).isdisjoint(candidate.skipped)
        assert set(candidate.kept) | set(candidate.skipped) == set(channels)
        for name, keep in candidate.kept.items():
            assert keep % 8 == 0
            # The plan ratio maps back to exactly this count, as make_plan will compute it.
            assert keep_count(channels[name], space.ratios(candidate)[name], 8) == keep


def test_skip_rate_matches_the_prior_probability(table):
    space = _space(table)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    draws = [suggest(study.ask(), space) for _ in range(600)]
    for group in space.groups:
        rate = sum(group.name in c.skipped for c in draws) / len(draws)
        assert rate == pytest.approx(group.skip_probability, abs=0.06)


def test_enqueued_params_reproduce_a_plan_and_the_unpruned_model(table):
    space = _space(table)
    study = optuna.create_study()
    plan = {"robust": 40, "odd": 8}
    study.enqueue_trial(params_for(space, plan))
    study.enqueue_trial(params_for(space, {}))
    assert suggest(study.ask(), space) == Candidate(kept=plan, skipped=("sensitive", "bumpy"))
    unpruned = suggest(study.ask(), space)
    assert unpruned.kept == {} and set(unpruned.skipped) == set(space.channels)
    assert space.skip_set(unpruned) == sorted([*space.channels, "stem"])


def test_params_refuse_plans_outside_the_space(table):
    space = _space(table)
    with pytest.raises(ConfigError, match="'stem', which the search space leaves whole"):
        params_for(space, {"stem": 8})
    with pytest.raises(ConfigError, match="keeps 12 channels of group 'robust'"):
        params_for(space, {"robust": 12})
    params = params_for(space, {"robust": 32})
    assert params[KEEP_PREFIX + "robust"] == 32 and params[SKIP_PREFIX + "sensitive"] == 0.0


def test_candidate_ratios_make_plans_with_exactly_the_suggested_counts():
    model = load_detector("ppocrv4_det", "pretrained")
    groups = discover_groups(model)
    prunable = {g.name: g.channels for g in groups if g.prunable}
    table = _table({name: [0.0, 0.0, 0.1, 0.2, 0.3] for name in prunable}, prunable)
    space = build_space(table, 8, 0.5, ["backbone.conv1.conv"], (0.05, 0.5))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    candidate = suggest(study.ask(), space)
    assert candidate.kept
    plan = make_plan(model, "ppocrv4_det", space.ratios(candidate), "fpgm", 8, (64, 64), groups)
    assert {name: len(kept) for name, kept in plan.kept.items()} == candidate.kept
