"""The study's life in one invocation of `python -m search multirun`: prepare, run the trials, summarise.

`search.sweeper` is the thin Hydra plugin around this (it owns the launcher); the steps are described there.
Any number of such invocations (workers) may run on one study at once, on one host or many: they share the
budget through the study (`search.study.Budget`, `over_budget`), beat on the trials they run and fail those of
workers that stopped (`search.heartbeat`), and the first one builds the prior while the others measure part of its
sensitivity table and then wait.
"""
from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, Trial, TrialState

from prune.budget import CostOfCounts
from prune.latency_model import latency_predictor
from prune.groups import discover_groups
from prune.sensitivity.report import plot_curves, write_csv
from search.app import TrialFailed, TrialOutcome, tracker_for
from search.attributes import (BASELINE_SEED_RULE, BASELINE_UNPRUNED, BUDGET_MET_REASON, DUPLICATE_REEVAL_REASON,
                               FINISHED, STALE_REASON, STUDY_CHOSEN, STUDY_CREATION, STUDY_PARENT_RUN, STUDY_REFERENCE,
                               STUDY_SETTINGS, STUDY_SPACE, TRIAL_BASELINE, TRIAL_CONFIRMS, TRIAL_FAIL_REASON,
                               TRIAL_HEARTBEAT, TRIAL_PROJECTED_COST, TRIAL_RATIOS, TRIAL_RECOVERY_SEED,
                               TRIAL_REEVAL_OF, TRIAL_RUN_ID, TRIAL_SCREENED_OUT, TRIAL_SKIP_SET, TRIAL_STOPPED_AT,
                               TRIAL_TARGET, TRIAL_WORKER, Metric)
from search.config import (check_same_settings, check_search_config, flat_config, frozen_settings, mask_url, objectives,
                           study_constraints, task_config)
from search.heartbeat import Heartbeat, Liveness, worker_id
from search.objective import load_trial_data, study_datasets
from search.pareto import (Selection, TrialRecord, format_front, pareto_front, plot_front, searched_vs_rule,
                           select)
from search.pareto import write_csv as write_records
from search.prior import Prior, always_skip_groups, build_prior, check_always_skip, help_scan
from search.reeval import (ReevalJob, claimed_jobs, confirm_jobs, confirmation_planned, plan_jobs, planned_jobs,
                           store_confirmation, store_jobs, taken_earlier)
from search.sampling import TrialSeededSampler, make_sampler, warm_start_trials
from search.space import Candidate, SearchSpace, suggest
from search.study import (Budget, claim_creation, count_finished, enqueue_warm_start, fail_stale_trials, give_up,
                          last_heartbeat, make_storage, open_study, over_budget, set_constraints, storage_file,
                          storage_where, trial_records)
from search.tracking import RunLogger
from train.cli import print_result_line
from train.errors import ConfigError, UserError
from train.models.zoo import build_detector
from train.recovery import RecoverySettings
from train.runtime import set_device
from train.weights import detector_from_config

log = logging.getLogger(__name__)
MAX_REASON_CHARS = 8000  # a crash's fail_reason carries its traceback


class TrialsCrashed(RuntimeError):
    """Trials failed on a bug of ours: the command ends with exit 1 and this traceback, never as a user error."""

    def __init__(self, numbers: list[int]):
        super().__init__(f"trial(s) {', '.join(map(str, numbers))} crashed: a bug in this project, not in your "
                         "input; their tracebacks are above, in each trial's fail_reason and in its MLflow run "
                         "(traceback.txt)")

# (trial numbers, per-job overrides) -> one JobReturn per job, in order.
Launch = Callable[[Sequence[int], Sequence[Sequence[str]]], Sequence[JobReturn]]

