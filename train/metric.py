"""Text-detection precision / recall / hmean, counted as PaddleOCR's ``DetMetric`` (``DetectionIoUEvaluator``).

This is the ICDAR-2015 IoU protocol as PaddleOCR implements it, so scores are comparable with PaddleOCR's:
- polygons (ground truth or predicted) that shapely finds invalid or non-simple are dropped before anything else;
- a prediction covering a don't-care ground truth by more than `area_precision_constraint` of its own area is
  don't-care too, i.e. neither a hit nor a false positive;
- matching is greedy and one-to-one in list order: each care ground truth takes the first unmatched care prediction
  with IoU > `iou_constraint`;
- scores are micro-averaged over images (total matches / total care GT or care predictions), not averaged per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from shapely.geometry import Polygon

SCORES_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ImageCounts:
    """What one image contributes to the totals."""

    gt_care: int
    det_care: int
    matched: int


@dataclass(frozen=True)
class DetScores:
    """Micro-averaged scores over `images` images. Precision/recall are 0 (not 1) when their denominator is 0."""

    precision: float
    recall: float
    hmean: float
    images: int
    matched: int
    gt_care: int
    det_care: int

    def to_json(self) -> dict:
        return {"schema_version": SCORES_SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> DetScores:
        fields = dict(data)
        version = fields.pop("schema_version")
        assert version == SCORES_SCHEMA_VERSION, f"DetScores schema_version {version} is not {SCORES_SCHEMA_VERSION}"
        return cls(**fields)


def _valid_polygon(points: np.ndarray | Sequence) -> Polygon | None:
    """A shapely polygon, or None where PaddleOCR would skip it (invalid or self-intersecting).

    Fewer than 3 points make shapely raise (and PaddleOCR crash); such shapes have no area and are skipped too.
    """
    coords = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(coords) < 3:
        return None
    polygon = Polygon(coords)
    return polygon if polygon.is_valid and polygon.is_simple else None


class DetectionIoUEvaluator:
    """Per-image matching and the micro-averaged combination of PaddleOCR's evaluator."""

    def __init__(self, iou_constraint: float = 0.5, area_precision_constraint: float = 0.5) -> None:
        self.iou_constraint = iou_constraint
        self.area_precision_constraint = area_precision_constraint

    def evaluate_image(
        self, gt_polys: Sequence[np.ndarray], ignore_tags: Sequence[bool], pred_polys: Sequence[np.ndarray]
    ) -> ImageCounts:
        if len(gt_polys) != len(ignore_tags):
            raise ValueError(f"{len(gt_polys)} ground-truth polygons but {len(ignore_tags)} ignore tags")
        gts: list[tuple[Polygon, bool]] = []
        for points, tag in zip(gt_polys, ignore_tags):
            poly = _valid_polygon(points)
            if poly is not None:
                gts.append((poly, bool(tag)))
        dont_care_gts = [poly for poly, ignored in gts if ignored]
        dets = [poly for poly in map(_valid_polygon, pred_polys) if poly is not None]
        det_is_dont_care = [self._covers_dont_care(det, dont_care_gts) for det in dets]

        det_taken = list(det_is_dont_care)
        matched = 0
        for gt, ignored in gts:
            if ignored:
                continue
            for j, det in enumerate(dets):
                if not det_taken[j] and _iou(det, gt) > self.iou_constraint:
                    det_taken[j] = True
                    matched += 1
                    break
        return ImageCounts(
            gt_care=len(gts) - len(dont_care_gts), det_care=len(dets) - sum(det_is_dont_care), matched=matched
        )

    def _covers_dont_care(self, det: Polygon, dont_care_gts: list[Polygon]) -> bool:
        for gt in dont_care_gts:
            inside = 0.0 if det.area == 0 else gt.intersection(det).area / det.area
            if inside > self.area_precision_constraint:
                return True
        return False

    @staticmethod
    def combine(results: Sequence[ImageCounts]) -> DetScores:
        gt_care = sum(r.gt_care for r in results)
        det_care = sum(r.det_care for r in results)
        matched = sum(r.matched for r in results)
        recall = matched / gt_care if gt_care else 0.0
        precision = matched / det_care if det_care else 0.0
        hmean = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return DetScores(
            precision=precision, recall=recall, hmean=hmean,
            images=len(results), matched=matched, gt_care=gt_care, det_care=det_care,
        )


def _iou(det: Polygon, gt: Polygon) -> float:
    return det.intersection(gt).area / det.union(gt).area


class DetMetric:
    """Accumulates per-image counts; `compute()` does not reset (call `reset()` between evaluations)."""

    def __init__(self, iou_constraint: float = 0.5, area_precision_constraint: float = 0.5) -> None:
        self.evaluator = DetectionIoUEvaluator(iou_constraint, area_precision_constraint)
        self.results: list[ImageCounts] = []

    def update(
        self, pred_points: Sequence[np.ndarray], gt_polys: Sequence[np.ndarray], ignore_tags: Sequence[bool]
    ) -> ImageCounts:
        """Add one image: predicted polygons (e.g. `DetBoxes.points`), GT polygons and their don't-care flags."""
        counts = self.evaluator.evaluate_image(gt_polys, ignore_tags, pred_points)
        self.results.append(counts)
        return counts

    def reset(self) -> None:
        self.results = []

    def compute(self) -> DetScores:
        return self.evaluator.combine(self.results)
