"""The interleaved A/B latency ratio (prune/latency.py) on real exported detectors and Paddle Inference."""
from __future__ import annotations

import math

import pytest

from prune.latency import LatencyRatio, check_rounds, interval
from prune.measure import measure_against
from train.errors import ConfigError
from train.models.zoo import build_detector
from train.weights import load_detector


def test_interval_of_known_log_ratios():
    ratio, low, high = interval([math.log(2.0)] * 2 + [math.log(2.0) + 0.1, math.log(2.0) - 0.1])
    assert ratio == pytest.approx(2.0)
    # mean 0, sd sqrt(0.02/3) over 4 values, t(0.975, 3) = 3.182
    half = 3.182446 * math.sqrt(0.02 / 3) / 2
    assert (low, high) == (pytest.approx(2.0 * math.exp(-half)), pytest.approx(2.0 * math.exp(half)))


@pytest.mark.timing
def test_a_model_against_itself_is_one_within_its_interval():
    model = load_detector("ppocrv4_det", "pretrained")
    _, result = measure_against(model, model, (160, 160), threads=1, warmup=2, min_rounds=30, max_rounds=30)
    assert isinstance(result, LatencyRatio) and result.rounds == 30
    assert result.low <= result.ratio <= result.high
    # The nominal 95% interval would miss 1.0 in 1 run of 20 by chance alone: the test allows twice its width
    # (a ~4-sigma band), which a bias of the protocol (one side always timed first, one model timed twice) exceeds.
    assert result.low ** 2 / result.ratio <= 1.0 <= result.high ** 2 / result.ratio, result


@pytest.mark.timing
def test_a_heavier_model_measures_slower_and_rounds_stop_at_the_tolerance():
    light = load_detector("ppocrv4_det", "pretrained")
    heavy = build_detector("det_mv3_db")  # about 4x the FLOPs; random weights cost the same
    heavy.eval()
    _, result = measure_against(heavy, light, (320, 320), threads=1, warmup=2, min_rounds=6, max_rounds=80,
                                tolerance=0.05)
    assert result.low > 1.0, result
    assert result.candidate_ms > result.reference_ms
    assert result.rounds == 80 or result.half_width <= 0.05 + 1e-9


@pytest.mark.parametrize("args, message", [
    ((2, 10, 0.03), "measure.min_rounds=2: need at least 3 rounds"),
    ((6, 5, 0.03), "measure.max_rounds=5: must be >= measure.min_rounds=6"),
    ((6, 10, 0.0), "measure.tolerance=0.0: must be in (0, 1)"),
])
def test_bad_round_settings_name_the_key(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_rounds(*args)
