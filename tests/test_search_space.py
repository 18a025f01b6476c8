"""The search space from the sensitivity prior: bounds, alignment, skip priors, always-skip, warm-start round trip,
and candidates projected onto FLOPs or latency targets (measured on the real PP-OCRv4 det)."""
from __future__ import annotations

import copy

import numpy as np
import optuna
import pytest

from prune.groups import discover_groups
from prune.latency_model import cost_features, latency_predictor
from prune.plan import apply_plan, keep_count, make_plan
from prune.sensitivity import SensitivityKey, SensitivityTable
from prune.budget import CostOfCounts
from prune.seed_rule import seed_rule_plan
from search.prior import without_groups
from search.space import (FIXED_ALWAYS_SKIP, FIXED_OVER_BUDGET, FIXED_TOO_NARROW, KEEP_PREFIX, OFFSET_PREFIX,
                          SKIP_PREFIX, TARGET_PARAM, Candidate, SearchSpace, build_space, cut_counts, params_for,
                          params_for_target, project, suggest)
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


# -- projected onto FLOPs targets, on the real model (FLOPs at a small input: the ratio hardly depends on it) ----
STEM = "backbone.conv1.conv"
SIZE = (96, 96)


@pytest.fixture(scope="module")
def real():
    """PP-OCRv4 det, its groups, a sensitivity table over them (the loss grows with the ratio, more for the
    groups listed first), the seed rule's plan at -50% FLOPs on it, and the FLOPs ratio of channel counts."""
    model = load_detector("ppocrv4_det", "pretrained")
    groups = discover_groups(model)
    prunable = {g.name: g.channels for g in groups if g.prunable}
    table = _table({name: [(0.01 + i / len(prunable)) * r for r in RATIOS] for i, name in enumerate(prunable)},
                   prunable)
    seed = seed_rule_plan(model, "ppocrv4_det", without_groups(table, [STEM]), 0.5, align=8, input_size=SIZE,
                          tolerance=0.01, groups=groups)
    return model, groups, table, seed, CostOfCounts(model, "ppocrv4_det", 8, SIZE, groups)


def _projected(real, **kwargs) -> SearchSpace:
    _, _, table, seed, _ = real
    args = dict(centres={0.5: cut_counts(seed.plan), 0.3: {}}, max_offset=0.5, tolerance=0.01)
    args.update(kwargs)
    return build_space(table, 8, 0.9, [STEM], (0.05, 0.5), **args)


def test_projected_candidates_land_on_target_within_tolerance_never_over(real):
    model, groups, _, _, flops = real
    space = _projected(real)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(6):
        candidate = suggest(study.ask(), space, flops)
        goal = 1.0 - candidate.target
        assert goal - 0.01 <= candidate.cost_ratio <= goal, candidate
        # The ratio is the real one of the plan the trial will make (ranked channels, not the first ones).
        plan = make_plan(model, "ppocrv4_det", space.ratios(candidate), "fpgm", 8, SIZE, groups)
        assert cut_counts(plan) == candidate.kept
        assert flops(candidate.kept) == pytest.approx(candidate.cost_ratio)
        assert set(candidate.kept).isdisjoint(candidate.skipped)
        assert all(keep % 8 == 0 for keep in candidate.kept.values())


def test_the_centre_of_a_target_is_the_seed_rules_plan(real):
    """Unprojected, the centre's parameters give the seed rule's plan exactly (the baseline trial); projected,
    the same shape lands in the band (the rule's bisection stops within its own tolerance, on either side)."""
    _, _, _, seed, flops = real
    space = _projected(real)
    study = optuna.create_study()
    for _ in range(2):
        study.enqueue_trial(params_for_target(space, 0.5))
    candidate = suggest(study.ask(), space, flops, projected=False)
    assert candidate.kept == cut_counts(seed.plan)
    assert candidate.cost_ratio == pytest.approx(seed.flops_ratio, abs=1e-6)
    projected = suggest(study.ask(), space, flops)
    assert 0.49 <= projected.cost_ratio <= 0.5
    if 0.49 <= seed.flops_ratio <= 0.5:
        assert projected.kept == candidate.kept
    with pytest.raises(ConfigError, match="target 0.7 is not a target of the search space"):
        params_for_target(space, 0.7)


