"""The label-free generalization guard: how far a pruned student's detections agree with its unpruned teacher's.

A recovered student can score well on the split it was recovered for and still fire on textures, skin and fabric
elsewhere (README, "Generalization"). On unlabelled images disjoint from recovery, with the teacher's detections
taken as ground truth and the same IoU rule as hmean:

- ``agreement``: hmean of the student's boxes against the teacher's (1.0 for a student that detects what the
  teacher detects, 0.0 for one that detects nothing where the teacher finds text);
- ``false_boxes``: the student's boxes per *text-free* image, i.e. per image where the teacher finds nothing.

No labels are needed, so it runs on a user's own unlabelled images as well as on the built-in pool.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from train.evaluation import Boxes
from train.metric import DetectionIoUEvaluator, ImageCounts


@dataclass(frozen=True)
class AgreementScores:
    """The guard's figures over ``images`` images, ``text_free`` of which the teacher finds no text in."""

    agreement: float
    precision: float
    recall: float
    false_boxes: float
    images: int
    text_free: int


def agreement_counts(student: list[Boxes], teacher: list[Boxes]) -> list[ImageCounts]:
    """Each image's match counts with ``teacher``'s boxes as the ground truth (no don't-care regions)."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student images but {len(teacher)} teacher images")
    evaluator = DetectionIoUEvaluator()
    return [evaluator.evaluate_image(t, [False] * len(t), s) for s, t in zip(student, teacher)]


def agreement_scores(student: list[Boxes], teacher: list[Boxes]) -> AgreementScores:
    """Compare per-image box lists; ``teacher`` plays the ground truth (no don't-care regions).

    When the teacher finds nothing on any image, a student that also finds nothing agrees fully (1.0).
    """
    return agreement_from_counts(agreement_counts(student, teacher), student, teacher)


def agreement_from_counts(counts: list[ImageCounts], student: list[Boxes], teacher: list[Boxes]) -> AgreementScores:
    """`agreement_scores` from the per-image ``counts`` `agreement_counts` gave for these box lists (for a caller
    that needs the counts too, so the boxes are matched once)."""
    scores = DetectionIoUEvaluator().combine(counts)
    text_free = [len(s) for s, t in zip(student, teacher) if not t]
    if scores.gt_care == 0 and scores.det_care == 0:
        precision = recall = hmean = 1.0
    else:
        precision, recall, hmean = scores.precision, scores.recall, scores.hmean
    return AgreementScores(agreement=hmean, precision=precision, recall=recall,
                           false_boxes=float(np.mean(text_free)) if text_free else 0.0, images=len(student),
                           text_free=len(text_free))
