"""`python -m prune.sensitivity`: measure (or load from cache) the per-group sensitivity table of a detector.

Writes `sensitivity.json` (the table), `sensitivity.csv` and `sensitivity.png` to the run's output folder and
prints the table; the last stdout line is `table=<csv path> plot=<png path>`.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from prune.sensitivity import build_probe, compute_sensitivity, sensitivity_key
from prune.sensitivity.report import format_table, plot_curves, write_csv
from train.cli import exit_on_user_error, print_result_line
from train.data.dataset import build_split
from train.data.source import resolve_data
from train.errors import ConfigError
from train.postprocess import DBPostProcess
from train.runtime import set_device
from train.weights import load_detector


@hydra.main(version_base="1.3", config_path="../../conf", config_name="prune_sensitivity")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    set_device(cfg.device)
    scfg = cfg.sensitivity
    source = resolve_data(cfg.data, progress=cfg.progress)
    label_file = source.train_label_file if scfg.split == "train" else source.eval_label_file
    if scfg.split not in ("train", "eval"):
        raise ConfigError(f"sensitivity.split={scfg.split!r}: use train or eval")
    if label_file is None:
        raise ConfigError("sensitivity.split=train but the dataset has no train split: set data.train_label_file "
                          "or sensitivity.split=eval")
    resize = (scfg.limit_side_len, "max")
    dataset = build_split(source.root, label_file, "eval", limit_side_len=resize[0], limit_type=resize[1],
                          on_error=cfg.data.on_error)
    model = load_detector(cfg.model.name, cfg.model.checkpoint)
    key = sensitivity_key(model, cfg.model.name, dataset, scfg.images, resize, cfg.prune.criterion, scfg.metric,
                          scfg.ratios)
    probe = build_probe(scfg.metric, dataset, scfg.images, model, DBPostProcess(**cfg.postprocess))
    cache_file = Path(scfg.cache_dir) / f"{cfg.model.name}-{key.digest()}.json"
    table = compute_sensitivity(model, cfg.model.name, probe, key, cache_file, progress=cfg.progress)

    out_dir = Path(cfg.out_dir)
    table.save(out_dir / "sensitivity.json")
    csv_path = write_csv(table, out_dir / "sensitivity.csv")
    png_path = plot_curves(table, out_dir / "sensitivity.png")
    print(format_table(table))
    print(f"measured in {table.seconds:.0f} s; cache: {cache_file}")
    print_result_line(f"table={csv_path} plot={png_path}")


if __name__ == "__main__":
    main()
