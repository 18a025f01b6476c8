"""DB detection transforms with the behaviour and defaults of PaddleOCR's ``ppocr/data/imaug`` det pipeline.

A sample is a dict like PaddleOCR's: ``image`` (HWC uint8 BGR, CHW float32 after :class:`ToCHW`), ``polys``
float32 (n, k, 2), ``ignore_tags`` bool (n,), ``texts`` list[str]. Each transform is a small callable
``t(sample, rng) -> sample``. Randomness comes only from the ``rng`` argument, never from global state, so a
sample is reproducible from its seed whichever worker process builds it.

Where PaddleOCR has a plain bug, we keep its intent and say so at the spot: the crop's lost last gap and
its boxes that only touch the crop, negative indices from polygons pushed off-image by rotation, and the
border map's NaN holes (pixels almost on an edge line left at thresh_min) and stray strips drawn on the last
row/column for polygons entirely off the canvas.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import pyclipper
from shapely.geometry import Polygon

from train.data.labels import TextRegion
from train.errors import ConfigError

Sample = dict[str, Any]
Transform = Callable[[Sample, np.random.Generator], Sample]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LIMIT_TYPES = ("max", "min", "resize_long")


class Compose:
    """Apply transforms in order, threading one RNG through all of them."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample


def make_sample(image: np.ndarray, regions: Sequence[TextRegion]) -> Sample:
    """Build the initial sample, as PaddleOCR's DetLabelEncode does.

    Polygons with fewer points are padded by repeating their last point, so all fit one (n, k, 2) array.
    """
    k = max((len(r.points) for r in regions), default=0)
    polys = np.zeros((len(regions), k, 2), dtype=np.float32)
    for i, r in enumerate(regions):
        polys[i, : len(r.points)] = r.points
        polys[i, len(r.points) :] = r.points[-1]
    return {
        "image": image,
        "polys": polys,
        "ignore_tags": np.array([r.ignore for r in regions], dtype=bool),
        "texts": [r.text for r in regions],
    }


def _keep(sample: Sample, keep: np.ndarray) -> None:
    """Drop the regions where ``keep`` is False from polys, ignore_tags and texts together."""
    sample["polys"] = sample["polys"][keep]
    sample["ignore_tags"] = sample["ignore_tags"][keep]
    sample["texts"] = [t for t, k in zip(sample["texts"], keep) if k]


class DetAugment:
    """PaddleOCR's default IaaAugment (imgaug ``Fliplr(0.5)``, ``Affine(rotate=(-10, 10))``, ``Resize((0.5, 3))``).

    Geometry follows imgaug's convention that pixel i covers [i, i+1): a flip maps x to w - x, rotation turns
    points about (w/2, h/2), which is pixel-index (w/2 - 0.5, h/2 - 0.5) for the image warp. Rotation keeps
    the canvas size and fills with black, so corners and text may leave the image, as in PaddleOCR; the crop
    and the map builders deal with polygons that go past the border.
    """

    def __init__(
        self,
        flip_p: float = 0.5,
        rotate: tuple[float, float] = (-10.0, 10.0),
        scale: tuple[float, float] = (0.5, 3.0),
    ):
        self.flip_p = flip_p
        self.rotate = rotate
        self.scale = scale

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image = sample["image"]
        polys = sample["polys"].astype(np.float64)
        h, w = image.shape[:2]

        # Draw all three parameters every time so the stream of draws does not depend on earlier outcomes.
        flip = rng.random() < self.flip_p
        angle = rng.uniform(*self.rotate)
        factor = rng.uniform(*self.scale)

        if flip:
            image = image[:, ::-1]
            polys[..., 0] = w - polys[..., 0]

        # imgaug's positive angle turns clockwise on screen; OpenCV's turns counter-clockwise.
        image_matrix = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), -angle, 1.0)
        point_matrix = cv2.getRotationMatrix2D((w / 2, h / 2), -angle, 1.0)
        image = cv2.warpAffine(
            np.ascontiguousarray(image), image_matrix, (w, h),
            flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0,
        )
        polys = polys @ point_matrix[:, :2].T + point_matrix[:, 2]

        new_w, new_h = max(1, round(w * factor)), max(1, round(h * factor))
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
        polys *= (new_w / w, new_h / h)

        sample["image"] = image
        sample["polys"] = polys.astype(np.float32)
        return sample


