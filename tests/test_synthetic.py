"""The synthetic dataset generator on tiny real specs: files, label format, determinism, caching, ink in boxes."""

import dataclasses
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from shapely.geometry import Polygon

import train.data.synthetic as synthetic
from train.data.synthetic import (DEFAULT_FONTS, SyntheticSpec, ensure_synthetic_dataset, label_path,
                                  resolve_fonts, shifted_eval_spec)
from train.errors import ConfigError, DataError

TINY = SyntheticSpec(seed=7, n_train=4, n_eval=2, width_range=(160, 220), height_range=(160, 220),
                     lines_range=(2, 4), font_size_range=(12, 24))
# No blur, noise, shapes or textures: every strong local difference from the background is then text ink.
CLEAN = dataclasses.replace(TINY, n_train=6, n_eval=0, max_blur_sigma=0.0, max_noise_sigma=0.0,
                            jpeg_quality_range=(95, 95), train_backgrounds=("solid", "gradient"))


def _labels(root: Path, split: str) -> list[tuple[str, list[dict]]]:
    rows = []
    for line in label_path(root, split).read_text(encoding="utf-8").splitlines():
        path, annotations = line.split("\t")
        rows.append((path, json.loads(annotations)))
    return rows


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("syn") / "tiny", TINY, progress=False)


def test_generates_paddleocr_det_labels(tiny_root):
    for split, n in (("train", 4), ("eval", 2)):
        rows = _labels(tiny_root, split)
        assert [p for p, _ in rows] == [f"images/{split}/{i:05d}.jpg" for i in range(n)]
        for path, annotations in rows:
            image = cv2.imread(str(tiny_root / path))
            h, w = image.shape[:2]
            assert 160 <= w <= 220 and 160 <= h <= 220
            assert annotations
            polys = []
            for ann in annotations:
                assert ann["transcription"].strip() and set(ann) == {"transcription", "points"}
                quad = np.array(ann["points"], dtype=float)
                assert quad.shape == (4, 2)
                assert (quad >= 0).all() and (quad[:, 0] <= w - 1).all() and (quad[:, 1] <= h - 1).all()
                # Clockwise in image coordinates (y down) means a positive shoelace sum; top-left first.
                x, y = quad[:, 0], quad[:, 1]
                assert np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) > 0
                assert np.argmin(x + y) == 0
                polys.append(Polygon(quad))
            for i, a in enumerate(polys):
                assert all(not a.intersects(b) for b in polys[i + 1:])
    meta = json.loads((tiny_root / "spec.json").read_text())
    assert meta["hash"] == TINY.hash() and SyntheticSpec.from_json(meta["spec"]) == TINY


def test_same_spec_is_byte_identical_and_seed_matters(tiny_root, tmp_path):
    again = ensure_synthetic_dataset(tmp_path / "again", TINY, progress=False)
    assert _files(again) == _files(tiny_root)
    other = ensure_synthetic_dataset(tmp_path / "other", dataclasses.replace(TINY, seed=8), progress=False)
    assert label_path(other, "train").read_text() != label_path(tiny_root, "train").read_text()


def test_cache_hit_leaves_files_untouched(tiny_root):
    before = {p: p.stat().st_mtime_ns for p in tiny_root.rglob("*")}
    assert ensure_synthetic_dataset(tiny_root, TINY, progress=False) == tiny_root
    assert {p: p.stat().st_mtime_ns for p in tiny_root.rglob("*")} == before


def test_partial_or_stale_dataset_is_regenerated(tmp_path):
    root = ensure_synthetic_dataset(tmp_path / "d", TINY, progress=False)
    reference = _files(root)
    (root / "images" / "train" / "00002.jpg").unlink()
    ensure_synthetic_dataset(root, TINY, progress=False)
    assert _files(root) == reference
    (root / "eval_label.txt").unlink()
    ensure_synthetic_dataset(root, TINY, progress=False)
    assert _files(root) == reference
    changed = dataclasses.replace(TINY, n_eval=3)
    ensure_synthetic_dataset(root, changed, progress=False)
    assert len(_labels(root, "eval")) == 3 and json.loads((root / "spec.json").read_text())["hash"] == changed.hash()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp or old folders left behind


