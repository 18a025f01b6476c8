"""Detection data pipeline: label reader, PaddleOCR-equivalent transforms, dataset and loaders.

All data is drawn here with OpenCV: a 200x160 (w x h) image with white boxes and text, written as JPEG with a
PaddleOCR label file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from shapely.geometry import Polygon

from train.data.dataset import build_loader, build_split, collate
from train.data.labels import TextRegion, read_label_file
from train.data.transforms import (
    DetAugment,
    DetResizeForTest,
    EastRandomCrop,
    MakeBorderMap,
    MakeShrinkMap,
    make_sample,
)
from train.errors import ConfigError, DataError

W, H = 200, 160
BOX = [[20, 20], [120, 20], [120, 50], [20, 50]]
WORD = [[28, 90], [84, 90], [84, 126], [28, 126]]
DONT_CARE = [[140, 100], [190, 100], [190, 150], [150, 150], [140, 125]]  # 5 points: exercises padding
REGIONS = [
    {"transcription": "box", "points": BOX},
    {"transcription": "AB", "points": WORD},
    {"transcription": "###", "points": DONT_CARE},
]


def draw_image() -> np.ndarray:
    image = np.full((H, W, 3), 30, np.uint8)
    cv2.rectangle(image, (20, 20), (120, 50), (255, 255, 255), -1)
    cv2.putText(image, "AB", (30, 122), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (255, 255, 255), 3)
    cv2.fillPoly(image, [np.array(DONT_CARE, np.int32)], (200, 200, 200))
    return image


@pytest.fixture
def root(tmp_path: Path) -> Path:
    cv2.imwrite(str(tmp_path / "a.jpg"), draw_image())
    (tmp_path / "sub").mkdir()
    cv2.imwrite(str(tmp_path / "sub" / "b.jpg"), draw_image())
    return tmp_path


def write_labels(root: Path, lines: list[str], name: str = "labels.txt") -> Path:
    path = root / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD_LINE = f"a.jpg\t{json.dumps(REGIONS)}"


def rect(x0: float, y0: float, x1: float, y1: float) -> TextRegion:
    points = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)
    return TextRegion(points=points, text="t", ignore=False)


# ---------------------------------------------------------------- label reader


def test_reader_parses_points_ignore_tags_and_paths(root: Path) -> None:
    star = [{"transcription": "*", "points": BOX}]
    labels = write_labels(root, [GOOD_LINE, "", f"sub/b.jpg\t{json.dumps(star)}"])
    items = read_label_file(labels, root)
    assert [i.image_path for i in items] == [root / "a.jpg", root / "sub" / "b.jpg"]
    assert [i.line_no for i in items] == [1, 3]
    first = items[0].regions
    assert [r.text for r in first] == ["box", "AB", "###"]
    assert [r.ignore for r in first] == [False, False, True]
    assert first[2].points.shape == (5, 2) and first[2].points.dtype == np.float32
    np.testing.assert_array_equal(first[0].points, np.array(BOX, np.float32))
    assert items[1].regions[0].ignore


def region_line(points: object, text: object = "x") -> str:
    return "a.jpg\t" + json.dumps([{"transcription": text, "points": points}])


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ("a.jpg " + json.dumps(REGIONS), "no TAB"),
        ("a.jpg\t[{'points': 1}]", "not valid JSON"),
        ("a.jpg\t" + json.dumps({"points": BOX}), "must be a list"),
        ("a.jpg\t" + json.dumps([{"transcription": "x"}]), "missing 'points'"),
        ("a.jpg\t" + json.dumps([["not", "a", "dict"]]), "expected an object"),
        (region_line([[0, 0], [10, 0]]), "needs at least 3"),
        (region_line([[0, 0], [10, "a"], [10, 10]]), "non-numeric"),
        ("a.jpg\t" + '[{"transcription": "x", "points": [[0, 0], [10, NaN], [10, 10]]}]', "non-finite"),
        (region_line([[0, 0], [10, 0], [10, 10], [5, 10], [5, -3]]), "self-intersecting"),
        (region_line([[0, 0], [5, 5], [10, 10]]), "zero-area"),
        ("missing.jpg\t" + json.dumps(REGIONS), "image file not found"),
        ("labels.txt\t" + json.dumps(REGIONS), "not an image OpenCV can read"),  # the label file itself
    ],
)
def test_reader_errors_name_file_and_line(root: Path, bad_line: str, problem: str) -> None:
    labels = write_labels(root, [GOOD_LINE, bad_line])
    with pytest.raises(DataError) as err:
        read_label_file(labels, root)
    assert "labels.txt:2: " in str(err.value)
    assert problem in str(err.value)


def test_reader_missing_file_root_and_empty_split(root: Path) -> None:
    with pytest.raises(DataError, match="label file not found: .*nope.txt"):
        read_label_file(root / "nope.txt", root)
    labels = write_labels(root, [GOOD_LINE])
    with pytest.raises(DataError, match="data root is not a directory: .*no_root"):
        read_label_file(labels, root / "no_root")
    with pytest.raises(DataError, match="no usable labelled images"):
        read_label_file(write_labels(root, ["", ""], "empty.txt"), root)


def test_reader_skip_mode_counts_and_reports_first_problem(root: Path) -> None:
    lines = [GOOD_LINE, "a.jpg no tab", region_line([[0, 0], [1, 1]]), GOOD_LINE, "gone.jpg\t[]"]
    labels = write_labels(root, lines)
    with pytest.warns(UserWarning, match=r"skipped 3 bad line\(s\).*labels.txt:2: no TAB"):
        items = read_label_file(labels, root, on_error="skip")
    assert [i.line_no for i in items] == [1, 4]

    only_bad = write_labels(root, ["a.jpg no tab"], "bad.txt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="no usable labelled images.*bad.txt:1: no TAB"):
            read_label_file(only_bad, root, on_error="skip")


def test_make_sample_pads_polygons_by_repeating_last_point() -> None:
    regions = [rect(0, 0, 10, 10), TextRegion(np.array(DONT_CARE, np.float32), "###", True)]
    sample = make_sample(np.zeros((4, 4, 3), np.uint8), regions)
    assert sample["polys"].shape == (2, 5, 2) and sample["polys"].dtype == np.float32
    np.testing.assert_array_equal(sample["polys"][0, 4], [0, 10])
    assert sample["ignore_tags"].tolist() == [False, True]


# ---------------------------------------------------------------- DB targets


def maps_for(regions: list[TextRegion], h: int = H, w: int = W) -> dict:
    sample = make_sample(np.zeros((h, w, 3), np.uint8), regions)
    sample = MakeBorderMap()(sample, np.random.default_rng(0))
    return MakeShrinkMap()(sample, np.random.default_rng(0))


def test_shrink_map_offsets_rectangle_by_db_formula() -> None:
    x0, y0, x1, y1 = 50, 60, 150, 100  # 100 x 40: D = A (1 - r^2) / L = 4000 * 0.84 / 280 = 12
    d = 4000 * (1 - 0.4**2) / 280
    sample = maps_for([rect(x0, y0, x1, y1)])
    ys, xs = np.nonzero(sample["shrink_map"])
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (x0 + d, x1 - d, y0 + d, y1 - d)
    # fillPoly includes boundary pixels: (76 + 1) x (16 + 1)
    assert sample["shrink_map"].sum() == (x1 - x0 - 2 * d + 1) * (y1 - y0 - 2 * d + 1)
    assert sample["shrink_mask"].min() == 1


def test_shrink_mask_zeroes_ignored_and_small_text() -> None:
    ignored = TextRegion(rect(10, 10, 60, 40).points, "###", True)
    small = rect(100, 100, 160, 106)  # 6 px high < min_text_size 8
    sample = maps_for([ignored, small, rect(80, 20, 180, 60)])
    assert sample["shrink_mask"][25, 35] == 0 and sample["shrink_mask"][103, 130] == 0
    assert sample["shrink_map"][25, 35] == 0 and sample["shrink_map"][103, 130] == 0
    assert sample["shrink_map"][40, 130] == 1 and sample["shrink_mask"][40, 130] == 1
    assert sample["ignore_tags"].tolist() == [True, True, False]
    # ignored regions get no threshold target either
    assert sample["threshold_mask"][25, 35] == 0 and sample["threshold_mask"][40, 130] == 1


def test_border_map_range_and_peak_on_edge() -> None:
    x0, y0, x1, y1 = 50, 60, 150, 100
    d = 12.0
    sample = maps_for([rect(x0, y0, x1, y1)])
    tmap = sample["threshold_map"]
    assert tmap.dtype == np.float32
    assert tmap.min() >= 0.3 - 1e-6 and tmap.max() <= 0.7 + 1e-6
    assert tmap[y0, 100] == pytest.approx(0.7) and tmap[80, x0] == pytest.approx(0.7)
    assert tmap[y0 - 6, 100] == pytest.approx(0.5, abs=1e-4)  # half of D outside the edge
    assert tmap[80, 100] == pytest.approx(0.3)  # centre: more than D from every edge
    ys, xs = np.nonzero(tmap > 0.69)
    dist_to_edge = np.minimum(np.minimum(abs(xs - x0), abs(xs - x1)), np.minimum(abs(ys - y0), abs(ys - y1)))
    assert dist_to_edge.max() <= 1
    mask = sample["threshold_mask"]
    assert mask[y0 - int(d) + 1, 100] == 1 and mask[y0 - int(d) - 2, 100] == 0


# ---------------------------------------------------------------- geometry-changing transforms


def pixel_index(points: np.ndarray) -> np.ndarray:
    """Label coordinates treat pixel i as [i, i+1) (imgaug's convention); its index is at i + 0.5."""
    return np.round(np.asarray(points) - 0.5).astype(np.int32)


def white_inside(image: np.ndarray, points: np.ndarray, margin: float) -> float:
    """Minimum grey level over the polygon shrunk by ``margin`` px."""
    inner = Polygon(points).buffer(-margin)
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(mask, [pixel_index(inner.exterior.coords)], 1)
    assert mask.sum() > 20
    return float(image[mask.astype(bool)].min())


def box_sample() -> dict:
    image = np.full((H, W, 3), 20, np.uint8)
    cv2.rectangle(image, (40, 30), (139, 89), (255, 255, 255), -1)  # pixels 40..139 cover [40, 140)
    return make_sample(image, [rect(40, 30, 140, 90)])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_augment_keeps_polygon_on_the_drawn_box(seed: int, flip_p: float) -> None:
    sample = DetAugment(flip_p=flip_p)(box_sample(), np.random.default_rng(seed))
    image, poly = sample["image"], sample["polys"][0]
    assert image.dtype == np.uint8 and sample["polys"].dtype == np.float32
    scale = image.shape[1] / W
    assert 0.5 <= scale <= 3.0 and image.shape[0] == pytest.approx(H * scale, abs=1)
    # Bilinear rotation and cubic resize blur the edge by about 3 source pixels.
    blur = 3 * scale + 1
    assert white_inside(image, poly, margin=blur) > 200
    pts = pixel_index(Polygon(poly).buffer(blur + 1).exterior.coords)  # just outside the box: background
    ok = (pts[:, 0] >= 0) & (pts[:, 0] < image.shape[1]) & (pts[:, 1] >= 0) & (pts[:, 1] < image.shape[0])
    assert image[pts[ok, 1], pts[ok, 0]].max() < 60


def test_crop_keeps_text_whole_and_aligned() -> None:
    image = np.full((H, W, 3), 20, np.uint8)
    boxes = [(10, 10, 50, 40), (70, 15, 120, 45), (130, 60, 190, 100), (20, 110, 90, 150)]
    for x0, y0, x1, y1 in boxes:
        cv2.rectangle(image, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), -1)
    ignored = TextRegion(rect(100, 110, 180, 150).points, "###", True)
    crop = EastRandomCrop(size=(96, 96))
    sizes = set()
    for seed in range(20):
        sample = make_sample(image, [rect(*b) for b in boxes] + [ignored])
        out = crop(sample, np.random.default_rng(seed))
        assert out["image"].shape == (96, 96, 3)
        care = out["polys"][~out["ignore_tags"]]
        assert len(care) >= 1
        for poly in care:
            assert poly.min() >= 0 and poly[:, 0].max() <= 96 and poly[:, 1].max() <= 96
            assert white_inside(out["image"], poly, margin=1.5) > 200
        assert len(out["texts"]) == len(out["polys"]) == len(out["ignore_tags"])
        sizes.add(len(care))
    assert len(sizes) > 1  # crops differ in how much text they take


