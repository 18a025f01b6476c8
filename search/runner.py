"""The study's life in one invocation of `python -m search multirun`: prepare, run the trials, summarise.

`search.sweeper` is the thin Hydra plugin around this (it owns the launcher); the steps are described there.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Callable, Sequence

import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import Trial, TrialState

from prune.groups import discover_groups
from prune.sensitivity.report import plot_curves, write_csv
from search.app import TrialFailed, TrialOutcome
from search.config import (check_same_settings, check_search_config, flat_config, frozen_settings, objectives,
                           task_config)
from search.objective import load_trial_data
from search.pareto import Selection, format_front, pareto_front, plot_front, select
from search.pareto import write_csv as write_records
from search.prior import Prior, build_prior, check_always_skip
from search.space import SearchSpace, cut_counts, params_for, suggest
from search.study import (BASELINE_SEED_RULE, BASELINE_UNPRUNED, FINISHED, STUDY_CHOSEN, STUDY_PARENT_RUN,
                          STUDY_REFERENCE, STUDY_SETTINGS, STUDY_SPACE, TRIAL_BASELINE, TRIAL_FAIL_REASON,
                          TRIAL_RATIOS, TRIAL_RUN_ID, TRIAL_SCREENED_OUT, TRIAL_SKIP_SET, TRIAL_TARGET, WarmStart,
                          constraints_func, count_finished, enqueue_warm_start, make_storage, mask_url, open_study,
                          trial_records)
from search.tracking import RunLogger, Tracker
from train.cli import print_result_line
from train.errors import ConfigError, UserError
from train.models.zoo import build_detector
from train.runtime import set_device
from train.weights import load_detector

log = logging.getLogger(__name__)

# (trial numbers, per-job overrides) -> one JobReturn per job, in order.
Launch = Callable[[Sequence[int], Sequence[Sequence[str]]], Sequence[JobReturn]]

# TPE's multivariate/group modes and a few samplers are "experimental" in Optuna, with a warning per trial.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def make_sampler(cfg: DictConfig, offset: int) -> optuna.samplers.BaseSampler:
    """The configured sampler; its seed is shifted by the study's trial count so that a resumed study does not
    replay the random draws of the invocation before it."""
    kwargs = {}
    if cfg.search.sampler.get("seed") is not None:
        kwargs["seed"] = int(cfg.search.sampler.seed) + offset
    func = constraints_func(OmegaConf.to_container(cfg.search.constraints))
    if func is not None:
        kwargs["constraints_func"] = func
    try:
        return instantiate(cfg.search.sampler, **kwargs)
    except Exception as exc:  # Hydra wraps import and argument errors alike
        raise ConfigError(f"search.sampler: cannot build {cfg.search.sampler.get('_target_')!r} "
                          f"({str(exc).splitlines()[0]})") from None


def warm_start_trials(prior: Prior, unpruned: bool) -> list[WarmStart]:
    """The unpruned model first (the baseline from trial 0), then the seed rule's plans by target."""
    trials = [WarmStart(params_for(prior.space, {}), {TRIAL_BASELINE: BASELINE_UNPRUNED})] if unpruned else []
    for plan in prior.seed_rule:
        trials.append(WarmStart(params_for(prior.space, cut_counts(plan.plan)), {
            TRIAL_BASELINE: BASELINE_SEED_RULE, TRIAL_TARGET: plan.target_reduction,
            "seed_rule_reduction": plan.reduction, "seed_rule_threshold": plan.threshold}))
    return trials


