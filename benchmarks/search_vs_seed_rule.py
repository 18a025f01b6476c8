"""Does the search beat the seed rule? Best searched hmean at the seed rule's FLOPs, from one study.

Every trial of a study gets the same recovery budget (`finetune.steps`), and the study holds the seed rule's plans
as warm-start trials, so one study answers it: for each seed-rule trial (default targets 30/50/70% inference-FLOPs
reduction), the best searched trial that costs no more FLOPs (+`--slack`), and whether a searched trial dominates
it. Runs (or resumes) the study first unless `--no-run`:

    OMP_NUM_THREADS=2 python benchmarks/search_vs_seed_rule.py [--no-run] [hydra overrides of conf/search.yaml]

Prints a markdown table; the last line is `target=0.5 seed_rule_hmean=<f> searched_hmean=<f> searched_flops_ratio=<f>
gain=<f>` for the 50% target (the issue's comparison; searched values are -1 when no searched trial is that cheap).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import optuna
from hydra import compose, initialize_config_dir
from optuna.trial import TrialState

import train.data.source  # noqa: F401  (registers the data generator schema the configs use)
from search.study import make_storage

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="only read the study")
    parser.add_argument("--slack", type=float, default=0.01, help="FLOPs-ratio slack for 'no more FLOPs'")
    args, overrides = parser.parse_known_args()
    if not args.no_run:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "search", "multirun", *overrides], cwd=REPO, check=True)
        print(f"study wall time: {time.perf_counter() - started:.0f} s")

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("search", overrides=overrides)
    study = optuna.load_study(study_name=cfg.search.study_name, storage=make_storage(cfg.storage))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    seeds = sorted((t for t in complete if t.user_attrs.get("baseline") == "seed_rule"),
                   key=lambda t: t.user_attrs["target_reduction"])
    searched = [t for t in complete if not t.user_attrs.get("baseline")]
    unpruned = next((t for t in complete if t.user_attrs.get("baseline") == "unpruned"), None)
    print(f"study {study.study_name!r}: {len(complete)} complete trials, {len(searched)} searched, "
          f"finetune.steps={cfg.finetune.steps}" + (f", unpruned hmean {unpruned.user_attrs['hmean']:.3f}"
                                                   if unpruned else ""))
    print("| seed rule target | FLOPs red. | hmean | best searched at <= FLOPs | its FLOPs red. | gain | dominated |")
    print("|---|---|---|---|---|---|---|")
    last = None
    for seed in seeds:
        a = seed.user_attrs
        cheaper = [t for t in searched if t.user_attrs["flops_ratio"] <= a["flops_ratio"] + args.slack]
        best = max(cheaper, key=lambda t: t.user_attrs["hmean"], default=None)
        dominated = any(t.user_attrs["hmean"] >= a["hmean"] and t.user_attrs["flops_ratio"] <= a["flops_ratio"]
                        for t in searched)
        if best is None:
            row = ["—", "—", "—"]
            result = (-1.0, -1.0, -1.0)
        else:
            b = best.user_attrs
            result = (b["hmean"], b["flops_ratio"], b["hmean"] - a["hmean"])
            row = [f"{b['hmean']:.3f} (trial {best.number})", f"{1 - b['flops_ratio']:.1%}", f"{result[2]:+.3f}"]
        print(f"| {a['target_reduction']:.0%} | {1 - a['flops_ratio']:.1%} | {a['hmean']:.3f} | " + " | ".join(row)
              + f" | {'yes' if dominated else 'no'} |")
        if abs(a["target_reduction"] - 0.5) < 1e-9:
            last = (a["hmean"], *result)
    if last is not None:
        print(f"target=0.5 seed_rule_hmean={last[0]:.6f} searched_hmean={last[1]:.6f} "
              f"searched_flops_ratio={last[2]:.6f} gain={last[3]:.6f}")


if __name__ == "__main__":
    main()
