"""Our own bugs reach the user as crashes (traceback, exit 1), never as user errors (one line, exit 2).

A trial that raises something other than a `UserError` keeps its traceback in the trial's log, its MLflow run
(`traceback.txt`, `fail_reason`), the Optuna trial's `fail_reason` and on stderr; the study then ends with
`TrialsCrashed`, which Hydra reports with its traceback and exit code 1.
"""
from __future__ import annotations

import optuna
import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

import train.data.source  # noqa: F401  (registers the data.generator schema the data configs use)
from search.app import CRASH_FILE, TrialFailed, _run_tracked
from search.attributes import TRIAL_FAIL_REASON
from search.runner import StudyRunner, TrialsCrashed
from search.tracking import Tracker
from train.errors import DataError, UserError


def _tracker(tmp_path) -> Tracker:
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "crashes", str(tmp_path / "artifacts"))
    tracker.check()
    return tracker


def test_a_bug_in_a_trial_fails_its_run_with_the_traceback(tmp_path):
    tracker = _tracker(tmp_path)
    run = tracker.start_run("trial-0")
    broken = OmegaConf.create({"seed": 0})  # no data/model keys: loading the trial data is an internal error
    with pytest.raises(TrialFailed) as caught:
        _run_tracked(run, broken, tmp_path)
    failed = caught.value
    assert failed.reason.startswith("crash: ") and failed.traceback and "Traceback" in failed.traceback
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    info = client.get_run(failed.run_id)
    assert info.info.status == "FAILED" and info.data.tags["fail_reason"] == failed.reason
    assert "Traceback" in (tmp_path / CRASH_FILE).read_text()
    assert CRASH_FILE in [a.path for a in client.list_artifacts(failed.run_id)]


def test_a_user_error_in_a_trial_stays_one_line(tmp_path):
    tracker = _tracker(tmp_path)
    run = tracker.start_run("trial-0")
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("search", overrides=["data=icdar", f"data.root={tmp_path / 'nope'}", "data.label_file=x.txt"])
    with pytest.raises(TrialFailed) as caught:
        _run_tracked(run, cfg, tmp_path)
    assert isinstance(caught.value.__cause__, DataError)
    assert caught.value.traceback is None and caught.value.reason.startswith("DataError: ")
    assert not (tmp_path / CRASH_FILE).exists()


def _runner(tmp_path) -> StudyRunner:
    cfg = OmegaConf.create({"search": {"study_name": "s", "objectives": ["hmean", "flops"]}, "out_dir": str(tmp_path)})
    runner = StudyRunner(cfg)
    runner.study = optuna.create_study(directions=["maximize", "minimize"])
    return runner


def _failed_job(exc: BaseException) -> JobReturn:
    job = JobReturn()
    job.status = JobStatus.FAILED
    job._return_value = exc
    return job


def test_the_runner_records_crashes_with_their_traceback_and_user_errors_in_one_line(tmp_path, capsys):
    runner = _runner(tmp_path)
    try:
        raise AttributeError("'NoneType' object has no attribute 'hmean'")
    except AttributeError as exc:
        bug = exc
    crashed, mistaken, crashed_in_run = (runner.study.ask() for _ in range(3))
    runner._report(crashed, _failed_job(bug))
    runner._report(mistaken, _failed_job(DataError("label file not found: x.txt")))
    runner._report(crashed_in_run, _failed_job(TrialFailed("crash: KeyError: 'maps'", "run", "Traceback (...)\n")))
    trials = runner.study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    first = trials[0].user_attrs[TRIAL_FAIL_REASON]
    assert first.startswith("AttributeError: ") and "Traceback (most recent call last)" in first
    assert trials[1].user_attrs[TRIAL_FAIL_REASON] == "DataError: label file not found: x.txt"
    assert trials[2].user_attrs[TRIAL_FAIL_REASON].startswith("crash: KeyError: 'maps'\nTraceback")
    assert runner.crashed == [0, 2] and runner.failures == 3
    assert "trial 0 crashed" in capsys.readouterr().err


def test_a_study_whose_trials_all_crashed_ends_as_a_crash(tmp_path):
    runner = _runner(tmp_path)
    tracker = _tracker(tmp_path)
    runner.cfg = OmegaConf.merge(runner.cfg, {"search": {"constraints": {"max_flops_ratio": None,
                                                                         "max_latency_ratio": None, "min_hmean": None},
                                                         "select": {"min_agreement": None}}})
    runner.parent = tracker.start_run("study")
    runner._report(runner.study.ask(), _failed_job(ZeroDivisionError("division by zero")))
    with pytest.raises(TrialsCrashed, match=r"trial\(s\) 0 crashed"):
        runner.finish()
    assert not issubclass(TrialsCrashed, UserError)  # so Hydra reports it with its traceback and exit 1
