"""Shared fixtures: a tiny synthetic dataset (real rendered text, tiny images) and an isolated data cache."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.fixture
def cache_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a CLI subprocess whose synthetic-data cache lives in the test's tmp dir."""
    env = dict(os.environ)
    env["OCRDET_CACHE_DIR"] = str(tmp_path / "cache")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run_cli(module: str, args: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `python -m module args...` the way a user does; returns the finished process (text mode)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
