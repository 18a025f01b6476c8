"""Crash safety and several workers (issue 6), on real `python -m search multirun` processes.

A tiny study is killed with SIGKILL at several points (while the sensitivity scan builds the prior, while the prior
is logged to the fresh parent run, in the middle of a trial, right after a trial's fine-tune as it logs to MLflow)
and rerun each time; the last run must finish the budget with a consistent Optuna study and MLflow store. Then
two workers share one JournalStorage study and must split its budget exactly.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import optuna
from conftest import N_TRIALS, REPO, STUDY, TINY_SEARCH
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from search.attributes import BUDGET_MET_REASON, STALE_REASON
from search.heartbeat import Liveness
from search.study import Budget, fail_stale_trials, give_up, over_budget

CHOSEN_LINE = re.compile(r"^chosen_trial=\d+ hmean=\d+\.\d+ flops_ratio=\d+\.\d+ latency_ratio=\d+\.\d+ "
                         r"run_id=[0-9a-f]{32}$")
# A killed worker's trial is stale 3 s after its last beat: reruns wait seconds, not the default minute.
FAST_HEARTBEAT = ["search.heartbeat.interval=0.5", "search.heartbeat.grace=3"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WARM_START = Counter({("unpruned", None): 1, ("seed_rule", 0.3): 1, ("seed_rule", 0.5): 1})


class Worker:
    """One `python -m search multirun` process of the tiny study, its output in files (a pipe could fill up)."""

    def __init__(self, out: Path, env: dict[str, str], name: str, *extra: str):
        self.log = out.parent / name
        args = ["multirun", *TINY_SEARCH, f"search.n_trials={N_TRIALS}", f"out_dir={out}", *extra]
        with open(f"{self.log}.out", "w") as stdout, open(f"{self.log}.err", "w") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "search", *args], cwd=REPO, env=env, stdout=stdout,
                                         stderr=stderr)

    def stdout(self) -> str:
        return Path(f"{self.log}.out").read_text()

    def stderr(self) -> str:
        return Path(f"{self.log}.err").read_text()

    def kill_when(self, ready: Callable[[], bool], what: str, delay: float = 0.0, timeout: float = 240) -> None:
        """SIGKILL the worker `delay` seconds after `ready()` first holds (polled every 20 ms)."""
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"worker exited ({self.proc.returncode}) before {what}:\n" + \
                self.stderr()[-3000:]
            assert time.monotonic() < deadline, f"no {what} after {timeout} s"
            time.sleep(0.02)
        time.sleep(delay)
        assert self.proc.poll() is None, f"worker exited before it was killed {what}"
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def finish(self, timeout: float = 300) -> str:
        """Wait for a clean exit; returns stdout."""
        assert self.proc.wait(timeout=timeout) == 0, self.stderr()[-3000:]
        return self.stdout()


def _runs(client: MlflowClient) -> tuple[object, list]:
    """The study's one active parent run and its child runs."""
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [(p.info.run_id, p.info.status) for p in parents]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    return parents[0], children


def _warm_start(trials: list[FrozenTrial]) -> Counter:
    return Counter((t.user_attrs["baseline"], t.user_attrs.get("target_reduction")) for t in trials
                   if t.state in FINISHED and "baseline" in t.user_attrs)


def _check_consistent(study: optuna.Study, client: MlflowClient, failure_reasons: set[str]) -> list[FrozenTrial]:
    """What every run of a study must leave, however often it was killed: the budget of finished trials, nothing
    running, each warm-start plan finished once, one FINISHED MLflow child run per finished trial and none left
    RUNNING. Returns the failed trials."""
    trials = study.get_trials()
    assert sum(t.state in FINISHED for t in trials) == N_TRIALS
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    assert _warm_start(trials) == WARM_START
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert {t.user_attrs["fail_reason"] for t in failed} <= failure_reasons

    parent, children = _runs(client)
    assert parent.info.status == "FINISHED"
    assert not [c.info.run_name for c in children if c.info.status not in ("FINISHED", "KILLED", "FAILED")]
    finished_runs = Counter(int(c.data.params["trial_number"]) for c in children if c.info.status == "FINISHED")
    assert finished_runs == Counter(t.number for t in trials if t.state in FINISHED)
    by_id = {c.info.run_id: c for c in children}
    for t in trials:
        if t.state in FINISHED:
            assert by_id[t.user_attrs["mlflow_run_id"]].info.status == "FINISHED"
        elif "mlflow_run_id" in t.user_attrs:
            run = by_id[t.user_attrs["mlflow_run_id"]]
            assert run.info.status == "KILLED" and run.data.tags["fail_reason"] == t.user_attrs["fail_reason"]
    return failed


