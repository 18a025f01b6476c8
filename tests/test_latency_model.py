"""The latency model (prune/latency_model.py): per-kind costs of real zoo models, the fit, its cache and the command.

Timing here is tiny (64x64 inputs, a few plans); the accuracy of the fit is a benchmark's figure (README), not a
test's.
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from prune.budget import plan_of_counts
from prune.groups import discover_groups
from prune.latency_model import (FEATURES, FIXED, LatencyModel, LatencyModelKey, MeasuredPlan, cached_latency_model,
                                 choose_block, conv_kind, cost_features, cost_features_by_block, fit_shares,
                                 predict_ratio, random_counts, relative_features)
from prune.measure import count_flops
from prune.plan import apply_plan
from train.models import zoo
from train.weights import load_detector

SIZE = (64, 64)
ROUNDS = {"warmup": 1, "min_rounds": 12, "max_rounds": 12, "tolerance": 0.03}
RESULT_LINE = re.compile(r"^plans=(\d+) fixed=(-?\d+\.\d+) mae=(\d+\.\d+|nan) max_error=(\d+\.\d+|nan) "
                         r"seconds=(\d+\.\d+)$")


@pytest.fixture(scope="module")
def ppocrv4():
    return load_detector("ppocrv4_det", "pretrained")


def _halved(model):
    """``model`` with every prunable group but the stem cut to half its channels (on the 8-grid)."""
    groups = discover_groups(model)
    stem = zoo.model_spec("ppocrv4_det").stem
    kept = {g.name: g.channels // 16 * 8 for g in groups if g.prunable and g.name != stem and g.channels >= 16}
    plan = plan_of_counts("ppocrv4_det", kept, {g.name: g.channels for g in groups if g.prunable}, 8, SIZE)
    return apply_plan(copy.deepcopy(model), plan, groups)


def test_costs_split_the_convs_by_kind_and_shrink_with_a_plan(ppocrv4):
    costs = cost_features(ppocrv4, SIZE)
    assert all(costs[k] > 0 for k in FEATURES)  # PP-OCRv4 det has every kind: stem 3x3, 1x1, depthwise, head deconvs
    # Every conv MAC is in one kind: their sum is the counted FLOPs less what is not a conv MAC (biases, BNs, pools).
    macs = sum(costs[k] for k in FEATURES if k != "conv_output")
    assert 0.9 * count_flops(ppocrv4, SIZE) < macs <= count_flops(ppocrv4, SIZE)
    assert relative_features(costs, costs) == dict.fromkeys(FEATURES, 1.0)
    pruned = relative_features(cost_features(_halved(ppocrv4), SIZE), costs)
    assert pruned["pointwise"] < 0.5 and pruned["depthwise"] < 0.8 and pruned["conv_output"] < 0.8, pruned
    kinds = {conv_kind(layer) for layer in ppocrv4.sublayers()} - {None}
    assert kinds == {"dense", "pointwise", "depthwise", "transposed"}


def test_costs_at_a_channel_block_count_a_cut_inside_a_block_as_no_cut(ppocrv4):
    """Rounded up to 16 channels, a model whose groups were cut by 8 from a multiple of 16 costs what the uncut
    one does, while the plain counts shrink; rounding never lowers a cost."""
    groups = discover_groups(ppocrv4)
    channels = {g.name: g.channels for g in groups if g.prunable}
    kept = {name: width - 8 for name, width in channels.items() if width % 16 == 0 and width > 16}
    assert len(kept) > 10
    cut = apply_plan(copy.deepcopy(ppocrv4), plan_of_counts("ppocrv4_det", kept, channels, 8, SIZE), groups)
    full, pruned = cost_features_by_block(ppocrv4, SIZE, (1, 16)), cost_features_by_block(cut, SIZE, (1, 16))
    assert full[1] == cost_features(ppocrv4, SIZE)
    assert all(full[16][k] >= full[1][k] and pruned[16][k] >= pruned[1][k] for k in FEATURES)
    plain = relative_features(pruned[1], full[1])
    blocked = relative_features(pruned[16], full[16])
    assert plain["pointwise"] < 0.97 and plain["conv_output"] < 0.97, plain
    # What is left: groups of odd multiples of 8 (e.g. the head's 24 channels feeding a cut 1x1) stay as they were.
    assert blocked["pointwise"] == pytest.approx(1.0, abs=0.02)
    assert blocked["conv_output"] == pytest.approx(1.0, abs=0.02)


def test_the_block_that_explains_the_timings_is_chosen():
    """Ratios made by shares over the 16-block costs of random plans are explained exactly at 16, not at 1 or 32."""
    rng = np.random.default_rng(3)
    true = {"dense": 0.3, "pointwise": 0.2, "depthwise": 0.0, "transposed": 0.05, "conv_output": 0.35, FIXED: 0.1}
    plans = []
    for _ in range(10):
        by_block = {b: {k: float(rng.uniform(0.2, 1.0)) for k in FEATURES} for b in (1, 16, 32)}
        ratio = predict_ratio(true, by_block[16])
        plans.append(MeasuredPlan(kept={}, features_by_block=by_block, ratio=ratio, low=ratio, high=ratio))
    block, errors = choose_block(plans, (1, 16, 32))
    assert block == 16 and errors[16] < 1e-6 < min(errors[1], errors[32])


def test_fit_recovers_known_shares_and_the_unpruned_model_is_exactly_one():
    true = {"dense": 0.2, "pointwise": 0.3, "depthwise": 0.05, "transposed": 0.0, "conv_output": 0.15}
    true[FIXED] = 1.0 - sum(true.values())
    rng = np.random.default_rng(0)
    rows = [{k: float(rng.uniform(0.2, 1.0)) for k in FEATURES} for _ in range(12)]
    shares = fit_shares(rows, [predict_ratio(true, r) for r in rows])
    assert shares == pytest.approx(true, abs=1e-9)
    assert predict_ratio(shares, dict.fromkeys(FEATURES, 1.0)) == pytest.approx(1.0)
    # Noisy ratios: the shares stay non-negative and still sum to one with the fixed share.
    noisy = fit_shares(rows, [predict_ratio(true, r) * rng.uniform(0.95, 1.05) for r in rows])
    assert all(noisy[k] >= 0 for k in FEATURES) and sum(noisy.values()) == pytest.approx(1.0)
    # Ratios that only a negative fixed share would explain (time shrinking faster than every cost): fixed stays >= 0.
    steep = fit_shares(rows, [1.0 - 1.3 * (1.0 - r["dense"]) for r in rows])
    assert -1e-9 <= steep[FIXED] and all(steep[k] >= 0 for k in FEATURES) and sum(steep.values()) == pytest.approx(1.0)


def test_random_counts_stay_on_the_grid_and_below_each_width():
    widths = {"a": 64, "b": 24, "c": 200}
    rng = np.random.default_rng(1)
    for _ in range(50):
        kept = random_counts(widths, 8, rng)
        assert all(0 < k < widths[n] and k % 8 == 0 for n, k in kept.items())


def test_the_key_names_what_the_fit_depends_on():
    key = LatencyModelKey(model="ppocrv4_det", input_size=SIZE, threads=1, use_mkldnn=True, align=8, plans=3, seed=0)
    assert key.cpu and key.paddle
    changed = [LatencyModelKey(**{**key.__dict__, field: value}) for field, value in
               (("threads", 2), ("input_size", (96, 96)), ("cpu", "another CPU"), ("paddle", "9.9.9"),
                ("isa_cap", "AVX2"), ("align", 16), ("use_mkldnn", False), ("blocks", (1, 16)))]
    assert len({key.digest(), *(k.digest() for k in changed)}) == 1 + len(changed)


def test_the_fit_is_cached_per_key_and_a_corrupt_cache_is_rebuilt(ppocrv4, tmp_path: Path, capsys):
    key = LatencyModelKey(model="ppocrv4_det", input_size=SIZE, threads=1, use_mkldnn=True, align=8, plans=3, seed=0,
                          blocks=(1, 16))
    timed = []
    fitted = cached_latency_model(tmp_path, ppocrv4, key, ROUNDS, lambda n, plan: timed.append(plan))
    assert len(timed) == len(fitted.measured) == 3 and all(m.low <= m.ratio <= m.high for m in fitted.measured)
    assert sum(fitted.shares.values()) == pytest.approx(1.0) and all(fitted.shares[k] >= 0 for k in FEATURES)
    assert fitted.block in key.blocks and set(fitted.block_errors) == set(key.blocks)
    assert fitted.reference == cost_features(ppocrv4, SIZE, fitted.block)
    [path] = tmp_path.glob("ppocrv4_det-*.json")

    again = cached_latency_model(tmp_path, ppocrv4, key, ROUNDS, lambda n, plan: timed.append(plan))
    assert len(timed) == 3 and again.shares == fitted.shares and again.reference == fitted.reference  # not re-timed
    assert again.block == fitted.block and again.measured == fitted.measured
    half = _halved(ppocrv4)
    assert again.predict(half) == pytest.approx(fitted.predict(half))
    assert again.predict(copy.deepcopy(ppocrv4)) == pytest.approx(1.0)

    other = LatencyModelKey(**{**key.__dict__, "threads": 2, "plans": 3})
    with pytest.raises(ValueError, match="key differs"):
        LatencyModel.load(path, other)

    path.write_text("{not json")
    rebuilt = cached_latency_model(tmp_path, ppocrv4, key, ROUNDS)
    assert len(rebuilt.measured) == 3 and LatencyModel.load(path, key).shares == rebuilt.shares
    assert "latency model cache" in capsys.readouterr().err and list(tmp_path.glob("*.corrupt-*"))


@pytest.mark.parametrize("override, message", [
    ("latency_model.plans=2", "latency_model.plans=2: need at least 3"),
    ("latency_model.input_size=[60,64]", "latency_model.input_size"),
    ("latency_model.max_rounds=10", "latency_model.max_rounds=10"),
    ("latency_model.blocks=[]", "latency_model.blocks=[]: need a list of channel counts"),
])
def test_bad_settings_are_one_line_errors(cache_env, override, message):
    proc = run_cli("prune.latency_model", [override], cache_env)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


def test_command_fits_validates_and_prints_its_line(cache_env):
    args = ["latency_model.plans=3", "latency_model.validate=2", "latency_model.input_size=[64,64]",
            "latency_model.threads=1", "latency_model.max_rounds=12"]
    proc = run_cli("prune.latency_model", args, cache_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = RESULT_LINE.match(proc.stdout.strip().splitlines()[-1])
    assert match, proc.stdout[-2000:]
    assert int(match.group(1)) == 3 and not math.isnan(float(match.group(3)))
    assert "validation: mean |error|" in proc.stdout
    again = run_cli("prune.latency_model", args[:1] + args[2:], cache_env)  # from the cache: no plan timed
    assert again.returncode == 0 and "plan 1:" not in again.stdout and RESULT_LINE.match(
        again.stdout.strip().splitlines()[-1])
