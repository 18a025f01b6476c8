"""DetMetric on hand-made polygons whose IoUs and counts are worked out in the comments."""

import numpy as np
import pytest

from train.metric import DetectionIoUEvaluator, DetMetric, DetScores


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float32)


GT_A = rect(0, 0, 14, 10)
GT_B = rect(40, 0, 60, 10)


def scores_of(*images: tuple[list, list, list]) -> DetScores:
    metric = DetMetric()
    for preds, gts, tags in images:
        metric.update(preds, gts, tags)
    return metric.compute()


def test_perfect_predictions_score_one():
    s = scores_of(([GT_B, GT_A], [GT_A, GT_B], [False, False]))
    assert (s.precision, s.recall, s.hmean) == (1.0, 1.0, 1.0)
    assert (s.images, s.matched, s.gt_care, s.det_care) == (1, 2, 2, 2)


def test_iou_below_threshold_is_a_miss():
    # Shifting a 14x10 box by 6 in x: intersection 8*10, union 20*10 -> IoU 0.4.
    s = scores_of(([GT_A + [6, 0], GT_B], [GT_A, GT_B], [False, False]))
    assert (s.precision, s.recall, s.hmean) == (0.5, 0.5, 0.5)


def test_iou_of_exactly_half_is_a_miss():
    # A 30x10 box shifted by 10: intersection 200, union 400 -> IoU exactly 0.5, and a match needs > 0.5.
    gt = rect(0, 0, 30, 10)
    s = scores_of(([gt + [10, 0]], [gt], [False]))
    assert s.matched == 0


def test_prediction_inside_dont_care_is_ignored():
    dont_care = rect(100, 100, 200, 120)
    inside = rect(110, 102, 150, 118)
    s = scores_of(([GT_A, inside], [GT_A, dont_care], [False, True]))
    assert (s.gt_care, s.det_care, s.matched) == (1, 1, 1)
    assert s.precision == 1.0


def test_prediction_half_over_dont_care_still_counts():
    # Half of its area over the don't-care box: area precision 0.5 is not > 0.5, so it is a false positive.
    dont_care = rect(100, 100, 200, 120)
    half_out = rect(180, 100, 220, 120)
    s = scores_of(([GT_A, half_out], [GT_A, dont_care], [False, True]))
    assert (s.gt_care, s.det_care, s.matched) == (1, 2, 1)


def test_matching_is_one_to_one():
    s = scores_of(([GT_A, GT_A + [0.5, 0]], [GT_A], [False]))
    assert (s.matched, s.gt_care, s.det_care) == (1, 1, 2)
    assert s.precision == 0.5 and s.recall == 1.0
    assert s.hmean == pytest.approx(2 / 3)


def test_greedy_matching_follows_list_order():
    # g0 = [0,20], g1 = [8,28] (x ranges, height 10): IoU(g0, g1) = 12/28. `both` = [4,24] has IoU 16/24 with each.
    # Each GT takes the first free prediction above 0.5, in order; there is no optimal assignment. With `both`
    # listed first, g0 takes it and g1 is left with g0's copy (IoU 0.43): 1 match where 2 were possible.
    g0, g1, both = rect(0, 0, 20, 10), rect(8, 0, 28, 10), rect(4, 0, 24, 10)
    assert scores_of(([g0, both], [g0, g1], [False, False])).matched == 2
    assert scores_of(([both, g0], [g0, g1], [False, False])).matched == 1


def test_micro_average_over_images():
    # Image 1: 2 GT, 2 exact predictions. Image 2: 1 GT, 2 predictions elsewhere.
    # Totals: matched 2, care GT 3, care predictions 4 -> P = 2/4, R = 2/3, H = 2PR/(P+R) = 4/7.
    # (Averaging per image would give P = R = 0.5 instead.)
    far = rect(500, 500, 520, 510)
    s = scores_of(
        ([GT_A, GT_B], [GT_A, GT_B], [False, False]),
        ([far, far + [30, 0]], [rect(200, 0, 220, 10)], [False]),
    )
    assert (s.images, s.matched, s.gt_care, s.det_care) == (2, 2, 3, 4)
    assert s.precision == 0.5
    assert s.recall == pytest.approx(2 / 3)
    assert s.hmean == pytest.approx(4 / 7)


def test_invalid_polygons_are_skipped():
    bow_tie = np.array([[0, 0], [14, 10], [14, 0], [0, 10]], dtype=np.float32)
    line = np.array([[0, 0], [5, 0]], dtype=np.float32)
    s = scores_of(([GT_A, bow_tie, line], [GT_A, bow_tie], [False, False]))
    assert (s.matched, s.gt_care, s.det_care) == (1, 1, 1)


def test_empty_everything_scores_zero():
    s = scores_of(([], [], []))
    assert (s.precision, s.recall, s.hmean, s.images) == (0.0, 0.0, 0.0, 1)


def test_reset_and_json_round_trip():
    metric = DetMetric()
    metric.update([GT_A], [GT_A], [False])
    scores = metric.compute()
    assert DetScores.from_json(scores.to_json()) == scores
    metric.reset()
    assert metric.compute().images == 0


def test_mismatched_ignore_tags_raise():
    with pytest.raises(ValueError):
        DetectionIoUEvaluator().evaluate_image([GT_A], [], [GT_A])
