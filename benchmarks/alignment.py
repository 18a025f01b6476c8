"""Which channel alignment (`prune.align`) buys the most latency per FLOP on this CPU?

oneDNN's fp32 convolutions work on channel blocks (8 on AVX2, 16 on AVX-512), so a cut that leaves a count off the
block may buy less time than its FLOPs say. For each alignment this builds the seed rule's plan and a uniform plan
at the same FLOPs target and times each against the unpruned model, interleaved in one process
(`prune.measure.measure_against`), at 1 and 2 threads. The figure to compare is latency ratio / FLOPs ratio (1.0:
time shrinks exactly like FLOPs; lower is better), since plans at different alignments land at slightly different
FLOPs.

    OMP_NUM_THREADS=1 python benchmarks/alignment.py [--target 0.5] [--aligns 8 16 32] [--threads 1 2] [overrides]

Time it on a quiet machine; each row's interval says how far to trust it.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import paddle  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

import train.data.source  # noqa: E402,F401  (registers the data config schema)
from prune.groups import discover_groups  # noqa: E402
from prune.latency import round_settings  # noqa: E402
from prune.measure import count_flops, measure_against  # noqa: E402
from prune.plan import apply_plan  # noqa: E402
from prune.seed_rule import seed_rule_plan  # noqa: E402
from recovery import sensitivity_table, uniform_plan  # noqa: E402
from train.weights import detector_from_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.5, help="FLOPs reduction of every plan")
    parser.add_argument("--aligns", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args, overrides = parser.parse_known_args()
    paddle.set_device("cpu")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("search", overrides=overrides)
    teacher = detector_from_config(cfg.model)
    groups = discover_groups(teacher)
    base = count_flops(teacher, tuple(cfg.prune.input_size))
    table = sensitivity_table([o for o in overrides if o.startswith(("sensitivity.", "data.", "model."))])
    rounds = {**round_settings(cfg.measure), "min_rounds": 20, "max_rounds": 80, "tolerance": 0.02}
    rows = []
    for align in args.aligns:
        rule = seed_rule_plan(copy.deepcopy(teacher), cfg.model.name, table, args.target, criterion=cfg.prune.criterion,
                              align=align, tolerance=0.04, groups=groups).plan
        uniform, _ = uniform_plan(teacher, groups, base, args.target, align)
        for kind, plan in (("seed rule", rule), ("uniform", uniform)):
            model = apply_plan(copy.deepcopy(teacher), plan, groups)
            flops_ratio = count_flops(model, tuple(cfg.prune.input_size)) / base
            for threads in args.threads:
                _, ratio = measure_against(model, teacher, tuple(cfg.prune.input_size), threads=threads,
                                           use_mkldnn=cfg.measure.use_mkldnn, **rounds)
                rows.append({"align": align, "plan": kind, "threads": threads, "flops_ratio": round(flops_ratio, 4),
                             "latency_ratio": round(ratio.ratio, 4), "low": round(ratio.low, 4),
                             "high": round(ratio.high, 4), "per_flop": round(ratio.ratio / flops_ratio, 4),
                             "rounds": ratio.rounds})
                print(json.dumps(rows[-1]), flush=True)
    print("| align | plan | threads | FLOPs ratio | latency ratio (95% interval) | latency / FLOPs |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['align']} | {r['plan']} | {r['threads']} | {r['flops_ratio']:.3f} | {r['latency_ratio']:.3f} "
              f"({r['low']:.3f}-{r['high']:.3f}) | {r['per_flop']:.3f} |")


if __name__ == "__main__":
    main()
