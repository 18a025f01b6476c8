"""Turn DB probability maps into scored text quadrilaterals, as PaddleOCR's ``DBPostProcess`` (box_type 'quad').

Every step follows PaddleOCR so that an hmean measured here is the hmean PaddleOCR would report for the same maps:
binarize at `thresh`, one candidate per contour (at most `max_candidates`), its minimum-area rectangle, score =
mean probability inside that rectangle ('fast') or inside the contour ('slow'), expansion by
area * unclip_ratio / perimeter with pyclipper, the minimum-area rectangle again, then scaling from map pixels to
source-image pixels, rounding and clipping. Box corners are ordered top-left, top-right, bottom-right, bottom-left.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pyclipper
from shapely.geometry import Polygon

from train.errors import ConfigError

SCORE_MODES = ("fast", "slow")
# PaddleOCR hard-codes this: rectangles with a shorter side below it are noise, and below MIN_SIZE + 2 after
# expansion.
MIN_SIZE = 3


@dataclass
class DetBoxes:
    """Detections of one image: `points` float32 (n, 4, 2) as (x, y) in source-image pixels, `scores` float32 (n,)."""

    points: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.points)


class DBPostProcess:
    """Callable: (prob_maps, shape_list) -> one `DetBoxes` per image. Defaults are the PP-OCR det configs' values."""

    def __init__(
        self,
        thresh: float = 0.3,
        box_thresh: float = 0.6,
        max_candidates: int = 1000,
        unclip_ratio: float = 1.5,
        use_dilation: bool = False,
        score_mode: str = "fast",
        box_type: str = "quad",
    ) -> None:
        if score_mode not in SCORE_MODES:
            raise ConfigError(f"postprocess.score_mode={score_mode!r}: expected one of {list(SCORE_MODES)}")
        if box_type != "quad":
            raise ConfigError(f"postprocess.box_type={box_type!r}: only 'quad' is supported")
        self.thresh = thresh
        self.box_thresh = box_thresh
        self.max_candidates = max_candidates
        self.unclip_ratio = unclip_ratio
        self.score_mode = score_mode
        self.dilation_kernel = np.ones((2, 2), dtype=np.uint8) if use_dilation else None

    def __call__(self, prob_maps: np.ndarray, shape_list: np.ndarray) -> list[DetBoxes]:
        """`prob_maps`: [B, H, W] or [B, C, H, W] (channel 0, the shrink map, is used, so train-mode maps work too).

        `shape_list`: [B, 4] rows of (src_h, src_w, ratio_h, ratio_w). Like PaddleOCR, boxes are scaled by
        src size / map size; the ratios are not used, which is right as long as the map covers the whole resized
        image (no padding), as with PaddleOCR's DetResizeForTest.
        """
        maps = np.asarray(prob_maps)
        if maps.ndim == 4:
            maps = maps[:, 0]
        assert maps.ndim == 3, f"expected probability maps [B,H,W] or [B,C,H,W], got shape {np.shape(prob_maps)}"
        shapes = np.asarray(shape_list)
        assert shapes.shape == (len(maps), 4), f"shape_list must be [{len(maps)}, 4], got {shapes.shape}"
        results = []
        for prob, (src_h, src_w, _, _) in zip(maps, shapes):
            bitmap = prob > self.thresh
            if self.dilation_kernel is not None:
                bitmap = cv2.dilate(bitmap.astype(np.uint8), self.dilation_kernel)
            results.append(self._boxes_from_bitmap(prob, bitmap, src_w, src_h))
        return results

    def _boxes_from_bitmap(self, prob: np.ndarray, bitmap: np.ndarray, dest_w: float, dest_h: float) -> DetBoxes:
        height, width = bitmap.shape
        contours, _ = cv2.findContours((bitmap * 255).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        boxes, scores = [], []
        for contour in contours[: self.max_candidates]:
            box, short_side = mini_box(contour)
            if short_side < MIN_SIZE:
                continue
            if self.score_mode == "fast":
                score = box_score_fast(prob, box)
            else:
                score = box_score_slow(prob, contour)
            if score < self.box_thresh:
                continue
            expanded = unclip(box, self.unclip_ratio)
            if len(expanded) == 0:
                continue
            box, short_side = mini_box(expanded.reshape(-1, 1, 2))
            if short_side < MIN_SIZE + 2:
                continue
            box[:, 0] = np.clip(np.round(box[:, 0] / width * dest_w), 0, dest_w)
            box[:, 1] = np.clip(np.round(box[:, 1] / height * dest_h), 0, dest_h)
            # PaddleOCR hands int16 boxes to its metric; the round trip keeps our values identical to theirs.
            boxes.append(box.astype(np.int16))
            scores.append(score)
        return DetBoxes(
            points=np.array(boxes, dtype=np.float32).reshape(-1, 4, 2),
            scores=np.array(scores, dtype=np.float32),
        )


def mini_box(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Minimum-area rectangle of `points` as float32 (4, 2) in TL, TR, BR, BL order, and its shorter side.

    The order comes from sorting the corners by x (stable, as PaddleOCR's `sorted`) and taking the upper one of
    each side pair first; rotated rectangles therefore get the same corner order as in PaddleOCR.
    """
    rect = cv2.minAreaRect(points)
    corners = sorted(cv2.boxPoints(rect), key=lambda p: p[0])
    left, right = corners[:2], corners[2:]
    top_left, bottom_left = (left[0], left[1]) if left[1][1] > left[0][1] else (left[1], left[0])
    top_right, bottom_right = (right[0], right[1]) if right[1][1] > right[0][1] else (right[1], right[0])
    return np.array([top_left, top_right, bottom_right, bottom_left], dtype=np.float32), min(rect[1])


def box_score_fast(prob: np.ndarray, box: np.ndarray) -> float:
    """Mean probability inside the (integer-truncated) quadrilateral `box`, computed on its bounding window."""
    h, w = prob.shape[:2]
    xmin = int(np.clip(np.floor(box[:, 0].min()), 0, w - 1))
    xmax = int(np.clip(np.ceil(box[:, 0].max()), 0, w - 1))
    ymin = int(np.clip(np.floor(box[:, 1].min()), 0, h - 1))
    ymax = int(np.clip(np.ceil(box[:, 1].max()), 0, h - 1))
    return _masked_mean(prob, box, xmin, xmax, ymin, ymax)


def box_score_slow(prob: np.ndarray, contour: np.ndarray) -> float:
    """Mean probability inside the contour itself: slower, but not diluted by background in curved text."""
    h, w = prob.shape[:2]
    points = contour.reshape(-1, 2)
    xmin = int(np.clip(points[:, 0].min(), 0, w - 1))
    xmax = int(np.clip(points[:, 0].max(), 0, w - 1))
    ymin = int(np.clip(points[:, 1].min(), 0, h - 1))
    ymax = int(np.clip(points[:, 1].max(), 0, h - 1))
    return _masked_mean(prob, points, xmin, xmax, ymin, ymax)


def _masked_mean(prob: np.ndarray, polygon: np.ndarray, xmin: int, xmax: int, ymin: int, ymax: int) -> float:
    mask = np.zeros((ymax - ymin + 1, xmax - xmin + 1), dtype=np.uint8)
    # The shift keeps the polygon's dtype and astype truncates toward zero, both as in PaddleOCR.
    shifted = polygon - np.array([xmin, ymin], dtype=polygon.dtype)
    cv2.fillPoly(mask, shifted.reshape(1, -1, 2).astype(np.int32), 1)
    return cv2.mean(prob[ymin : ymax + 1, xmin : xmax + 1], mask)[0]


def unclip(box: np.ndarray, unclip_ratio: float) -> np.ndarray:
    """Grow `box` by distance area * unclip_ratio / perimeter (the inverse of the label shrink); int64 (k, 2).

    pyclipper works on integer coordinates (it truncates the float corners). All output paths are stacked, as
    PaddleOCR's np.array does; a convex box gives exactly one path, an empty result means nothing to keep.
    """
    polygon = Polygon(box)
    distance = polygon.area * unclip_ratio / polygon.length
    offset = pyclipper.PyclipperOffset()
    offset.AddPath(box, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    paths = offset.Execute(distance)
    return np.array([point for path in paths for point in path], dtype=np.int64).reshape(-1, 2)