def test_interrupted_generation_leaves_old_dataset_intact(tmp_path, monkeypatch):
    root = ensure_synthetic_dataset(tmp_path / "d", TINY, progress=False)
    reference = _files(root)
    real_render, calls = synthetic.render_image, []

    def render_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_image", render_then_die)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_dataset(root, dataclasses.replace(TINY, seed=9), progress=False)
    assert _files(root) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="thesis.tex"):
        ensure_synthetic_dataset(tmp_path / "mine", TINY, progress=False)


def test_spec_json_round_trip_and_validation():
    spec = shifted_eval_spec(TINY)
    data = json.loads(json.dumps(spec.to_json()))
    assert SyntheticSpec.from_json(data) == spec and SyntheticSpec.from_json(data).hash() == spec.hash()
    assert spec.hash() != TINY.hash() and SyntheticSpec().hash() == SyntheticSpec().hash()
    with pytest.raises(ConfigError, match="colour"):
        SyntheticSpec.from_json({**data, "colour": 1})
    with pytest.raises(ConfigError, match="schema_version"):
        SyntheticSpec.from_json({**data, "schema_version": 99})
    with pytest.raises(ConfigError, match="font_size_range"):
        SyntheticSpec(font_size_range=(30, 20))
    with pytest.raises(ConfigError, match="paper"):
        SyntheticSpec(eval_backgrounds=("paper",))


def test_fonts_resolve_and_shifted_spec_uses_other_styles():
    default = {os.path.basename(f) for f in resolve_fonts(DEFAULT_FONTS)}
    shifted_spec = shifted_eval_spec()
    shifted = {os.path.basename(f) for f in resolve_fonts(shifted_spec.eval_fonts)}
    assert "DejaVuSans.ttf" in default and "DejaVuSansDisplay.ttf" not in default
    assert "cmr10.ttf" in shifted and "STIXGeneral.ttf" in shifted
    assert not {"cmsy10.ttf", "cmex10.ttf", "cmmi10.ttf"} & shifted  # symbol fonts, not text
    assert not default & shifted
    assert not set(shifted_spec.eval_backgrounds) & set(SyntheticSpec().train_backgrounds)
    assert shifted_spec.n_train == 0 and shifted_spec.n_eval == SyntheticSpec().n_eval
    with pytest.raises(ConfigError, match="nofont"):
        resolve_fonts(("nofont*.ttf",))


def test_rendered_ink_lies_inside_its_boxes_and_fills_them(tmp_path):
    root = ensure_synthetic_dataset(tmp_path / "clean", CLEAN, progress=False)
    inside_total = outside_total = 0
    fits = []
    for path, annotations in _labels(root, "train"):
        image = cv2.imread(str(root / path))
        # Text is at most 24 px: a 41 px median is the local background.
        background = cv2.medianBlur(image, 41)
        ink = np.abs(image.astype(np.int16) - background).max(axis=2) > 40
        boxes = np.zeros(ink.shape, bool)
        for ann in annotations:
            quad = np.array(ann["points"])
            one = cv2.fillPoly(np.zeros(ink.shape, np.uint8), [np.round(quad).astype(np.int32)], 1).astype(bool)
            ys, xs = np.nonzero(ink & one)
            assert len(xs) >= 10, f"{path}: no ink in the box of {ann['transcription']!r}"
            ink_rect = Polygon(cv2.boxPoints(cv2.minAreaRect(np.stack([xs, ys], 1).astype(np.float32))))
            fits.append(ink_rect.intersection(Polygon(quad)).area / ink_rect.union(Polygon(quad)).area)
            boxes |= one
        inside_total += int(ink[boxes].sum())
        outside_total += int(ink[~boxes].sum())
    # Boxes shifted by 4 px already drop the first figure to 0.98; boxes 1.3x too large drop the second to 0.41.
    assert inside_total / (inside_total + outside_total) > 0.995
    assert np.mean(fits) > 0.6
