"""How the study proposes plans: the configured Optuna sampler, seeded per trial, and the warm-start trials (the
unpruned model and the seed rule's plans) it learns from first."""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState

from search.attributes import (BASELINE_SEED_RULE, BASELINE_UNPRUNED, TRIAL_BASELINE, TRIAL_SEED_RULE_REDUCTION,
                               TRIAL_SEED_RULE_THRESHOLD, TRIAL_TARGET)
from search.prior import Prior
from search.space import cut_counts, params_for, params_for_target
from search.study import WarmStart
from train.errors import ConfigError

# TPE's multivariate/group modes and a few samplers are "experimental" in Optuna, with a warning per trial.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial `number` in a study seeded `seed`: a stream of its own for every pair.

    `seed + number` made studies with neighbouring seeds replay each other one trial apart (seed 1's trial 11 drew
    seed 2's trial 10), so three "independent" studies with seeds 0, 1, 2 sampled mostly the same plans."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def make_sampler(cfg: DictConfig, number: int) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded for trial `number` (`trial_seed`)."""
    kwargs = {}
    if cfg.search.sampler.get("seed") is not None:
        seed = cfg.search.sampler.seed
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"search.sampler.seed={seed}: an integer >= 0, or null for an unseeded sampler")
        kwargs["seed"] = trial_seed(seed, number)
    try:
        return instantiate(cfg.search.sampler, **kwargs)
    except Exception as exc:  # Hydra wraps import and argument errors alike
        raise ConfigError(f"search.sampler: cannot build {cfg.search.sampler.get('_target_')!r} "
                          f"({str(exc).splitlines()[0]})") from None


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """The configured sampler, built afresh for each trial with a seed of the trial's own (`trial_seed`).

    One sampler per invocation would give workers started together identically seeded generators (they would
    propose the same plans), and a resumed study would replay the draws of the invocation before it. Seeding by
    trial number avoids both and keeps a one-worker study reproducible. Optuna's samplers keep what they learn
    in the study, not in the object, so a fresh instance per trial loses nothing.
    """

    def __init__(self, build: Callable[[int], optuna.samplers.BaseSampler]):
        self._build = build
        self._number = -1
        self._sampler = build(0)  # fails now, in one line, if the sampler config is wrong

    def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        if trial.number != self._number:
            self._sampler, self._number = self._build(trial.number), trial.number
        return self._sampler

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values) -> None:
        self._for(trial).after_trial(study, trial, state, values)


def warm_start_trials(prior: Prior, unpruned: bool) -> list[WarmStart]:
    """The unpruned model first (the baseline from trial 0), then the seed rule's plans by target (in a projected
    space: its centres, which are those plans)."""
    space = prior.space
    # A projected space has no parameters for "cut nothing": the runner knows the unpruned trial by its tag.
    trials = ([WarmStart({} if space.targets else params_for(space, {}), {TRIAL_BASELINE: BASELINE_UNPRUNED})]
              if unpruned else [])
    for plan in prior.seed_rule:
        params = (params_for_target(space, plan.target_reduction) if space.targets
                  else params_for(space, cut_counts(plan.plan)))
        trials.append(WarmStart(params, {
            TRIAL_BASELINE: BASELINE_SEED_RULE, TRIAL_TARGET: plan.target_reduction,
            TRIAL_SEED_RULE_REDUCTION: plan.reduction, TRIAL_SEED_RULE_THRESHOLD: plan.threshold}))
    return trials