def test_killed_worker_resumes_and_finishes_the_budget(tmp_path, cache_env):
    out = tmp_path / "study"
    sensitivity_cache = Path(cache_env["OCRDET_CACHE_DIR"]) / "sensitivity"
    storage = f"sqlite:///{out}/optuna.db"

    # 1. In the sensitivity scan (the cache is saved after every evaluation): the half-built table is whole JSON.
    Worker(out, cache_env, "1", *FAST_HEARTBEAT).kill_when(lambda: any(sensitivity_cache.glob("*.json")),
                                                          "sensitivity cache")
    for cache in sensitivity_cache.glob("*.json"):
        assert json.loads(cache.read_text())["key"]
    assert "space" not in optuna.load_study(study_name=STUDY, storage=storage).user_attrs

    # 2. Logging the prior to the new parent run: the next worker takes the creation over (after the grace).
    Worker(out, cache_env, "2", *FAST_HEARTBEAT).kill_when(lambda: (out / "prior").exists(), "prior folder")
    assert "mlflow_parent_run_id" in optuna.load_study(study_name=STUDY, storage=storage).user_attrs

    # 3. In the middle of trial 1 (a warm-start plan): measuring, screening or fine-tuning.
    Worker(out, cache_env, "3", *FAST_HEARTBEAT).kill_when(lambda: (out / "trials" / "1" / "plan.json").exists(),
                                                          "trial 1's plan", delay=1.5)

    # 4. Right after trial 2's fine-tune and evaluation, while its weights go to MLflow.
    Worker(out, cache_env, "4", *FAST_HEARTBEAT).kill_when(
        lambda: (out / "trials" / "2" / "finetuned.pdparams").exists(), "trial 2's weights")

    stdout = Worker(out, cache_env, "5", *FAST_HEARTBEAT).finish()
    assert CHOSEN_LINE.match(stdout.strip().splitlines()[-1]), stdout[-2000:]
    study = optuna.load_study(study_name=STUDY, storage=storage)
    failed = _check_consistent(study, MlflowClient(f"sqlite:///{out}/mlflow.db"), {STALE_REASON})
    # Trial 1 was killed mid-trial, so its plan ran again under another number.
    assert 1 in {t.number for t in failed}
    assert study.trials[1].user_attrs["baseline"] == "seed_rule"
    assert "stopped building the prior of study 'tiny'" in (tmp_path / "2.out").read_text()


def test_two_workers_share_one_journal_study(tmp_path, cache_env):
    out = tmp_path / "study"
    n_trials = N_TRIALS + 1
    # Grace well above any late beat of a busy host: here no worker dies, so no trial may be taken for stale.
    settings = ["storage=journal", f"search.n_trials={n_trials}", "search.heartbeat.interval=0.5",
                "search.heartbeat.grace=20"]
    first = Worker(out, cache_env, "first", *settings)
    # The second starts once the first has created the study (past its input checks, which render the shared
    # synthetic data cache), so it waits for the first's prior rather than building its own.
    journal = out / "optuna.journal"
    deadline = time.monotonic() + 120
    while not (journal.exists() and journal.stat().st_size > 0):
        assert first.proc.poll() is None and time.monotonic() < deadline, first.stderr()[-3000:]
        time.sleep(0.05)
    second = Worker(out, cache_env, "second", *settings)
    outputs = [first.finish(), second.finish()]

    last_lines = {o.strip().splitlines()[-1] for o in outputs}
    assert len(last_lines) == 1 and CHOSEN_LINE.match(last_lines.pop()), outputs
    assert sum("search space:" in o for o in outputs) == 1                  # the prior was built once

    study = optuna.load_study(study_name=STUDY, storage=JournalStorage(JournalFileBackend(str(journal))))
    trials = study.get_trials()
    assert sum(t.state in FINISHED for t in trials) == n_trials
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    assert _warm_start(trials) == WARM_START
    assert {t.user_attrs["fail_reason"] for t in trials if t.state == TrialState.FAIL} <= {BUDGET_MET_REASON}
    finished = [t for t in trials if t.state in FINISHED]
    assert len({t.user_attrs["worker"] for t in finished}) == 2               # both did trials
    sampled = [json.dumps(t.params, sort_keys=True) for t in finished if "baseline" not in t.user_attrs]
    assert len(sampled) == n_trials - 3 and len(set(sampled)) == len(sampled)

    parent, children = _runs(MlflowClient(f"sqlite:///{out}/mlflow.db"))
    assert parent.info.status == "FINISHED"
    assert sorted(int(c.data.params["trial_number"]) for c in children) == [t.number for t in finished]
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.info.run_id for c in children} == {t.user_attrs["mlflow_run_id"] for t in finished}


def _two_workers(tmp_path: Path) -> tuple[optuna.Study, optuna.Study]:
    """One journal study seen by two workers, each through its own storage object as separate processes would."""
    path = str(tmp_path / "optuna.journal")
    first = optuna.create_study(storage=JournalStorage(JournalFileBackend(path)), study_name="s")
    return first, optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(path)))


def test_a_trial_asked_past_the_budget_is_the_one_given_back(tmp_path):
    a, b = _two_workers(tmp_path)
    # Budget 2, one finished: both saw room for the last trial and asked at once; the lower number keeps it.
    a.tell(a.ask(), 1.0)
    mine, theirs = a.ask(), b.ask()
    assert not over_budget(a, mine.number, 2) and over_budget(b, theirs.number, 2)
    assert give_up(b, theirs.number, BUDGET_MET_REASON) is not None
    assert not over_budget(a, mine.number, 2)
    a.tell(mine, 1.0)
    assert Budget.of(b) == Budget(finished=2, running=0)


def test_a_stale_warm_start_trial_is_failed_once_and_enqueued_again(tmp_path):
    a, b = _two_workers(tmp_path)
    a.enqueue_trial({"x": 1.0}, user_attrs={"baseline": "seed_rule", "target_reduction": 0.3})
    killed = a.ask()
    assert killed.suggest_float("x", 0, 2) == 1.0
    killed.set_user_attr("heartbeat", time.time() - 10)
    alive = a.ask()
    alive.set_user_attr("heartbeat", time.time())

    liveness = Liveness(interval=0.5, grace=3)
    assert [t.number for t in fail_stale_trials(b, liveness)] == [killed.number]
    assert fail_stale_trials(a, liveness) == []                     # already failed: nobody fails it twice
    assert a.trials[killed.number].user_attrs["fail_reason"] == STALE_REASON
    assert a.trials[alive.number].state == TrialState.RUNNING
    rerun = b.ask()                                                 # the plan runs again, with its tags
    assert rerun.suggest_float("x", 0, 2) == 1.0
    assert b.trials[rerun.number].user_attrs == {"baseline": "seed_rule", "target_reduction": 0.3}
