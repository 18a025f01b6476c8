"""`python -m train.finetune`: fine-tune a detector with the DB loss on a dataset's train split.

Writes `<out_dir>/finetuned.pdparams` (a PaddleOCR-style state dict that `model.checkpoint=` loads) and a
resumable state `<out_dir>/last.*`; rerunning with the same `out_dir` continues an interrupted run. Last stdout
line: `checkpoint=<path> hmean=<f> precision=<f> recall=<f> images=<int>` (after fine-tuning).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from train.cli import exit_on_user_error, print_result_line, run_app
from train.data.dataset import endless_batches
from train.data.source import build_dataset, resolve_data
from train.evaluation import evaluate_detector
from train.loss import DBLoss
from train.postprocess import DBPostProcess
from train.runtime import seed_everything, set_device
from train.trainer import FinetuneSettings, finetune, save_weights
from train.weights import detector_from_config

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_finetune")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    set_device(cfg.device)
    seed_everything(cfg.seed)
    out_dir = Path(cfg.out_dir)
    source = resolve_data(cfg.data, progress=cfg.progress)
    train_set = build_dataset(cfg.data, source, "train", seed=cfg.seed)
    eval_set = build_dataset(cfg.data, source, "eval")
    postprocess = DBPostProcess(**cfg.postprocess)
    model = detector_from_config(cfg.model)

    report: dict = {"config": OmegaConf.to_container(cfg, resolve=True)}
    if cfg.evaluate_before:
        report["before"] = evaluate_detector(model, eval_set, postprocess, cfg.data.eval.max_images,
                                             progress=cfg.progress).to_json()
        log.info("before fine-tuning: %s", report["before"])

    settings = FinetuneSettings(**{k: v for k, v in cfg.finetune.items() if k not in ("batch_size", "num_workers")})
    result = finetune(model, endless_batches(train_set, cfg.finetune.batch_size, cfg.finetune.num_workers),
                      DBLoss(**cfg.loss), settings, checkpoint_prefix=out_dir / "last", progress=cfg.progress)
    weights = out_dir / "finetuned.pdparams"
    save_weights(model, weights)
    report["finetune"] = result.to_json()

    scores = None
    if cfg.evaluate_after:
        scores = evaluate_detector(model, eval_set, postprocess, cfg.data.eval.max_images, progress=cfg.progress)
        report["after"] = scores.to_json()
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    line = f"checkpoint={weights}"
    if scores is not None:
        line += (f" hmean={scores.hmean:.6f} precision={scores.precision:.6f} recall={scores.recall:.6f} "
                 f"images={scores.images}")
    print_result_line(line)


if __name__ == "__main__":
    run_app(main)
