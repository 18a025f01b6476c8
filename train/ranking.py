"""Does one detection metric rank a set of models the way another does, and how far *can* it on these images?

The generalization guard's teacher agreement is meant to rank a study's trials the way an independent labelled set
ranks them (README, "Generalization"). A Spearman correlation over a dozen close trials is itself a noisy figure:
both metrics are hmeans pooled over a few hundred images, and when the trials differ by less than what another draw
of images would change, neither metric can rank them consistently, let alone like the other. So beside the
correlation this reports

- a 95% bootstrap interval: both image sets resampled with replacement, every model scored on the same resample;
- each metric's split-half reliability: the Spearman correlation between the rankings of the two halves of its
  images, averaged over random halvings and stepped up to the full set (Spearman-Brown); 0 when the halves do not
  agree at all;
- the ceiling those reliabilities put on the correlation of the two metrics (the classical attenuation bound,
  ``sqrt(reliability_a * reliability_b)``): what even a metric that measured exactly the right thing could show.

Counts are per model and image: ``(gt_care, det_care, matched)`` as `train.metric.DetectionIoUEvaluator` gives them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import spearmanr

from train.metric import ImageCounts


@dataclass(frozen=True)
class RankAgreement:
    """Spearman correlation of two metrics over the same models, with what the images allow."""

    spearman: float
    low: float
    high: float
    reliability_a: float
    reliability_b: float
    ceiling: float
    models: int


def counts_array(per_model: Sequence[Sequence[ImageCounts]]) -> np.ndarray:
    """models x images x (gt_care, det_care, matched) from each model's per-image counts (same images, same order)."""
    if len({len(images) for images in per_model}) > 1:
        raise ValueError("every model must be scored on the same images")
    return np.array([[(c.gt_care, c.det_care, c.matched) for c in images] for images in per_model], dtype=np.float64)


def pooled_hmean(counts: np.ndarray) -> np.ndarray:
    """Each model's hmean over the images of ``counts`` (models x images x 3), matches pooled as the metric pools
    them. A model with nothing to find and nothing found scores 1.0 (the guard's convention)."""
    gt, det, matched = counts[..., 0].sum(-1), counts[..., 1].sum(-1), counts[..., 2].sum(-1)
    precision = np.divide(matched, det, out=np.zeros_like(matched), where=det > 0)
    recall = np.divide(matched, gt, out=np.zeros_like(matched), where=gt > 0)
    total = precision + recall
    hmean = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return np.where((gt == 0) & (det == 0), 1.0, hmean)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho; 1.0 when both rankings are constant (nothing to tell apart), 0.0 when only one is."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 1.0 if np.ptp(x) == np.ptp(y) == 0 else 0.0
    return float(spearmanr(x, y).statistic)


def split_half_reliability(counts: np.ndarray, halvings: int = 500, seed: int = 0) -> float:
    """How consistently the images of ``counts`` rank its models: the mean Spearman correlation between the rankings
    of random halves of the images, stepped up to the full set by Spearman-Brown (``2r / (1 + r)``)."""
    if counts.shape[1] < 2:
        raise ValueError("split-half reliability needs at least 2 images")
    rng = np.random.default_rng(seed)
    half = counts.shape[1] // 2
    rhos = []
    for _ in range(halvings):
        order = rng.permutation(counts.shape[1])
        rhos.append(_spearman(pooled_hmean(counts[:, order[:half]]), pooled_hmean(counts[:, order[half:]])))
    # Halves of one fixed image set are anti-correlated when the models barely differ (one half's luck is the
    # other's lack of it), so the mean can go below 0: that is no reliability at all, not a negative one.
    r = max(float(np.mean(rhos)), 0.0)
    return 2 * r / (1 + r)


def rank_agreement(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> RankAgreement:
    """Spearman(hmean on ``a``'s images, hmean on ``b``'s) over the models, with a bootstrap interval and the
    ceiling the two image sets' reliabilities allow. ``a`` and ``b``: counts arrays of the same models."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{a.shape[0]} models in the first set of counts, {b.shape[0]} in the second")
    if a.shape[0] < 3:
        raise ValueError("a rank correlation needs at least 3 models")
    rng = np.random.default_rng(seed)
    rho = _spearman(pooled_hmean(a), pooled_hmean(b))
    boot = [_spearman(pooled_hmean(a[:, rng.integers(0, a.shape[1], a.shape[1])]),
                      pooled_hmean(b[:, rng.integers(0, b.shape[1], b.shape[1])])) for _ in range(resamples)]
    rel_a, rel_b = split_half_reliability(a, seed=seed), split_half_reliability(b, seed=seed)
    return RankAgreement(spearman=rho, low=float(np.percentile(boot, 2.5)), high=float(np.percentile(boot, 97.5)),
                         reliability_a=rel_a, reliability_b=rel_b,
                         ceiling=float(np.sqrt(max(rel_a, 0.0) * max(rel_b, 0.0))), models=a.shape[0])
