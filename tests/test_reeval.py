"""Re-evaluation of the best plans with more recovery seeds (`search.reeval`): which trials, how the seeds are
averaged into the records the front and the choice read, how jobs are claimed, and a tiny study end to end."""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from conftest import STUDY, TEST_CPU_LOCK, TINY_SEARCH, run_cli
from search.attributes import STUDY_REEVAL, TRIAL_CONFIRMS, TRIAL_RECOVERY_SEED, TRIAL_REEVAL_OF, Metric
from search.config import objectives
from search.export import select_trial, study_hmean
from search.pareto import confirmation_lead, pareto_front, select
from search.reeval import (ReevalJob, claimed_jobs, confirm_jobs, confirmation_planned, plan_jobs, planned_jobs,
                           store_confirmation, store_jobs, taken_earlier)
from search.study import Budget, count_finished, over_budget, trial_records
from train.locks import cpu_work

HMEAN_FLOPS = objectives(["hmean", "flops"])
MIN_AGREEMENT = {"min_agreement": 0.5}


def _add(study: optuna.Study, hmean: float, flops_ratio: float, state: TrialState = TrialState.COMPLETE,
         agreement: float = 0.9, **attrs) -> int:
    metrics = {Metric.HMEAN: hmean, Metric.PRECISION: hmean, Metric.RECALL: hmean, Metric.FLOPS_RATIO: flops_ratio,
               Metric.LATENCY_RATIO: flops_ratio, Metric.PARAMS: 100, Metric.AGREEMENT: agreement,
               Metric.FALSE_BOXES: 0.0}
    values = [hmean, flops_ratio] if state == TrialState.COMPLETE else None
    study.add_trial(create_trial(state=state, values=values, params={"x": hmean},
                                 distributions={"x": FloatDistribution(0, 1)},
                                 user_attrs={**{str(k): v for k, v in metrics.items()}, **attrs}))
    return len(study.trials) - 1


