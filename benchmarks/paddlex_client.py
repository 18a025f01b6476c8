"""Does PaddleOCR 3 (PaddleX) load an export folder as its text detector, and detect what our predictor detects?

PaddleOCR 3 is not a dependency (paddlex pulls in model hubs, pypdfium2, opencv-contrib...). Install it without
dependencies beside the project's environment, with the modules it imports at start-up:

    pip install --no-deps --target /tmp/paddleocr3 paddleocr==3.7.0 paddlex==3.7.2 chardet ruamel.yaml filelock \
        huggingface_hub modelscope modelscope_hub aistudio_sdk psutil pypdfium2 \
        opencv-contrib-python==4.10.0.84
    PYTHONPATH=/tmp/paddleocr3 PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK=True HF_HUB_OFFLINE=1 \
        python benchmarks/paddlex_client.py outputs/search/v8/export/trial-7

(PaddleX checks for the distribution `opencv-contrib-python` by name before it reads an image; the wheel above
satisfies it and shadows the project's cv2 in this process only.)

Runs `paddleocr.TextDetection(model_name=<Global.model_name of the folder's inference.yml>, model_dir=<export>)` on
a rendered image of known words and the same image through our own predictor (Paddle Inference + DB
post-processing, `search.predict`'s path), and prints both box sets and their largest corner difference in pixels.
PaddleX takes the resize limits from its own arguments, not from `inference.yml`, so they are passed as the
folder's (`limit_side_len`, `limit_type`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from train.data.synthetic import known_words_image
from train.data.transforms import build_eval_transform, make_sample
from train.deploy_config import read_deploy_config
from train.inference import InferenceSession
from train.postprocess import DBPostProcess


def own_boxes(export_dir: Path, image: np.ndarray) -> np.ndarray:
    deploy = read_deploy_config(export_dir)
    sample = build_eval_transform(deploy.limit_side_len, deploy.limit_type)(make_sample(image, []),
                                                                            np.random.default_rng(0))
    maps = InferenceSession(export_dir, threads=1)(sample["image"][None].astype(np.float32))
    return DBPostProcess(**deploy.postprocess)(maps, sample["shape"][None])[0].points


def sorted_boxes(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4, 2)
    return boxes[np.lexsort((boxes[:, :, 0].min(1), boxes[:, :, 1].min(1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    args = parser.parse_args()
    try:
        import paddleocr
        from paddleocr import TextDetection
    except ImportError as error:
        sys.exit(f"error: paddleocr 3.x is not importable ({error}); see this script's docstring")
    deploy = read_deploy_config(args.export_dir)
    image = known_words_image()
    try:
        detector = TextDetection(model_name=deploy.model_name, model_dir=str(args.export_dir), device="cpu",
                                 limit_side_len=deploy.limit_side_len, limit_type=deploy.limit_type)
    except Exception as error:  # PaddleX raises ValueError, KeyError, FileNotFoundError... for folders it refuses
        print(f"client=paddleocr{paddleocr.__version__} loads=no error={type(error).__name__}: {error}")
        sys.exit(1)
    theirs = sorted_boxes(next(iter(detector.predict(image)))["dt_polys"])
    ours = sorted_boxes(own_boxes(args.export_dir, image))
    print(f"PaddleOCR {paddleocr.__version__} TextDetection(model_name={deploy.model_name!r}): {len(theirs)} boxes "
          f"{theirs.astype(int).tolist()}")
    print(f"ours (Paddle Inference + DBPostProcess): {len(ours)} boxes {ours.astype(int).tolist()}")
    same = len(theirs) == len(ours)
    diff = float(np.abs(theirs - ours).max()) if same and len(ours) else float("nan")
    print(f"client=paddleocr{paddleocr.__version__} loads=yes boxes={len(theirs)} own_boxes={len(ours)} "
          f"max_corner_diff_px={diff:.1f}")


if __name__ == "__main__":
    main()