def test_crop_without_care_text_uses_whole_image() -> None:
    image = np.zeros((H, W, 3), np.uint8)
    sample = make_sample(image, [TextRegion(rect(10, 10, 50, 40).points, "###", True)])
    out = EastRandomCrop(size=(100, 100))(sample, np.random.default_rng(0))
    np.testing.assert_allclose(out["polys"][0], rect(5, 5, 25, 20).points)  # scale 0.5, no offset


@pytest.mark.parametrize(
    "src_hw, limit, limit_type, expect_hw",
    [
        ((1000, 700), 960, "max", (960, 672)),
        ((160, 200), 960, "max", (160, 192)),
        ((160, 200), 736, "min", (736, 928)),
        ((1000, 700), 736, "min", (1056, 736)),
        ((160, 200), 960, "resize_long", (768, 960)),
        ((20, 30), 960, "max", (32, 32)),  # padded to 32x32 first
    ],
)
def test_det_resize_for_test(src_hw: tuple, limit: int, limit_type: str, expect_hw: tuple) -> None:
    h, w = src_hw
    sample = make_sample(np.zeros((h, w, 3), np.uint8), [rect(1, 1, 10, 10)])
    out = DetResizeForTest(limit, limit_type)(sample, np.random.default_rng(0))
    out_h, out_w = out["image"].shape[:2]
    assert (out_h, out_w) == expect_hw and out_h % 32 == 0 and out_w % 32 == 0
    shape = out["shape"]
    assert shape.dtype == np.float32 and shape.shape == (4,)
    padded_h, padded_w = max(h, 32) if h + w < 64 else h, max(w, 32) if h + w < 64 else w
    np.testing.assert_allclose(shape, [h, w, out_h / padded_h, out_w / padded_w], rtol=1e-6)
    np.testing.assert_array_equal(out["polys"][0], rect(1, 1, 10, 10).points)  # metric needs originals


