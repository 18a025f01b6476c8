"""The study's result for people: Pareto front, knee, the chosen trial, and the front as a table, CSV and plot.

Plain functions over `TrialRecord`s, so the rules are tested on hand-made points; the sweeper builds the records
from the Optuna study.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first: no display on servers)
import numpy as np  # noqa: E402

from search.attributes import BASELINE_SEED_RULE, Metric  # noqa: E402
from search.config import Objective  # noqa: E402


@dataclass(frozen=True)
class TrialRecord:
    """A finished (complete) trial as the study summary needs it; ratios are pruned / unpruned."""

    number: int
    hmean: float
    precision: float
    recall: float
    flops_ratio: float
    latency_ratio: float
    params: int
    run_id: str
    baseline: str = ""          # "seed_rule", "unpruned" or ""
    target_reduction: float | None = None
    target_cost: str = "flops"      # what the target reduces: flops or latency (the study's search.targets)
    feasible: bool = True
    agreement: float = math.nan     # generalization guard: hmean against the teacher's boxes on held-out images
    false_boxes: float = math.nan   # generalization guard: boxes per image where the teacher finds no text
    seeds: int = 1                  # recovery seeds the accuracy figures are the mean of (search.reeval)
    hmean_sd: float = math.nan      # their hmean's standard deviation (two or more seeds)
    reeval_of: int | None = None    # a re-evaluation of that trial's plan: one of its seeds, never on the front
    confirms: bool = False          # ... a confirmation seed of it (search.reeval.confirm_seeds)
    confirm_hmeans: tuple[tuple[int, float], ...] = ()  # (seed, hmean) of its confirmation recoveries, kept out
    #                                 of `hmean`: fresh seeds that nothing chose by (`confirmation_lead`)

    @property
    def flops_reduction(self) -> float:
        return 1.0 - self.flops_ratio

    @property
    def confirm_hmean(self) -> float:
        """Mean hmean over its confirmation seeds (nan: none)."""
        return float(np.mean([h for _, h in self.confirm_hmeans])) if self.confirm_hmeans else math.nan

    @property
    def speedup(self) -> float:
        return 1.0 / self.latency_ratio

    @property
    def target_label(self) -> str:
        """The target as the user wrote it: `-50%` (FLOPs reduction) or `lat<=0.60` (latency ratio); '' for none."""
        if self.target_reduction is None:
            return ""
        if self.target_cost == "latency":
            return f"lat<={1 - self.target_reduction:.2f}"
        return f"-{self.target_reduction:.0%}"


def _oriented(record: TrialRecord, objectives: Sequence[Objective]) -> tuple[float, ...]:
    """Objective values turned so that smaller is better for every one."""
    return tuple(-getattr(record, o.metric) if o.direction == "maximize" else getattr(record, o.metric)
                 for o in objectives)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """`a` dominates `b` (both minimized): no worse anywhere, better somewhere."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(records: Sequence[TrialRecord], objectives: Sequence[Objective]) -> list[TrialRecord]:
    """The feasible records no other feasible record dominates, by trial number (as Optuna's `best_trials`);
    re-evaluations are seeds of their trial's record, not points of their own."""
    feasible = [r for r in records if r.feasible and r.reeval_of is None]
    values = {r.number: _oriented(r, objectives) for r in feasible}
    return sorted((r for r in feasible if not any(dominates(values[o.number], values[r.number]) for o in feasible)),
                  key=lambda r: r.number)


