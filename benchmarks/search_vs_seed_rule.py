"""Does the search beat the seed rule? Per seed-rule target, the best searched hmean at no more FLOPs, over studies.

Every trial of a study gets the same recovery budget (`finetune.steps`), and the study holds the seed rule's plans
as warm-start trials, so one study answers it once: for each seed-rule trial (default targets 30/50/70% inference-
FLOPs reduction), the best searched trial that costs no more FLOPs (+`--slack`), and whether a searched trial
dominates it. One study is one sample of the sampler, so the issue's comparison is over several studies that differ
only in `search.sampler.seed`:

    OMP_NUM_THREADS=2 python benchmarks/search_vs_seed_rule.py [hydra overrides of conf/search.yaml]
        runs (or resumes) the study those overrides name, then reads it;
    python benchmarks/search_vs_seed_rule.py --studies outputs/search/v8 outputs/search/v9s1 ... [--shifted]
        reads finished studies (their `out_dir`s) and adds a mean ± sd summary over them.

`--seeds N` recovers the 50% seed-rule plan and the best searched plan of each study again with recovery seeds
1..N (`python -m search trial.plan=... finetune.seed=<s>`, two at a time; seed 0 is the trial itself, and the study's
own re-evaluations of a plan (`search.reeval`, the same seeds) are used as they are; cached by plan and seed in
`<out_dir>/reeval_seeds.json`) and compares them seed by seed (common random numbers): one 60-step
recovery's seed spread is as large as the differences between plans, so the single-seed gain says little.

`--held-out N` recovers each study's chosen plan and its 50% seed-rule plan with N recovery seeds from 1000 on,
which no trial, re-evaluation or choice of the study used, and compares them seed by seed: the study's own scores
of the plan it chose are the maximum over noisy recoveries, so a gain measured on them is partly selected noise.

`--shifted` also scores, at the 50% target, the seed rule's trial and the study's chosen trial (their trial
weights, as recovered in the study) on `../shared/eval/shifted_v1` with `python -m train.evaluate` (evaluation
only; cached in `<out_dir>/shifted_v1_trials.json`).

Per study it prints a markdown table and `target=0.5 seed_rule_hmean=<f> searched_hmean=<f>
searched_flops_ratio=<f> gain=<f>` (searched values -1 when no searched trial is that cheap); with `--studies`
the last line is `studies=<n> gain_mean=<f> gain_sd=<f> chosen_gain_mean=<f> [shifted_gain_mean=<f>
shifted_gain_sd=<f>] [seeds=<n> seeds_gain_mean=<f> seeds_gain_sd=<f>] [held_out=<n> held_out_gain_mean=<f>
held_out_gain_sd=<f>]`, where `chosen_gain` is the chosen trial's
hmean minus the seed rule's at 50%, and `seeds_gain` the best searched plan's mean hmean over recovery seeds 0..N
minus the seed rule's, and `held_out_gain` the chosen plan's minus the seed rule's on the held-out seeds (mean and
sd over studies).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from hydra import compose, initialize_config_dir
from optuna.trial import TrialState

import train.data.source  # noqa: F401  (registers the data generator schema the configs use)
from search.attributes import TRIAL_RECOVERY_SEED, TRIAL_REEVAL_OF
from search.study import make_storage

REPO = Path(__file__).resolve().parents[1]
SHIFTED_CACHE = "shifted_v1_trials.json"
REEVAL_CACHE = "reeval_seeds.json"
# Recovery seeds of the held-out comparison: far above any a study uses (its trials are seed 0, its re-evaluations
# 1..search.reeval.seeds), so the chosen plan's score there carries no selection bias.
HELD_OUT_FIRST_SEED = 1000


@dataclass
class Comparison:
    """At the 50% target of one study: the seed rule's trial, the best searched one at no more FLOPs, the chosen."""

    study: str
    seed_rule: optuna.trial.FrozenTrial
    best: optuna.trial.FrozenTrial | None
    chosen: optuna.trial.FrozenTrial | None
    # The study's own re-evaluations (`search.reeval`): (trial, recovery seed) -> hmean.
    reevaluated: dict[tuple[int, int], float] = field(default_factory=dict)

    @property
    def gain(self) -> float:
        return self.best.user_attrs["hmean"] - self.seed_rule.user_attrs["hmean"] if self.best else float("nan")

    @property
    def chosen_gain(self) -> float:
        return (self.chosen.user_attrs["hmean"] - self.seed_rule.user_attrs["hmean"] if self.chosen
                else float("nan"))


