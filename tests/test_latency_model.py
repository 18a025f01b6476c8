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
from prune.latency_model import (FEATURES, FIXED, LatencyModel, LatencyModelKey, cached_latency_model, conv_kind,
                                 cost_features, fit_shares, predict_ratio, random_counts, relative_features)
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
                ("isa_cap", "AVX2"), ("align", 16), ("use_mkldnn", False))]
    assert len({key.digest(), *(k.digest() for k in changed)}) == 1 + len(changed)


def test_the_fit_is_cached_per_key_and_a_corrupt_cache_is_rebuilt(ppocrv4, tmp_path: Path, capsys):
    key = LatencyModelKey(model="ppocrv4_det", input_size=SIZE, threads=1, use_mkldnn=True, align=8, plans=3, seed=0)
    timed = []
    fitted = cached_latency_model(tmp_path, ppocrv4, key, ROUNDS, lambda n, plan: timed.append(plan))
    assert len(timed) == len(fitted.measured) == 3 and all(m.low <= m.ratio <= m.high for m in fitted.measured)
    assert sum(fitted.shares.values()) == pytest.approx(1.0) and all(fitted.shares[k] >= 0 for k in FEATURES)
    [path] = tmp_path.glob("ppocrv4_det-*.json")

    again = cached_latency_model(tmp_path, ppocrv4, key, ROUNDS, lambda n, plan: timed.append(plan))
    assert len(timed) == 3 and again.shares == fitted.shares and again.reference == fitted.reference  # not re-timed
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