def _masked(node: Any) -> Any:
    """`node` (plain containers) with a password in any URL string masked."""
    if isinstance(node, dict):
        return {k: _masked(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_masked(v) for v in node]
    return mask_url(node) if isinstance(node, str) else node


class StudyRunner:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.name = str(cfg.search.study_name)
        self.objectives = objectives(list(cfg.search.objectives))
        self.out_dir = Path(cfg.out_dir)
        self.failures = 0
        self.worker = worker_id()
        # Asked by this worker and not told yet: the trials its heartbeat vouches for.
        self.pending: list[Trial] = []
        self.crashed: list[int] = []  # trials of this invocation that failed on a bug (not a UserError)
        self._cost: CostOfCounts | None = None

    # -- 1 and 2: checks, study, prior, parent run ------------------------------------------------------------
    def prepare(self, on_open: Callable[[], None] | None = None) -> None:
        """Check everything, open the stores and the study, and build its prior or wait for the worker that does.
        `on_open` runs once the study is open, before the prior (the primary starts its helpers there, so they
        share the sensitivity scan)."""
        cfg = self.cfg
        check_search_config(cfg)
        self.liveness = Liveness.from_config(cfg.search.heartbeat)
        sampler = TrialSeededSampler(lambda number: make_sampler(cfg, number))
        set_device(cfg.device)
        # Every check a user can fail runs before the storage or the tracking store is written to.
        self._check_inputs()
        where = storage_where(cfg.storage)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # A server that cannot be reached fails before the other store's local file is created.
        storage_is_local = storage_file(cfg.storage) is not None
        if not storage_is_local:
            self.storage = make_storage(cfg.storage)
        self.tracker = tracker_for(cfg)
        self.tracker.check()
        if storage_is_local:
            self.storage = make_storage(cfg.storage)
        settings = frozen_settings(cfg)
        self.study, created = open_study(self.storage, self.name, self.objectives)
        log.info("study %r: Optuna storage %s, MLflow %s, worker %s", self.name, where, mask_url(cfg.tracking.uri),
                 self.worker)
        if on_open is not None:
            on_open()
        if created:
            self.study.set_user_attr(STUDY_SETTINGS, settings)
            self._lead(attempt=0)
        else:
            self._await_creation(settings)
        self.study.sampler = sampler
        self.space = SearchSpace.from_json(self.study.user_attrs[STUDY_SPACE])
        self.parent = self._parent_run()

    def _check_inputs(self) -> None:
        """Load the model and the data once as the prior and every trial will: an unknown model, a checkpoint that
        does not fit, a missing or malformed dataset, an unreadable image or an empty split is then one error
        before the study exists, instead of a failure in the sensitivity scan or in every trial."""
        cfg = self.cfg
        self.groups = discover_groups(build_detector(cfg.model.name))  # kept for projecting candidates
        check_always_skip(always_skip_groups(cfg), self.groups, cfg.model.name)
        RecoverySettings(**cfg.finetune)
        self.model = detector_from_config(cfg.model)  # kept for projecting candidates (never changed)
        self.data = load_trial_data(cfg)  # kept for the parent run's dataset inputs

    def _lead(self, attempt: int) -> None:
        """Build the prior while beating on the study's creation lease, so that waiting workers can tell a builder
        at work from one that was killed. A builder that fails releases the lease: the next worker takes over at
        once rather than after the grace period."""
        def beat(heartbeat: float | None = None) -> None:
            self.study.set_user_attr(STUDY_CREATION, {"worker": self.worker, "attempt": attempt,
                                                      "heartbeat": time.time() if heartbeat is None else heartbeat})

        beat()
        try:
            with Heartbeat(self.liveness.interval, beat, f"study {self.name!r} creation"):
                self._create()
        except BaseException:
            beat(heartbeat=0.0)
            raise

    def _await_creation(self, settings: dict) -> None:
        """Another worker created the study: wait until its prior is built, or take over when that worker stopped
        beating (killed mid-scan); among several waiters, `claim_creation` picks one."""
        waiting_since = time.time()
        announced = False
        if STUDY_SPACE not in self.study.user_attrs:  # being built: measure the sensitivity table from its far end
            help_scan(self.cfg, self.model, self.groups, self.worker)
        while True:
            attrs = self.study.user_attrs
            if STUDY_SETTINGS in attrs:
                check_same_settings(attrs[STUDY_SETTINGS], settings, self.name)
            if STUDY_SPACE in attrs:
                return
            # No lease yet: its creator was stopped right after creating the study (or is about to write it).
            lease = attrs.get(STUDY_CREATION, {"worker": "?", "attempt": 0, "heartbeat": waiting_since})
            if self.liveness.is_stale(lease["heartbeat"]):
                attempt = lease["attempt"] + 1
                if claim_creation(self.storage, self.study, attempt):
                    if STUDY_SPACE in self.study.user_attrs:  # finished after all, between the read and the claim
                        return
                    log.warning("worker %s stopped building the prior of study %r: worker %s takes over",
                                lease["worker"], self.name, self.worker)
                    if STUDY_SETTINGS not in attrs:
                        self.study.set_user_attr(STUDY_SETTINGS, settings)
                    self._lead(attempt)
                    return
            elif not announced:
                log.info("waiting for worker %s to build the prior of study %r (sensitivity table, search space)",
                         lease["worker"], self.name)
                announced = True
            time.sleep(self.liveness.interval)

    def _create(self) -> None:
        """The prior, the parent run with its artifacts, the warm start, the study's fixed attributes. The search
        space is written last: until it is there, other workers wait, and a worker that takes over a stopped
        builder redoes the creation (the sensitivity table is cached, the warm start is enqueued once)."""
        cfg = self.cfg
        prior = build_prior(cfg)
        stopped = self.study.user_attrs.get(STUDY_PARENT_RUN)
        if stopped:  # the partial parent run of a builder that was stopped
            self.tracker.delete_run(stopped)
        parent = self.tracker.start_run(self.name, tags={"study": self.name,
                                                          "storage": mask_url(str(cfg.storage.get("url", "")))})
        self.study.set_user_attr(STUDY_PARENT_RUN, parent.run_id)
        parent.log_params(_masked(flat_config(cfg)))
        parent.log_datasets(study_datasets(self.data))
        self._log_prior(parent, prior)
        count = enqueue_warm_start(self.study, warm_start_trials(prior, cfg.search.warm_start.unpruned))
        self.study.set_user_attr(STUDY_REFERENCE, prior.reference.to_json())
        self.study.set_user_attr(STUDY_SPACE, prior.space.to_json())  # the marker that creation finished
        log.info("search space: %d groups searched, %d left whole; %d warm-start trials enqueued",
                 len(prior.space.groups), len(prior.space.fixed), count)

    def _log_prior(self, parent: RunLogger, prior: Prior) -> None:
        folder = self.out_dir / "prior"
        folder.mkdir(parents=True, exist_ok=True)
        # Resolved, so storage and tracking URLs from the environment are in it: masked.
        config = OmegaConf.to_container(task_config(self.cfg), resolve=True)
        OmegaConf.save(OmegaConf.create(_masked(config)), folder / "config.yaml")
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
        """Ask, launch and tell until the study has its budget of finished trials or `search.max_failures` trials
        failed in this invocation. Trials other workers are running count against the budget: with no room left,
        this worker waits for them, as one may fail or go stale and free its place."""
        n_trials, max_failures = self.cfg.search.n_trials, self.cfg.search.max_failures
        waited: Budget | None = None
        with Heartbeat(self.liveness.interval, self._beat, f"trials of worker {self.worker}"):
            try:
                while True:
                    self._fail_stale()
                    budget = Budget.of(self.study)
                    reeval = self._open_reeval_jobs() if budget.finished >= n_trials else []
                    if reeval is None:
                        log.info("study %r has %d finished trials (budget %d) and its re-evaluations", self.name,
                                 budget.finished, n_trials)
                        return
                    if self.failures >= max_failures:
                        log.error("stopping: %d trials failed in this run (search.max_failures=%d); %d of %d "
                                  "finished", self.failures, max_failures, budget.finished, n_trials)
                        return
                    room = len(reeval) if budget.finished >= n_trials else n_trials - budget.finished - budget.running
                    if room <= 0:
                        if budget != waited:
                            log.info("waiting for the running trial(s) of other workers (%d of %d finished)",
                                     budget.finished, n_trials)
                            waited = budget
                        time.sleep(self.liveness.interval)
                        continue
                    if reeval:
                        self._ask_reeval(reeval[:batch_size])
                    else:
                        self._ask(min(batch_size, room))
                    if not self.pending:
                        continue
                    overrides = [[f"trial.number={t.number}", f"tracking.parent_run_id={self.parent.run_id}"]
                                 for t in self.pending]
                    for job in launch([t.number for t in self.pending], overrides):
                        self._tell(self.pending[0], job)
                        self.pending.pop(0)
            except BaseException as exc:
                # Interrupted (Ctrl-C) or broken mid-batch: its trials are failed rather than left running.
                for trial in self.pending:
                    give_up(self.study, trial.number, f"interrupted ({type(exc).__name__})")
                self.parent.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
                raise

    def _beat(self) -> None:
        now = time.time()
        for trial in list(self.pending):
            try:
                trial.set_user_attr(TRIAL_HEARTBEAT, now)
            except optuna.exceptions.UpdateFinishedTrialError:  # told since the list was copied
                pass

    def _fail_stale(self) -> None:
        """Fail the trials of workers that stopped beating, and end their MLflow runs KILLED."""
        for trial in fail_stale_trials(self.study, self.liveness):
            log.warning("trial %d of worker %s failed: %s (none for %.0f s)", trial.number,
                        trial.user_attrs.get(TRIAL_WORKER, "?"), STALE_REASON,
                        time.time() - last_heartbeat(trial))
            self._kill_run(trial, STALE_REASON)

    def _kill_run(self, trial: FrozenTrial, reason: str) -> None:
        run_id = trial.user_attrs.get(TRIAL_RUN_ID)
        if run_id:
            self.tracker.kill_run(run_id, reason)

    def _ask_one(self) -> Trial:
        """A new trial of the study, marked as this worker's and alive now (so no worker takes it for stale)."""
        trial = self.study.ask()
        trial.set_user_attr(TRIAL_WORKER, self.worker)
        trial.set_user_attr(TRIAL_HEARTBEAT, time.time())
        return trial

    def _ask(self, count: int) -> None:
        """Ask up to `count` trials into `self.pending`, each with its plan stored in the study. A trial that a
        concurrent ask of another worker pushed over the budget (`over_budget`) is given back: failed, so it does
        not count, and never launched."""
        for _ in range(count):
            trial = self._ask_one()
            if over_budget(self.study, trial.number, self.cfg.search.n_trials):
                give_up(self.study, trial.number, BUDGET_MET_REASON)
                log.info("trial %d given back: %s", trial.number, BUDGET_MET_REASON)
                return
            self.pending.append(trial)
            baseline = trial.user_attrs.get(TRIAL_BASELINE)
            if baseline == BASELINE_UNPRUNED and self.space.targets:  # (a free space has parameters for it)
                candidate = Candidate(kept={}, skipped=tuple(g.name for g in self.space.groups))
            else:  # the seed rule's baselines are its own plans, not projected
                candidate = suggest(trial, self.space, self._cost_ratio(), projected=baseline != BASELINE_SEED_RULE)
            trial.set_user_attr(TRIAL_RATIOS, json.dumps(self.space.ratios(candidate)))
            trial.set_user_attr(TRIAL_SKIP_SET, self.space.skip_set(candidate))
            if candidate.target is not None:
                trial.set_user_attr(TRIAL_TARGET, candidate.target)
                trial.set_user_attr(TRIAL_PROJECTED_COST, candidate.cost_ratio)

    def _open_reeval_jobs(self) -> list[ReevalJob] | None:
        """The budget is met: the re-evaluation jobs no trial holds (planned here if no worker did yet), then, once
        they have all finished, the confirmation's; None when every job has finished (or there are none)."""
        n_trials, reeval, limits = self.cfg.search.n_trials, self.cfg.search.reeval, self.cfg.search.select
        jobs = planned_jobs(self.study, n_trials)
        if jobs is None:
            records = trial_records(self.study, study_constraints(self.cfg))
            planned = plan_jobs(records, reeval.top, reeval.seeds, int(self.cfg.finetune.seed),
                                limits.max_flops_ratio, limits.max_latency_ratio)
            jobs = store_jobs(self.study, n_trials, planned)
            if planned:
                log.info("re-evaluating trial(s) %s with %d more recovery seed(s) each before choosing",
                         ", ".join(str(n) for n in sorted({j.trial for j in planned})), reeval.seeds)
        held = claimed_jobs(self.study)
        if all(held.get(job) in FINISHED for job in jobs) and not confirmation_planned(self.study, n_trials):
            jobs = self._plan_confirmation()
        if all(held.get(job) in FINISHED for job in jobs):
            return None
        return [job for job in jobs if job not in held]

    def _plan_confirmation(self) -> list[ReevalJob]:
        """Every re-evaluation has finished: when the choice would replace the seed rule's plan with a searched one
        (its lead at least `min_gain`), both are recovered with `reeval.confirm_seeds` fresh seeds first. Returns
        every job of the budget."""
        n_trials, reeval, limits = self.cfg.search.n_trials, self.cfg.search.reeval, self.cfg.search.select
        planned: list[ReevalJob] = []
        if reeval.confirm_seeds > 0:
            records = trial_records(self.study, study_constraints(self.cfg))
            contest = searched_vs_rule(pareto_front(records, self.objectives), records, limits.max_flops_ratio,
                                       limits.max_latency_ratio)
            if contest is not None and contest[0].hmean - contest[1].hmean >= limits.min_gain:
                searched, rule = contest
                first = int(self.cfg.finetune.seed) + reeval.seeds + 1
                planned = confirm_jobs(searched.number, rule.number, reeval.confirm_seeds, first)
                log.info("trial %d leads the seed rule's plan (trial %d) by %+.4f: confirming the lead on fresh "
                         "recovery seed(s) %s of both before choosing", searched.number, rule.number,
                         searched.hmean - rule.hmean, ", ".join(str(first + k) for k in range(reeval.confirm_seeds)))
        return store_confirmation(self.study, n_trials, planned)

    def _ask_reeval(self, jobs: Sequence[ReevalJob]) -> None:
        """Ask one trial per job into `self.pending`, with the original trial's plan and the job's recovery seed. A
        job another worker asked at the same moment stays with the lower-numbered trial; this one is given back."""
        trials = self.study.get_trials(deepcopy=False)
        for job in jobs:
            trial = self._ask_one()
            # `reeval_of` last: it is what marks the trial as a job (`job_of`), read by other workers meanwhile.
            trial.set_user_attr(TRIAL_RECOVERY_SEED, job.seed)
            if job.confirm:
                trial.set_user_attr(TRIAL_CONFIRMS, True)
            trial.set_user_attr(TRIAL_REEVAL_OF, job.trial)
            if taken_earlier(self.study, trial.number, job):
                give_up(self.study, trial.number, DUPLICATE_REEVAL_REASON)
                continue
            original = trials[job.trial].user_attrs
            for key in (TRIAL_RATIOS, TRIAL_SKIP_SET, TRIAL_TARGET, TRIAL_PROJECTED_COST):
                if key in original:
                    trial.set_user_attr(key, original[key])
            self.pending.append(trial)

    def _cost_ratio(self) -> CostOfCounts | None:
        """The cost ratio of channel counts that candidates are projected with (a projected space only; built once):
        FLOPs, or the latency predicted by the fit the study stored with its space."""
        if not self.space.targets:
            return None
        if self._cost is None:
            size = tuple(self.cfg.prune.input_size)
            fit = self.space.cost_model
            cost = (latency_predictor(fit["shares"], fit["reference"], size, fit.get("block", 1))  # a pre-block study
                    if self.space.cost == "latency" else None)
            self._cost = CostOfCounts(self.model, self.cfg.model.name, self.space.align, size, self.groups, cost)
        return self._cost

    def _tell(self, trial: Trial, job: JobReturn) -> None:
        try:
            self._report(trial, job)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            frozen = self.study.get_trials(deepcopy=False)[trial.number]
            if frozen.state == TrialState.RUNNING:
                raise
            # Its heartbeat was late by more than the grace period (an overloaded host, a storage outage or
            # clocks out of step), so another worker failed it and its place in the budget went to another trial.
            log.warning("trial %d was failed by another worker while it ran (%s): its result is dropped",
                        trial.number, frozen.user_attrs.get(TRIAL_FAIL_REASON, frozen.state.name))
            self._kill_run(frozen, STALE_REASON)

    def _report(self, trial: Trial, job: JobReturn) -> None:
        try:
            outcome: TrialOutcome = job.return_value
        except Exception as exc:  # the job's exception, re-raised by JobReturn
            self.failures += 1
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if isinstance(exc, TrialFailed):
                trace = exc.traceback
            else:  # raised outside the tracked run (loading the study, starting the run)
                reason = f"{type(exc).__name__}: {reason}"
                trace = None if isinstance(exc, UserError) else "".join(traceback.format_exception(exc))
            if trace is not None:
                self.crashed.append(trial.number)
                print(f"trial {trial.number} crashed (a bug in this project, not in your input):\n{trace}",
                      file=sys.stderr, flush=True)
                reason = f"{reason}\n{trace}"
            trial.set_user_attr(TRIAL_FAIL_REASON, reason[:MAX_REASON_CHARS])
            self.study.tell(trial, state=TrialState.FAIL)
            log.warning("trial %d failed: %s", trial.number, reason.splitlines()[0])
            return
        assert job.status == JobStatus.COMPLETED
        for key, value in outcome.metrics.items():
            trial.set_user_attr(key, value)
        set_constraints(trial, study_constraints(self.cfg))
        if outcome.screened_out:
            trial.set_user_attr(TRIAL_SCREENED_OUT, True)
            self.study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d screened out (screening hmean %.4f, flops ratio %.3f)", trial.number,
                     outcome.metrics[Metric.SCREEN_HMEAN], outcome.metrics[Metric.FLOPS_RATIO])
            return
        if outcome.stopped_at is not None:  # lost at a rung (search.rungs): told like a screened-out candidate
            trial.set_user_attr(TRIAL_STOPPED_AT, outcome.stopped_at)
            self.study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d stopped at rung %d (hmean %.4f there, flops ratio %.3f)", trial.number,
                     outcome.stopped_at, outcome.metrics[Metric.RUNG_HMEAN], outcome.metrics[Metric.FLOPS_RATIO])
            return
        self.study.tell(trial, [outcome.metrics[o.metric] for o in self.objectives])
        metrics = outcome.metrics
        log.info("trial %d: hmean %.4f, flops ratio %.3f, latency ratio %.3f", trial.number, metrics[Metric.HMEAN],
                 metrics[Metric.FLOPS_RATIO], metrics[Metric.LATENCY_RATIO])

    # -- 4: summary ------------------------------------------------------------------------------------------
    def finish(self) -> Selection:
        cfg = self.cfg
        records = trial_records(self.study, study_constraints(cfg))
        if not records:
            self.parent.end("FAILED")
            if self.crashed:
                raise TrialsCrashed(self.crashed)
            raise UserError(f"study {self.name!r} has no complete trial; see the trials' {TRIAL_FAIL_REASON} in "
                            "the study or the FAILED runs in MLflow")
        front = pareto_front(records, self.objectives)
        if not front:
            self.parent.end("FAILED")
            raise ConfigError(f"no complete trial of study {self.name!r} meets search.constraints and "
                              f"search.select.min_agreement: {study_constraints(cfg)}")
        limits = cfg.search.select
        confirm_gain = limits.confirm_gain if cfg.search.reeval.confirm_seeds > 0 else None
        chosen = select(front, self.objectives, limits.max_flops_ratio, limits.max_latency_ratio, records,
                        limits.min_gain, confirm_gain)
        # The seed rule's plan kept over a searched one that leads it by less than min_gain may be off the front:
        # the table shows it beside the front.
        on_front = any(r.number == chosen.record.number for r in front)
        shown = front if on_front else sorted([*front, chosen.record], key=lambda r: r.number)
        self._tag_runs({r.number for r in front}, chosen.record.number, records)
        self.study.set_user_attr(STUDY_CHOSEN, chosen.record.number)

        cost = next(o.metric for o in self.objectives if o.metric != Metric.HMEAN)
        files = [write_records(front, self.out_dir / "pareto.csv"), write_records(records, self.out_dir / "trials.csv"),
                 plot_front(records, front, chosen.record.number, self.out_dir / "pareto.png",
                            screened=self._screened_points(cost), cost=cost)]
        for path in files:
            self.parent.log_artifact(path)
        self.parent.set_tags({"chosen_trial": chosen.record.number, "chosen_run_id": chosen.record.run_id,
                              "n_finished": count_finished(self.study)})
        plans = sum(r.reeval_of is None for r in records)
        self.parent.describe(
            f"Chosen: **trial {chosen.record.number}** ({chosen.reason}). Pareto front "
            f"({len(front)} of {plans} complete trials; hmean of a re-evaluated plan: the mean over its recovery "
            f"seeds): artifacts `pareto.png`, `pareto.csv`; every trial: `trials.csv`. The trials are this run's "
            f"nested runs, named `trial-<n> h=<hmean> f=<FLOPs ratio> a=<teacher agreement>` (a re-evaluation: "
            f"`... seed <s> of trial <n>`); tags `pareto` and `chosen` mark the front.\n\n```\n"
            f"{format_front(shown, chosen.record.number)}\n```")
        self.parent.end("FINISHED")

        print(f"Pareto front of study {self.name!r} ({len(front)} of {plans} complete trials):")
        print(format_front(shown, chosen.record.number))
        print(f"chosen: trial {chosen.record.number} ({chosen.reason}); files in {self.out_dir}")
        r = chosen.record
        print_result_line(f"chosen_trial={r.number} hmean={r.hmean:.6f} flops_ratio={r.flops_ratio:.6f} "
                          f"latency_ratio={r.latency_ratio:.6f} run_id={r.run_id}")
        if self.crashed:
            raise TrialsCrashed(self.crashed)
        return chosen

    def _screened_points(self, cost: str) -> list[tuple[float, float]]:
        return [(float(t.user_attrs[Metric.SCREEN_HMEAN]), float(t.user_attrs[cost]))
                for t in self.study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
                if t.user_attrs.get(TRIAL_SCREENED_OUT)]

    def _tag_runs(self, front: set[int], chosen: int, records: Sequence[TrialRecord]) -> None:
        """`pareto` and `chosen` on every finished trial's run (true or false), so a front that moved since the
        last invocation leaves no stale tag behind; a re-evaluated trial's run also gets its mean over seeds."""
        by_number = {r.number: r for r in records}
        for trial in self.study.get_trials(deepcopy=False, states=FINISHED):
            run_id = trial.user_attrs.get(TRIAL_RUN_ID)
            if run_id:
                tags: dict[str, Any] = {"pareto": trial.number in front, "chosen": trial.number == chosen}
                r = by_number.get(trial.number)
                if r is not None and r.seeds > 1:
                    tags.update(seeds=r.seeds, hmean_mean=f"{r.hmean:.6f}", hmean_sd=f"{r.hmean_sd:.6f}")
                if r is not None and r.confirm_hmeans:
                    tags.update(confirm_seeds=len(r.confirm_hmeans), confirm_hmean=f"{r.confirm_hmean:.6f}")
                self.tracker.set_tags(run_id, tags)