def read_study(overrides: list[str], slack: float) -> tuple[Comparison | None, Path]:
    """Print the study's table and last line; its 50% comparison (None without a 50% seed-rule trial)."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("search", overrides=overrides)
    study = optuna.load_study(study_name=cfg.search.study_name, storage=make_storage(cfg.storage))
    # One seed per plan here (the study's re-evaluations are other seeds of its best plans; --seeds runs its own).
    finished = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    complete = [t for t in finished if t.user_attrs.get(TRIAL_REEVAL_OF) is None]
    reevaluated = {(t.user_attrs[TRIAL_REEVAL_OF], t.user_attrs[TRIAL_RECOVERY_SEED]): t.user_attrs["hmean"]
                   for t in finished if t.user_attrs.get(TRIAL_REEVAL_OF) is not None}
    seeds = sorted((t for t in complete if t.user_attrs.get("baseline") == "seed_rule"),
                   key=lambda t: t.user_attrs["target_reduction"])
    searched = [t for t in complete if not t.user_attrs.get("baseline")]
    unpruned = next((t for t in complete if t.user_attrs.get("baseline") == "unpruned"), None)
    chosen_number = study.user_attrs.get("chosen_trial")
    chosen = next((t for t in complete if t.number == chosen_number), None)
    print(f"study {study.study_name!r} in {cfg.out_dir}: {len(complete)} complete trials, {len(searched)} searched, "
          f"finetune.steps={cfg.finetune.steps}" + (f", unpruned hmean {unpruned.user_attrs['hmean']:.3f}"
                                                   if unpruned else "")
          + (f", chosen trial {chosen_number}" if chosen_number is not None else ""))
    print("| seed rule target | FLOPs red. | hmean | best searched at <= FLOPs | its FLOPs red. | gain | dominated |")
    print("|---|---|---|---|---|---|---|")
    comparison = None
    for seed in seeds:
        a = seed.user_attrs
        cheaper = [t for t in searched if t.user_attrs["flops_ratio"] <= a["flops_ratio"] + slack]
        best = max(cheaper, key=lambda t: t.user_attrs["hmean"], default=None)
        dominated = any(t.user_attrs["hmean"] >= a["hmean"] and t.user_attrs["flops_ratio"] <= a["flops_ratio"]
                        for t in searched)
        if best is None:
            row = ["—", "—", "—"]
        else:
            b = best.user_attrs
            row = [f"{b['hmean']:.3f} (trial {best.number})", f"{1 - b['flops_ratio']:.1%}",
                   f"{b['hmean'] - a['hmean']:+.3f}"]
        print(f"| {a['target_reduction']:.0%} | {1 - a['flops_ratio']:.1%} | {a['hmean']:.3f} | " + " | ".join(row)
              + f" | {'yes' if dominated else 'no'} |")
        if abs(a["target_reduction"] - 0.5) < 1e-9:
            comparison = Comparison(str(cfg.out_dir), seed, best, chosen, reevaluated)
    if comparison is not None:
        b = comparison.best.user_attrs if comparison.best else {"hmean": -1.0, "flops_ratio": -1.0}
        gain = comparison.gain if comparison.best else -1.0
        print(f"target=0.5 seed_rule_hmean={comparison.seed_rule.user_attrs['hmean']:.6f} "
              f"searched_hmean={b['hmean']:.6f} searched_flops_ratio={b['flops_ratio']:.6f} gain={gain:.6f}")
    return comparison, Path(str(cfg.out_dir))


def result_hmean(stdout: str) -> float:
    """`hmean=` of a command's last stdout line (`key=value` pairs)."""
    line = stdout.strip().splitlines()[-1]
    return float(dict(pair.split("=", 1) for pair in line.split())["hmean"])


def shifted_hmean(out_dir: Path, trial: int) -> float:
    """A trial's recovered weights scored on shifted_v1 (`python -m train.evaluate`), cached beside the study."""
    cache_path = out_dir / SHIFTED_CACHE
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if str(trial) not in cache:
        folder = out_dir / "trials" / str(trial)
        proc = subprocess.run([sys.executable, "-m", "train.evaluate", "data=shifted_v1", "progress=false",
                               f"model.plan={folder / 'plan.json'}",
                               f"model.checkpoint={folder / 'finetuned.pdparams'}"],
                              cwd=REPO, capture_output=True, text=True, check=True)
        cache[str(trial)] = result_hmean(proc.stdout)
        cache_path.write_text(json.dumps(cache, indent=1))
    return cache[str(trial)]


def _plan_key(out_dir: Path, trial: int) -> str:
    return hashlib.sha256((out_dir / "trials" / str(trial) / "plan.json").read_bytes()).hexdigest()[:16]


