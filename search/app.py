"""The Hydra task of `python -m search` (`task`): one trial, either a job of the study's sweep or a single run by hand.

In a sweep (`python -m search multirun`) the sweeper sets `trial.number`; the job reads that trial's plan from
the study, runs it (`search.objective`), logs a child run under the study's MLflow parent run (its id recorded on
the trial at once, so that a killed worker's run can be found and ended) and returns a `TrialOutcome` for the
sweeper to tell Optuna. A failure is logged as a FAILED run and re-raised as
`TrialFailed` (carrying the reason and the run id); Hydra hands it to the sweeper, which marks the trial failed
and goes on.

Without multirun, `python -m search [trial.plan=plan.json | trial.ratios={group: ratio}]` evaluates one plan
(default: the unpruned model) the same way, logs a standalone run in the study's experiment and prints
`hmean=<f> flops_ratio=<f> latency_ratio=<f> run_id=<id>` as its last line.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from prune.measure import Measurement
from prune.plan import PruningPlan, check_plan_fits, make_plan
from search.attributes import (STUDY_REFERENCE, STUDY_SPACE, TRIAL_FAIL_REASON, TRIAL_RUN_ID, TRIAL_STOPPED_AT,
                               Metric)
from search.config import mask_url, objectives
from search.objective import (PLAN_FILE, WEIGHTS_FILE, RungCheck, TrialData, TrialResult, load_trial_data,
                              measure_model, run_candidate)
from search.rungs import RungJudge, RungRule
from search.space import SearchSpace
from search.study import TrialSpec, load_study, make_storage, screening_points, set_trial_attr, trial_spec
from search.tracking import RunLogger, Tracker
from train.cli import exit_on_user_error, print_result_line
from train.errors import ConfigError, UserError
from train.runtime import seed_everything, set_device
from train.weights import detector_from_config

log = logging.getLogger(__name__)
CRASH_FILE = "traceback.txt"  # in the trial's folder and its MLflow run, when the trial crashed


@dataclass
class TrialOutcome:
    """What a finished job hands back to the sweeper (picklable, for launchers in other processes)."""

    number: int
    run_id: str
    screened_out: bool
    metrics: dict[str, float]
    stopped_at: int | None = None  # recovery steps at the rung the trial was stopped at (search.rungs)


class TrialFailed(Exception):
    """A trial that raised; `reason` is one line for the study, `run_id` its FAILED MLflow run. `traceback` is set
    when the cause was not a `UserError`: a bug of ours (a crash), which must reach the user as one."""

    def __init__(self, reason: str, run_id: str, traceback: str | None = None):
        super().__init__(reason, run_id, traceback)
        self.reason = reason
        self.run_id = run_id
        self.traceback = traceback

    def __str__(self) -> str:
        return self.reason


def tracker_for(cfg: DictConfig) -> Tracker:
    return Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_location)


def trial_params(cfg: DictConfig, ratios: dict[str, float], groups: list[str], skip_set: list[str]) -> dict:
    """The same parameter names for every run of a study, so MLflow can compare them."""
    return {"sampler": cfg.search.sampler._target_.rsplit(".", 1)[-1], "study": cfg.search.study_name,
            "skip_set": ",".join(skip_set), "n_skipped": len(skip_set),
            **{f"ratio:{g}": round(ratios.get(g, 0.0), 6) for g in groups}}


def _log_result(run: RunLogger, result: TrialResult, out_dir: Path, log_weights: bool) -> None:
    run.log_metrics(result.metrics())
    run.log_artifact(out_dir / PLAN_FILE, "plan")
    hydra_dir = out_dir / ".hydra"
    if hydra_dir.is_dir():
        run.log_artifact(hydra_dir, "hydra")
    if log_weights and (out_dir / WEIGHTS_FILE).exists():
        run.log_artifact(out_dir / WEIGHTS_FILE, "weights")
    run.set_tags({"screened_out": result.screened_out})
    if result.stopped_at is not None:
        run.set_tags({TRIAL_STOPPED_AT: result.stopped_at})


def _run_tracked(run: RunLogger, cfg: DictConfig, out_dir: Path, data: TrialData | None = None,
                 **candidate) -> TrialResult:
    """`run_candidate` with everything logged to `run`; a failure ends the run FAILED and raises TrialFailed, an
    interrupt ends it KILLED. Without `data` it is loaded inside the run, so that a dataset broken since the study
    started fails this trial's run rather than the job."""
    try:
        seed_everything(cfg.seed)
        data = load_trial_data(cfg) if data is None else data
        result = run_candidate(cfg, data, out_dir=out_dir, sink=run, **candidate)
        _log_result(run, result, out_dir, cfg.tracking.log_weights)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        trace = None
        if not isinstance(exc, UserError):  # a crash: its traceback goes to the job's log and the run
            trace = traceback.format_exc()
            log.error("trial crashed (a bug in this project, not in your input):\n%s", trace)
            (out_dir / CRASH_FILE).write_text(trace)
            run.log_artifact(out_dir / CRASH_FILE)
            reason = f"crash: {reason}"
        run.set_tags({"fail_reason": reason})
        run.end("FAILED")
        raise TrialFailed(reason, run.run_id, trace) from exc
    except BaseException:  # Ctrl-C: the run must not stay RUNNING forever
        run.end("KILLED")
        raise
    run.end("FINISHED")
    return result


