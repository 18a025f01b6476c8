"""How well the fast sensitivity metric (map_dice) ranks groups like hmean does, on the default model and data.

Runs `python -m prune.sensitivity` twice (sensitivity.metric=map_dice and =hmean; both cached, so a rerun is
instant), then prints the Spearman rank correlation between the two tables: over groups (each group's mean
monotone loss) and over every (group, ratio) entry, plus the wall time of each scan.

    python benchmarks/sensitivity_metrics.py [extra hydra overrides, e.g. sensitivity.images=16]
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from prune.sensitivity import SensitivityTable


def scan(metric: str, out: Path, overrides: list[str]) -> tuple[SensitivityTable, float]:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "prune.sensitivity", f"sensitivity.metric={metric}", "progress=false",
                    f"hydra.run.dir={out / metric}", *overrides], check=True, stdout=subprocess.DEVNULL)
    table = SensitivityTable.from_json(json.loads((out / metric / "sensitivity.json").read_text()))
    return table, time.perf_counter() - started


def main(overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fast, fast_s = scan("map_dice", Path(tmp), overrides)
        slow, slow_s = scan("hmean", Path(tmp), overrides)
    groups = fast.groups
    per_group = spearmanr([fast.sensitivity(g) for g in groups], [slow.sensitivity(g) for g in groups])
    entries = spearmanr(np.concatenate([fast.curve(g) for g in groups]),
                        np.concatenate([slow.curve(g) for g in groups]))
    top = 10
    top_fast, top_slow = set(fast.most_sensitive_first()[:top]), set(slow.most_sensitive_first()[:top])
    print(f"model={fast.key.model} groups={len(groups)} ratios={list(fast.ratios)} base hmean={slow.base:.4f}")
    print(f"scan wall time (incl. cache hits): map_dice {fast_s:.0f} s (measured {fast.seconds:.0f} s), "
          f"hmean {slow_s:.0f} s (measured {slow.seconds:.0f} s)")
    print(f"spearman over groups (mean monotone loss): {per_group.statistic:.3f}")
    print(f"spearman over (group, ratio) entries:      {entries.statistic:.3f}")
    print(f"top-{top} most sensitive groups shared:      {len(top_fast & top_slow)}/{top}")


if __name__ == "__main__":
    main(sys.argv[1:])