def _study() -> optuna.Study:
    """Trial 0 unpruned; 1-4 pruned plans; 3 is infeasible (agreement below the floor); 4 costs more than 0.5."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    _add(study, 0.96, 1.0, baseline="unpruned")
    _add(study, 0.90, 0.50)
    _add(study, 0.93, 0.48)
    _add(study, 0.99, 0.45, agreement=0.1)
    _add(study, 0.95, 0.70)
    return study


def test_the_best_feasible_plans_within_the_select_limits_get_more_seeds():
    records = trial_records(_study(), MIN_AGREEMENT)
    jobs = plan_jobs(records, top=2, seeds=2, base_seed=10, max_flops_ratio=0.5, max_latency_ratio=None)
    assert jobs == [ReevalJob(2, 11), ReevalJob(2, 12), ReevalJob(1, 11), ReevalJob(1, 12)]
    # No limits: the 0.70 plan is the best; the unpruned model never (nothing is recovered, a seed changes nothing).
    assert plan_jobs(records, 1, 1, 0, None, None) == [ReevalJob(4, 1)]
    assert plan_jobs(records, 0, 2, 0, 0.5, None) == [] and plan_jobs(records, 2, 0, 0, 0.5, None) == []

    # The seed rule's plan within the limits is re-evaluated too, even below the top: the choice compares the best
    # searched plan with it (search.pareto.select), on the same seeds.
    study = _study()
    rule = _add(study, 0.80, 0.49, baseline="seed_rule")
    _add(study, 0.97, 0.60, baseline="seed_rule")  # beyond the limit: not the baseline of this choice
    records = trial_records(study, MIN_AGREEMENT)
    assert plan_jobs(records, 1, 1, 0, 0.5, None) == [ReevalJob(2, 1), ReevalJob(rule, 1)]
    assert plan_jobs(records, 0, 1, 0, 0.5, None) == []  # top 0: re-evaluation off, the rule's plan included
    assert plan_jobs(records, 1, 1, 0, None, None) == [ReevalJob(rule + 1, 1)]  # no limits: the knee, no baseline


def test_a_plans_figures_are_the_mean_over_its_seeds_and_the_choice_follows_the_mean():
    """Trial 2 (0.93 with seed 0) falls to a mean of 0.89 after two more seeds; trial 1 (0.90) holds 0.90: the
    choice moves from 2 to 1. The re-evaluations are records of their own, never on the front, and do not count
    towards n_trials."""
    study = _study()
    before = select(pareto_front(trial_records(study, MIN_AGREEMENT), HMEAN_FLOPS), HMEAN_FLOPS, 0.5, None)
    assert before.record.number == 2
    _add(study, 0.86, 0.48, agreement=0.6, **{TRIAL_REEVAL_OF: 2, TRIAL_RECOVERY_SEED: 1})
    _add(study, 0.88, 0.48, agreement=0.3, **{TRIAL_REEVAL_OF: 2, TRIAL_RECOVERY_SEED: 2})
    _add(study, 0.91, 0.50, **{TRIAL_REEVAL_OF: 1, TRIAL_RECOVERY_SEED: 1})
    _add(study, 0.89, 0.50, **{TRIAL_REEVAL_OF: 1, TRIAL_RECOVERY_SEED: 2})
    _add(study, 0.10, 0.50, state=TrialState.FAIL, **{TRIAL_REEVAL_OF: 1, TRIAL_RECOVERY_SEED: 3})
    records = {r.number: r for r in trial_records(study, MIN_AGREEMENT)}
    two, one = records[2], records[1]
    assert two.seeds == 3 and two.hmean == pytest.approx((0.93 + 0.86 + 0.88) / 3)
    assert two.hmean_sd == pytest.approx(float(np.std([0.93, 0.86, 0.88], ddof=1)))
    assert two.agreement == pytest.approx((0.9 + 0.6 + 0.3) / 3) and two.feasible  # judged on the mean: 0.6
    assert one.seeds == 3 and one.hmean == pytest.approx(0.90)  # the failed seed is not averaged in
    assert records[5].reeval_of == 2 and records[5].seeds == 1 and records[5].hmean == pytest.approx(0.86)
    assert records[4].seeds == 1 and math.isnan(records[4].hmean_sd)
    front = pareto_front(list(records.values()), HMEAN_FLOPS)
    assert all(r.reeval_of is None for r in front)
    assert select(front, HMEAN_FLOPS, 0.5, None).record.number == 1
    assert count_finished(study) == 5 and Budget.of(study) == Budget(finished=5, running=0)
    assert not over_budget(study, 7, 6)


def test_jobs_are_planned_once_per_budget_and_a_failed_one_is_open_again():
    study = _study()
    assert planned_jobs(study, 5) is None
    jobs = store_jobs(study, 5, [ReevalJob(2, 1), ReevalJob(1, 1)])
    assert jobs == [ReevalJob(1, 1), ReevalJob(2, 1)] == planned_jobs(study, 5)
    assert store_jobs(study, 5, [ReevalJob(2, 1), ReevalJob(1, 1)]) == jobs  # a second worker writes the same
    assert planned_jobs(study, 8) is None  # a larger budget plans again, keeping the earlier jobs
    assert store_jobs(study, 8, [ReevalJob(4, 1)]) == [ReevalJob(1, 1), ReevalJob(2, 1), ReevalJob(4, 1)]
    assert study.user_attrs[STUDY_REEVAL]["n_trials"] == 8

    _add(study, 0.5, 0.5, state=TrialState.FAIL, **{TRIAL_REEVAL_OF: 1, TRIAL_RECOVERY_SEED: 1})
    assert claimed_jobs(study) == {}
    running = study.ask()
    running.set_user_attr(TRIAL_REEVAL_OF, 2)
    running.set_user_attr(TRIAL_RECOVERY_SEED, 1)
    assert claimed_jobs(study) == {ReevalJob(2, 1): TrialState.RUNNING}
    assert Budget.of(study) == Budget(finished=5, running=0)  # a re-evaluation is not part of n_trials
    second = study.ask()
    second.set_user_attr(TRIAL_REEVAL_OF, 2)
    second.set_user_attr(TRIAL_RECOVERY_SEED, 1)
    assert taken_earlier(study, second.number, ReevalJob(2, 1))
    assert not taken_earlier(study, running.number, ReevalJob(2, 1))


def test_confirmations_are_planned_once_per_budget_and_kept_out_of_the_means():
    study = _study()
    rule = _add(study, 0.88, 0.49, baseline="seed_rule")
    store_jobs(study, 5, [ReevalJob(2, 1)])
    assert not confirmation_planned(study, 5)
    jobs = confirm_jobs(2, rule, seeds=2, first_seed=3)
    assert jobs == [ReevalJob(2, 3, True), ReevalJob(2, 4, True), ReevalJob(rule, 3, True), ReevalJob(rule, 4, True)]
    held = store_confirmation(study, 5, jobs)
    assert confirmation_planned(study, 5) and held == planned_jobs(study, 5) == sorted([ReevalJob(2, 1), *jobs])
    assert store_confirmation(study, 5, jobs) == held  # a second worker plans the same
    assert store_jobs(study, 8, []) == held and not confirmation_planned(study, 8)  # a larger budget: again
    assert store_confirmation(study, 8, []) == held and confirmation_planned(study, 8)  # nothing to confirm there

    # A running confirmation is claimed as such (another seed of the plan with the same number is another job).
    running = study.ask()
    for key, value in ((TRIAL_REEVAL_OF, 2), (TRIAL_RECOVERY_SEED, 3), (TRIAL_CONFIRMS, True)):
        running.set_user_attr(key, value)
    assert claimed_jobs(study) == {ReevalJob(2, 3, True): TrialState.RUNNING}
    study.tell(running, state=TrialState.FAIL)  # failed: open again, and no figure of it is used
    assert claimed_jobs(study) == {}
    _add(study, 0.92, 0.48, **{TRIAL_REEVAL_OF: 2, TRIAL_RECOVERY_SEED: 4, TRIAL_CONFIRMS: True})
    _add(study, 0.86, 0.48, **{TRIAL_REEVAL_OF: 2, TRIAL_RECOVERY_SEED: 1})
    _add(study, 0.89, 0.49, **{TRIAL_REEVAL_OF: rule, TRIAL_RECOVERY_SEED: 3, TRIAL_CONFIRMS: True})
    _add(study, 0.90, 0.49, **{TRIAL_REEVAL_OF: rule, TRIAL_RECOVERY_SEED: 4, TRIAL_CONFIRMS: True})
    records = {r.number: r for r in trial_records(study, MIN_AGREEMENT)}
    two, rules = records[2], records[rule]
    assert two.seeds == 2 and two.hmean == pytest.approx((0.93 + 0.86) / 2)  # the study's seeds only
    assert two.confirm_hmeans == ((4, 0.92),) and rules.confirm_hmeans == ((3, 0.89), (4, 0.90))
    assert rules.seeds == 1 and rules.hmean == pytest.approx(0.88)
    assert sorted((r.reeval_of, r.hmean) for r in records.values() if r.confirms) == [
        (2, 0.92), (rule, 0.89), (rule, 0.90)]
    assert [r.number for r in pareto_front(list(records.values()), HMEAN_FLOPS) if r.confirms] == []
    lead, seeds = confirmation_lead(two, rules)  # paired: only seed 4 has both
    assert seeds == 1 and lead == pytest.approx(0.02)


def _tiny_study(tmp_path, *overrides: str) -> tuple:
    """Run a tiny study (TINY_SEARCH with `overrides`) under the tests' CPU lock: (process, out_dir, env, args,
    study)."""
    out = tmp_path / "study"
    env = dict(os.environ, OCRDET_CACHE_DIR=str(tmp_path / "cache"))
    env.setdefault("OMP_NUM_THREADS", "2")
    args = ["multirun", *TINY_SEARCH, *overrides, f"out_dir={out}"]
    with cpu_work(TEST_CPU_LOCK):
        proc = run_cli("search", args, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out, env, args, optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out}/optuna.db")


def test_a_study_re_evaluates_its_best_plan_and_chooses_by_the_mean(tmp_path):
    """Tiny study: the warm start (unpruned, seed rule at 30% and 50%), then the better seed-rule plan recovered
    with seeds 1 and 2 as trials 3 and 4: the same plan, other crops (another loss), averaged in trials.csv and
    the summary, named in MLflow; a rerun adds nothing."""
    proc, out, env, args, study = _tiny_study(
        tmp_path, "search.n_trials=3", "search.reeval.top=1", "search.reeval.seeds=2",
        "search.select.min_agreement=null", "search.select.max_flops_ratio=null")
    trials = study.trials
    assert len(trials) == 5 and all(t.state == TrialState.COMPLETE for t in trials)
    best = max(trials[1:3], key=lambda t: t.user_attrs["hmean"]).number
    assert [(t.user_attrs[TRIAL_REEVAL_OF], t.user_attrs[TRIAL_RECOVERY_SEED]) for t in trials[3:]] == [
        (best, 1), (best, 2)]
    plans = [json.loads((out / "trials" / str(n) / "plan.json").read_text())["kept"] for n in (best, 3, 4)]
    assert plans[0] == plans[1] == plans[2]
    losses = [trials[n].user_attrs["finetune_final_loss"] for n in (best, 3, 4)]
    assert len(set(losses)) == 3, losses  # other recovery seeds, other crops

    hmeans = [trials[n].user_attrs["hmean"] for n in (best, 3, 4)]
    with (out / "trials.csv").open() as handle:
        rows = {int(r["trial"]): r for r in csv.DictReader(handle)}
    assert float(rows[best]["hmean"]) == pytest.approx(float(np.mean(hmeans)), abs=1e-6)
    assert int(rows[best]["seeds"]) == 3 and rows[3]["reeval_of"] == str(best) and rows[best]["reeval_of"] == ""
    assert f"re-evaluating trial(s) {best} with 2 more recovery seed(s)" in proc.stdout
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name(STUDY).experiment_id])}
    third = runs[trials[3].user_attrs["mlflow_run_id"]]
    assert third.data.tags["mlflow.runName"].endswith(f"seed 1 of trial {best}")
    assert third.data.tags["reeval_of"] == str(best) and third.info.status == "FINISHED"
    assert runs[trials[best].user_attrs["mlflow_run_id"]].data.tags["seeds"] == "3"
    # The export names both figures: the weights it continues from (seed 0), and the mean the study chose by.
    assert study_hmean(study, select_trial(study, best, None)) == (
        f"hmean {hmeans[0]:.4f} with its weights in the study, {np.mean(hmeans):.4f} ± {np.std(hmeans, ddof=1):.4f} "
        "over 3 recovery seeds")
    assert study_hmean(study, select_trial(study, 0, None)) == f"hmean {trials[0].user_attrs['hmean']:.4f} in the study"

    again = run_cli("search", args, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == proc.stdout.strip().splitlines()[-1]
    assert len(optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out}/optuna.db").trials) == 5


def test_a_searched_lead_is_confirmed_on_fresh_seeds_before_it_replaces_the_seed_rules_plan(tmp_path):
    """Tiny study: the seed rule's -50% plan (trial 1) and one searched plan (trial 2) that leads it (both score 0
    after 2 steps at 64x64; the searched one costs fewer FLOPs) with min_gain 0: both are recovered once more with
    the fresh seed 3 (after the re-evaluation seeds 1 and 2, unused here) as confirmations, kept out of the means;
    the choice follows the paired lead there against confirm_gain. A rerun adds nothing; a rerun with another
    confirm_gain only chooses again."""
    proc, out, env, args, study = _tiny_study(
        tmp_path, "search.n_trials=3", "search.targets=[0.5]", "search.reeval.confirm_seeds=1",
        "search.select.min_gain=0", "search.select.max_flops_ratio=0.55", "search.select.min_agreement=null")
    trials = study.trials
    assert len(trials) == 5 and all(t.state == TrialState.COMPLETE for t in trials)
    assert trials[1].user_attrs["baseline"] == "seed_rule" and not trials[2].user_attrs.get("baseline")
    hmean = [t.user_attrs["hmean"] for t in trials]
    flops = [t.user_attrs["flops_ratio"] for t in trials]
    assert (hmean[2], -flops[2]) > (hmean[1], -flops[1]), "the setup no longer gives the searched plan the lead"
    confirmations = {t.user_attrs[TRIAL_REEVAL_OF]: t for t in trials[3:]}
    assert sorted(confirmations) == [1, 2]
    assert all(t.user_attrs[TRIAL_RECOVERY_SEED] == 3 and t.user_attrs[TRIAL_CONFIRMS] for t in trials[3:])
    for of, trial in confirmations.items():
        original = json.loads((out / "trials" / str(of) / "plan.json").read_text())["kept"]
        assert json.loads((out / "trials" / str(trial.number) / "plan.json").read_text())["kept"] == original
    lead = confirmations[2].user_attrs["hmean"] - confirmations[1].user_attrs["hmean"]
    expected = 2 if lead >= 0.01 else 1
    assert proc.stdout.strip().splitlines()[-1].startswith(f"chosen_trial={expected} ")
    assert "on 1 fresh confirmation seed(s)" in proc.stdout
    assert "trial 2 leads the seed rule's plan (trial 1) by" in proc.stdout

    with (out / "trials.csv").open() as handle:
        rows = {int(r["trial"]): r for r in csv.DictReader(handle)}
    for of in (1, 2):  # the confirmation stays out of the plan's figures
        assert rows[of]["seeds"] == "1" and float(rows[of]["hmean"]) == pytest.approx(hmean[of], abs=1e-6)
        assert float(rows[of]["confirm_hmean"]) == pytest.approx(confirmations[of].user_attrs["hmean"], abs=1e-6)
        assert rows[confirmations[of].number]["confirms"] == "True"
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    run = client.get_run(confirmations[2].user_attrs["mlflow_run_id"])
    assert run.data.tags["mlflow.runName"].endswith("confirmation seed 3 of trial 2")
    assert client.get_run(trials[2].user_attrs["mlflow_run_id"]).data.tags["confirm_seeds"] == "1"

    again = run_cli("search", args, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == proc.stdout.strip().splitlines()[-1]
    other = run_cli("search", [*args, f"search.select.confirm_gain={lead - 0.01}"], env)
    assert other.returncode == 0, other.stderr[-3000:]
    assert other.stdout.strip().splitlines()[-1].startswith("chosen_trial=2 ")
    assert len(optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out}/optuna.db").trials) == 5
