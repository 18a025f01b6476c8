"""DBPostProcess on synthetic probability maps whose boxes follow from the unclip formula."""

import cv2
import numpy as np
import pyclipper
import pytest
from shapely.geometry import Polygon

from train.errors import ConfigError
from train.metric import DetMetric
from train.postprocess import DBPostProcess

MAP_H, MAP_W = 64, 96
SRC_H, SRC_W = 128, 144  # ratio_h = 0.5, ratio_w = 2/3: the map is a downscaled image
SHAPES = np.array([[SRC_H, SRC_W, MAP_H / SRC_H, MAP_W / SRC_W]])

# (row0, row1, col0, col1) inclusive pixel ranges
TEXT_A = (10, 19, 10, 49)
TEXT_B = (40, 49, 60, 79)
WEAK = (54, 60, 10, 30)


def paint(*blobs: tuple[tuple[int, int, int, int], float]) -> np.ndarray:
    prob = np.zeros((1, 1, MAP_H, MAP_W), dtype=np.float32)
    for (r0, r1, c0, c1), value in blobs:
        prob[0, 0, r0 : r1 + 1, c0 : c1 + 1] = value
    return prob


def expected_box(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """The contour runs through pixel centres, so the rectangle is (c1-c0) x (r1-r0); unclip grows it by
    area * 1.5 / perimeter on every side. Corners TL, TR, BR, BL, scaled to source pixels."""
    w, h = c1 - c0, r1 - r0
    d = w * h * 1.5 / (2 * (w + h))
    x0, x1, y0, y1 = c0 - d, c1 + d, r0 - d, r1 + d
    box = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    return box * [SRC_W / MAP_W, SRC_H / MAP_H]


def sort_by_x(points: np.ndarray) -> np.ndarray:
    return points[np.argsort(points[:, 0, 0])]


def test_two_rectangles_give_two_unclipped_boxes_and_the_weak_blob_is_dropped():
    (result,) = DBPostProcess()(paint((TEXT_A, 0.9), (TEXT_B, 0.9), (WEAK, 0.5)), SHAPES)
    assert result.points.shape == (2, 4, 2) and result.points.dtype == np.float32
    np.testing.assert_allclose(result.scores, [0.9, 0.9], atol=1e-6)
    expected = np.stack([expected_box(*TEXT_A), expected_box(*TEXT_B)])
    # pyclipper works on integer coordinates and the output is rounded: at most about one map pixel off.
    scale = np.array([SRC_W / MAP_W, SRC_H / MAP_H])
    assert np.all(np.abs(sort_by_x(result.points) - expected) <= scale + 0.5)
    assert np.array_equal(result.points, np.round(result.points))


def test_weak_blob_is_kept_when_box_thresh_is_below_its_score():
    (result,) = DBPostProcess(box_thresh=0.45)(paint((WEAK, 0.5)), SHAPES)
    assert len(result) == 1
    assert result.scores[0] == pytest.approx(0.5)


def test_blobs_thinner_than_three_pixels_are_dropped():
    (result,) = DBPostProcess()(paint(((10, 11, 10, 60), 0.9)), SHAPES)
    assert len(result) == 0


def test_boxes_are_clipped_to_the_source_image():
    (result,) = DBPostProcess()(paint(((0, 9, 0, 30), 0.9)), SHAPES)
    assert result.points.min() == 0
    assert result.points[..., 0].max() <= SRC_W and result.points[..., 1].max() <= SRC_H


def test_input_layouts_modes_and_empty_maps():
    prob = paint((TEXT_A, 0.9), (TEXT_B, 0.9))
    (reference,) = DBPostProcess()(prob, SHAPES)
    train_maps = np.concatenate([prob, np.zeros_like(prob), prob], axis=1)  # shrink, threshold, binary
    for maps, post in [
        (prob[:, 0], DBPostProcess()),
        (train_maps, DBPostProcess()),
        (prob, DBPostProcess(score_mode="slow")),
    ]:
        (result,) = post(maps, SHAPES)
        np.testing.assert_array_equal(result.points, reference.points)
        np.testing.assert_allclose(result.scores, reference.scores, atol=1e-6)
    (dilated,) = DBPostProcess(use_dilation=True)(prob, SHAPES)
    assert len(dilated) == 2
    empty = DBPostProcess()(np.zeros((2, 1, MAP_H, MAP_W), np.float32), np.repeat(SHAPES, 2, axis=0))
    assert [r.points.shape for r in empty] == [(0, 4, 2), (0, 4, 2)]


def test_corner_order_of_a_rotated_box():
    prob = np.zeros((1, 1, MAP_H, MAP_W), dtype=np.float32)
    quad = np.array([[20, 20], [70, 10], [73, 25], [23, 35]], dtype=np.int32)  # tilted ~11 degrees
    cv2.fillPoly(prob[0, 0], [quad], 0.9)
    (result,) = DBPostProcess()(prob, np.array([[MAP_H, MAP_W, 1.0, 1.0]]))
    tl, tr, br, bl = result.points[0]
    assert tl[0] < tr[0] and bl[0] < br[0]  # left corners first
    assert tl[1] < bl[1] and tr[1] < br[1]  # upper corners first
    assert tr[1] < tl[1]  # rising to the right, like the painted quad


def test_unsupported_options_raise_config_errors():
    with pytest.raises(ConfigError):
        DBPostProcess(score_mode="median")
    with pytest.raises(ConfigError):
        DBPostProcess(box_type="poly")


def shrink(poly: np.ndarray, ratio: float = 0.4) -> np.ndarray:
    """The DB label shrink: inward offset by area * (1 - ratio^2) / perimeter (as MakeShrinkMap)."""
    shape = Polygon(poly)
    distance = shape.area * (1 - ratio**2) / shape.length
    offset = pyclipper.PyclipperOffset()
    offset.AddPath(poly.astype(np.int64).tolist(), pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    (path,) = offset.Execute(-distance)
    return np.array(path, dtype=np.float64)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_maps_rendered_from_ground_truth_round_trip_to_hmean_one(scale):
    src_h, src_w = 200, 240
    gts = [
        np.array([[20, 20], [120, 20], [120, 60], [20, 60]]),
        np.array([[30, 90], [110, 90], [110, 120], [30, 120]]),
        np.array([[140, 120], [215, 105], [221, 135], [146, 150]]),  # rotated
        np.array([[10, 170], [90, 170], [90, 190], [10, 190]]),  # don't care, not drawn (as in DB labels)
    ]
    ignore = [False, False, False, True]
    map_h, map_w = int(src_h * scale), int(src_w * scale)
    prob = np.zeros((1, 1, map_h, map_w), dtype=np.float32)
    for gt, ignored in zip(gts, ignore):
        if not ignored:
            cv2.fillPoly(prob[0, 0], [np.round(shrink(gt) * scale).astype(np.int32)], 1.0)
    (boxes,) = DBPostProcess()(prob, np.array([[src_h, src_w, scale, scale]]))
    metric = DetMetric()
    metric.update(boxes.points, [g.astype(np.float32) for g in gts], ignore)
    scores = metric.compute()
    assert (scores.matched, scores.gt_care, scores.det_care) == (3, 3, 3)
    assert scores.hmean == 1.0
