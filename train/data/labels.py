"""Read PaddleOCR detection label files into validated, typed records.

A label file has one line per image: ``relative/path.jpg<TAB>[{"transcription": "...", "points": [[x, y], ...]}]``.
Every problem is found here, at load time, and reported with ``file:line`` so that a bad line never surfaces as
an obscure crash deep inside a worker process several minutes into training. That includes an image file that is
not an image: its header is checked here (cheap), the pixels are decoded when the sample is used.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image
from shapely.geometry import Polygon, box
from shapely.validation import explain_validity

from train.errors import DataError

# PaddleOCR's DetLabelEncode treats these transcriptions as "don't care": the region is masked out of the loss
# and excluded from the metric.
IGNORE_TRANSCRIPTIONS = frozenset({"###", "*"})


@dataclass(frozen=True)
class TextRegion:
    """One labelled text polygon, in the pixel coordinates of the original image."""

    points: np.ndarray  # (N, 2) float32, N >= 3
    text: str
    ignore: bool


@dataclass(frozen=True)
class LabeledImage:
    """An image with its regions; ``label_file``/``line_no`` let later errors point back at the label line."""

    image_path: Path
    regions: list[TextRegion]
    label_file: Path
    line_no: int


class _LineError(Exception):
    """A problem in one line; the caller adds ``file:line`` and decides whether to raise or skip."""


def read_label_file(
    label_file: str | Path, root: str | Path, on_error: Literal["raise", "skip"] = "raise"
) -> list[LabeledImage]:
    """Parse and validate ``label_file``, resolving image paths against ``root``.

    With ``on_error='raise'`` the first bad line raises :class:`DataError` naming ``file:line`` and the problem.
    With ``'skip'`` bad lines are dropped and a single warning reports how many, plus the first problem, so a
    large public dataset with a handful of broken polygons stays usable without flooding the log. An empty
    result is always an error: training on nothing would otherwise fail much later and less clearly.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    label_file = Path(label_file)
    root = Path(root)
    if label_file.is_dir():
        raise DataError(f"label file {label_file} is a folder, not a file")
    if not label_file.is_file():
        raise DataError(f"label file not found: {label_file}")
    if not root.is_dir():
        raise DataError(f"data root is not a directory: {root} (needed by label file {label_file})")

    items: list[LabeledImage] = []
    problems: list[str] = []
    try:
        text = label_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{label_file}: not a text label file (byte {e.start} is not UTF-8); expected lines "
                        "'image path<TAB>JSON list of regions'") from None
    for line_no, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            items.append(_parse_line(line, root, label_file, line_no))
        except _LineError as e:
            message = f"{label_file}:{line_no}: {e}"
            if on_error == "raise":
                raise DataError(message) from None
            problems.append(message)

    if problems:
        warnings.warn(
            f"skipped {len(problems)} bad line(s) in {label_file}; first: {problems[0]}", stacklevel=2
        )
    if not items:
        hint = f"; first problem: {problems[0]}" if problems else ""
        raise DataError(f"no usable labelled images in {label_file}{hint}")
    return items


def _parse_line(line: str, root: Path, label_file: Path, line_no: int) -> LabeledImage:
    if "\t" not in line:
        raise _LineError("no TAB between image path and JSON label")
    rel_path, label_json = line.split("\t", 1)
    if not rel_path:
        raise _LineError("empty image path")
    try:
        entries = json.loads(label_json)
    except json.JSONDecodeError as e:
        raise _LineError(f"label is not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(entries, list):
        raise _LineError(f"label JSON must be a list of regions, got {type(entries).__name__}")

    regions = [_parse_region(entry, k) for k, entry in enumerate(entries)]
    image_path = root / rel_path
    if not image_path.is_file():
        raise _LineError(f"image file not found: {image_path}")
    if not cv2.haveImageReader(str(image_path)):
        raise _LineError(f"not an image OpenCV can read (unknown format or unreadable file): {image_path}")
    _check_inside(regions, image_path)
    return LabeledImage(image_path=image_path, regions=regions, label_file=label_file, line_no=line_no)


def _parse_region(entry: object, k: int) -> TextRegion:
    where = f"region {k}"
    if not isinstance(entry, dict):
        raise _LineError(f"{where}: expected an object, got {type(entry).__name__}")
    if "points" not in entry:
        raise _LineError(f"{where}: missing 'points'")
    if "transcription" not in entry:
        raise _LineError(f"{where}: missing 'transcription'")
    text = entry["transcription"]
    if not isinstance(text, str):
        raise _LineError(f"{where}: 'transcription' must be a string, got {type(text).__name__}")
    points = _parse_points(entry["points"], where)
    return TextRegion(points=points, text=text, ignore=text in IGNORE_TRANSCRIPTIONS)


def _parse_points(raw: object, where: str) -> np.ndarray:
    if not isinstance(raw, list) or not all(isinstance(p, list) and len(p) == 2 for p in raw):
        raise _LineError(f"{where}: 'points' must be a list of [x, y] pairs")
    if len(raw) < 3:
        raise _LineError(f"{where}: polygon has {len(raw)} point(s), needs at least 3")
    for p in raw:
        for v in p:
            # bool is an int subclass in Python; JSON true/false as a coordinate is a labelling bug.
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _LineError(f"{where}: non-numeric or non-finite coordinate {v!r}")
    points = np.asarray(raw, dtype=np.float32)
    shape = Polygon(points)
    if shape.area <= 0 or not shape.is_valid:
        # A symmetric bow-tie has zero area too; explain_validity tells the user where the crossing is.
        problem = "zero-area" if shape.area <= 0 else "self-intersecting"
        raise _LineError(f"{where}: {problem} polygon ({explain_validity(shape)}): {raw}")
    return points


def _check_inside(regions: list[TextRegion], image_path: Path) -> None:
    """A region with no part inside its image can never be detected: it would only lower recall, silently (labels
    for another image size, swapped x/y). Regions partly outside are kept as PaddleOCR keeps them (its metric does
    not clip them). The size comes from the header (PIL reads no pixels); a format PIL does not know is not checked.
    """
    if not regions:
        return
    try:
        with Image.open(image_path) as image:
            width, height = image.size
    except (OSError, ValueError):
        return
    frame = box(0, 0, width, height)
    for k, region in enumerate(regions):
        if Polygon(region.points).intersection(frame).area <= 0:
            raise _LineError(f"region {k}: polygon lies outside the {width}x{height} image: "
                             f"{region.points.astype(int).tolist()}")
