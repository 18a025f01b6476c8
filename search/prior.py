"""What a study is built on, computed once when it is created: the sensitivity table (the prior), the seed rule's
plans at the targets (FLOPs reductions, or latency ratios predicted by a fit timed on this machine), the search
space, and the unpruned model's measured cost (the reference every trial's ratios divide by).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import paddle
from omegaconf import DictConfig

from prune.groups import ChannelGroup, discover_groups
from prune.latency import round_settings
from prune.latency_model import LatencyModel, LatencyModelKey, cached_latency_model, check_blocks
from prune.measure import Measurement
from prune.budget import ModelCost
from prune.seed_rule import SeedRulePlan, seed_rule_plan
from prune.sensitivity import SensitivityTable, table_for_config
from search.config import parse_targets
from search.objective import measure_model
from search.space import SearchSpace, build_space, cut_counts
from train.cli import print_warning
from train.data.source import resolve_data
from train.errors import ConfigError
from train.models.zoo import model_spec
from train.weights import detector_from_config

log = logging.getLogger(__name__)

# A jump in the seed rule's FLOPs curve (one group entering at its first measured ratio) can straddle a tight
# band around a target; the baseline then is the seed rule's plan within a band this many times wider.
_TOLERANCE_WIDENING = (1, 2, 4)


@dataclass
class Prior:
    table: SensitivityTable
    space: SearchSpace
    seed_rule: list[SeedRulePlan]
    reference: Measurement
    skipped_targets: dict[float, str] = field(default_factory=dict)


def without_groups(table: SensitivityTable, names: list[str]) -> SensitivityTable:
    """`table` as if `names` had never been measured (the seed rule then never cuts them)."""
    return SensitivityTable(key=table.key, base=table.base,
                            channels={g: c for g, c in table.channels.items() if g not in names},
                            losses={g: row for g, row in table.losses.items() if g not in names}, seconds=table.seconds)


def _seed_rule(cfg: DictConfig, model: paddle.nn.Layer, table: SensitivityTable, target: float,
               groups: list[ChannelGroup], cost: ModelCost | None = None) -> SeedRulePlan | str:
    """The seed rule's plan at `target` reduction of FLOPs (or of `cost`: the predicted latency), or why it has
    none."""
    reason = ""
    for widening in _TOLERANCE_WIDENING:
        try:
            return seed_rule_plan(model, cfg.model.name, table, target, cfg.prune.criterion, cfg.prune.align,
                                  tuple(cfg.prune.input_size), cfg.search.warm_start.tolerance * widening,
                                  groups=groups, cost=cost, cost_name="FLOPs" if cost is None else "latency")
        except ConfigError as exc:
            reason = str(exc)
    return reason


def check_always_skip(names: list[str], groups: list[ChannelGroup], model_name: str) -> None:
    """ConfigError for a name that is not a prunable group (checked before the sensitivity scan)."""
    prunable = [g.name for g in groups if g.prunable]
    for name in names:
        if name not in prunable:
            raise ConfigError(f"search.space.always_skip: {name!r} is not a prunable group of {model_name}; "
                              f"list them with `python -m prune.groups model={model_name}`")


def always_skip_groups(cfg: DictConfig) -> list[str]:
    """The groups the search never cuts: `search.space.always_skip`, plus the model's stem under `keep_stem`."""
    names = list(cfg.search.space.always_skip)
    stem = model_spec(cfg.model.name).stem
    if cfg.search.space.keep_stem and stem not in names:
        names.insert(0, stem)
    return names


def latency_model_for(cfg: DictConfig, model: paddle.nn.Layer) -> LatencyModel:
    """The fit that predicts a plan's latency ratio on this machine, timed like every trial (`measure.*`), from the
    cache or built there (`search.latency_model`)."""
    settings = cfg.search.latency_model
    key = LatencyModelKey(model=cfg.model.name, input_size=tuple(cfg.prune.input_size), threads=cfg.measure.threads,
                          use_mkldnn=cfg.measure.use_mkldnn, align=cfg.prune.align, plans=settings.plans,
                          seed=settings.seed, blocks=check_blocks(settings.blocks, "search.latency_model.blocks"))

    def report(done: int, plan) -> None:
        log.info("latency model: plan %d of %d timed, ratio %.3f", done, settings.plans, plan.ratio)

    fitted = cached_latency_model(Path(settings.cache_dir).expanduser(), model, key, round_settings(cfg.measure),
                                  report)
    log.info("latency model: %d plans, fixed share %.3f", len(fitted.measured), fitted.shares["fixed"])
    return fitted


def help_scan(cfg: DictConfig, model: paddle.nn.Layer, groups: list[ChannelGroup], worker: str) -> None:
    """Measure the sensitivity table of `model` (the config's, as loaded) from its far end while another worker
    builds the prior (the shared scan of `prune.sensitivity.compute_sensitivity`): the builder merges what this
    worker measured."""
    name = "worker-" + re.sub(r"[^\w.-]", "-", worker)
    table_for_config(cfg, model, resolve_data(cfg.data, progress=False), groups, helper=name)


def build_prior(cfg: DictConfig) -> Prior:
    """Everything `search.prior` holds, for the config's model, data and search settings."""
    model = detector_from_config(cfg.model)
    groups = discover_groups(model)
    always_skip = always_skip_groups(cfg)
    source = resolve_data(cfg.data, progress=cfg.progress)
    table, _ = table_for_config(cfg, model, source, groups)
    if all(loss == 0 for row in table.losses.values() for loss in row.values()):
        print_warning("the sensitivity table is flat (no single cut moved the probe images' map): the probe saw "
                      "no text; raise sensitivity.images or use sensitivity.split=train")

    seed_table = without_groups(table, always_skip)
    targets = parse_targets(cfg.search.targets)
    fit = latency_model_for(cfg, model) if targets.cost == "latency" else None
    cost = None if fit is None else fit.predict
    plans, skipped = [], {}
    # A projected space starts from the seed rule's plans at its targets; a free one at the warm start's targets.
    for target in sorted(targets.reductions or cfg.search.warm_start.seed_rule_targets):
        outcome = _seed_rule(cfg, model, seed_table, float(target), groups, cost)
        if isinstance(outcome, str):
            log.warning("warm start: no seed-rule plan at %.0f%% %s reduction (%s)", 100 * target, targets.cost,
                        outcome)
            skipped[float(target)] = outcome
        else:
            log.info("warm start: seed rule at %.0f%% %s reduction -> %.1f%% (threshold %.4g)", 100 * target,
                     targets.cost, 100 * outcome.reduction, outcome.threshold)
            plans.append(outcome)

    # A target the seed rule has no plan at is centred on the whole model: its candidates start uniform.
    centres: dict[float, dict[str, int]] = {float(t): {} for t in targets.reductions}
    centres.update({p.target_reduction: cut_counts(p.plan) for p in plans if p.target_reduction in centres})
    space = build_space(table, cfg.prune.align, cfg.search.space.loss_budget, always_skip,
                        tuple(cfg.search.space.skip_probability), warm_start=[cut_counts(p.plan) for p in plans],
                        centres=centres or None, max_offset=cfg.search.space.max_offset,
                        tolerance=cfg.search.space.tolerance, cost=targets.cost,
                        cost_model=None if fit is None else fit.stored(),
                        keep_rule_whole=cfg.search.space.keep_rule_whole)
    return Prior(table=table, space=space, seed_rule=plans,
                 reference=measure_model(model, cfg), skipped_targets=skipped)