def reevaluate(jobs: list[tuple[Path, optuna.trial.FrozenTrial, Comparison]], seeds: list[int],
               folders: list[Path]) -> dict[str, float]:
    """hmean of each (study, trial)'s plan recovered with each of `seeds` (0: the trial's own), keyed
    `<plan digest>:<seed>`; the study's own re-evaluations count, the missing recoveries run two at a time and are
    cached in each study's folder."""
    known: dict[str, float] = {}
    for folder in folders:
        path = folder / REEVAL_CACHE
        if path.exists():
            known.update(json.loads(path.read_text()))
    todo = []
    for out_dir, trial, comparison in jobs:
        key = _plan_key(out_dir, trial.number)
        known.setdefault(f"{key}:0", float(trial.user_attrs["hmean"]))
        for (number, seed), hmean in comparison.reevaluated.items():
            if number == trial.number:
                known.setdefault(f"{key}:{seed}", float(hmean))
        todo += [(out_dir, trial.number, key, s) for s in seeds if f"{key}:{s}" not in known]
    todo = list({(k, s): (o, n, k, s) for o, n, k, s in todo}.values())  # one plan, one seed: once
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
    for start in range(0, len(todo), 2):
        procs = []
        for out_dir, number, key, seed in todo[start:start + 2]:
            folder = out_dir / "reeval" / f"{number}-s{seed}"
            procs.append((out_dir, key, seed, subprocess.Popen(
                [sys.executable, "-m", "search", f"trial.plan={out_dir / 'trials' / str(number) / 'plan.json'}",
                 f"finetune.seed={seed}", f"out_dir={folder}", "progress=false"],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)))
        for out_dir, key, seed, proc in procs:
            stdout, _ = proc.communicate()
            if proc.returncode != 0:
                sys.exit(f"error: recovery of plan {key} with seed {seed} failed (exit {proc.returncode})")
            known[f"{key}:{seed}"] = result_hmean(stdout)
            path = out_dir / REEVAL_CACHE
            cached = json.loads(path.read_text()) if path.exists() else {}
            path.write_text(json.dumps({**cached, f"{key}:{seed}": known[f"{key}:{seed}"]}, indent=1))
    return known


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="only read the study the overrides name")
    parser.add_argument("--studies", nargs="+", type=Path, help="read these finished studies (out_dir folders)")
    parser.add_argument("--shifted", action="store_true", help="score the 50%% trials on shifted_v1 too")
    parser.add_argument("--slack", type=float, default=0.01, help="FLOPs-ratio slack for 'no more FLOPs'")
    parser.add_argument("--seeds", type=int, default=0, help="recover the 50%% plans again with seeds 1..N")
    parser.add_argument("--held-out", type=int, default=0, metavar="N",
                        help=f"recover the chosen and the 50%% seed-rule plan with N recovery seeds from "
                             f"{HELD_OUT_FIRST_SEED} on, which no trial, re-evaluation or choice of the study used")
    args, overrides = parser.parse_known_args()
    if args.studies is None:
        if not args.no_run:
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "search", "multirun", *overrides], cwd=REPO, check=True)
            print(f"study wall time: {time.perf_counter() - started:.0f} s")
        read_study(overrides, args.slack)
        return

    comparisons = []
    for folder in args.studies:
        if not (folder / "optuna.db").is_file():
            sys.exit(f"error: {folder}: no optuna.db (not a study's out_dir)")
        comparison, out_dir = read_study([*overrides, f"out_dir={folder.resolve()}"], args.slack)
        if comparison is not None:
            comparisons.append((comparison, out_dir))
        print()
    if not comparisons:
        sys.exit("error: no study has a 50% seed-rule trial")
    print("| study | seed rule hmean | best searched (trial) | gain | chosen (trial) | chosen gain |"
          + (" shifted_v1 seed rule | shifted_v1 chosen |" if args.shifted else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if args.shifted else ""))
    shifted_gains = []
    for c, out_dir in comparisons:
        row = (f"| {out_dir.name} | {c.seed_rule.user_attrs['hmean']:.3f} | "
               + (f"{c.best.user_attrs['hmean']:.3f} ({c.best.number})" if c.best else "—") + f" | {c.gain:+.3f} | "
               + (f"{c.chosen.user_attrs['hmean']:.3f} ({c.chosen.number})" if c.chosen else "—")
               + f" | {c.chosen_gain:+.3f} |")
        if args.shifted and c.chosen is not None:
            rule, chosen = shifted_hmean(out_dir, c.seed_rule.number), shifted_hmean(out_dir, c.chosen.number)
            shifted_gains.append(chosen - rule)
            row += f" {rule:.3f} | {chosen:.3f} |"
        print(row)
    gain = mean_sd([c.gain for c, _ in comparisons if c.best])
    chosen_gain = mean_sd([c.chosen_gain for c, _ in comparisons if c.chosen])
    line = (f"studies={len(comparisons)} gain_mean={gain[0]:.6f} gain_sd={gain[1]:.6f} "
            f"chosen_gain_mean={chosen_gain[0]:.6f}")
    if shifted_gains:
        shifted = mean_sd(shifted_gains)
        line += f" shifted_gain_mean={shifted[0]:.6f} shifted_gain_sd={shifted[1]:.6f}"
    if args.seeds > 0:
        line += " " + seeds_comparison(comparisons, args.seeds, list(args.studies))
    if args.held_out > 0:
        line += " " + held_out_comparison(comparisons, args.held_out, list(args.studies))
    print(line)


