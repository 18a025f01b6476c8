"""`python -m prune.sensitivity`: measure (or load from cache) the per-group sensitivity table of a detector.

Writes `sensitivity.json` (the table), `sensitivity.csv` and `sensitivity.png` to the run's output folder and
prints the table; the last stdout line is `table=<csv path> plot=<png path>`.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from prune.sensitivity import table_for_config
from prune.sensitivity.report import format_table, plot_curves, write_csv
from train.cli import exit_on_user_error, print_result_line, run_app
from train.data.source import resolve_data
from train.runtime import set_device
from train.weights import detector_from_config


@hydra.main(version_base="1.3", config_path="../../conf", config_name="prune_sensitivity")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    set_device(cfg.device)
    source = resolve_data(cfg.data, progress=cfg.progress)
    model = detector_from_config(cfg.model)
    table, cache_file = table_for_config(cfg, model, source)

    out_dir = Path(cfg.out_dir)
    table.save(out_dir / "sensitivity.json")
    csv_path = write_csv(table, out_dir / "sensitivity.csv")
    png_path = plot_curves(table, out_dir / "sensitivity.png")
    print(format_table(table))
    print(f"measured in {table.seconds:.0f} s; cache: {cache_file}")
    print_result_line(f"table={csv_path} plot={png_path}")


if __name__ == "__main__":
    run_app(main)
