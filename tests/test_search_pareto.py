"""Pareto front, knee and selection on hand-made points; the front agrees with Optuna's own `best_trials`."""
from __future__ import annotations

import csv

import numpy as np
import optuna
import pytest

from search.config import objectives
from search.pareto import (TrialRecord, dominated_with_margin, format_front, knee, pareto_front, plot_front, select,
                           write_csv)

HMEAN_FLOPS = objectives(["hmean", "flops"])


def _record(number: int, hmean: float, flops_ratio: float, latency_ratio: float = 1.0, **kwargs) -> TrialRecord:
    return TrialRecord(number=number, hmean=hmean, precision=hmean, recall=hmean, flops_ratio=flops_ratio,
                       latency_ratio=latency_ratio, params=1000, run_id=f"run{number}", **kwargs)


def test_front_keeps_exactly_the_non_dominated_feasible_points():
    records = [
        _record(0, 0.95, 1.00, baseline="unpruned"),
        _record(1, 0.90, 0.70),
        _record(2, 0.85, 0.70),            # dominated by 1 (same cost, lower hmean)
        _record(3, 0.80, 0.50),
        _record(4, 0.60, 0.55),            # dominated by 3
        _record(5, 0.99, 0.40, feasible=False),  # would dominate everything, but violates a constraint
        _record(6, 0.30, 0.30),
    ]
    assert [r.number for r in pareto_front(records, HMEAN_FLOPS)] == [0, 1, 3, 6]


def test_front_matches_optuna_best_trials_on_random_points():
    rng = np.random.default_rng(0)
    study = optuna.create_study(directions=["maximize", "minimize"])
    records = []
    for number in range(40):
        hmean, flops = float(rng.choice([0.5, 0.6, 0.7, 0.8])), float(rng.choice([0.3, 0.5, 0.7, 1.0]))
        study.add_trial(optuna.trial.create_trial(values=[hmean, flops]))
        records.append(_record(number, hmean, flops))
    assert [r.number for r in pareto_front(records, HMEAN_FLOPS)] == sorted(t.number for t in study.best_trials)


def test_knee_is_the_bulge_of_a_convex_front():
    front = [_record(0, 0.95, 1.0), _record(1, 0.93, 0.55), _record(2, 0.70, 0.45), _record(3, 0.20, 0.30)]
    assert knee(front, HMEAN_FLOPS).number == 1


def test_knee_of_two_points_is_nearest_the_ideal_and_ties_go_to_hmean():
    assert knee([_record(0, 0.9, 0.9), _record(1, 0.8, 0.3)], HMEAN_FLOPS).number == 1
    assert knee([_record(0, 0.5, 0.25), _record(1, 0.75, 0.5)], HMEAN_FLOPS).number == 1  # a tie
    # A straight front has no bulge: every point is as good, the highest hmean wins.
    straight = [_record(0, 0.2, 0.3), _record(1, 0.5, 0.6), _record(2, 0.8, 0.9)]
    assert knee(straight, HMEAN_FLOPS).number == 2


def test_select_takes_the_best_hmean_under_the_flops_limit_else_the_knee():
    front = [_record(0, 0.95, 1.0), _record(1, 0.93, 0.55), _record(2, 0.70, 0.45), _record(3, 0.20, 0.30)]
    chosen = select(front, HMEAN_FLOPS, max_flops_ratio=0.5, max_latency_ratio=None)
    assert chosen.record.number == 2 and "max_flops_ratio=0.5" in chosen.reason
    fallback = select(front, HMEAN_FLOPS, max_flops_ratio=0.1, max_latency_ratio=None)
    assert fallback.record.number == 1 and fallback.reason.startswith("knee")
    assert select(front, HMEAN_FLOPS, None, None).record.number == 1


def test_a_searched_plan_replaces_the_seed_rules_only_with_a_clear_lead():
    rule = _record(1, 0.930, 0.49, baseline="seed_rule", target_reduction=0.5)
    records = [_record(0, 0.96, 1.0, baseline="unpruned"), rule, _record(2, 0.945, 0.48),
               _record(3, 0.99, 0.30, baseline="seed_rule", feasible=False),  # infeasible: never the baseline
               _record(4, 0.97, 0.70, baseline="seed_rule")]                  # beyond the limit: nor this one
    front = pareto_front(records, HMEAN_FLOPS)
    assert 1 not in [r.number for r in front]  # trial 2 dominates the rule's plan, by less than the noise
    kept = select(front, HMEAN_FLOPS, 0.5, None, records, min_gain=0.02)
    assert kept.record.number == 1
    assert "seed rule's plan -50%" in kept.reason and "trial 2" in kept.reason and "+0.0150" in kept.reason
    assert select(front, HMEAN_FLOPS, 0.5, None, records, min_gain=0.01).record.number == 2  # a clear lead
    assert select(front, HMEAN_FLOPS, 0.5, None, records, min_gain=0.0).record.number == 2
    assert select(front, HMEAN_FLOPS, 0.5, None, min_gain=0.02).record.number == 2  # no records: nothing to keep
    # The knee (no limits) is not a comparison at one cost: unchanged.
    knee_number = knee(front, HMEAN_FLOPS).number
    assert select(front, HMEAN_FLOPS, None, None, records, min_gain=0.02).record.number == knee_number