def test_offsets_change_the_shape_not_the_cost(real):
    """Cutting one group harder than its centre leaves more channels elsewhere, at the same FLOPs."""
    _, _, _, seed, flops = real
    space = _projected(real)
    centre = cut_counts(seed.plan)
    name = max(centre, key=centre.get)
    harder = project(space, 0.5, {name: -0.5}, flops)
    assert harder.kept[name] < centre[name]
    assert sum(harder.kept.values()) - harder.kept[name] >= sum(centre.values()) - centre[name]
    assert 0.49 <= harder.cost_ratio <= 0.5


def test_a_target_without_a_seed_rule_plan_starts_uniform(real):
    flops = real[4]
    space = _projected(real)
    assert all(space.centres["0.3"][g.name] == g.channels for g in space.groups)
    candidate = project(space, 0.3, {}, flops)
    assert 0.69 <= candidate.cost_ratio <= 0.7
    shares = [candidate.kept.get(g.name, g.channels) / g.channels for g in space.groups]
    assert max(shares) - min(shares) < 0.5  # one scale for every group, up to the grid and the bounds


def test_keep_rule_whole_cuts_only_the_groups_the_seed_rule_cuts(real):
    """With keep_rule_whole, random shapes at -50% redistribute the rule's cuts and stay on target; without it, the
    one scale cuts groups the rule left whole. A target the rule has no plan at still cuts every group."""
    _, _, _, seed, flops = real
    rule_cut = set(cut_counts(seed.plan))
    kept_whole, free = _projected(real, keep_rule_whole=True), _projected(real)
    assert SearchSpace.from_json(kept_whole.to_json()) == kept_whole
    rng = np.random.default_rng(0)
    beyond_rule = 0
    for _ in range(5):
        offsets = {g.name: float(rng.uniform(-0.5, 0.5)) for g in free.groups}
        candidate = project(kept_whole, 0.5, offsets, flops)
        assert set(candidate.kept) <= rule_cut and 0.49 <= candidate.cost_ratio <= 0.5
        beyond_rule += bool(set(project(free, 0.5, offsets, flops).kept) - rule_cut)
    assert beyond_rule > 0
    assert project(kept_whole, 0.3, {}, flops) == project(free, 0.3, {}, flops)


def test_projected_space_round_trips_and_needs_the_flops(real):
    space = _projected(real)
    assert SearchSpace.from_json(space.to_json()) == space
    assert space.targets == [0.3, 0.5]
    trial = optuna.create_study().ask()
    with pytest.raises(ValueError, match="needs the cost ratio"):
        suggest(trial, space)
    assert TARGET_PARAM not in trial.params and not any(k.startswith(OFFSET_PREFIX) for k in trial.params)


def test_counts_off_the_grid_or_not_a_cut_are_refused(real):
    flops = real[4]
    name, channels = next((n, c) for n, c in flops.channels.items() if c >= 32)
    assert 0.0 < flops({name: 8}) < 1.0 and flops({}) == 1.0
    for bad in (channels, 12, 0):
        with pytest.raises(ConfigError, match=f"group '{name}': cannot keep {bad} channels"):
            flops({name: bad})


def test_latency_targets_project_on_the_predicted_latency(real):
    """A latency space projects with a fit's prediction (here fixed shares on the real model's costs): candidates
    land in the band of the predicted latency ratio, and the space keeps the fit through its JSON."""
    model, groups, _, _, flops = real
    shares = {"fixed": 0.05, "dense": 0.3, "pointwise": 0.05, "depthwise": 0.0, "transposed": 0.05,
              "conv_output": 0.55}
    reference = cost_features(model, SIZE)
    latency = CostOfCounts(model, "ppocrv4_det", 8, SIZE, groups, latency_predictor(shares, reference, SIZE))
    space = _projected(real, cost="latency", cost_model={"shares": shares, "reference": reference})
    assert SearchSpace.from_json(space.to_json()) == space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    for _ in range(3):
        candidate = suggest(study.ask(), space, latency)
        assert 1.0 - candidate.target - 0.01 <= candidate.cost_ratio <= 1.0 - candidate.target, candidate
        plan = make_plan(model, "ppocrv4_det", space.ratios(candidate), "fpgm", 8, SIZE, groups)
        pruned = apply_plan(copy.deepcopy(model), plan, groups)
        assert latency.cost(pruned) == pytest.approx(candidate.cost_ratio)
        assert flops(candidate.kept) < candidate.cost_ratio  # FLOPs fall faster than this latency
