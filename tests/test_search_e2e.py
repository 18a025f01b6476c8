"""`python -m search multirun` end to end on a tiny study: result line, Optuna trials, MLflow runs and tags, resume.

One real study (tiny synthetic images, 1-image sensitivity probe, 2 fine-tune steps, 64x64 measurement; the
`study_run` fixture of conftest.py, shared with the export tests) is run once; the tests read what it left in the
Optuna storage and the MLflow store.
"""
from __future__ import annotations

import csv
import re

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import N_TRIALS, STUDY, TINY_SEARCH, run_cli, run_study  # noqa: F401 (TINY_SEARCH: re-export)
from search.attributes import TRIAL_ATTRS, is_trial_metric

CHOSEN_LINE = re.compile(r"^chosen_trial=(\d+) hmean=(\d+\.\d+) flops_ratio=(\d+\.\d+) latency_ratio=(\d+\.\d+) "
                         r"run_id=([0-9a-f]{32})$")

def _runs(client: MlflowClient) -> tuple[object, list]:
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    return parents[0], [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_last_line_names_the_chosen_trial(study_run):
    proc, _, _, study, _ = study_run
    match = CHOSEN_LINE.match(proc.stdout.strip().splitlines()[-1])
    assert match, proc.stdout[-2000:]
    number, hmean, flops_ratio, latency_ratio, run_id = match.groups()
    chosen = study.trials[int(number)]
    assert chosen.state == TrialState.COMPLETE and study.user_attrs["chosen_trial"] == int(number)
    assert float(hmean) == pytest.approx(chosen.user_attrs["hmean"], abs=1e-6)
    assert float(flops_ratio) == pytest.approx(chosen.user_attrs["flops_ratio"], abs=1e-6)
    assert float(latency_ratio) == pytest.approx(chosen.user_attrs["latency_ratio"], abs=1e-6)
    assert run_id == chosen.user_attrs["mlflow_run_id"]
    assert int(number) in {t.number for t in study.best_trials}
    assert "Pareto front of study 'tiny'" in proc.stdout


def test_study_has_the_budget_of_finished_trials_with_the_warm_start_first(study_run):
    _, out, _, study, _ = study_run
    trials = study.trials
    assert len(trials) == N_TRIALS
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert trials[0].user_attrs["baseline"] == "unpruned" and trials[0].user_attrs["ratios"] == "{}"
    assert trials[0].user_attrs["flops_ratio"] == 1.0
    assert [(t.user_attrs["baseline"], t.user_attrs["target_reduction"]) for t in trials[1:3]] == [
        ("seed_rule", 0.3), ("seed_rule", 0.5)]
    for t in trials[1:3]:
        assert abs(1 - t.user_attrs["flops_ratio"] - t.user_attrs["target_reduction"]) <= 0.04
    assert all("baseline" not in t.user_attrs for t in trials[3:])
    for t in trials[3:]:  # sampled: projected onto a target, which the trial's own FLOPs count confirms
        target = t.user_attrs["target_reduction"]
        assert target in (0.3, 0.5) and t.params["target"] == target
        assert 1 - target - 0.01 <= t.user_attrs["flops_ratio"] <= 1 - target
        assert t.user_attrs["flops_ratio"] == pytest.approx(t.user_attrs["projected_cost_ratio"])
    # Unrecalibrated pruned candidates score 0 at screening, so with margin 0 every sampled one that costs no less
    # than the seed rule's -50% plan is screened out; the budget counts them.
    assert any(t.state == TrialState.PRUNED for t in trials)
    for t in trials:
        assert (out / "trials" / str(t.number) / "plan.json").is_file()
        assert (out / "trials" / str(t.number) / ".hydra" / "config.yaml").is_file()
        if t.state == TrialState.PRUNED:
            assert t.user_attrs["screened_out"] is True and "hmean" not in t.user_attrs
        else:
            assert t.values == [t.user_attrs["hmean"], t.user_attrs["flops_ratio"]]


def test_mlflow_has_one_parent_and_one_comparable_child_per_trial(study_run):
    _, _, _, study, client = study_run
    parent, children = _runs(client)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["chosen_trial"] == str(study.user_attrs["chosen_trial"])
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    by_number = {int(c.data.params["trial_number"]): c for c in children}
    assert sorted(by_number) == [t.number for t in study.trials]
    assert len({frozenset(c.data.params) for c in children}) == 1         # same parameter names everywhere
    params = children[0].data.params
    assert {"sampler", "skip_set", "trial_number", "baseline"} <= set(params)
    assert params["sampler"] == "TPESampler"
    assert sum(k.startswith("ratio:") for k in params) == 36                # every prunable group of ppocrv4_det
    assert "backbone.conv1.conv" in params["skip_set"].split(",")         # the model's stem, kept whole
    for t in study.trials:
        run = by_number[t.number]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"] and run.info.status == "FINISHED"
        metrics = run.data.metrics
        assert {"flops", "flops_ratio", "flops_reduction", "params", "latency_ms", "size_bytes",
                "screen_hmean", "screen_precision", "screen_recall"} <= set(metrics)
        assert metrics["flops_ratio"] == pytest.approx(t.user_attrs["flops_ratio"])
        # Every name a trial logs or stores is declared once, in search.attributes (a typo there fails here).
        assert all(is_trial_metric(name) for name in metrics), sorted(metrics)
        assert all(is_trial_metric(name) or name in TRIAL_ATTRS for name in t.user_attrs), sorted(t.user_attrs)
        ratios = [float(v) for k, v in run.data.params.items() if k.startswith("ratio:")]
        assert (max(ratios) == 0) == (t.number == 0)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"plan", "hydra"} <= artifacts
        assert run.data.tags["screened_out"] == str(t.state == TrialState.PRUNED).lower()
        if t.state == TrialState.COMPLETE:
            assert {"hmean", "precision", "recall"} <= set(metrics) and "weights" in artifacts
        if t.state == TrialState.COMPLETE and t.number != 0:  # the unpruned model has nothing to recover
            losses = client.get_metric_history(run.info.run_id, "finetune_loss")
            assert [m.step for m in losses] == [1, 2]
    assert by_number[0].data.tags["baseline"] == "unpruned"
    assert {by_number[n].data.tags["baseline"] for n in (1, 2)} == {"seed_rule"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"prior", "pareto.csv", "pareto.png"}
    prior = {a.path for a in client.list_artifacts(parent.info.run_id, "prior")}
    assert {"prior/sensitivity.csv", "prior/sensitivity.png", "prior/seed_rule_30.json", "prior/space.json"} <= prior


