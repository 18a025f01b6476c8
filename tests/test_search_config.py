"""The composed search config: value checks that fail fast, and the settings a study refuses to resume under."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

import train.data.source  # noqa: F401  (registers the data.generator schema the data configs use)
from conftest import REPO
from search.config import (Targets, check_same_settings, check_search_config, frozen_settings, objectives,
                           parse_targets, study_constraints)
from train.errors import ConfigError


def _compose(*overrides: str):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("search", overrides=list(overrides))


def test_default_config_composes_and_passes():
    cfg = _compose()
    check_search_config(cfg)
    assert [o.direction for o in objectives(list(cfg.search.objectives))] == ["maximize", "minimize"]
    assert cfg.storage.url.startswith("sqlite:///") and cfg.tracking.uri.startswith("sqlite:///")
    assert cfg.search.sampler._target_ == "optuna.samplers.TPESampler"
    assert _compose("search/sampler=nsgaii").search.sampler._target_ == "optuna.samplers.NSGAIISampler"


@pytest.mark.parametrize("override, message", [
    ("search.objectives=[hmean,size]", "unknown objective 'size'"),
    ("search.objectives=[flops,latency]", "needs hmean"),
    ("search.n_trials=0", "search.n_trials=0"),
    ("search.warm_start.seed_rule_targets=[0.3,1.2]", "1.2 is not a FLOPs reduction"),
    ("search.targets=[0.5,0]", "search.targets: 0 is not a FLOPs reduction"),
    ("search.targets=[latency:1.2]", "search.targets: 'latency:1.2' is not a target"),
    ("search.targets=[speed:0.5]", "search.targets: 'speed:0.5' is not a target"),
    ("search.targets=[0.5,latency:0.6]", "targets of one study bound one cost"),
    ("search.latency_model.plans=2", "search.latency_model.plans=2: need at least 3"),
    ("search.latency_model.blocks=[0,16]", "search.latency_model.blocks=[0, 16]: need a list of channel counts"),
    ("search.space.max_offset=0", "search.space.max_offset=0"),
    ("search.space.tolerance=0.5", "search.space.tolerance=0.5"),
    ("search.space.skip_probability=[0.5,0.1]", "skip_probability"),
    ("search.screening.margin=-0.1", "search.screening.margin=-0.1"),
    ("search.constraints.max_flops_ratio=0", "max_flops_ratio=0"),
    ("prune.align=0", "prune.align=0"),
    ("search.select.min_agreement=1.5", "search.select.min_agreement=1.5"),
    ("search.select.min_gain=-0.01", "search.select.min_gain=-0.01: must be >= 0"),
    ("search.select.min_gain=null", "search.select.min_gain=None: must be >= 0"),
    ("search.reeval.confirm_seeds=-1", "search.reeval.confirm_seeds=-1: must be >= 0"),
    ("search.select.confirm_gain=null", "search.select.confirm_gain=null: must be a number"),
    ("data.unlabeled_eval=null", "min_agreement needs the guard's images"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        check_search_config(_compose(override))


def test_targets_read_as_reductions_of_one_cost():
    assert parse_targets([0.3, 0.5]) == Targets("flops", [0.3, 0.5])
    assert parse_targets(["latency<=0.6", "latency:0.45"]) == Targets("latency", [0.4, 0.55])
    assert parse_targets(["flops<=0.5", 0.3]) == Targets("flops", [0.5, 0.3])
    assert parse_targets([]) == Targets("flops", [])
    check_search_config(_compose("search.targets=[latency:0.6,latency:0.5]"))


def test_the_guard_threshold_is_a_constraint_of_the_study():
    assert study_constraints(_compose())["min_agreement"] == 0.25
    assert study_constraints(_compose("search.select.min_agreement=null"))["min_agreement"] is None
    check_search_config(_compose("search.select.min_agreement=null", "data.unlabeled_eval=null"))


def test_frozen_settings_cover_what_makes_trials_comparable(monkeypatch):
    base = frozen_settings(_compose())
    assert base["finetune.steps"] == 60 and base["prune.align"] == 8 and base["search.objectives"] == ["hmean", "flops"]
    assert base["search.targets"] == [0.3, 0.5, 0.7] and base["search.space.max_offset"] == 0.5
    assert not any(k.startswith(("search.n_trials", "search.sampler", "search.select", "tracking")) for k in base)
    monkeypatch.setenv("OCRDET_CACHE_DIR", "/elsewhere")
    assert frozen_settings(_compose("search.n_trials=40", "search/sampler=nsgaii")) == base


def test_resuming_under_other_settings_names_the_key_and_both_values():
    stored = frozen_settings(_compose())
    check_same_settings(stored, frozen_settings(_compose()), "s")
    with pytest.raises(ConfigError, match=r"^finetune\.steps=50, but study 's' was created with 60"):
        check_same_settings(stored, frozen_settings(_compose("finetune.steps=50")), "s")