def test_a_searched_lead_must_hold_on_fresh_confirmation_seeds():
    """Trial 2 leads the rule's plan by +0.025 on the study's seeds; whether it is chosen depends on its paired lead
    on the confirmation seeds both plans were recovered with afterwards, which never enter the means."""
    rule = _record(1, 0.930, 0.49, baseline="seed_rule", target_reduction=0.5,
                   confirm_hmeans=((3, 0.940), (4, 0.950), (7, 0.10)))  # seed 7: the searched plan has none
    records = [_record(0, 0.96, 1.0, baseline="unpruned"), rule,
               _record(2, 0.955, 0.48, confirm_hmeans=((3, 0.945), (4, 0.940)))]
    front = pareto_front(records, HMEAN_FLOPS)
    kept = select(front, HMEAN_FLOPS, 0.5, None, records, min_gain=0.02, confirm_gain=0.01)
    assert kept.record.number == 1
    assert "+0.0250 on the study's seeds, but by -0.0025 on 2 fresh confirmation seed(s)" in kept.reason
    assert select(front, HMEAN_FLOPS, 0.5, None, records, 0.02, confirm_gain=-0.01).record.number == 2
    assert select(front, HMEAN_FLOPS, 0.5, None, records, 0.02).record.number == 2  # no confirmation asked

    held = [*records[:2], _record(2, 0.955, 0.48, confirm_hmeans=((3, 0.960), (4, 0.965), (5, 0.2)))]
    chosen = select(pareto_front(held, HMEAN_FLOPS), HMEAN_FLOPS, 0.5, None, held, 0.02, confirm_gain=0.01)
    assert chosen.record.number == 2 and "held on 2 fresh confirmation seed(s): +0.0175" in chosen.reason
    # Confirmation never rescues a lead under min_gain, and a lead without confirmation recoveries is not chosen.
    assert select(front, HMEAN_FLOPS, 0.5, None, held, 0.03, confirm_gain=0.01).record.number == 1
    bare = [*records[:2], _record(2, 0.955, 0.48)]
    unconfirmed = select(pareto_front(bare, HMEAN_FLOPS), HMEAN_FLOPS, 0.5, None, bare, 0.02, confirm_gain=0.0)
    assert unconfirmed.record.number == 1 and "not confirmed" in unconfirmed.reason


def test_select_honours_the_latency_limit_too():
    front = [_record(0, 0.9, 0.45, latency_ratio=0.95), _record(1, 0.8, 0.40, latency_ratio=0.7)]
    assert select(front, HMEAN_FLOPS, 0.5, 0.8).record.number == 1


def test_screening_needs_a_cheaper_candidate_better_by_the_margin():
    others = [(0.50, 0.6), (0.30, 0.4)]
    assert dominated_with_margin(0.35, 0.6, others, margin=0.1)        # (0.50, 0.6) beats it by 0.15
    assert not dominated_with_margin(0.45, 0.6, others, margin=0.1)    # only 0.05 better
    assert not dominated_with_margin(0.10, 0.3, others, margin=0.1)    # nobody is as cheap
    assert dominated_with_margin(0.30, 0.5, others, margin=0.0)        # equal hmean at lower cost, no margin


def test_table_csv_and_plot(tmp_path):
    records = [_record(0, 0.95, 1.0, baseline="unpruned"), _record(1, 0.9, 0.5, baseline="seed_rule",
                                                                    target_reduction=0.5),
               _record(2, 0.92, 0.5, confirm_hmeans=((3, 0.90), (4, 0.85))),
               _record(3, 0.90, 0.5, reeval_of=2, confirms=True), _record(4, 0.85, 0.5, reeval_of=2, confirms=True)]
    front = pareto_front(records, HMEAN_FLOPS)
    text = format_front(front, chosen=2)
    assert text.splitlines()[1].split()[:2] == ["2", "0.9200"] and "<- chosen" in text
    rows = list(csv.DictReader(write_csv(front, tmp_path / "pareto.csv").open()))
    assert [int(r["trial"]) for r in rows] == [0, 2]
    assert float(rows[1]["flops_reduction"]) == pytest.approx(0.5) and rows[1]["run_id"] == "run2"
    assert float(rows[1]["confirm_hmean"]) == pytest.approx(0.875) and rows[0]["confirm_hmean"] == "nan"
    every = {int(r["trial"]): r for r in csv.DictReader(write_csv(records, tmp_path / "trials.csv").open())}
    assert every[3]["confirms"] == "True" and every[3]["reeval_of"] == "2" and every[2]["confirms"] == "False"
    png = plot_front(records, front, 2, tmp_path / "pareto.png", screened=[(0.1, 0.4)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
