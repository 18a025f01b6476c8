"""`python -m search multirun` when things go wrong: user errors fail fast in one line (exit 2) before any trial
work and before the storage or tracking store is written; a diverging trial is recorded as failed and the study
goes on until `search.max_failures`."""
from __future__ import annotations

import json
import re

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import run_cli
from search.workers import resolve_workers
from train.errors import ConfigError
from test_search_e2e import TINY_SEARCH


@pytest.mark.parametrize("override, message", [
    ("search.space.always_skip=[backbone.nope]",
     "error: search.space.always_skip: 'backbone.nope' is not a prunable group of ppocrv4_det; list them with "
     "`python -m prune.groups model=ppocrv4_det`"),
    ("tracking.uri=http://127.0.0.1:9", "error: tracking.uri=http://127.0.0.1:9: MLflow server not reachable "
                                        "(ConnectionError)"),
    ("storage.url=postgresql://search:secret@127.0.0.1:9/optuna", "error: storage postgresql://search:***@127.0.0.1:9/"
                                                                  "optuna: cannot open ("),
    ("search.n_trials=3,4", "error: search.n_trials=3,4: sweep syntax is not supported here"),
])
def test_user_errors_are_one_line_before_any_work(tmp_path, cache_env, override, message):
    out = tmp_path / "study"
    proc = run_cli("search", ["multirun", *TINY_SEARCH, f"out_dir={out}", override], cache_env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
    assert "secret" not in proc.stderr + proc.stdout
    assert not list(out.rglob("*.db")) and not (out / "trials").exists(), "a store was written"


def test_diverging_trials_fail_with_their_reason_and_the_study_goes_on(tmp_path, cache_env):
    out = tmp_path / "study"
    proc = run_cli("search", ["multirun", *TINY_SEARCH, f"out_dir={out}", "finetune.lr=1e30", "search.n_trials=3",
                              "search.max_failures=2", "search.targets=[0.5]",
                              "search.screening.enabled=false"], cache_env)
    # The unpruned baseline is not fine-tuned, so it completes; the two fine-tuned trials diverge.
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("chosen_trial=0 hmean=")
    assert "stopping: 2 trials failed in this run (search.max_failures=2); 1 of 3 finished" in proc.stdout
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out}/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    for trial in study.trials[1:]:
        reason = trial.user_attrs["fail_reason"]
        assert reason.startswith("TrainingDiverged: loss is nan at step"), reason
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["fail_reason"] == reason
        assert "flops_ratio" in run.data.metrics                     # measured before fine-tuning diverged


@pytest.mark.parametrize("model", ["det_mv3_db", "ppocrv3_det"])
def test_the_other_zoo_models_refuse_random_weights_and_search_with_them_allowed(tmp_path, cache_env, model):
    """No weights ship for these: the search refuses to run on random weights unless told to, then runs on the
    defaults (their own stem left whole) to a chosen trial."""
    out = tmp_path / "study"
    proc = run_cli("search", ["multirun", *TINY_SEARCH, f"model={model}", f"out_dir={out}"], cache_env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: model {model} has no weights: pass model.checkpoint=<a PaddleOCR .pdparams> "
        "(model.allow_random_init=true to run on random weights anyway)")
    assert not list(tmp_path.rglob("*.db"))

    proc = run_cli("search", ["multirun", *TINY_SEARCH, f"model={model}", "model.allow_random_init=true",
                              "search.n_trials=2", "search.targets=[0.3]",
                              "search.select.min_agreement=null", f"out_dir={out}"], cache_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("chosen_trial=")
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out}/optuna.db")
    assert sum(t.state.is_finished() for t in study.trials) == 2  # the unpruned model and the seed rule's plan
    stem = "backbone.conv.conv"
    for trial in study.trials:
        assert json.loads(trial.user_attrs.get("ratios", "{}")).get(stem, 0.0) == 0.0, "the stem was cut"


def test_local_workers_share_the_study(tmp_path, cache_env):
    """`search.workers=2`: the command starts one helper worker; both run trials of the one study (SQLite storage)
    and the budget is met exactly, with one summary; then both take the re-evaluation jobs, each run once."""
    out = tmp_path / "study"
    proc = run_cli("search", ["multirun", *TINY_SEARCH, "search.workers=2", "search.n_trials=5",
                              "search.targets=[0.3]", "search.reeval.top=1", "search.reeval.seeds=2",
                              "search.select.max_flops_ratio=null", "search.select.min_agreement=null",
                              f"out_dir={out}"], cache_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("chosen_trial=")
    assert proc.stdout.count("Pareto front of study") == 1
    assert re.search(r"^cpu: \d+\.\d\d cores busy on average over \d+\.\d min \(this command and its 1 helper",
                     proc.stdout, re.M)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out}/optuna.db")
    finished = [t for t in study.trials if t.state.is_finished() and t.state != TrialState.FAIL]
    reevaluations = [(t.user_attrs["reeval_of"], t.user_attrs["recovery_seed"]) for t in finished
                     if "reeval_of" in t.user_attrs]
    assert len(finished) == 5 + 2 and len(set(reevaluations)) == len(reevaluations) == 2, reevaluations
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2, "one worker ran every trial"
    assert (out / "workers" / "helper-1.log").is_file()


@pytest.mark.parametrize("setting, cores, memory, expected", [
    ("auto", 2, 24 << 30, 2), ("auto", 32, 24 << 30, 8), ("auto", 1, 1 << 30, 1), ("3", 2, 1 << 30, 3)])
def test_workers_setting(setting, cores, memory, expected):
    assert resolve_workers(setting, cores=cores, memory=memory) == expected


@pytest.mark.parametrize("setting", ["0", "-1", "many"])
def test_bad_workers_setting_names_the_key(setting):
    with pytest.raises(ConfigError, match=f"search.workers={setting}: a count >= 1 or auto"):
        resolve_workers(setting)
