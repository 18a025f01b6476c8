"""The generalization guard's metric (train.agreement): crafted box sets with known answers, and real models."""
from __future__ import annotations

import copy

import numpy as np
import paddle
import pytest

from train.agreement import agreement_scores
from train.evaluation import detect
from train.data.pool import PoolSpec, ensure_pool, pool_images
from train.data.unlabeled import unlabeled_eval_set
from train.postprocess import DBPostProcess
from train.weights import load_detector


def box(x: float, y: float, w: float = 40, h: float = 10) -> np.ndarray:
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float64)


TEACHER = [[box(0, 0), box(0, 50)], [], [box(100, 100)], []]


def test_identical_boxes_agree_fully():
    scores = agreement_scores(copy.deepcopy(TEACHER), TEACHER)
    assert (scores.agreement, scores.precision, scores.recall) == (1.0, 1.0, 1.0)
    assert scores.false_boxes == 0.0 and scores.text_free == 2 and scores.images == 4


def test_a_student_that_detects_nothing_agrees_not_at_all():
    scores = agreement_scores([[] for _ in TEACHER], TEACHER)
    assert scores.agreement == 0.0 and scores.recall == 0.0 and scores.false_boxes == 0.0


def test_known_boxes_give_the_known_value():
    # Image 0: one of two teacher boxes found, plus a box far off. Image 1 (text-free): 3 false boxes.
    # Image 2: the box shifted by 30% of its width (IoU 0.54 > 0.5: a match). Image 3 (text-free): nothing.
    student = [[box(0, 0), box(300, 300)], [box(5, 5), box(60, 5), box(5, 60)], [box(112, 100)], []]
    scores = agreement_scores(student, TEACHER)
    precision, recall = 2 / 6, 2 / 3
    assert scores.precision == pytest.approx(precision)
    assert scores.recall == pytest.approx(recall)
    assert scores.agreement == pytest.approx(2 * precision * recall / (precision + recall))
    assert scores.false_boxes == pytest.approx(1.5)  # (3 + 0) boxes over the 2 images the teacher finds empty


def test_a_shift_below_the_iou_rule_is_no_match():
    scores = agreement_scores([[box(0, 0), box(0, 50)], [], [box(125, 100)], []], TEACHER)  # IoU 0.23
    assert scores.recall == pytest.approx(2 / 3) and scores.precision == pytest.approx(2 / 3)


def test_nothing_anywhere_is_full_agreement():
    scores = agreement_scores([[], []], [[], []])
    assert scores.agreement == 1.0 and scores.text_free == 2


def test_lengths_must_match():
    with pytest.raises(ValueError, match="2 student images but 1 teacher"):
        agreement_scores([[], []], [[]])


@pytest.fixture(scope="module")
def guard_set(tmp_path_factory):
    spec = PoolSpec(n_recovery=1, n_guard=6, width_range=(160, 192), height_range=(160, 192),
                    font_size_range=(20, 48), shares=(1, 1, 2))
    root = ensure_pool(tmp_path_factory.mktemp("pool") / "p", spec, progress=False)
    return unlabeled_eval_set([root / i.path for i in pool_images(root, "guard")], 192, "max")


def test_real_models_identical_and_silenced(guard_set):
    """The pretrained model against itself agrees fully; with its last layer silenced it finds nothing."""
    post = DBPostProcess()
    teacher = load_detector("ppocrv4_det", "pretrained")
    reference = detect(teacher, guard_set, post)
    assert sum(len(b) for b in reference) > 0, "the guard's text images should hold text the teacher finds"
    assert agreement_scores(detect(teacher, guard_set, post), reference).agreement == 1.0
    silenced = copy.deepcopy(teacher)
    last = silenced.head.binarize.conv3
    last.weight.set_value(paddle.zeros_like(last.weight))
    last.bias.set_value(paddle.full_like(last.bias, -20.0))  # probability 2e-9 everywhere
    scores = agreement_scores(detect(silenced, guard_set, post), reference)
    assert scores.agreement == 0.0 and scores.false_boxes == 0.0