class StudyRunner:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.name = str(cfg.search.study_name)
        self.objectives = objectives(list(cfg.search.objectives))
        self.out_dir = Path(cfg.out_dir)
        self.failures = 0

    # -- 1 and 2: checks, study, prior, parent run ------------------------------------------------------------
    def prepare(self) -> None:
        cfg = self.cfg
        check_search_config(cfg)
        set_device(cfg.device)
        # Every check a user can fail runs before the storage or the tracking store is written to.
        self._check_inputs()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
        self.tracker.check()
        storage = make_storage(cfg.storage)
        self.study = open_study(storage, self.name, self.objectives)
        settings = frozen_settings(cfg)
        stored = self.study.user_attrs.get(STUDY_SETTINGS)
        if stored is not None:
            check_same_settings(stored, settings, self.name)
        self.study.sampler = make_sampler(cfg, len(self.study.get_trials(deepcopy=False)))
        log.info("study %r: Optuna storage %s, MLflow %s", self.name,
                 mask_url(str(cfg.storage.get("url", cfg.storage._target_))), mask_url(cfg.tracking.uri))
        if STUDY_SPACE not in self.study.user_attrs:
            self._create(settings)
        self.space = SearchSpace.from_json(self.study.user_attrs[STUDY_SPACE])
        self.parent = self._parent_run()

    def _check_inputs(self) -> None:
        """Load the model and the data once as the prior and every trial will: an unknown model, a checkpoint that
        does not fit, a missing or malformed dataset, an unreadable image or an empty split is then one error
        before the study exists, instead of a failure in the sensitivity scan or in every trial."""
        cfg = self.cfg
        check_always_skip(list(cfg.search.space.always_skip), discover_groups(build_detector(cfg.model.name)),
                          cfg.model.name)
        load_detector(cfg.model.name, cfg.model.checkpoint)
        load_trial_data(cfg)

    def _create(self, settings: dict) -> None:
        """First invocation: the prior, the parent run with its artifacts, the warm start, the study's fixed
        attributes. The search space is written last: until it is there, the next invocation redoes the creation
        (the sensitivity table is cached, the warm start is enqueued once)."""
        cfg = self.cfg
        prior = build_prior(cfg)
        parent = self.tracker.start_run(self.name, tags={"study": self.name,
                                                          "storage": mask_url(str(cfg.storage.get("url", "")))})
        config = {k: mask_url(v) if isinstance(v, str) else v for k, v in flat_config(cfg).items()}
        parent.log_params(config)
        self._log_prior(parent, prior)
        count = enqueue_warm_start(self.study, warm_start_trials(prior, cfg.search.warm_start.unpruned))
        self.study.set_user_attr(STUDY_REFERENCE, prior.reference.to_json())
        self.study.set_user_attr(STUDY_PARENT_RUN, parent.run_id)
        self.study.set_user_attr(STUDY_SETTINGS, settings)
        self.study.set_user_attr(STUDY_SPACE, prior.space.to_json())  # the marker that creation finished
        log.info("search space: %d groups searched, %d left whole; %d warm-start trials enqueued",
                 len(prior.space.groups), len(prior.space.fixed), count)

    def _log_prior(self, parent: RunLogger, prior: Prior) -> None:
        folder = self.out_dir / "prior"
        folder.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(task_config(self.cfg), folder / "config.yaml", resolve=True)
        prior.table.save(folder / "sensitivity.json")
        write_csv(prior.table, folder / "sensitivity.csv")
        plot_curves(prior.table, folder / "sensitivity.png")
        (folder / "space.json").write_text(json.dumps(prior.space.to_json(), indent=1))
        (folder / "reference.json").write_text(json.dumps(prior.reference.to_json(), indent=1))
        summary = {"plans": [], "skipped_targets": {f"{t:g}": why for t, why in prior.skipped_targets.items()}}
        for plan in prior.seed_rule:
            name = f"seed_rule_{round(100 * plan.target_reduction)}.json"
            plan.plan.save(folder / name)
            summary["plans"].append({"file": name, "target_reduction": plan.target_reduction,
                                     "reduction": plan.reduction, "threshold": plan.threshold,
                                     "iterations": plan.iterations})
        (folder / "seed_rule.json").write_text(json.dumps(summary, indent=1))
        parent.log_artifact(folder, "prior")

    def _parent_run(self) -> RunLogger:
        parent_id = self.study.user_attrs[STUDY_PARENT_RUN]
        parent = self.tracker.resume_run(parent_id)
        if parent is None:
            log.warning("MLflow parent run %s is not in %s: starting a new parent run", parent_id,
                        mask_url(self.cfg.tracking.uri))
            parent = self.tracker.start_run(self.name, tags={"study": self.name})
            self.study.set_user_attr(STUDY_PARENT_RUN, parent.run_id)
        return parent

    # -- 3: the trial loop -----------------------------------------------------------------------------------
    def run(self, launch: Launch, batch_size: int) -> None:
        """Ask, launch and tell until the budget is met or `search.max_failures` trials failed."""
        n_trials, max_failures = self.cfg.search.n_trials, self.cfg.search.max_failures
        pending: list[Trial] = []
        try:
            while True:
                finished = count_finished(self.study)
                if finished >= n_trials:
                    log.info("study %r has %d finished trials (budget %d)", self.name, finished, n_trials)
                    return
                if self.failures >= max_failures:
                    log.error("stopping: %d trials failed in this run (search.max_failures=%d); %d of %d finished",
                              self.failures, max_failures, finished, n_trials)
                    return
                pending = [self._ask() for _ in range(min(batch_size, n_trials - finished))]
                overrides = [[f"trial.number={t.number}", f"tracking.parent_run_id={self.parent.run_id}"]
                             for t in pending]
                for job in launch([t.number for t in pending], overrides):
                    self._tell(pending[0], job)
                    pending.pop(0)
        except BaseException as exc:
            # Interrupted (Ctrl-C) or broken mid-batch: its trials are failed rather than left running forever.
            for trial in pending:
                trial.set_user_attr(TRIAL_FAIL_REASON, f"interrupted ({type(exc).__name__})")
                self.study.tell(trial, state=TrialState.FAIL)
            self.parent.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise

    def _ask(self) -> Trial:
        trial = self.study.ask()
        candidate = suggest(trial, self.space)
        trial.set_user_attr(TRIAL_RATIOS, json.dumps(self.space.ratios(candidate)))
        trial.set_user_attr(TRIAL_SKIP_SET, self.space.skip_set(candidate))
        return trial

    def _tell(self, trial: Trial, job: JobReturn) -> None:
        try:
            outcome: TrialOutcome = job.return_value
        except Exception as exc:  # the job's exception, re-raised by JobReturn
            self.failures += 1
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if not isinstance(exc, TrialFailed):
                reason = f"{type(exc).__name__}: {reason}"
            else:
                trial.set_user_attr(TRIAL_RUN_ID, exc.run_id)
            trial.set_user_attr(TRIAL_FAIL_REASON, reason[:1000])
            self.study.tell(trial, state=TrialState.FAIL)
            log.warning("trial %d failed: %s", trial.number, reason)
            return
        assert job.status == JobStatus.COMPLETED
        for key, value in outcome.metrics.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr(TRIAL_RUN_ID, outcome.run_id)
        if outcome.screened_out:
            trial.set_user_attr(TRIAL_SCREENED_OUT, True)
            self.study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d screened out (screening hmean %.4f, flops ratio %.3f)", trial.number,
                     outcome.metrics["screen_hmean"], outcome.metrics["flops_ratio"])
            return
        self.study.tell(trial, [outcome.metrics[o.metric] for o in self.objectives])
        log.info("trial %d: hmean %.4f, flops ratio %.3f, latency ratio %.3f", trial.number,
                 outcome.metrics["hmean"], outcome.metrics["flops_ratio"], outcome.metrics["latency_ratio"])

    # -- 4: summary ------------------------------------------------------------------------------------------
    def finish(self) -> Selection:
        cfg = self.cfg
        records = trial_records(self.study, OmegaConf.to_container(cfg.search.constraints))
        if not records:
            self.parent.end("FAILED")
            raise UserError(f"study {self.name!r} has no complete trial; see the trials' {TRIAL_FAIL_REASON} in "
                            "the study or the FAILED runs in MLflow")
        front = pareto_front(records, self.objectives)
        if not front:
            self.parent.end("FAILED")
            raise ConfigError(f"no complete trial of study {self.name!r} meets search.constraints="
                              f"{OmegaConf.to_container(cfg.search.constraints)}")
        chosen = select(front, self.objectives, cfg.search.select.max_flops_ratio, cfg.search.select.max_latency_ratio)
        self._tag_runs({r.number for r in front}, chosen.record.number)
        self.study.set_user_attr(STUDY_CHOSEN, chosen.record.number)

        cost = next(o.metric for o in self.objectives if o.name != "hmean")
        files = [write_records(front, self.out_dir / "pareto.csv"), write_records(records, self.out_dir / "trials.csv"),
                 plot_front(records, front, chosen.record.number, self.out_dir / "pareto.png",
                            screened=self._screened_points(cost), cost=cost)]
        for path in files:
            self.parent.log_artifact(path)
        self.parent.set_tags({"chosen_trial": chosen.record.number, "chosen_run_id": chosen.record.run_id,
                              "n_finished": count_finished(self.study)})
        self.parent.end("FINISHED")

        print(f"Pareto front of study {self.name!r} ({len(front)} of {len(records)} complete trials):")
        print(format_front(front, chosen.record.number))
        print(f"chosen: trial {chosen.record.number} ({chosen.reason}); files in {self.out_dir}")
        r = chosen.record
        print_result_line(f"chosen_trial={r.number} hmean={r.hmean:.6f} flops_ratio={r.flops_ratio:.6f} "
                          f"latency_ratio={r.latency_ratio:.6f} run_id={r.run_id}")
        return chosen

    def _screened_points(self, cost: str) -> list[tuple[float, float]]:
        return [(float(t.user_attrs["screen_hmean"]), float(t.user_attrs[cost]))
                for t in self.study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
                if t.user_attrs.get(TRIAL_SCREENED_OUT)]

    def _tag_runs(self, front: set[int], chosen: int) -> None:
        """`pareto` and `chosen` on every finished trial's run (true or false), so a front that moved since the
        last invocation leaves no stale tag behind."""
        for trial in self.study.get_trials(deepcopy=False, states=FINISHED):
            run_id = trial.user_attrs.get(TRIAL_RUN_ID)
            if run_id:
                self.tracker.set_tags(run_id, {"pareto": trial.number in front, "chosen": trial.number == chosen})
