"""What a study stores, by name: its user attributes, its trials' user attributes, and the metrics trials log.

Trials run in other processes (and hosts) than the sweeper that tells their results, and exports and resumed
studies read what earlier invocations wrote, so these names are the study's interface: they live here, once, and
every reader and writer uses them. Metric names are also MLflow's metric keys and the columns of `trials.csv`.
"""
from __future__ import annotations

from enum import StrEnum

from optuna.trial import TrialState

# Study user attributes.
STUDY_SETTINGS = "settings"
STUDY_SPACE = "space"
STUDY_REFERENCE = "reference"
STUDY_PARENT_RUN = "mlflow_parent_run_id"
STUDY_WARM_STARTED = "warm_started"
STUDY_CHOSEN = "chosen_trial"
STUDY_CREATION = "creation"     # the lease of the worker building the prior: {worker, attempt, heartbeat}
STUDY_REEVAL = "reeval"         # the re-evaluation jobs, [[trial, recovery seed], ...], planned once the budget is met,
# and the confirmation jobs (`confirm`), planned once the re-evaluations have finished (search/reeval.py)

# Trial user attributes (besides the trial's metrics, which are stored under their `Metric` names).
TRIAL_RATIOS = "ratios"
TRIAL_SKIP_SET = "skip_set"
TRIAL_BASELINE = "baseline"
TRIAL_TARGET = "target_reduction"
TRIAL_PROJECTED_COST = "projected_cost_ratio"  # the cost ratio a projected candidate was scaled to (the
# space's cost: FLOPs, or the latency ratio its fit predicts)
TRIAL_SEED_RULE_REDUCTION = "seed_rule_reduction"
TRIAL_SEED_RULE_THRESHOLD = "seed_rule_threshold"
TRIAL_RUN_ID = "mlflow_run_id"
TRIAL_SCREENED_OUT = "screened_out"
TRIAL_STOPPED_AT = "stopped_at"  # the rung (recovery steps) a candidate was stopped at (search.rungs)
TRIAL_RUNG_PREFIX = "rung:"      # `rung:<steps>`: {"hmean", "cost"} of a trial at that rung
TRIAL_FAIL_REASON = "fail_reason"
TRIAL_WORKER = "worker"
TRIAL_HEARTBEAT = "heartbeat"   # time.time() of the running trial's last heartbeat
TRIAL_REEVAL_OF = "reeval_of"   # a re-evaluation: the trial whose plan it recovers again ...
TRIAL_RECOVERY_SEED = "recovery_seed"  # ... with this recovery seed (finetune.seed)
TRIAL_CONFIRMS = "confirms"     # ... as a confirmation: a fresh seed, kept out of the plan's mean (search.reeval)

STALE_REASON = "stale: worker stopped sending heartbeats"
DUPLICATE_REEVAL_REASON = "re-evaluation taken by another worker"
BUDGET_MET_REASON = "budget met by other workers"

TRIAL_ATTRS = (TRIAL_RATIOS, TRIAL_SKIP_SET, TRIAL_BASELINE, TRIAL_TARGET, TRIAL_PROJECTED_COST,
               TRIAL_SEED_RULE_REDUCTION, TRIAL_SEED_RULE_THRESHOLD, TRIAL_RUN_ID, TRIAL_SCREENED_OUT,
               TRIAL_STOPPED_AT, TRIAL_FAIL_REASON, TRIAL_WORKER, TRIAL_HEARTBEAT, TRIAL_REEVAL_OF,
               TRIAL_RECOVERY_SEED, TRIAL_CONFIRMS)

# What a warm-start trial is enqueued with (and enqueued again with when it is given up before it ran).
WARM_START_ATTRS = (TRIAL_BASELINE, TRIAL_TARGET, TRIAL_SEED_RULE_REDUCTION, TRIAL_SEED_RULE_THRESHOLD)

BASELINE_SEED_RULE = "seed_rule"
BASELINE_UNPRUNED = "unpruned"

# Screened-out candidates are told as PRUNED: they count towards the budget, samplers learn to avoid their
# region, and they stay off Optuna's own Pareto front (`study.best_trials`) as they were never fine-tuned.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class Metric(StrEnum):
    """A trial's scalar results: MLflow metric keys and the trial's user attributes (the values are the names)."""

    # Accuracy on the labelled eval split, after recovery; `screen_*` before it (the cheap screening estimate).
    HMEAN = "hmean"
    PRECISION = "precision"
    RECALL = "recall"
    SCREEN_HMEAN = "screen_hmean"
    SCREEN_PRECISION = "screen_precision"
    SCREEN_RECALL = "screen_recall"
    RUNG_HMEAN = "rung_hmean"  # during recovery, at each rung (MLflow step = recovery step; search.rungs)
    # The generalization guard: agreement with the unpruned model on unlabelled images (train.agreement).
    AGREEMENT = "agreement"
    AGREEMENT_PRECISION = "agreement_precision"
    AGREEMENT_RECALL = "agreement_recall"
    FALSE_BOXES = "false_boxes"
    # Costs; ratios are pruned / unpruned, so they read the same on any model and input size.
    FLOPS = "flops"
    FLOPS_RATIO = "flops_ratio"
    FLOPS_REDUCTION = "flops_reduction"
    PARAMS = "params"
    SIZE_BYTES = "size_bytes"
    LATENCY_MS = "latency_ms"
    LATENCY_RATIO = "latency_ratio"
    LATENCY_RATIO_LOW = "latency_ratio_low"
    LATENCY_RATIO_HIGH = "latency_ratio_high"
    LATENCY_ROUNDS = "latency_rounds"
    SPEEDUP = "speedup"
    FINETUNE_LOSS = "finetune_loss"  # a series: the recovery loss at each step
    FINETUNE_FINAL_LOSS = "finetune_final_loss"
    # The export of a trial (logged on its run with `EXPORT_PREFIX`, beside the accuracy and cost names above).
    FINETUNE_STEPS = "finetune_steps"
    PARITY_MAX_ABS_DIFF = "parity_max_abs_diff"
    DEPLOYED_MAX_ABS_DIFF = "deployed_max_abs_diff"


# Wall seconds of a trial's stages: `seconds_measure`, `seconds_finetune`, ...
SECONDS_PREFIX = "seconds_"
# What `python -m search.export` measured of the exported model, on the trial's run: `export_hmean`, ...
EXPORT_PREFIX = "export_"


def is_trial_metric(name: str) -> bool:
    """Whether ``name`` is one a trial's run holds: a `Metric`, a stage's seconds or an exported model's `Metric`."""
    known = Metric.__members__.values()
    return (name in known or name.startswith(SECONDS_PREFIX)
            or (name.startswith(EXPORT_PREFIX) and name[len(EXPORT_PREFIX):] in known))