def knee(front: Sequence[TrialRecord], objectives: Sequence[Objective]) -> TrialRecord:
    """The knee of a front: the point farthest below the chord between its two extremes (two objectives, three or
    more points), otherwise the point nearest the ideal (hmean 1, zero cost).

    Values are compared on their own scales: hmean and the cost ratios all live in [0, 1], so 0.1 hmean weighs
    like 10% of the unpruned model's cost. (Scaling by the front's own span would make any two points tie.)
    """
    if not front:
        raise ValueError("knee of an empty front")
    # Ties (e.g. a straight front, where every point scores 0) go to the higher hmean.
    front = sorted(front, key=lambda r: -r.hmean)
    values = np.array([_oriented(r, objectives) for r in front], dtype=np.float64)
    first, last = values[np.argmin(values[:, 0])], values[np.argmax(values[:, 0])]
    chord = last - first
    if len(front) >= 3 and len(objectives) == 2 and np.linalg.norm(chord) > 0:
        # Signed, negative on the ideal corner's side: the deepest bulge wins, a concave stretch never.
        distance = chord[0] * (values[:, 1] - first[1]) - chord[1] * (values[:, 0] - first[0])
        return front[int(np.argmin(distance))]
    ideal = np.array([-1.0 if o.direction == "maximize" else 0.0 for o in objectives])
    return front[int(np.argmin(np.linalg.norm(values - ideal, axis=1)))]


def confirmation_lead(searched: TrialRecord, rule: TrialRecord) -> tuple[float, int]:
    """The searched plan's mean hmean lead over the rule's on the confirmation seeds both were recovered with, and
    how many there are (nan, 0 when none)."""
    theirs = dict(rule.confirm_hmeans)
    leads = [hmean - theirs[seed] for seed, hmean in searched.confirm_hmeans if seed in theirs]
    return (float(np.mean(leads)) if leads else math.nan), len(leads)


@dataclass(frozen=True)
class Selection:
    record: TrialRecord
    reason: str


def within_limits(record: TrialRecord, max_flops_ratio: float | None, max_latency_ratio: float | None) -> bool:
    """Whether a record is within the select limits (None: no limit)."""
    return ((max_flops_ratio is None or record.flops_ratio <= max_flops_ratio)
            and (max_latency_ratio is None or record.latency_ratio <= max_latency_ratio))


def seed_rule_baseline(records: Sequence[TrialRecord], max_flops_ratio: float | None,
                       max_latency_ratio: float | None) -> TrialRecord | None:
    """The seed rule's best feasible plan within the select limits: the plan a searched one must beat by
    `min_gain` to be chosen (`select`), and which the re-evaluation therefore always includes."""
    rules = [r for r in records if r.baseline == BASELINE_SEED_RULE and r.feasible and r.reeval_of is None
             and within_limits(r, max_flops_ratio, max_latency_ratio)]
    return max(rules, key=lambda r: (r.hmean, -r.flops_ratio), default=None)


def searched_vs_rule(front: Sequence[TrialRecord], records: Sequence[TrialRecord], max_flops_ratio: float | None,
                     max_latency_ratio: float | None) -> tuple[TrialRecord, TrialRecord] | None:
    """(best searched plan, seed rule's plan) when the best front point within the select limits is a searched plan
    and the seed rule has a plan there (among `records`): the contest `select` decides by `min_gain` and the
    confirmation (`search.reeval`). None otherwise: the best point is chosen as it is."""
    if max_flops_ratio is None and max_latency_ratio is None:
        return None
    within = [r for r in front if within_limits(r, max_flops_ratio, max_latency_ratio)]
    rule = seed_rule_baseline(records, max_flops_ratio, max_latency_ratio)
    if not within or rule is None:
        return None
    best = max(within, key=lambda r: (r.hmean, -r.flops_ratio))
    return None if best.baseline else (best, rule)