def test_det_resize_rejects_unknown_limit_type() -> None:
    with pytest.raises(ConfigError, match="limit_type='side'"):
        DetResizeForTest(960, "side")


# ---------------------------------------------------------------- dataset


def test_train_dataset_samples(root: Path) -> None:
    labels = write_labels(root, [GOOD_LINE, f"sub/b.jpg\t{json.dumps(REGIONS[:2])}"])
    ds = build_split(root, labels, "train", crop_size=128, seed=3)
    assert len(ds) == 2
    first = ds[0]
    assert set(first) == {"image", "shrink_map", "shrink_mask", "threshold_map", "threshold_mask"}
    assert first["image"].shape == (3, 128, 128)
    for key in ("shrink_map", "shrink_mask", "threshold_map", "threshold_mask"):
        assert first[key].shape == (128, 128)
    assert all(v.dtype == np.float32 for v in first.values())
    assert first["shrink_map"].max() == 1

    again = ds[0]
    assert all(np.array_equal(first[k], again[k]) for k in first)  # seeded per (seed, epoch, index)
    ds.set_epoch(1)
    assert not np.array_equal(first["image"], ds[0]["image"])

    batch = next(iter(build_loader(ds, batch_size=2, shuffle=False)))
    assert list(batch["image"].shape) == [2, 3, 128, 128] and list(batch["shrink_map"].shape) == [2, 128, 128]