class EastRandomCrop:
    """PaddleOCR's EastRandomCropData: a random crop whose edges never cut a non-ignored text region.

    Crop edges are drawn only from rows/columns that no care polygon spans, so any text inside the crop is
    whole. A crop must keep at least one care polygon and have each side >= ``min_crop_side_ratio`` of the
    image; after ``max_tries`` failures the whole image is used. The crop is then scaled to fit ``size``
    (w, h) and, with ``keep_ratio``, padded with black at the right/bottom.
    """

    def __init__(
        self,
        size: tuple[int, int] = (640, 640),
        max_tries: int = 50,
        min_crop_side_ratio: float = 0.1,
        keep_ratio: bool = True,
    ):
        self.size = size
        self.max_tries = max_tries
        self.min_crop_side_ratio = min_crop_side_ratio
        self.keep_ratio = keep_ratio

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image = sample["image"]
        polys = sample["polys"]
        care = polys[~sample["ignore_tags"]]
        x, y, cw, ch = self._crop_area(image.shape[0], image.shape[1], care, rng)

        scale = min(self.size[0] / cw, self.size[1] / ch)
        out_h, out_w = int(ch * scale), int(cw * scale)
        crop = image[y : y + ch, x : x + cw]
        if self.keep_ratio:
            padded = np.zeros((self.size[1], self.size[0], image.shape[2]), image.dtype)
            padded[:out_h, :out_w] = cv2.resize(crop, (out_w, out_h))
            sample["image"] = padded
        else:
            sample["image"] = cv2.resize(crop, tuple(self.size))

        polys = (polys - (x, y)) * scale
        sample["polys"] = polys.astype(np.float32)
        _keep(sample, np.array([not _outside(p, 0, 0, out_w, out_h) for p in polys], dtype=bool))
        return sample

    def _crop_area(
        self, h: int, w: int, care: np.ndarray, rng: np.random.Generator
    ) -> tuple[int, int, int, int]:
        free_x = _free_coords(care[..., 0], w)
        free_y = _free_coords(care[..., 1], h)
        if len(free_x) == 0 or len(free_y) == 0:
            return 0, 0, w, h
        runs_x, runs_y = _runs(free_x), _runs(free_y)
        for _ in range(self.max_tries):
            x0, x1 = _pick_span(free_x, runs_x, rng)
            y0, y1 = _pick_span(free_y, runs_y, rng)
            if x1 - x0 < self.min_crop_side_ratio * w or y1 - y0 < self.min_crop_side_ratio * h:
                continue
            if any(not _outside(p, x0, y0, x1 - x0, y1 - y0) for p in care):
                return x0, y0, x1 - x0, y1 - y0
        return 0, 0, w, h


def _free_coords(coords: np.ndarray, size: int) -> np.ndarray:
    """Indices along one axis that no polygon spans (each polygon spans [round(min), round(max)))."""
    taken = np.zeros(size, dtype=bool)
    for c in coords:
        # Clip: after rotation a polygon can start left of 0, and a negative slice start would mark nothing.
        lo = int(np.clip(np.round(c.min()), 0, size))
        hi = int(np.clip(np.round(c.max()), 0, size))
        taken[lo:hi] = True
    return np.flatnonzero(~taken)


def _runs(free: np.ndarray) -> list[np.ndarray]:
    """Split sorted indices into runs of consecutive values (the gaps between text).

    PaddleOCR's split_regions drops the last run; we keep it, so the gap after the last text can hold an edge.
    """
    breaks = np.flatnonzero(np.diff(free) != 1) + 1
    return np.split(free, breaks)


def _pick_span(free: np.ndarray, runs: list[np.ndarray], rng: np.random.Generator) -> tuple[int, int]:
    if len(runs) > 1:
        # Two gaps chosen (with replacement), one edge in each: crops tend to span whole text blocks.
        picks = [int(rng.choice(runs[i])) for i in rng.integers(0, len(runs), size=2)]
    else:
        picks = [int(v) for v in rng.choice(free, size=2)]
    return min(picks), max(picks)


def _outside(poly: np.ndarray, x: float, y: float, w: float, h: float) -> bool:
    """True when ``poly`` lies entirely to one side of the rectangle.

    Touching counts as outside, unlike PaddleOCR: crop edges are often exactly a text box's edge, and a box
    that merely touches the crop has no pixel in it yet would get a threshold band along the border.
    """
    xs, ys = poly[:, 0], poly[:, 1]
    return bool(xs.max() <= x or xs.min() >= x + w or ys.max() <= y or ys.min() >= y + h)