def test_the_mlflow_ui_reads_like_the_pareto_table(study_run):
    """Trial runs named with their key figures, the parent run described with the front and its plot, and the
    study's datasets as inputs of the parent run, with digests."""
    _, _, _, study, client = study_run
    parent, children = _runs(client)
    for child in children:
        number = int(child.data.params["trial_number"])
        trial = study.trials[number]
        name = child.data.tags["mlflow.runName"]
        if trial.state == TrialState.COMPLETE:
            assert name == (f"trial-{number} h={trial.user_attrs['hmean']:.3f} f={trial.user_attrs['flops_ratio']:.2f}"
                            f" a={trial.user_attrs['agreement']:.2f}")
        else:
            assert name == f"trial-{number} screened f={trial.user_attrs['flops_ratio']:.2f}"
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens in "Model training"
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith(f"Chosen: **trial {study.user_attrs['chosen_trial']}**") and "pareto.png" in note
    inputs = {d.dataset.name: d for d in parent.inputs.dataset_inputs}
    assert set(inputs) == {"train", "eval", "unlabeled", "guard"}
    assert {d.tags[0].value for d in inputs.values()} == {"train", "eval", "unlabeled", "guard"}
    assert all(len(d.dataset.digest) == 16 for d in inputs.values())


def test_pareto_and_chosen_tags_mark_exactly_the_front(study_run):
    _, _, _, study, client = study_run
    _, children = _runs(client)
    front = {t.user_attrs["mlflow_run_id"] for t in study.best_trials}
    assert front and {c.info.run_id for c in children if c.data.tags["pareto"] == "true"} == front
    assert all(c.data.tags["pareto"] in ("true", "false") for c in children)
    chosen = [c.info.run_id for c in children if c.data.tags["chosen"] == "true"]
    assert chosen == [study.trials[study.user_attrs["chosen_trial"]].user_attrs["mlflow_run_id"]]


