"""`python -m train.evaluate`: hmean / precision / recall of a detector on a dataset's eval split.

Defaults: the pretrained PP-OCRv4 mobile det on the built-in synthetic eval split. A user's own model and data:
`python -m train.evaluate model=det_mv3_db model.checkpoint=path/best_accuracy.pdparams data=icdar
data.root=... data.label_file=...`. A pruned model: `export_dir=<an export folder>` scores the exported program
through Paddle Inference (what a deployment runs); `model.plan=<plan.json> model.checkpoint=<pruned .pdparams>`
the dygraph model (the plan replayed on a fresh model, the weights loaded strictly).
Last stdout line: `hmean=<f> precision=<f> recall=<f> images=<int>`.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from train.cli import exit_on_user_error, print_result_line, run_app
from train.data.source import build_dataset, resolve_data
from train.errors import ConfigError
from train.evaluation import evaluate_detector, images_scored
from train.inference import ExportedDetector, fast_forward
from train.postprocess import DBPostProcess
from train.runtime import set_device
from train.weights import detector_from_config


def _model(cfg: DictConfig):
    """The model the config names: an export folder, a pruned dygraph model (plan + weights) or a zoo model."""
    plan = cfg.model.get("plan")
    if cfg.export_dir is not None:
        if plan is not None:
            raise ConfigError("export_dir and model.plan: score one model, an export folder or a plan with weights")
        if not Path(cfg.export_dir).is_dir():
            raise ConfigError(f"export_dir={cfg.export_dir}: not a folder")
        return ExportedDetector.load(cfg.export_dir, threads=cfg.threads, use_mkldnn=cfg.use_mkldnn)
    if plan is None:
        return detector_from_config(cfg.model)
    from prune.plan import PruningPlan, load_pruned  # the one command of `train` that replays a pruning plan

    if not Path(plan).is_file():
        raise ConfigError(f"model.plan={plan}: file not found")
    if cfg.model.checkpoint is None or not Path(str(cfg.model.checkpoint)).is_file():
        raise ConfigError(f"model.plan needs model.checkpoint=<the pruned model's .pdparams> (got "
                          f"{cfg.model.checkpoint})")
    return load_pruned(cfg.model.name, PruningPlan.load(plan), cfg.model.checkpoint)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    set_device(cfg.device)
    source = resolve_data(cfg.data, progress=cfg.progress)
    dataset = build_dataset(cfg.data, source, "eval")
    model = _model(cfg)
    limit = cfg.data.eval.max_images
    scores = evaluate_detector(fast_forward(model, images_scored(dataset, limit), cfg.threads), dataset,
                               DBPostProcess(**cfg.postprocess), limit, progress=cfg.progress)
    print_result_line(f"hmean={scores.hmean:.6f} precision={scores.precision:.6f} recall={scores.recall:.6f} "
                      f"images={scores.images}")


if __name__ == "__main__":
    run_app(main)
