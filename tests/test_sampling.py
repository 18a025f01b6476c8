"""The sampler's per-trial seeds: reproducible for one study, independent between studies of other seeds."""
from __future__ import annotations

import optuna
import pytest
from omegaconf import OmegaConf

from search.sampling import TrialSeededSampler, make_sampler, trial_seed
from train.errors import ConfigError

optuna.logging.set_verbosity(optuna.logging.WARNING)


def config(seed):
    return OmegaConf.create({"search": {
        "sampler": {"_target_": "optuna.samplers.TPESampler", "seed": seed, "n_startup_trials": 3},
        "constraints": {"max_flops_ratio": None}, "select": {"min_agreement": None}}})


def draws(seed: int, trials: int = 8) -> list[tuple[float, ...]]:
    cfg = config(seed)
    study = optuna.create_study(sampler=TrialSeededSampler(lambda number: make_sampler(cfg, number)))
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2 + t.suggest_float("y", -1, 1), n_trials=trials)
    return [(t.params["x"], t.params["y"]) for t in study.trials]


def test_one_seed_replays_its_draws_and_neighbouring_seeds_share_none():
    assert draws(1) == draws(1)
    one, two = draws(1), draws(2)
    # With seeds shifted by the trial number, seed 1's trial n + 1 was seed 2's trial n.
    assert not set(one) & set(two), (one, two)
    assert len({trial_seed(s, n) for s in range(3) for n in range(20)}) == 60


@pytest.mark.parametrize("seed", [-1, "abc", 1.5])
def test_a_bad_sampler_seed_names_the_key(seed):
    with pytest.raises(ConfigError, match="search.sampler.seed"):
        make_sampler(config(seed), 0)