def test_eval_dataset_keeps_original_polygons(root: Path) -> None:
    labels = write_labels(root, [GOOD_LINE])
    ds = build_split(root, [labels], "eval", limit_side_len=320, limit_type="min")
    item = ds[0]
    assert item["image"].shape == (3, 320, 384) and item["image"].dtype == np.float32
    np.testing.assert_allclose(item["shape"], [H, W, 2.0, 1.92], rtol=1e-6)  # 400/32 = 12.5 rounds to 12
    regions = ds.ground_truth(int(item["index"]))
    np.testing.assert_array_equal(regions[0].points, np.array(BOX, np.float32))
    assert [r.ignore for r in regions] == [False, False, True]

    batch = next(iter(build_loader(ds, batch_size=1)))
    assert list(batch["image"].shape) == [1, 3, 320, 384] and int(batch["index"][0]) == 0
    with pytest.raises(ConfigError, match="use 1"):
        build_loader(ds, batch_size=2)
    with pytest.raises(ConfigError, match="use batch_size=1"):
        collate([{"image": np.zeros((3, 32, 64))}, {"image": np.zeros((3, 64, 32))}])


def test_corrupt_image_names_the_file(root: Path) -> None:
    # A JPEG header passes the reader's check (a file that is no image at all fails there); the body does not decode.
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff" + b"not a jpeg at all")
    labels = write_labels(root, [f"bad.jpg\t{json.dumps(REGIONS)}"])
    ds = build_split(root, labels, "eval")
    with pytest.raises(DataError, match=r"cannot decode image .*bad\.jpg"):
        ds[0]


def test_image_without_text_is_a_negative_sample(root: Path) -> None:
    labels = write_labels(root, ["a.jpg\t[]"])
    assert read_label_file(labels, root)[0].regions == []
    sample = build_split(root, labels, "train", crop_size=64)[0]
    assert sample["shrink_map"].max() == 0 and sample["shrink_mask"].min() == 1
    assert sample["threshold_mask"].max() == 0
    assert build_split(root, labels, "eval")[0]["image"].shape == (3, 160, 192)
