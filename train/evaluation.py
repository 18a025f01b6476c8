"""Evaluate a DB detector on an eval split the way PaddleOCR's eval does: one image at a time at its resized
shape, DB post-processing back to source coordinates, and the IoU detection metric against the original polygons.
"""
from __future__ import annotations

import numpy as np
import paddle
from tqdm import tqdm

from train.data.dataset import DetDataset
from train.locks import cpu_work
from train.metric import DetectionIoUEvaluator, DetMetric, DetScores, ImageCounts
from train.postprocess import DBPostProcess

Boxes = list[np.ndarray]


def predict_maps(model: paddle.nn.Layer, image_chw: np.ndarray) -> np.ndarray:
    """The probability map [1, H, W] of one normalised CHW image (eval mode, no gradients)."""
    with paddle.no_grad(), cpu_work():  # pauses while another worker of the host times a model
        maps = model(paddle.to_tensor(image_chw[None]))["maps"]
    return maps.numpy()[:, 0]


def evaluate_detector(
    model: paddle.nn.Layer,
    dataset: DetDataset,
    postprocess: DBPostProcess,
    max_images: int | None = None,
    progress: bool = True,
) -> DetScores:
    """hmean / precision / recall of `model` on the first `max_images` images of `dataset` (all by default).

    The model is put in eval mode and left there.
    """
    return DetectionIoUEvaluator().combine(image_counts(model, dataset, postprocess, max_images, progress))


def image_counts(model: paddle.nn.Layer, dataset: DetDataset, postprocess: DBPostProcess,
                 max_images: int | None = None, progress: bool = True) -> list[ImageCounts]:
    """What each of the first `max_images` images of `dataset` contributes to `evaluate_detector`'s totals (for
    statistics over images, e.g. `train.ranking`)."""
    metric = DetMetric()
    for index, boxes in enumerate(detect(model, dataset, postprocess, progress, "evaluate", max_images)):
        regions = dataset.ground_truth(index)
        metric.update(boxes, [r.points for r in regions], [r.ignore for r in regions])
    return metric.results


def images_scored(dataset: DetDataset, max_images: int | None) -> int:
    """How many images ``detect`` and ``evaluate_detector`` run on: the first ``max_images`` (None: all)."""
    return len(dataset) if max_images is None else min(max_images, len(dataset))


def detect(model: paddle.nn.Layer, dataset: DetDataset, postprocess: DBPostProcess, progress: bool = False,
           desc: str = "detect", max_images: int | None = None) -> list[Boxes]:
    """The post-processed boxes (source-image coordinates) of ``model`` on the first ``max_images`` images (all by
    default) of an eval-mode dataset. The model is put in eval mode and left there."""
    if dataset.mode != "eval":
        raise ValueError(f"{desc} needs an eval-mode dataset (resize-for-test transform)")
    model.eval()
    count = images_scored(dataset, max_images)
    out = []
    for index in tqdm(range(count), desc=desc, unit="img", disable=not progress, dynamic_ncols=True):
        sample = dataset[index]
        boxes = postprocess(predict_maps(model, sample["image"]), sample["shape"][None])[0]
        out.append([np.asarray(p, dtype=np.float64) for p in boxes.points])
    return out
