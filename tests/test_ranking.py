"""Rank agreement of two metrics (train.ranking): pooled hmean as the metric pools it, known rankings, and noise."""
from __future__ import annotations

import numpy as np
import pytest

from train.metric import DetectionIoUEvaluator
from train.ranking import counts_array, pooled_hmean, rank_agreement, split_half_reliability


def box(x: float, y: float, w: float = 40, h: float = 10) -> np.ndarray:
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float64)


def graded_counts(models: int, images: int, boxes: int = 10) -> np.ndarray:
    """Model k finds k + 1 of ``boxes`` boxes on every image and nothing else: a ranking every image agrees on."""
    return np.array([[(boxes, k + 1, k + 1)] * images for k in range(models)], dtype=np.float64)


def test_pooled_hmean_is_the_evaluators_hmean():
    evaluator = DetectionIoUEvaluator()
    truth = [[box(0, 0), box(0, 50)], [box(100, 100)], []]
    found = [[box(0, 0)], [box(100, 100), box(300, 300)], [box(5, 5)]]
    counts = [evaluator.evaluate_image(t, [False] * len(t), f) for t, f in zip(truth, found)]
    assert pooled_hmean(counts_array([counts]))[0] == pytest.approx(evaluator.combine(counts).hmean)
    nothing = [evaluator.evaluate_image([], [], []) for _ in range(3)]
    assert pooled_hmean(counts_array([nothing]))[0] == 1.0  # nothing to find, nothing found: the guard's 1.0


def test_a_ranking_every_image_agrees_on_is_fully_reliable():
    a, b = graded_counts(5, 40), graded_counts(5, 25, boxes=8)
    result = rank_agreement(a, b, resamples=200)
    figures = (result.spearman, result.low, result.high, result.reliability_a, result.reliability_b, result.ceiling)
    assert figures == pytest.approx((1.0,) * 6)
    assert rank_agreement(a, b[::-1], resamples=200).spearman == pytest.approx(-1.0)


def test_models_that_differ_only_by_image_noise_cannot_be_ranked():
    rng = np.random.default_rng(3)
    gt = rng.integers(1, 4, size=(1, 60))
    matched = rng.binomial(np.broadcast_to(gt, (8, 60)), 0.7)  # 8 models, one skill, per-image luck
    counts = np.stack([np.broadcast_to(gt, (8, 60)), matched, matched], axis=-1).astype(np.float64)
    assert abs(split_half_reliability(counts)) < 0.5
    result = rank_agreement(counts, graded_counts(8, 30), resamples=300)
    assert result.low < 0.0 < result.high and result.ceiling < 0.75


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="same images"):
        counts_array([[DetectionIoUEvaluator().evaluate_image([], [], [])], []])
    with pytest.raises(ValueError, match="models"):
        rank_agreement(graded_counts(4, 10), graded_counts(5, 10))
    with pytest.raises(ValueError, match="at least 3"):
        rank_agreement(graded_counts(2, 10), graded_counts(2, 10))