def run_title(number: int, result: TrialResult) -> str:
    """A trial run's name with its key figures, so the UI's run list reads like the Pareto table:
    `trial-5 h=0.832 f=0.48 a=0.61` (hmean, FLOPs ratio, teacher agreement), `trial-7 screened f=0.60` or
    `trial-8 stopped@20 h=0.412 f=0.50` (its hmean at the rung it was stopped at)."""
    if result.stopped_at is not None:
        return f"trial-{number} stopped@{result.stopped_at} h={result.rungs[result.stopped_at]:.3f} " \
               f"f={result.flops_ratio:.2f}"
    if result.screened_out or result.scores is None:
        return f"trial-{number} screened f={result.flops_ratio:.2f}"
    title = f"trial-{number} h={result.scores.hmean:.3f} f={result.flops_ratio:.2f}"
    return title if result.guard is None else f"{title} a={result.guard.agreement:.2f}"


def release_freed_memory() -> None:
    """Hand memory a finished trial freed back to the OS.

    Paddle's CPU tensors come from glibc malloc, which keeps freed blocks in its arenas; with Hydra's basic
    launcher every trial runs in the sweeper's process, which then grew by ~350 MB per trial (measured on
    ppocrv4_det with crops of 320), ~150 MB with this. Not glibc (e.g. musl, macOS): nothing to do.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def run_study_trial(cfg: DictConfig) -> TrialOutcome:
    """A sweep job: the study's trial `cfg.trial.number`."""
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        raise ConfigError("trial.number is set by the sweeper; run `python -m search multirun`, or evaluate a plan "
                          "with trial.plan=<plan.json>")
    set_device(cfg.device)
    study = load_study(make_storage(cfg.storage), cfg.search.study_name)
    spec: TrialSpec = trial_spec(study, cfg.trial.number)
    space = SearchSpace.from_json(study.user_attrs[STUDY_SPACE])
    reference = Measurement.from_json(study.user_attrs[STUDY_REFERENCE])
    cost_metric = next(o.metric for o in objectives(list(cfg.search.objectives)) if o.metric != Metric.HMEAN)
    # Baselines are always fine-tuned: they are what the study must beat; a re-evaluation's plan passed already.
    front = None if spec.baseline or spec.reeval_of is not None else screening_points(study, cost_metric)
    rule = RungRule.from_config(cfg)
    rungs = rule.active_steps(cfg.finetune.steps)
    # Every recovered trial reports its rungs (the seed rule's plan is the score to beat); only candidates stop.
    rung = RungCheck(rungs, RungJudge(study, spec.number, rule, spec.target_reduction,
                                      stoppable=front is not None)) if rungs else None
    if spec.recovery_seed is not None:  # this job's own config (Hydra composes one per job)
        cfg.finetune.seed = spec.recovery_seed

    tags = {"trial": spec.number, "study": cfg.search.study_name}
    if spec.baseline:
        tags["baseline"] = spec.baseline
    if spec.reeval_of is not None:
        tags.update(reeval_of=spec.reeval_of, recovery_seed=spec.recovery_seed, confirms=spec.confirms)
    tracker = tracker_for(cfg)
    run = tracker.start_run(f"trial-{spec.number}", parent_run_id=cfg.tracking.parent_run_id, tags=tags)
    # At once: if this worker is killed from here on, the worker that fails the stale trial ends this run KILLED.
    try:
        set_trial_attr(study, spec.number, TRIAL_RUN_ID, run.run_id)
    except optuna.exceptions.UpdateFinishedTrialError:
        run.end("KILLED")
        raise TrialFailed(f"trial {spec.number} was failed by another worker before it started", run.run_id) from None
    params = trial_params(cfg, spec.ratios, [*space.channels, *space.fixed], spec.skip_set)
    run.log_params({**params, "trial_number": spec.number, "baseline": spec.baseline or "none",
                    "target_reduction": spec.target_reduction if spec.target_reduction is not None else "none"})
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = _run_tracked(run, cfg, out_dir, reference=reference, ratios=spec.ratios, screening_front=front,
                              cost_metric=cost_metric, rung=rung)
    finally:
        release_freed_memory()
    title = run_title(spec.number, result)
    if spec.reeval_of is not None:
        kind = "confirmation seed" if spec.confirms else "seed"
        title = f"{title} {kind} {spec.recovery_seed} of trial {spec.reeval_of}"
    run.rename(title)
    # A launcher's job can outlive its worker (a SLURM job after the sweeper's host was lost): once another worker
    # gave the trial up as stale, its run must not stay FINISHED beside a failed trial.
    trial = study.get_trials(deepcopy=False)[spec.number]
    if trial.state.is_finished():
        tracker.kill_run(run.run_id, trial.user_attrs.get(TRIAL_FAIL_REASON, trial.state.name))
    return TrialOutcome(number=spec.number, run_id=run.run_id, screened_out=result.screened_out,
                        metrics=result.metrics(), stopped_at=result.stopped_at)


