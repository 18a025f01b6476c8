"""Exported models in deployment: inference.yml round trip, legacy/PIR export parity, `python -m search.predict`,
RapidOCR reading text with an exported detector."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest
from conftest import run_cli

from train.data.synthetic import KNOWN_WORDS, SyntheticSpec, ensure_synthetic_dataset, known_words_image
from train.deploy_config import DeployConfig, read_deploy_config
from train.errors import ConfigError
from train.inference import PROGRAM_FILES, InferenceSession, export_inference, exported_programs
from train.onnx import ONNX_FILE, convert_to_onnx
from train.weights import load_detector

TINY = SyntheticSpec(n_train=0, n_eval=3, width_range=(160, 192), height_range=(160, 192), lines_range=(1, 2),
                     font_size_range=(20, 32))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export")
    export_inference(load_detector("ppocrv4_det", "pretrained"), out)
    DeployConfig(model_name="ppocrv4_det", limit_side_len=640, limit_type="max",
                 postprocess={"thresh": 0.3, "box_thresh": 0.5, "max_candidates": 1000, "unclip_ratio": 1.5,
                              "use_dilation": False, "score_mode": "fast"}).write(out)
    return out


def test_deploy_config_round_trip_and_paddleocr_layout(exported: Path):
    config = read_deploy_config(exported)
    assert (config.limit_side_len, config.limit_type, config.postprocess["box_thresh"]) == (640, "max", 0.5)
    text = (exported / "inference.yml").read_text()
    assert "DetResizeForTest" in text and "name: DBPostProcess" in text and "NormalizeImage" in text
    assert read_deploy_config(exported.parent / "nothing-here") == DeployConfig()


def test_broken_deploy_config_is_a_config_error(tmp_path: Path):
    (tmp_path / "inference.yml").write_text("PreProcess: [1, 2]\n")
    with pytest.raises(ConfigError, match="inference.yml"):
        read_deploy_config(tmp_path)


@pytest.mark.parametrize("formats", [("pir",), ("legacy",), ("pir", "legacy")])
def test_every_export_format_predicts_like_dygraph(tmp_path: Path, formats: tuple[str, ...]):
    model = load_detector("ppocrv4_det", "pretrained")
    programs = export_inference(model, tmp_path, formats=formats)
    assert [p.name for p in programs] == [PROGRAM_FILES[f] for f in formats] and all(p.exists() for p in programs)
    assert exported_programs(tmp_path) == list(formats)
    x = np.random.default_rng(1).normal(size=(1, 3, 96, 128)).astype(np.float32)
    with paddle.no_grad():
        expected = model(paddle.to_tensor(x))["maps"].numpy()
    for program in formats:  # both programs read the one params file
        assert np.abs(InferenceSession(tmp_path, use_mkldnn=False, program=program)(x) - expected).max() <= 1e-5


def test_predict_cli_writes_boxes_and_drawings(exported: Path, tmp_path: Path, cache_env):
    root = ensure_synthetic_dataset(tmp_path / "data", TINY, progress=False)
    images = root / "images" / "eval"
    out = tmp_path / "pred"
    proc = run_cli("search.predict", [f"export_dir={exported}", f"images={images}", f"hydra.run.dir={out}"],
                   cache_env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(rf"images=3 boxes=(\d+) mean_latency_ms=\d+\.\d+ out_dir={re.escape(str(out))}", lines[-1])
    assert sum(line.startswith("image=") and "latency_ms=" in line for line in lines) == 3
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 3 and sum(len(r["boxes"]) for r in records) >= 3  # every image has a rendered line
    assert all(len(box) == 4 for r in records for box in r["boxes"])
    assert sorted(p.name for p in (out / "vis").iterdir()) == sorted(p.name for p in images.iterdir())


def test_predict_without_images_is_one_line_error(exported: Path, tmp_path: Path, cache_env):
    proc = run_cli("search.predict", [f"export_dir={exported}", f"images={tmp_path / 'none'}",
                                      f"hydra.run.dir={tmp_path / 'p'}"], cache_env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: images={tmp_path / 'none'}: no such folder or file, and no file matches it as a glob")


def test_predict_checks_every_image_before_writing_any_prediction(exported: Path, tmp_path: Path, cache_env):
    root = ensure_synthetic_dataset(tmp_path / "data", TINY, progress=False)
    images = tmp_path / "images"
    shutil.copytree(root / "images" / "eval", images)
    (images / "zz_empty.png").write_bytes(b"")  # sorted last: a loop that checks as it goes would write first
    out = tmp_path / "pred"
    proc = run_cli("search.predict", [f"export_dir={exported}", f"images={images}", f"hydra.run.dir={out}"],
                   cache_env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: images: cannot read image {images / 'zz_empty.png'} (empty, corrupt or not an image); pass "
        "on_error=skip to skip such files")
    assert not list(out.glob("predictions.jsonl*"))

    proc = run_cli("search.predict", [f"export_dir={exported}", f"images={images}", f"hydra.run.dir={out}",
                                      "on_error=skip"], cache_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped 1 unreadable file(s) of 4" in proc.stderr
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3


@pytest.mark.skipif(importlib.util.find_spec("rapidocr_paddle") is None, reason="rapidocr-paddle is not installed")
def test_rapidocr_reads_text_with_an_exported_detector(tmp_path: Path):
    """RapidOCR, the client most people run PP-OCR with, loads the default export (both programs) as its detector
    and reads the words with the recogniser and classifier that ship in its wheel."""
    from rapidocr_paddle import RapidOCR

    export_inference(load_detector("ppocrv4_det", "pretrained"), tmp_path, formats=("pir", "legacy"))
    result, _ = RapidOCR(det_model_path=str(tmp_path))(known_words_image())
    assert [line[1] for line in result or []][-2:] == list(KNOWN_WORDS)


@pytest.mark.skipif(importlib.util.find_spec("rapidocr_onnxruntime") is None,
                    reason="rapidocr-onnxruntime is not installed")
def test_rapidocr_onnxruntime_reads_text_with_an_exported_onnx_detector(tmp_path: Path):
    """RapidOCR's default engine, onnxruntime, with the export's `inference.onnx` as its detector."""
    from rapidocr_onnxruntime import RapidOCR

    export_inference(load_detector("ppocrv4_det", "pretrained"), tmp_path, formats=("legacy",))
    onnx = convert_to_onnx(tmp_path, tmp_path / ONNX_FILE)
    result, _ = RapidOCR(det_model_path=str(onnx))(known_words_image())
    assert [line[1] for line in result or []][-2:] == list(KNOWN_WORDS)