def select(front: Sequence[TrialRecord], objectives: Sequence[Objective], max_flops_ratio: float | None,
           max_latency_ratio: float | None, records: Sequence[TrialRecord] = (), min_gain: float = 0.0,
           confirm_gain: float | None = None) -> Selection:
    """Highest hmean on the front within the configured cost limits (fewer FLOPs breaks ties); if no point is
    within them (or no limit is set), the knee.

    A searched plan replaces the seed rule's best plan within the limits (among `records`, on the front or not)
    only when it leads it by at least `min_gain` hmean. The study's scores of its best plan are the maximum over
    noisy recoveries, so a small lead is mostly the noise that picked it: three studies' chosen plans led the seed
    rule by +0.009 on the recovery seeds that chose them and trailed it by 0.009 on three seeds no study used
    (README "The search"); below a clear lead the rule's plan, which nothing selected, is the better bet.

    `confirm_gain` (None: no confirmation): such a lead must also hold on the confirmation seeds both plans were
    recovered with afterwards (`confirmation_lead` at least this); a plan without them is not chosen."""
    limits = [(name, limit) for name, limit in (("max_flops_ratio", max_flops_ratio),
                                                ("max_latency_ratio", max_latency_ratio)) if limit is not None]
    within = [r for r in front if within_limits(r, max_flops_ratio, max_latency_ratio)]
    if limits and within:
        described = " and ".join(f"{name}={limit:g}" for name, limit in limits)
        contest = searched_vs_rule(front, records, max_flops_ratio, max_latency_ratio)
        if contest is None:
            return Selection(max(within, key=lambda r: (r.hmean, -r.flops_ratio)), f"highest hmean with {described}")
        best, rule = contest
        lead = best.hmean - rule.hmean
        kept = (f"the seed rule's plan {rule.target_label} with {described}: the best searched plan "
                f"(trial {best.number})")
        if lead < min_gain:
            return Selection(rule, f"{kept} leads it by {lead:+.4f}, under search.select.min_gain={min_gain:g}")
        if confirm_gain is None:
            return Selection(best, f"highest hmean with {described}")
        confirmed, seeds = confirmation_lead(best, rule)
        if not seeds:
            return Selection(rule, f"{kept} leads it by {lead:+.4f}, but was not confirmed on fresh seeds (no "
                                   "confirmation recoveries of both plans finished)")
        if confirmed < confirm_gain:
            return Selection(rule, f"{kept} leads it by {lead:+.4f} on the study's seeds, but by {confirmed:+.4f} "
                                   f"on {seeds} fresh confirmation seed(s), under "
                                   f"search.select.confirm_gain={confirm_gain:g}")
        return Selection(best, f"highest hmean with {described}; its lead over the seed rule's plan (trial "
                               f"{rule.number}), {lead:+.4f}, held on {seeds} fresh confirmation seed(s): "
                               f"{confirmed:+.4f}")
    reason = "knee of the front" + (" (no front point within the select limits)" if limits else "")
    return Selection(knee(front, objectives), reason)


def dominated_with_margin(hmean: float, cost: float, others: Sequence[tuple[float, float]], margin: float) -> bool:
    """Screening rule: some other candidate costs no more and scores at least `margin` higher."""
    return any(other_cost <= cost and other_hmean >= hmean + margin for other_hmean, other_cost in others)


_COLUMNS = ("trial", "hmean", "hmean_sd", "seeds", "confirm_hmean", "precision", "recall", "agreement", "false_boxes",
            "flops_ratio", "flops_reduction", "latency_ratio", "speedup", "params", "baseline", "target_reduction",
            "reeval_of", "confirms", "feasible", "run_id")


def _row(record: TrialRecord) -> list[str]:
    values = {f.name: getattr(record, f.name) for f in fields(record)}
    values.update(trial=record.number, flops_reduction=record.flops_reduction, speedup=record.speedup,
                  confirm_hmean=record.confirm_hmean)
    out = []
    for column in _COLUMNS:
        value = values[column]
        out.append(f"{value:.6f}" if isinstance(value, float) else "" if value is None else str(value))
    return out


