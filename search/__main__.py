"""`python -m search multirun [overrides]`: the pruning search, exactly Hydra's `python -m search --multirun`.
`python -m search [overrides]`: one trial of the current config (see `search.app`).

The Hydra entry point is defined here rather than in `search.app`: Hydra resolves `config_path` against the file
of a `__main__` task function, but against the package of an imported one.
"""
import sys

import hydra
from omegaconf import DictConfig

from search.app import TrialOutcome, task
from train.cli import run_app


@hydra.main(version_base="1.3", config_path="../conf", config_name="search")
def main(cfg: DictConfig) -> TrialOutcome | None:
    return task(cfg)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "multirun":
        sys.argv[1] = "--multirun"
    run_app(main)