def test_rerun_adds_no_trials_and_other_settings_are_refused(study_run):
    proc, out, env, study, client = study_run
    again = run_study(out, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == proc.stdout.strip().splitlines()[-1]
    assert len(optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out}/optuna.db").trials) == N_TRIALS
    assert len(_runs(client)[1]) == N_TRIALS

    other = run_study(out, env, "finetune.steps=3")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1] == (
        f"error: finetune.steps=3, but study '{STUDY}' was created with 2: pass finetune.steps=2 to resume it, or "
        "set search.study_name=<new name> for a new study")


def test_single_run_replays_a_trial_plan(study_run):
    _, out, env, study, client = study_run
    trial = study.trials[2]
    proc = run_cli("search", [*TINY_SEARCH, f"out_dir={out}", f"trial.plan={out / 'trials' / '2' / 'plan.json'}"],
                   env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.match(r"^hmean=(\d+\.\d+) flops_ratio=(\d+\.\d+) latency_ratio=(\d+\.\d+) run_id=([0-9a-f]{32})$",
                     proc.stdout.strip().splitlines()[-1])
    assert match, proc.stdout[-2000:]
    assert float(match.group(2)) == pytest.approx(trial.user_attrs["flops_ratio"], abs=1e-6)
    run = client.get_run(match.group(4))
    assert run.data.tags["single"] == "true" and "mlflow.parentRunId" not in run.data.tags


def test_the_generalization_guard_scores_every_recovered_trial_and_gates_the_front(study_run):
    _, out, _, study, client = study_run
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    for t in complete:
        assert 0.0 <= t.user_attrs["agreement"] <= 1.0 and t.user_attrs["false_boxes"] >= 0.0
    assert complete[0].number == 0 and complete[0].user_attrs["agreement"] == 1.0  # the teacher agrees with itself
    assert (out / "guard_teacher.json").is_file()
    experiment = client.get_experiment_by_name(STUDY)
    children = [r for r in client.search_runs([experiment.experiment_id], max_results=1000)
                if "mlflow.parentRunId" in r.data.tags]  # (a single run of test_single_run... has no parent)
    assert children
    for run in children:
        if run.data.tags["screened_out"] == "false":
            assert {"agreement", "agreement_precision", "agreement_recall", "false_boxes"} <= set(run.data.metrics)
    with (out / "trials.csv").open() as handle:
        rows = {int(r["trial"]): r for r in csv.DictReader(handle)}
    with (out / "pareto.csv").open() as handle:
        front = {int(r["trial"]) for r in csv.DictReader(handle)}
    for t in complete:  # search.select.min_agreement = 0.25 by default: below it a trial is infeasible, off the front
        feasible = t.user_attrs["agreement"] >= 0.25
        assert rows[t.number]["feasible"] == str(feasible)
        assert float(rows[t.number]["agreement"]) == pytest.approx(t.user_attrs["agreement"], abs=1e-6)
        if not feasible:
            assert t.number not in front
    assert front <= {t.number for t in complete if t.user_attrs["agreement"] >= 0.25}


def test_the_sampler_is_told_each_finished_trials_constraints(study_run):
    """Optuna 5 reads constraints from the trial (`Trial.set_constraint`; its `constraints_func` is deprecated):
    every complete or screened-out trial carries the guard's value, agreement below the floor is > 0, and the
    study no longer warns about the deprecated argument."""
    proc, _, _, study, _ = study_run
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert finished
    for t in finished:
        assert set(t.constraints) == {"min_agreement"}, t.constraints
        assert t.constraints["min_agreement"] == pytest.approx(0.25 - t.user_attrs.get("agreement", 0.0))
    assert "constraints_func" not in proc.stderr + proc.stdout