@exit_on_user_error
def run_single(cfg: DictConfig) -> None:
    """One plan by hand: `trial.plan` (a PruningPlan JSON, applied as is), `trial.ratios`, or the unpruned model.

    The plan, the model, its checkpoint and the data are all checked before the tracking store is opened: a
    mistake there is one line and leaves no run behind.
    """
    if cfg.trial.plan is not None and cfg.trial.ratios is not None:
        raise ConfigError("set trial.plan or trial.ratios, not both")
    plan = None
    if cfg.trial.plan is not None:
        if not Path(cfg.trial.plan).is_file():
            raise ConfigError(f"trial.plan={cfg.trial.plan}: file not found")
        plan = PruningPlan.load(cfg.trial.plan)
        if plan.model != cfg.model.name:
            raise ConfigError(f"trial.plan={cfg.trial.plan} is for model {plan.model!r}, not model={cfg.model.name}")
    set_device(cfg.device)
    model = detector_from_config(cfg.model)
    if plan is None:  # ranked now, so a wrong group name or ratio fails before any work
        ratios = OmegaConf.to_container(cfg.trial.ratios) if cfg.trial.ratios is not None else {}
        plan = make_plan(model, cfg.model.name, {str(k): float(v) for k, v in ratios.items()}, cfg.prune.criterion,
                         cfg.prune.align, tuple(cfg.prune.input_size))
    else:
        check_plan_fits(plan, model)
    data = load_trial_data(cfg)
    tracker = tracker_for(cfg)
    tracker.check()
    reference = measure_model(model, cfg)

    run = tracker.start_run(f"single-{time.strftime('%Y%m%d-%H%M%S')}", tags={"single": True})
    run.log_params({"plan": cfg.trial.plan or "none", "tracking": mask_url(cfg.tracking.uri),
                    **{f"ratio:{g}": r for g, r in plan.ratios.items()}})
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = _run_tracked(run, cfg, out_dir, data, reference=reference, plan=plan)
    except TrialFailed as failed:
        if isinstance(failed.__cause__, UserError):  # one line and exit 2, as for errors before the run
            raise failed.__cause__ from None
        raise
    print_result_line(f"hmean={result.scores.hmean:.6f} flops_ratio={result.flops_ratio:.6f} "
                      f"latency_ratio={result.latency_ratio:.6f} run_id={run.run_id}")


def task(cfg: DictConfig) -> TrialOutcome | None:
    """The Hydra task function (decorated in `search.__main__`)."""
    if cfg.trial.number is None:
        return run_single(cfg)
    return run_study_trial(cfg)
