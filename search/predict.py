"""`python -m search.predict export_dir=... images=...`: detect text with an exported model.

Paddle Inference + DB post-processing, the way a deployment runs it. Writes `predictions.jsonl` (one line per
image: boxes in source-image pixels, scores, latency) and, with `draw=true`, `vis/<image>` with the boxes drawn.
Prints each image's inference latency; last line: `images=<int> boxes=<int> mean_latency_ms=<float> out_dir=<path>`.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cv2
import hydra
import numpy as np
from omegaconf import DictConfig

from train.cli import exit_on_user_error, print_result_line, run_app
from train.data.dataset import read_image
from train.data.transforms import build_eval_transform, make_sample
from train.data.unlabeled import user_images
from train.deploy_config import read_deploy_config
from train.inference import InferenceSession
from train.postprocess import DBPostProcess

def draw_boxes(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    canvas = image.copy()
    cv2.polylines(canvas, [b.astype(np.int32).reshape(-1, 1, 2) for b in boxes], True, (0, 0, 255), 2)
    return canvas


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    deploy = read_deploy_config(cfg.export_dir)
    session = InferenceSession(cfg.export_dir, threads=cfg.threads, use_mkldnn=cfg.use_mkldnn)
    transform = build_eval_transform(limit_side_len=deploy.limit_side_len, limit_type=deploy.limit_type)
    postprocess = DBPostProcess(**deploy.postprocess)
    # Every file is checked before any prediction is written; the predictions appear whole or not at all.
    images = user_images(cfg.images, "images", cfg.on_error, on_error_key="on_error")
    out_dir = Path(cfg.out_dir)
    (out_dir / "vis").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)  # the eval transform draws nothing; the argument is part of its interface
    latencies, total_boxes = [], 0
    partial = out_dir / "predictions.jsonl.partial"
    with partial.open("w") as out:
        for path in images:
            image = read_image(path)
            sample = transform(make_sample(image, []), rng)
            started = time.perf_counter()
            maps = session(sample["image"][None].astype(np.float32))
            latency = (time.perf_counter() - started) * 1000.0
            boxes = postprocess(maps, sample["shape"][None])[0]
            latencies.append(latency)
            total_boxes += len(boxes.points)
            out.write(json.dumps({"image": str(path), "boxes": boxes.points.round(1).tolist(),
                                  "scores": [round(float(s), 4) for s in boxes.scores],
                                  "latency_ms": round(latency, 3)}) + "\n")
            if cfg.draw:
                cv2.imwrite(str(out_dir / "vis" / path.name), draw_boxes(image, boxes.points))
            print(f"image={path} boxes={len(boxes.points)} latency_ms={latency:.2f}", flush=True)
    os.replace(partial, out_dir / "predictions.jsonl")
    print_result_line(f"images={len(images)} boxes={total_boxes} mean_latency_ms={float(np.mean(latencies)):.3f} "
                      f"out_dir={out_dir}")


if __name__ == "__main__":
    run_app(main)
