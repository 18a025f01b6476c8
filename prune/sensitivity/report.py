"""Sensitivity tables for people: a CSV, a text table and a plot (loss vs ratio, most sensitive group first)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first: no display on servers)

from prune.sensitivity import SensitivityTable  # noqa: E402


def write_csv(table: SensitivityTable, path: Path) -> Path:
    """One row per group (most sensitive first): channels, mean monotone loss, then raw loss at each ratio."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "channels", "sensitivity", *[f"loss@{r:g}" for r in table.ratios]])
        for group in table.most_sensitive_first():
            writer.writerow([group, table.channels[group], f"{table.sensitivity(group):.6f}",
                             *[f"{v:.6f}" for v in table.raw(group)]])
    return path


def format_table(table: SensitivityTable) -> str:
    """Monotone losses, most sensitive group first, as aligned text."""
    groups = table.most_sensitive_first()
    width = max(len(g) for g in groups)
    header = f"{'group':<{width}}  {'ch':>4}  " + "  ".join(f"{r:>6g}" for r in table.ratios)
    rows = [f"{g:<{width}}  {table.channels[g]:>4}  " + "  ".join(f"{v:>6.3f}" for v in table.curve(g))
            for g in groups]
    return "\n".join([f"{table.key.metric} base={table.base:.4f}", header, *rows])


def plot_curves(table: SensitivityTable, path: Path, columns: int = 6) -> Path:
    """Small multiples, one panel per group in sensitivity order: raw loss (dots) and the monotone prior (line)."""
    groups = table.most_sensitive_first()
    rows = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.0 * rows), sharex=True, sharey=True,
                             squeeze=False)
    top = max(0.05, max(float(max(table.curve(g).max(), table.raw(g).max())) for g in groups))
    for ax, group in zip(axes.flat, groups):
        ax.plot(table.ratios, table.curve(group), color="tab:red", lw=1.5)
        ax.plot(table.ratios, table.raw(group), "o", color="tab:blue", ms=2.5)
        ax.set_title(f"{group} ({table.channels[group]})", fontsize=6)
        ax.set_ylim(min(0.0, *[float(table.raw(g).min()) for g in groups]) - 0.02, top * 1.05)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.supxlabel("pruned ratio of the group", fontsize=9)
    fig.supylabel(f"relative {table.key.metric} loss", fontsize=9)
    fig.suptitle(f"{table.key.model} sensitivity ({table.key.metric}, base {table.base:.3f}), most sensitive first",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
