"""The export's long recovery on every core: `export.finetune.runs` recoveries of the chosen trial at once, with
recovery seeds `finetune.seed` + 0, 1, ..., and the model shipped is the average of their weights (a uniform soup).

Why: the export's recovery runs its dygraph kernels fastest on one thread (`export.finetune.threads`), which left
every other core idle for its ~20 minutes, and one recovery is one draw. Continued 400 steps from the default
study's seed-rule −50.8% trial with recovery seeds 0 / 1 / 2, agreement with the teacher on 300 held-out
guard-style images read 0.753 / 0.783 / 0.792 (in-distribution hmean 0.970 / 0.973 / 0.979). The runs start from
one set of weights with frozen BatchNorms and stay in one basin: the average of two runs' weights agreed 0.778 and
0.789, of all three 0.787 (in-distribution 0.979-0.981), at or above the runs' mean. So the shipped model is the
runs' consensus rather than one seed's luck, at no extra wall time where the cores are there (README "Export").

Run 0 is this process's own (progress bar, threads as set); runs 1.. are spawned processes that load the trial's
weights, data and teacher themselves and write their final weights beside the resumable state; a finished run is
not run again when the export is rerun.
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import paddle
from omegaconf import DictConfig, OmegaConf

from prune.groups import discover_groups
from prune.plan import PruningPlan, load_pruned
from search.objective import TrialData, load_trial_data, recover_candidate
from search.workers import resolve_workers, usable_cores
from train.inference import dygraph_threads
from train.recovery import RecoverySettings
from train.runtime import seed_everything, set_device
from train.trainer import save_weights
from train.weights import detector_from_config, strip_backup_keys

START_FILE = "start.pdparams"
PLAN_FILE = "plan.json"


def export_recovery_settings(cfg: DictConfig) -> RecoverySettings | None:
    """The export's recovery: the study's recovery settings with the export's budget; None for no recovery."""
    settings = RecoverySettings(**cfg.finetune)
    if not int(cfg.export.finetune.steps):
        return None
    settings = replace(settings, steps=int(cfg.export.finetune.steps), save_every=int(cfg.export.finetune.save_every))
    if not cfg.export.finetune.distill:  # labels only: the DB loss, no teacher terms
        settings = replace(settings, map_weight=0.0, feature_weight=0.0, backbone_weight=0.0,
                           label_weight=settings.label_weight or 1.0)
    return settings


def resolve_runs(setting: object, threads: int, device: str) -> int:
    """`export.finetune.runs`: a count >= 1, or `auto`: one per `threads` usable cores as memory allows (one on a
    GPU, where the runs would share the device)."""
    if str(setting) == "auto" and device != "cpu":
        return 1
    return resolve_workers(setting, cores=max(1, usable_cores() // max(1, threads)), key="export.finetune.runs")


def average_weights(states: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The element-wise mean of floating-point entries over `states` (summed in float64, then cast back: entries
    equal in every state, like frozen BN statistics, stay bit-identical); other entries from the first state."""
    averaged = {}
    for name, first in states[0].items():
        values = [np.asarray(s[name]) for s in states]
        if np.issubdtype(values[0].dtype, np.floating):
            averaged[name] = np.mean(np.stack(values).astype(np.float64), axis=0).astype(values[0].dtype)
        else:
            averaged[name] = values[0]
    return averaged


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """`os.environ` with `values` for the block: what a spawned process starts with."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _final_weights(folder: Path, run: int) -> Path:
    return folder / f"run-{run}.pdparams"


def recover_run(cfg: DictConfig, model: paddle.nn.Layer, plan: PruningPlan, teacher: paddle.nn.Layer,
                data: TrialData, settings: RecoverySettings, checkpoint_prefix: Path, progress: bool) -> None:
    """One recovery run of the export, in place: what run 0 does in the export's process and every spawned run in
    its own (its `settings` carry its recovery seed)."""
    seed_everything(cfg.seed)
    with dygraph_threads(int(cfg.export.finetune.threads)):
        recover_candidate(model, teacher, plan, discover_groups(teacher), data.train_set, settings, progress,
                          unlabeled=data.unlabeled, checkpoint_prefix=checkpoint_prefix)


def _run_in_child(config: dict, folder: str, run: int) -> None:
    """A spawned recovery run: the trial's start weights from `folder`, recovery seed finetune.seed + `run`."""
    cfg = OmegaConf.create({**config, "progress": False})
    folder_path = Path(folder)
    set_device(cfg.device)
    plan = PruningPlan.load(folder_path / PLAN_FILE)
    model = load_pruned(cfg.model.name, plan, folder_path / START_FILE)
    settings = export_recovery_settings(cfg)
    assert settings is not None
    recover_run(cfg, model, plan, detector_from_config(cfg.model), load_trial_data(cfg),
                replace(settings, seed=settings.seed + run), folder_path / f"run-{run}" / "last", progress=False)
    save_weights(model, _final_weights(folder_path, run))


def recover_in_runs(cfg: DictConfig, model: paddle.nn.Layer, plan: PruningPlan, settings: RecoverySettings,
                    runs: int, folder: Path, recover_here: Callable[[paddle.nn.Layer, Path], None]) -> None:
    """Recover `model` in place as the average of `runs` recoveries: `recover_here(model, checkpoint_prefix)` is
    run 0 in this process, runs 1.. are spawned with `export.finetune.threads` threads each. `folder` keeps the
    start weights, every run's resumable state and the finished runs' weights."""
    folder.mkdir(parents=True, exist_ok=True)
    if runs > 1:
        plan.save(folder / PLAN_FILE)
        if not (folder / START_FILE).is_file():
            save_weights(model, folder / START_FILE)
    threads = int(cfg.export.finetune.threads)
    context = multiprocessing.get_context("spawn")
    children = []
    config = OmegaConf.to_container(cfg, resolve=True)
    try:
        with _environment(OMP_NUM_THREADS=str(threads)):
            for run in range(1, runs):
                if not _final_weights(folder, run).is_file():
                    child = context.Process(target=_run_in_child, args=(config, str(folder), run),
                                            name=f"export-recovery-{run}")
                    child.start()
                    children.append((run, child))
        recover_here(model, folder / "last")
        for run, child in children:
            child.join()
            if child.exitcode != 0:
                raise RuntimeError(f"export recovery run {run} (finetune.seed={settings.seed + run}) exited with code "
                                   f"{child.exitcode} (its error is above); rerun the export to resume it")
    finally:
        for _, child in children:
            if child.is_alive():
                child.terminate()
                child.join()
    if runs > 1:
        states = [{k: v.numpy() for k, v in strip_backup_keys(model.state_dict()).items()}]
        states += [paddle.load(str(_final_weights(folder, run)), return_numpy=True) for run in range(1, runs)]
        model.set_state_dict({k: paddle.to_tensor(v) for k, v in average_weights(states).items()})