def _offset_distance(polygon: Polygon, ratio: float) -> float:
    """DB's shrink/expand offset D = A (1 - r^2) / L, for area A and perimeter L."""
    return polygon.area * (1 - ratio**2) / polygon.length


def _offset(points: np.ndarray, distance: float) -> list[np.ndarray]:
    """Offset a polygon outward (distance > 0) or inward (< 0) with rounded joins, as DB does."""
    pco = pyclipper.PyclipperOffset()
    pco.AddPath([tuple(p) for p in points], pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    return [np.asarray(path) for path in pco.Execute(distance)]


class MakeBorderMap:
    """DB threshold map: 1 - dist/D inside the polygon expanded by D, scaled to [thresh_min, thresh_max].

    ``threshold_mask`` is 1 inside the expanded polygons of non-ignored regions. The distance is PaddleOCR's,
    which is not quite point-to-segment: it is the distance to the edge's line while the pixel lies within the
    circle whose diameter is that edge, and to the nearer endpoint outside it.
    """

    def __init__(self, shrink_ratio: float = 0.4, thresh_min: float = 0.3, thresh_max: float = 0.7):
        self.shrink_ratio = shrink_ratio
        self.thresh_min = thresh_min
        self.thresh_max = thresh_max

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        h, w = sample["image"].shape[:2]
        canvas = np.zeros((h, w), dtype=np.float32)
        mask = np.zeros((h, w), dtype=np.float32)
        for poly, ignore in zip(sample["polys"], sample["ignore_tags"]):
            if not ignore:
                self._draw(poly.astype(np.float64), canvas, mask)
        sample["threshold_map"] = canvas * (self.thresh_max - self.thresh_min) + self.thresh_min
        sample["threshold_mask"] = mask
        return sample

    def _draw(self, poly: np.ndarray, canvas: np.ndarray, mask: np.ndarray) -> None:
        shape = Polygon(poly)
        if shape.area <= 0:
            return
        distance = _offset_distance(shape, self.shrink_ratio)
        expanded = _offset(poly, distance)[0]
        cv2.fillPoly(mask, [expanded.astype(np.int32)], 1.0)

        x0, y0 = expanded.min(axis=0)
        x1, y1 = expanded.max(axis=0)
        # Work in the expanded box only, clipped to the canvas (text may hang off the image after rotation).
        cx0, cx1 = max(x0, 0), min(x1, canvas.shape[1] - 1)
        cy0, cy1 = max(y0, 0), min(y1, canvas.shape[0] - 1)
        if cx0 > cx1 or cy0 > cy1:
            return
        xs, ys = np.meshgrid(np.arange(cx0, cx1 + 1, dtype=np.float64), np.arange(cy0, cy1 + 1, dtype=np.float64))
        dist = np.ones_like(xs)
        for a, b in zip(poly, np.roll(poly, -1, axis=0)):
            dist = np.minimum(dist, np.clip(_edge_distance(xs, ys, a, b) / distance, 0, 1))
        region = canvas[cy0 : cy1 + 1, cx0 : cx1 + 1]
        np.fmax(1 - dist, region, out=region)


def _edge_distance(xs: np.ndarray, ys: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PaddleOCR's pixel-to-edge distance (see :class:`MakeBorderMap`), written without its NaNs."""
    da2 = (xs - a[0]) ** 2 + (ys - a[1]) ** 2
    db2 = (xs - b[0]) ** 2 + (ys - b[1]) ** 2
    ab2 = (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2
    near_end = np.sqrt(np.minimum(da2, db2))
    if ab2 == 0:
        # A repeated (padding) point: PaddleOCR gets NaN at that one pixel and leaves it undrawn.
        return near_end
    cross = (b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0])
    to_line = np.abs(cross) / math.sqrt(ab2)
    return np.where(da2 + db2 > ab2, near_end, to_line)


class MakeShrinkMap:
    """DB probability target: each region shrunk by D = A (1 - r^2) / L, and a mask of what the loss sees.

    Ignored regions, regions whose box is thinner than ``min_text_size``, near-zero-area ones and ones that
    shrink to nothing are zeroed in ``shrink_mask`` and become ignored. If shrinking splits a region, larger
    ratios (r, 2r, ... < 1) are tried, as in PaddleOCR, before drawing all pieces.
    """

    def __init__(self, shrink_ratio: float = 0.4, min_text_size: int = 8):
        self.shrink_ratio = shrink_ratio
        self.min_text_size = min_text_size

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        h, w = sample["image"].shape[:2]
        ignore = sample["ignore_tags"].copy()
        gt = np.zeros((h, w), dtype=np.float32)
        mask = np.ones((h, w), dtype=np.float32)
        for i, poly in enumerate(sample["polys"]):
            poly = poly.astype(np.float64)
            poly[:, 0] = np.clip(poly[:, 0], 0, w - 1)
            poly[:, 1] = np.clip(poly[:, 1], 0, h - 1)
            area = _signed_area(poly)
            ignore[i] |= abs(area) < 1
            if area > 0:
                poly = poly[::-1]  # PaddleOCR's orientation normalisation; kept so pyclipper sees the same path
            extent = poly.max(axis=0) - poly.min(axis=0)
            shrunk = [] if ignore[i] or extent.min() < self.min_text_size else self._shrink(poly)
            if not shrunk:
                cv2.fillPoly(mask, [poly.astype(np.int32)], 0)
                ignore[i] = True
                continue
            cv2.fillPoly(gt, [piece.astype(np.int32) for piece in shrunk], 1)
        sample["shrink_map"] = gt
        sample["shrink_mask"] = mask
        sample["ignore_tags"] = ignore
        return sample

    def _shrink(self, poly: np.ndarray) -> list[np.ndarray]:
        shape = Polygon(poly)
        shrunk: list[np.ndarray] = []
        for ratio in np.arange(self.shrink_ratio, 1, self.shrink_ratio):
            shrunk = _offset(poly, -_offset_distance(shape, ratio))
            if len(shrunk) == 1:
                break
        return shrunk


def _signed_area(poly: np.ndarray) -> float:
    """Shoelace area with PaddleOCR's sign convention (positive means it reverses the point order)."""
    prev = np.roll(poly, 1, axis=0)
    return float(np.sum(poly[:, 0] * prev[:, 1] - poly[:, 1] * prev[:, 0]) / 2)


class NormalizeImage:
    """``(image * scale - mean) / std`` per channel on HWC, as PaddleOCR with ``order: hwc``.

    PaddleOCR's det configs decode as BGR and still use the RGB ImageNet mean/std in that order; pretrained
    weights expect exactly this, so we keep it.
    """

    def __init__(
        self,
        scale: float = 1.0 / 255.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        self.scale = np.float32(scale)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        sample["image"] = (sample["image"].astype(np.float32) * self.scale - self.mean) / self.std
        return sample


class ToCHW:
    """HWC -> CHW, contiguous, as the network takes it."""

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        sample["image"] = np.ascontiguousarray(sample["image"].transpose(2, 0, 1))
        return sample


class DetResizeForTest:
    """Eval resize to multiples of 32, recording ``shape = [src_h, src_w, ratio_h, ratio_w]`` (float32).

    ``limit_type``: 'max' shrinks so the long side is <= limit_side_len, 'min' enlarges so the short side is
    >= limit_side_len, 'resize_long' scales the long side to limit_side_len. Each side is then rounded to a
    multiple of 32 (at least 32), and capped by ``max_side_limit``. Polygons are left in original coordinates,
    where the metric compares them; predictions are mapped back with the ratios.
    """

    def __init__(self, limit_side_len: int = 960, limit_type: str = "max", max_side_limit: int = 4000):
        if limit_type not in LIMIT_TYPES:
            raise ConfigError(f"limit_type={limit_type!r} is not one of {LIMIT_TYPES}")
        if limit_side_len < 1:
            raise ConfigError(f"limit_side_len={limit_side_len} must be positive")
        self.limit_side_len = limit_side_len
        self.limit_type = limit_type
        self.max_side_limit = max_side_limit

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image = sample["image"]
        src_h, src_w = image.shape[:2]
        if src_h + src_w < 64:
            # PaddleOCR pads tiny images (bottom/right) to at least 32x32 before resizing.
            padded = np.zeros((max(32, src_h), max(32, src_w), image.shape[2]), image.dtype)
            padded[:src_h, :src_w] = image
            image = padded
        h, w = image.shape[:2]
        ratio = self._ratio(h, w)
        resize_h, resize_w = int(h * ratio), int(w * ratio)
        if max(resize_h, resize_w) > self.max_side_limit:
            cap = self.max_side_limit / max(resize_h, resize_w)
            resize_h, resize_w = int(resize_h * cap), int(resize_w * cap)
        resize_h = max(round(resize_h / 32) * 32, 32)
        resize_w = max(round(resize_w / 32) * 32, 32)
        sample["image"] = cv2.resize(image, (resize_w, resize_h))
        sample["shape"] = np.array([src_h, src_w, resize_h / h, resize_w / w], dtype=np.float32)
        return sample

    def _ratio(self, h: int, w: int) -> float:
        limit = float(self.limit_side_len)
        if self.limit_type == "max":
            return limit / max(h, w) if max(h, w) > limit else 1.0
        if self.limit_type == "min":
            return limit / min(h, w) if min(h, w) < limit else 1.0
        return limit / max(h, w)


class RandomScaleCrop:
    """A random window of an unlabelled image, resized to ``size`` x ``size``: the window's side is ``size / s`` with
    ``s`` log-uniform in ``scale_range`` (s > 1 magnifies), clipped to the image; a window wider than the image is
    filled black, as ``EastRandomCrop`` pads. Flipped left-right half the time.

    ``EastRandomCrop`` picks its window around labelled text and keeps the whole image when there is none; an
    unlabelled image has none, and still has to be seen at many scales and places.
    """

    def __init__(self, size: int, scale_range: tuple[float, float] = (0.5, 2.0)):
        self.size = size
        self.scale_range = scale_range

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image = sample["image"]
        h, w = image.shape[:2]
        scale = float(np.exp(rng.uniform(np.log(self.scale_range[0]), np.log(self.scale_range[1]))))
        side = max(1, int(round(self.size / scale)))
        ch, cw = min(side, h), min(side, w)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out = np.zeros((self.size, self.size, image.shape[2]), image.dtype)
        out_h, out_w = max(1, round(ch * self.size / side)), max(1, round(cw * self.size / side))
        out[:out_h, :out_w] = cv2.resize(image[y:y + ch, x:x + cw], (out_w, out_h))
        sample["image"] = out[:, ::-1].copy() if rng.random() < 0.5 else out
        return sample


class PhotometricJitter:
    """Brightness, contrast and saturation jitter, sometimes grey or blurred: the camera variety an unlabelled
    pool of a few hundred images does not have by itself."""

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image = sample["image"].astype(np.float32)
        grey = image.mean(axis=2, keepdims=True)
        saturation = 0.0 if rng.random() < 0.15 else rng.uniform(0.6, 1.4)
        image = grey + (image - grey) * saturation
        mean = float(image.mean())
        image = (image - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.75, 1.25)
        if rng.random() < 0.25:
            image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 1.5))
        sample["image"] = np.clip(image, 0, 255).astype(np.uint8)
        return sample


class EmptyTargets:
    """Zero DB maps *and masks*: the DB loss sees no pixel of the crop, so only distillation learns from it."""

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        shape = sample["image"].shape[:2]
        for key in ("shrink_map", "shrink_mask", "threshold_map", "threshold_mask"):
            sample[key] = np.zeros(shape, dtype=np.float32)
        return sample


def build_train_transform(crop_size: int = 640, augment: bool = True) -> Compose:
    """PaddleOCR's DB train pipeline after label decoding: augment, crop, border map, shrink map, normalise."""
    if crop_size < 32 or crop_size % 32:
        raise ConfigError(f"crop_size={crop_size} must be a positive multiple of 32 (the network's stride)")
    return Compose(
        ([DetAugment()] if augment else [])
        + [
            EastRandomCrop(size=(crop_size, crop_size)),
            MakeBorderMap(),
            MakeShrinkMap(),
            NormalizeImage(),
            ToCHW(),
        ]
    )


def build_eval_transform(limit_side_len: int = 960, limit_type: str = "max") -> Compose:
    """PaddleOCR's DB eval pipeline after label decoding: resize for test, normalise."""
    return Compose([DetResizeForTest(limit_side_len, limit_type), NormalizeImage(), ToCHW()])


def build_unlabeled_transform(crop_size: int = 640, augment: bool = True) -> Compose:
    """Crops of unlabelled images for distillation, batchable with the train split's: a random scaled window,
    photometric jitter, empty DB targets (no pixel reaches the DB loss), normalise."""
    if crop_size < 32 or crop_size % 32:
        raise ConfigError(f"crop_size={crop_size} must be a positive multiple of 32 (the network's stride)")
    return Compose([RandomScaleCrop(crop_size, (0.5, 2.0) if augment else (1.0, 1.0)),
                    *([PhotometricJitter()] if augment else []), EmptyTargets(), NormalizeImage(), ToCHW()])
