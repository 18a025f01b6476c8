"""A Hydra sweeper that runs an Optuna study by ask/tell: each trial is one Hydra job, launched by any launcher.

`sweep()`:
1. checks the config, opens the storage and the MLflow tracking store (one-line errors, exit 2, before any work);
2. creates or resumes the study (`search.study_name`); the worker that creates it builds the prior once
   (sensitivity table, seed-rule plans, search space, unpruned reference measurement), opens the study's MLflow
   parent run with the config and the prior as artifacts, and enqueues the warm-start trials (unpruned + seed
   rule at each target), while other workers started on the same study wait (and take over if it is killed);
3. until the study has `search.n_trials` finished trials (complete or screened out; failures do not count, and
   this invocation stops after `search.max_failures` of them): fails the trials of workers that stopped sending
   heartbeats, asks as many trials as the budget has room for beside those other workers are running, suggests
   their plans from the space, stores the plans in the study, launches one job per trial (`trial.number=<n>`)
   while beating on them, and tells Optuna the jobs' objectives, screened-out state or failure reason;
4. summarises: Pareto front, chosen trial (`search.select`), MLflow tags, Pareto CSV and plot; the last stdout line
   is `chosen_trial=<n> hmean=<f> flops_ratio=<f> latency_ratio=<f> run_id=<id>`.

Rerunning the same command resumes: `n_trials` is the study's total, so a finished study only prints its summary.
`search.workers` (default `auto`: one per core) runs that many local workers of the command (`search/workers.py`).
Running it several times at once (on one host with `storage=journal`, on many with `storage=postgres`) shares the
study's budget among the workers.

Hydra imports every module of the `hydra_plugins` package (where this class is registered) when any Hydra app of
this repository starts; the heavy imports (Paddle, Optuna, MLflow) therefore happen inside `sweep()`.
"""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from train.cli import exit_on_user_error
from train.errors import ConfigError


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that ended (the helper workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class OptunaAskTellSweeper(Sweeper):
    """Optuna ask/tell over the pruning search space; `batch_size` trials are launched together (use > 1 with a
    parallel launcher such as joblib)."""

    def __init__(self, batch_size: int = 1) -> None:
        if batch_size < 1:
            raise ConfigError(f"hydra.sweeper.batch_size={batch_size}: must be >= 1")
        self.batch_size = batch_size
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher: Optional[Launcher] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def _reject_sweep_syntax(self, arguments: List[str]) -> None:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        for override in parser.parse_overrides(arguments):
            if override.is_sweep_override():
                raise ConfigError(f"{override.input_line}: sweep syntax is not supported here; the study chooses "
                                  "each trial's plan (search.*), every other value takes one setting")

    @exit_on_user_error
    def sweep(self, arguments: List[str]) -> Any:
        from search.runner import StudyRunner  # heavy imports, see the module docstring
        from search.workers import resolve_workers, start_helpers, stop_helpers, usable_cores, wait_helpers
        from train.inference import set_dygraph_threads
        from train.locks import CPU_LOCK_ENV, host_cpu_lock

        assert self.config is not None and self.launcher is not None
        self._reject_sweep_syntax(arguments)
        # Latency is timed while this host's other workers pause (train.locks.quiet_host); helpers inherit it.
        os.environ.setdefault(CPU_LOCK_ENV, str(host_cpu_lock()))
        started = time.perf_counter(), _cpu_seconds()
        runner = StudyRunner(self.config)
        search = self.config.search
        helpers: list = []

        def start_workers() -> None:
            """The primary, once the study is open: this process's threads and the helper workers, which measure
            part of the sensitivity scan while the prior is built and then take trials."""
            if search.helper:
                return
            workers = resolve_workers(search.workers)
            threads = max(1, usable_cores() // workers)
            set_dygraph_threads(threads)
            helpers.extend(start_helpers(workers - 1, arguments, Path(self.config.out_dir), threads))

        try:
            runner.prepare(on_open=start_workers)
            runner.run(lambda numbers, overrides: self._launch(arguments, numbers, overrides), self.batch_size)
        except BaseException:
            stop_helpers(helpers)
            raise
        wait_helpers(helpers)
        if search.helper:
            return None
        wall = time.perf_counter() - started[0]
        print(f"cpu: {(_cpu_seconds() - started[1]) / wall:.2f} cores busy on average over {wall / 60:.1f} min "
              f"(this command and its {len(helpers)} helper worker(s))", flush=True)
        return runner.finish()

    def _launch(self, arguments: Sequence[str], numbers: Sequence[int],
                overrides: Sequence[Sequence[str]]) -> Sequence[JobReturn]:
        batch = [[*arguments, *job] for job in overrides]
        self.validate_batch_is_legal(batch)
        return self.launcher.launch(batch, initial_job_idx=numbers[0])
