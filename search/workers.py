"""Local parallel workers: `search.workers` processes of one command share the study, so every core works.

A trial's recovery runs Paddle's dygraph kernels, which keep about one core busy; one worker per core is what
fills a machine. The invocation the user started is the primary: it creates the study (prior, warm start), then
starts `workers - 1` helpers, each the same command with `search.helper=true`. Every worker asks, runs and tells
trials against the shared budget (the same coordination as workers on several hosts, README "Scale-out"); the
helpers stop when the budget is met and print no summary, the primary waits for them and summarises.
Each worker's dygraph kernels get `cores // workers` threads, so workers do not oversubscribe the cores.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from train.errors import ConfigError

log = logging.getLogger(__name__)
WORKER_KEYS = ("search.workers=", "search.helper=")
MEMORY_PER_WORKER = 3 << 30  # peak RSS of one worker on the default study: 2.5 GB


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which container limits set), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(setting: object, cores: int | None = None, memory: int | None = None,
                    key: str = "search.workers") -> int:
    """`search.workers` (or another count named `key`): a count >= 1, or `auto`: one per usable core (or per
    `cores`), as many as the memory holds at 3 GB each."""
    if str(setting) == "auto":
        cores = usable_cores() if cores is None else cores
        if memory is None:
            memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return max(1, min(cores, memory // MEMORY_PER_WORKER))
    try:
        count = int(str(setting))
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"{key}={setting}: a count >= 1 or auto")
    return count


def start_helpers(count: int, arguments: Sequence[str], out_dir: Path, threads: int) -> list[subprocess.Popen]:
    """`count` helper workers: this command with `search.helper=true`, logging to `out_dir/workers/`."""
    folder = out_dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    kept = [a for a in arguments if not a.startswith(WORKER_KEYS)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    helpers = []
    for index in range(1, count + 1):
        with open(folder / f"helper-{index}.log", "w") as output:
            helpers.append(subprocess.Popen(
                [sys.executable, "-m", "search", "multirun", *kept, "search.workers=1", "search.helper=true"],
                stdout=output, stderr=subprocess.STDOUT, env=env))
    log.info("started %d helper worker(s) (logs in %s), %d dygraph thread(s) each", count, folder, threads)
    return helpers


def wait_helpers(helpers: Sequence[subprocess.Popen]) -> None:
    """Wait for the helpers; one that failed is reported (its trials are the study's, failed or finished)."""
    for index, helper in enumerate(helpers, start=1):
        code = helper.wait()
        if code != 0:
            log.warning("helper worker %d exited with code %d (its log: workers/helper-%d.log)", index, code, index)


def stop_helpers(helpers: Sequence[subprocess.Popen], grace: float = 60.0) -> None:
    """Interrupt the helpers as Ctrl-C would (they fail their running trials and end their MLflow runs KILLED),
    then kill any that does not stop within `grace` seconds."""
    for helper in helpers:
        if helper.poll() is None:
            helper.send_signal(signal.SIGINT)
    for helper in helpers:
        try:
            helper.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            helper.kill()
