"""Scale-out: two `python -m search multirun` workers at once on one study, sharing only a PostgreSQL Optuna storage
and an `mlflow server` (both throwaway, on loopback: tests/services.py).

Each worker has its own `out_dir` and data/sensitivity cache, as on two hosts. Together they must spend the study's
budget exactly once: `search.n_trials` finished trials, the warm start run once, no two sampled trials alike, one
MLflow parent run with one child per finished trial, nothing left running, and the storage password nowhere in
what the workers print, write or log.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
from conftest import REPO, STUDY, TINY_SEARCH
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from services import mlflow_server, postgres  # noqa: F401 (fixtures)

from search.attributes import (BUDGET_MET_REASON, STUDY_PARENT_RUN, TRIAL_BASELINE, TRIAL_FAIL_REASON, TRIAL_RUN_ID,
                               TRIAL_TARGET)

N_TRIALS = 6  # 3 warm-start trials (TINY_SEARCH: unpruned, seed rule at 0.3 and 0.5) + 3 sampled
WORKERS = 2
WORKER_TIMEOUT_S = 1200
# storage=postgres reads the URL (password included) from the environment, never the command line: Hydra saves the
# command line's overrides in every trial folder, and the search logs those folders to MLflow.
URL_VARIABLE = "SEARCH_STORAGE_URL"


def _start_worker(index: int, root: Path, storage_url: str, tracking_uri: str) -> subprocess.Popen:
    env = dict(os.environ, OCRDET_CACHE_DIR=str(root / f"cache-{index}"), **{URL_VARIABLE: storage_url})
    env.setdefault("OMP_NUM_THREADS", "2")
    args = [*TINY_SEARCH, f"search.n_trials={N_TRIALS}", f"out_dir={root / f'worker-{index}'}",
            "storage=postgres", f"tracking.uri={tracking_uri}", "tracking.artifact_location=null"]
    return subprocess.Popen([sys.executable, "-m", "search", "multirun", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(workers: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of every worker; all of them are killed if one overruns the timeout."""
    results = []
    try:
        for proc in workers:
            out, err = proc.communicate(timeout=WORKER_TIMEOUT_S)
            results.append((proc.returncode, out, err))
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _files_containing(secret: str, *folders: Path) -> list[Path]:
    needle = secret.encode()
    return [p for folder in folders for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_two_workers_share_one_study_on_postgres_and_an_mlflow_server(postgres, mlflow_server, tmp_path):  # noqa: F811
    workers = [_start_worker(i, tmp_path, postgres.url, mlflow_server.uri) for i in range(WORKERS)]
    results = _finish(workers)
    for i, (code, out, err) in enumerate(results):
        assert code == 0, f"worker {i} exited {code}:\n{err[-3000:]}"

    study = optuna.load_study(study_name=STUDY, storage=postgres.url)
    trials = study.get_trials(deepcopy=False)
    by_state = Counter(t.state for t in trials)
    # The only failure allowed is a trial given back unrun when two workers asked for the last place at once.
    reasons = {t.number: t.user_attrs.get(TRIAL_FAIL_REASON) for t in trials if t.state == TrialState.FAIL}
    assert set(reasons.values()) <= {BUDGET_MET_REASON}, f"failed trials: {reasons}"
    assert by_state[TrialState.RUNNING] == by_state[TrialState.WAITING] == 0, by_state
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == N_TRIALS, by_state

    # The warm start is enqueued once per study, not once per worker.
    warm = Counter((t.user_attrs[TRIAL_BASELINE], t.user_attrs.get(TRIAL_TARGET)) for t in trials
                   if TRIAL_BASELINE in t.user_attrs)
    assert warm == {("unpruned", None): 1, ("seed_rule", 0.3): 1, ("seed_rule", 0.5): 1}
    sampled = [t for t in finished if TRIAL_BASELINE not in t.user_attrs]
    assert len({tuple(sorted(t.params.items())) for t in sampled}) == len(sampled), [t.params for t in sampled]

    # Both workers ran trials (it scaled out), in folders of their own, each trial in exactly one of them.
    folders = [{int(p.name) for p in (tmp_path / f"worker-{i}" / "trials").glob("*") if (p / "plan.json").is_file()}
               for i in range(WORKERS)]
    assert all(folders), folders
    assert not set.intersection(*folders) and set.union(*folders) == {t.number for t in finished}, folders

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [p.info.run_id for p in parents] == [study.user_attrs[STUDY_PARENT_RUN]]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(int(c.data.params["trial_number"]) for c in children) == sorted(t.number for t in finished)
    by_run = {c.info.run_id: int(c.data.params["trial_number"]) for c in children}
    assert {t.user_attrs[TRIAL_RUN_ID]: t.number for t in finished} == by_run
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    assert {r.info.status for r in runs} == {"FINISHED"}
    # Artifacts went through the server (experiments have no artifact location of their own).
    assert all(any(a.path == "plan" for a in client.list_artifacts(c.info.run_id)) for c in children)
    assert any(mlflow_server.artifacts.rglob("plan.json"))

    # The password: masked where the URL is shown, absent everywhere else.
    secret = postgres.password
    output = "".join(out + err for _, out, err in results)
    assert f"{postgres.user}:***@{postgres.host}:{postgres.port}" in output
    assert secret not in output
    assert all(secret not in str(v) for r in runs for v in [*r.data.params.values(), *r.data.tags.values()])
    assert _files_containing(secret, *(tmp_path / f"worker-{i}" for i in range(WORKERS)),
                             mlflow_server.artifacts) == []
    assert secret.encode() not in mlflow_server.backend_db.read_bytes()