def write_csv(records: Sequence[TrialRecord], path: Path) -> Path:
    """One row per record (trial order) with the columns people compare."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(_COLUMNS)
        writer.writerows(_row(r) for r in sorted(records, key=lambda r: r.number))
    return path


def format_front(front: Sequence[TrialRecord], chosen: int | None) -> str:
    """The Pareto table as aligned text, fewest FLOPs first."""
    lines = [f"{'trial':>5}  {'hmean':>6}  {'± sd':>6}  {'seeds':>5}  {'agree':>6}  {'false/img':>9}  "
             f"{'FLOPs red.':>10}  {'speed-up':>8}  {'plan':<18}  mlflow run"]
    for r in sorted(front, key=lambda r: r.flops_ratio):
        base = (r.baseline or "searched") + (f" {r.target_label}" if r.target_label else "")
        mark = "  <- chosen" if r.number == chosen else ""
        spread = f"{r.hmean_sd:>6.4f}" if r.seeds > 1 else f"{'':>6}"
        lines.append(f"{r.number:>5}  {r.hmean:>6.4f}  {spread}  {r.seeds:>5}  {r.agreement:>6.4f}  "
                     f"{r.false_boxes:>9.2f}  {r.flops_reduction:>10.1%}  {r.speedup:>7.2f}x  {base:<18}  "
                     f"{r.run_id}{mark}")
    return "\n".join(lines)


def plot_front(records: Sequence[TrialRecord], front: Sequence[TrialRecord], chosen: int | None, path: Path,
               screened: Sequence[tuple[float, float]] = (), cost: str = Metric.FLOPS_RATIO) -> Path:
    """hmean against cost ratio: every complete trial, the front as a line, baselines and the chosen trial marked.

    `screened`: (screening hmean, cost ratio) of screened-out candidates, drawn faintly (they were not fine-tuned).
    A re-evaluated plan is drawn at its mean with a ±sd bar, its single seeds as small rings, confirmation seeds
    (outside the mean) as triangles.
    """
    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    if screened:
        ax.scatter([c for _, c in screened], [h for h, _ in screened], marker="x", color="0.75", s=22,
                   label="screened out (before fine-tune)")
    seeds = [r for r in records if r.reeval_of is not None and not r.confirms]
    confirmations = [r for r in records if r.confirms]
    records = [r for r in records if r.reeval_of is None]
    if seeds:
        ax.scatter([getattr(r, cost) for r in seeds], [r.hmean for r in seeds], marker="o", facecolor="none",
                   edgecolor="0.6", s=14, label="other recovery seeds")
    if confirmations:
        ax.scatter([getattr(r, cost) for r in confirmations], [r.hmean for r in confirmations], marker="^",
                   facecolor="none", edgecolor="tab:purple", s=22, label="confirmation seeds (not in the mean)")
    for r in records:
        if r.seeds > 1:
            ax.errorbar(getattr(r, cost), r.hmean, yerr=r.hmean_sd, color="0.45", capsize=3, lw=1)
    ax.scatter([getattr(r, cost) for r in records], [r.hmean for r in records], color="0.45", s=18,
               label="trials (mean over seeds)" if seeds else "trials")
    ordered = sorted(front, key=lambda r: getattr(r, cost))
    ax.plot([getattr(r, cost) for r in ordered], [r.hmean for r in ordered], "-o", color="tab:orange", ms=5,
            label="Pareto front")
    for r in records:
        if r.baseline == BASELINE_SEED_RULE:
            ax.scatter(getattr(r, cost), r.hmean, marker="s", facecolor="none", edgecolor="tab:blue", s=80)
            ax.annotate(f"seed rule {r.target_label}", (getattr(r, cost), r.hmean), fontsize=7,
                        xytext=(4, -10), textcoords="offset points", color="tab:blue")
        elif r.baseline == "unpruned":
            ax.scatter(getattr(r, cost), r.hmean, marker="D", facecolor="none", edgecolor="black", s=70)
            ax.annotate("unpruned", (getattr(r, cost), r.hmean), fontsize=7, xytext=(-40, -12),
                        textcoords="offset points")
        if r.number == chosen:
            ax.scatter(getattr(r, cost), r.hmean, marker="*", color="tab:red", s=220, zorder=5,
                       label=f"chosen (trial {r.number})")
    ax.scatter([], [], marker="s", facecolor="none", edgecolor="tab:blue", label="seed rule baselines")
    label = {Metric.FLOPS_RATIO: "inference FLOPs", Metric.LATENCY_RATIO: "CPU latency"}.get(cost, cost)
    ax.set_xlabel(f"{label}, pruned / unpruned")
    ax.set_ylabel("hmean after fine-tune")
    finite = [r.hmean for r in records if math.isfinite(r.hmean)]
    ax.set_ylim(-0.02, max([1.0, *finite]) + 0.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