def seeds_comparison(comparisons: list[tuple[Comparison, Path]], seeds: int, folders: list[Path]) -> str:
    """Print the seed-by-seed table of the 50% plans; the `seeds=...` part of the last line."""
    pairs = [(out_dir, c.seed_rule, c.best) for c, out_dir in comparisons if c.best is not None]
    known = reevaluate([(o, t, c) for c, o in comparisons for t in (c.seed_rule, c.best) if t is not None],
                       list(range(1, seeds + 1)), folders)
    print(f"\nRecovered with seeds 0..{seeds} (hmean per seed; gain = searched - seed rule, seed by seed):")
    gain = paired_table(pairs, list(range(seeds + 1)), known, "best searched")
    return f"seeds={seeds + 1} seeds_gain_mean={gain[0]:.6f} seeds_gain_sd={gain[1]:.6f}"


def held_out_comparison(comparisons: list[tuple[Comparison, Path]], seeds: int, folders: list[Path]) -> str:
    """Print the chosen plan against the 50% seed-rule plan, recovered with seeds the study never saw; the
    `held_out=...` part of the last line.

    The study's own scores of its chosen plan are biased upwards: it is the maximum over noisy recoveries (the trial's
    seed 0 and the re-evaluations' seeds picked it), so a gain measured on those seeds is partly the noise the choice
    selected. Fresh seeds measure what a user gets."""
    chosen = [(c, out_dir) for c, out_dir in comparisons if c.chosen is not None]
    held_out = list(range(HELD_OUT_FIRST_SEED, HELD_OUT_FIRST_SEED + seeds))
    known = reevaluate([(o, t, c) for c, o in chosen for t in (c.seed_rule, c.chosen)], held_out, folders)
    print(f"\nChosen plan vs seed rule at 50%, recovered with held-out seeds {held_out[0]}..{held_out[-1]} "
          "(gain = chosen - seed rule, seed by seed):")
    gain = paired_table([(out_dir, c.seed_rule, c.chosen) for c, out_dir in chosen], held_out, known, "chosen")
    return f"held_out={seeds} held_out_gain_mean={gain[0]:.6f} held_out_gain_sd={gain[1]:.6f}"


def paired_table(pairs: list[tuple[Path, optuna.trial.FrozenTrial, optuna.trial.FrozenTrial]], seeds: list[int],
                 known: dict[str, float], label: str) -> tuple[float, float]:
    """Print, per study, the seed rule's plan and another (`label`) recovered with `seeds`, and their gain seed by
    seed (common random numbers); the gains' mean and sd over studies."""
    print(f"| study | seed rule | mean ± sd | {label} (trial) | mean ± sd | gain mean ± sd |")
    print("|---|---|---|---|---|---|")
    gains = []
    for out_dir, rule_trial, other_trial in pairs:
        rule = [known[f"{_plan_key(out_dir, rule_trial.number)}:{s}"] for s in seeds]
        other = [known[f"{_plan_key(out_dir, other_trial.number)}:{s}"] for s in seeds]
        paired = [b - r for b, r in zip(other, rule)]
        gains.append(statistics.fmean(paired))
        print(f"| {out_dir.name} | {' '.join(f'{v:.3f}' for v in rule)} | {mean_sd(rule)[0]:.3f} ± "
              f"{mean_sd(rule)[1]:.3f} | {' '.join(f'{v:.3f}' for v in other)} ({other_trial.number}) | "
              f"{mean_sd(other)[0]:.3f} ± {mean_sd(other)[1]:.3f} | {mean_sd(paired)[0]:+.3f} ± "
              f"{mean_sd(paired)[1]:.3f} |")
    return mean_sd(gains)


if __name__ == "__main__":
    main()
