"""Shared fixtures: a tiny synthetic dataset (real rendered text, tiny images), an isolated data cache, and one
tiny finished search study shared by the search and export tests."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from train.locks import cpu_work, quiet_host

REPO = Path(__file__).resolve().parents[1]

# Tiny but real: a few 160-192 px images with 1-2 rendered lines each.
TINY_SYNTHETIC = [
    "data.generator.n_train=4",
    "data.generator.n_eval=3",
    "data.generator.width_range=[160,192]",
    "data.generator.height_range=[160,192]",
    "data.generator.lines_range=[1,2]",
    "data.generator.font_size_range=[20,32]",
]

# The built-in unlabelled pool, as tiny: recovery's and the guard's images (data.pool is every data config's).
TINY_POOL = [
    "data.pool.n_recovery=6",
    "data.pool.n_guard=3",
    "data.pool.width_range=[160,192]",
    "data.pool.height_range=[160,192]",
    "data.pool.font_size_range=[16,48]",
]


@pytest.fixture
def cache_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a CLI subprocess whose synthetic-data cache lives in the test's tmp dir."""
    env = dict(os.environ)
    env["OCRDET_CACHE_DIR"] = str(tmp_path / "cache")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run_cli(module: str, args: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `python -m module args...` the way a user does; returns the finished process (text mode)."""
    return subprocess.run([sys.executable, "-m", module, *args], check=False, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


# The test run's own CPU lock (train.locks' turnstile, apart from the one studies use): a test marked `timing`
# asserts on a latency it measures, so it holds the lock exclusively while every other test of the run, on any
# xdist worker, holds it shared; the timing test waits for the running ones and the others wait for it. Beside a
# worker that trained, the unpruned model timed against itself read 1.10 (interval 1.06-1.14); alone, 0.99-1.02.
TEST_CPU_LOCK = Path(tempfile.gettempdir()) / f"ocrdet-tests-{os.getuid()}.lock"


@pytest.fixture(autouse=True)
def _cpu_turn(request: pytest.FixtureRequest):
    with (quiet_host if request.node.get_closest_marker("timing") else cpu_work)(TEST_CPU_LOCK):
        yield


# A tiny study of `python -m search multirun`: shared by the search and export tests.
STUDY = "tiny"
N_TRIALS = 5
TINY_SEARCH = [
    *TINY_SYNTHETIC,
    *TINY_POOL,
    # One probe image: a labelled one, as one image of the pool may be text-free (a flat table, no seed rule).
    "sensitivity.images=1", "sensitivity.split=train", "sensitivity.ratios=[0.3,0.6]",
    "sensitivity.limit_side_len=96",
    "finetune.steps=2", "finetune.batch_size=2", "finetune.crop_size=64", "finetune.warmup_steps=0",
    "prune.input_size=[64,64]", "measure.runs=1", "measure.warmup=0", "measure.max_rounds=12",
    "search.targets=[0.3,0.5]", "search.screening.max_images=2",
    "search.screening.bn_batches=0", "search.screening.margin=0", "progress=false",
    "search.workers=1",  # one process per study here; test_search_cli runs the parallel default
    "search.reeval.top=0", "search.reeval.confirm_seeds=0",  # no re-evaluations here; test_reeval runs them
    f"search.study_name={STUDY}",
]


def run_study(out: Path, env: dict[str, str], *extra: str):
    return run_cli("search", ["multirun", *TINY_SEARCH, f"search.n_trials={N_TRIALS}", f"out_dir={out}", *extra], env)


@pytest.fixture(scope="session")
def study_run(tmp_path_factory):
    """A finished tiny study: (process, out_dir, env, study, MLflow client)."""
    root = tmp_path_factory.mktemp("search")
    env = dict(os.environ, OCRDET_CACHE_DIR=str(root / "cache"))
    env.setdefault("OMP_NUM_THREADS", "2")
    out = root / "study"
    with cpu_work(TEST_CPU_LOCK):
        proc = run_study(out, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out}/optuna.db")
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    return proc, out, env, study, client


# Fixtures whose tests start the project's commands in subprocesses (or share a study made that way).
_SUBPROCESS_FIXTURES = {"cache_env", "study_run", "chosen_export", "scanned", "mlflow_server", "postgres"}


# Session fixtures too costly to build once per xdist worker: every test file that uses one runs on one worker.
_SHARED_SESSION_FIXTURES = ("study_run",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `slow` every test that runs a command in a subprocess, by its fixtures or a `run_cli` call; put each
    test file in one xdist group (its module fixtures are built once), and the files sharing a costly session
    fixture in one group together (`-n auto --dist loadgroup`, pyproject's addopts)."""
    group_of_module: dict[str, str] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        group_of_module.setdefault(module, module)
        shared = [name for name in _SHARED_SESSION_FIXTURES if name in getattr(item, "fixturenames", ())]
        if shared:
            group_of_module[module] = shared[0]
    for item in items:
        source = getattr(getattr(item, "function", None), "__code__", None)
        calls_cli = source is not None and "run_cli" in source.co_names
        if calls_cli or _SUBPROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        item.add_marker(pytest.mark.xdist_group(group_of_module[item.nodeid.split("::")[0]]))
