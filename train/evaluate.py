"""`python -m train.evaluate`: hmean / precision / recall of a detector on a dataset's eval split.

Defaults: the pretrained PP-OCRv4 mobile det on the built-in synthetic eval split. A user's own model and data:
`python -m train.evaluate model=det_mv3_db model.checkpoint=path/best_accuracy.pdparams data=icdar
data.root=... data.label_file=...`. Last stdout line: `hmean=<f> precision=<f> recall=<f> images=<int>`.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from train.cli import exit_on_user_error, print_result_line, run_app
from train.data.source import build_dataset, resolve_data
from train.evaluation import evaluate_detector
from train.postprocess import DBPostProcess
from train.runtime import set_device
from train.weights import detector_from_config


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    set_device(cfg.device)
    source = resolve_data(cfg.data, progress=cfg.progress)
    dataset = build_dataset(cfg.data, source, "eval")
    model = detector_from_config(cfg.model)
    scores = evaluate_detector(model, dataset, DBPostProcess(**cfg.postprocess), cfg.data.eval.max_images,
                               progress=cfg.progress)
    print_result_line(f"hmean={scores.hmean:.6f} precision={scores.precision:.6f} recall={scores.recall:.6f} "
                      f"images={scores.images}")


if __name__ == "__main__":
    run_app(main)
