"""Channel groups of the zoo detectors, and the masking-equivalence proof that their coupling is right.

Masking equivalence: cutting a group's removed channels must change the model exactly as zeroing those
channels' consumer input weights does. If a coupling were missing (a residual partner, a concat offset, an SE
gate, a BN), the pruned model would compute something else or fail to run.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import paddle
import pytest

from prune.graph import trace
from prune.groups import (
    CONSUMER,
    KINDS,
    PRODUCER,
    REASON_OUTPUT,
    REASON_THRESH,
    discover_groups,
    format_table,
    group_flops_share,
)
from prune.plan import apply_plan, make_plan
from prune_fixtures import MODELS, copy_model, eval_maps, mask_removed_channels, perturbed, random_ratios
from train.models import zoo

# Paddle auto names (conv2d_57, batch_norm_3, learnable_affine_block_0) as a dotted path component.
AUTO_NAME = re.compile(r"(^|\.)[a-z_]+_\d+(\.|$)")
MASK_TOL = 1e-5


@pytest.fixture(scope="module")
def discovered() -> dict[str, tuple[paddle.nn.Layer, list]]:
    """Each zoo model (v4 in deploy form) with perturbed weights, and its groups."""
    result = {}
    for name in MODELS:
        model = perturbed(name)
        result[name] = (model, discover_groups(model))
    return result


def _by_name(groups):
    return {g.name: g for g in groups}


def _producer_layers(group) -> set[str]:
    return {m.param.rsplit(".", 1)[0] for m in group.members if m.role == PRODUCER}


@pytest.mark.parametrize("name", MODELS)
def test_groups_are_named_by_structured_layers_and_partition_every_conv(discovered, name):
    model, groups = discovered[name]
    state = model.state_dict()
    layers = dict(model.named_sublayers())
    assert len({g.name for g in groups}) == len(groups)
    for group in groups:
        assert not AUTO_NAME.search(group.name), group.name
        assert group.name in layers, f"{group.name} is not a layer of {name}"
        assert group.prunable == (group.reason == ""), group
        assert set(group.kinds) <= set(KINDS)
        for member in group.members:
            assert len(member.indices) == group.channels
            assert max(member.indices) < state[member.param].shape[member.axis]

    # Every channel axis is cut by at most one group per index, and every conv filter's output axis is a
    # producer (or depthwise passthrough) in exactly one group: no conv escapes the engine.
    seen: dict[tuple[str, int], list[int]] = defaultdict(list)
    for group in groups:
        for member in group.members:
            seen[(member.param, member.axis)].extend(member.indices)
    for (key, axis), indices in seen.items():
        assert sorted(indices) == list(range(state[key].shape[axis])), f"{key} axis {axis}"
    conv_weights = [f"{n}.weight" for n, layer in layers.items()
                    if isinstance(layer, (paddle.nn.Conv2D, paddle.nn.Conv2DTranspose))]
    for key in conv_weights:
        out_axis = 1 if isinstance(layers[key.rsplit(".", 1)[0]], paddle.nn.Conv2DTranspose) else 0
        assert (key, out_axis) in seen, f"{key} output channels are in no group"


def test_det_mv3_db_groups(discovered):
    _, groups = discovered["det_mv3_db"]
    groups = _by_name(groups)
    # The concat-fed FPN convs and the head's first conv (~90% of the FLOPs) are prunable.
    for level in (2, 3, 4, 5):
        group = groups[f"neck.p{level}_conv"]
        assert group.prunable and "concat" in group.kinds
        consumers = {m.param: m.indices for m in group.members if m.role == CONSUMER}
        assert set(consumers) == {"head.binarize.conv1.weight", "head.thresh.conv1.weight"}
        offset = 64 * (5 - level)  # concat order: p5, p4, p3, p2
        assert consumers["head.binarize.conv1.weight"] == tuple(range(offset, offset + 64))
    assert groups["head.binarize.conv1"].prunable
    # Lateral convs tied by upsample+add are one group; a residual chain is one group.
    assert _producer_layers(groups["neck.in2_conv"]) == {f"neck.in{i}_conv" for i in (2, 3, 4, 5)}
    assert "fpn_add" in groups["neck.in2_conv"].kinds
    assert _producer_layers(groups["backbone.stage2.0.linear_conv.conv"]) == {
        f"backbone.stage2.{i}.linear_conv.conv" for i in range(4)
    }
    assert _producer_layers(groups["backbone.conv.conv"]) == {
        "backbone.conv.conv", "backbone.stage0.0.linear_conv.conv"
    }
    # An SE gate conv produces the same channels as its block's expand conv.
    assert _producer_layers(groups["backbone.stage1.0.expand_conv.conv"]) == {
        "backbone.stage1.0.expand_conv.conv", "backbone.stage1.0.mid_se.conv2"
    }
    assert {"depthwise", "se"} <= set(groups["backbone.stage1.0.expand_conv.conv"].kinds)
    assert groups["head.binarize.conv2"].prunable and "transposed" in groups["head.binarize.conv2"].kinds
    assert len(groups) == 40 and sum(g.prunable for g in groups.values()) == 37


@pytest.mark.parametrize("name", MODELS)
def test_output_and_thresh_only_groups_are_not_prunable(discovered, name):
    groups = _by_name(discovered[name][1])
    assert not groups["head.binarize.conv3"].prunable
    assert groups["head.binarize.conv3"].reason == REASON_OUTPUT
    for layer in ("head.thresh.conv1", "head.thresh.conv2"):
        assert groups[layer].reason == REASON_THRESH
    not_prunable = {g.name for g in groups.values() if not g.prunable}
    assert not_prunable == {"head.binarize.conv3", "head.thresh.conv1", "head.thresh.conv2"}


def test_ppocrv4_det_deploy_groups(discovered):
    _, groups = discovered["ppocrv4_det"]
    groups = _by_name(groups)
    for i in range(4):
        group = groups[f"neck.inp_conv.{i}.in_conv"]
        assert group.prunable and {"concat", "se"} <= set(group.kinds)
    assert groups["head.binarize.conv1"].prunable
    assert _producer_layers(groups["neck.ins_conv.0.in_conv"]) >= {f"neck.ins_conv.{i}.in_conv" for i in range(4)}
    assert len(groups) == 39 and sum(g.prunable for g in groups.values()) == 36


def test_discovery_leaves_the_model_unchanged(discovered):
    model, _ = discovered["ppocrv3_det"]
    x = np.random.RandomState(0).rand(1, 3, 64, 96).astype("float32")
    before = eval_maps(model, x)
    discover_groups(model)
    assert not model.training and paddle.in_dynamic_mode()
    np.testing.assert_array_equal(eval_maps(model, x), before)


def test_ppocrv4_det_training_form_prunes_and_still_fuses():
    """The multi-branch form traces; a pruned training-form model fuses (rep) to the same function."""
    model = perturbed("ppocrv4_det", deploy=False, bn_scale=(0.2, 0.3))
    groups = discover_groups(model)
    names = _by_name(groups)
    assert "backbone.blocks2.0.pw_conv.conv_kxk.0.conv" in names
    # Identity BN branches tie a block's input to its output: whole stages become one residual group.
    assert "residual" in names["backbone.blocks3.0.pw_conv.conv_kxk.0.conv"].kinds
    plan = make_plan(model, "ppocrv4_det", random_ratios(groups, np.random.RandomState(3)), groups=groups)
    x = np.random.RandomState(1).rand(1, 3, 96, 128).astype("float32")
    masked = copy_model("ppocrv4_det", model, deploy=False)
    mask_removed_channels(masked, groups, plan)
    apply_plan(model, plan, groups)
    pruned = eval_maps(model, x)
    assert 0.01 < pruned.std(), "maps saturated: the check would be vacuous"
    assert np.abs(pruned - eval_maps(masked, x)).max() <= MASK_TOL
    zoo.reparameterize(model)
    assert np.abs(eval_maps(model, x) - pruned).max() <= MASK_TOL


@pytest.mark.parametrize("name", MODELS)
def test_masking_equivalence(discovered, name):
    """Pruned model == unpruned model with the removed channels' consumer weights zeroed (eval mode)."""
    source, groups = discovered[name]
    rng = np.random.RandomState(7)
    x = rng.rand(1, 3, 128, 160).astype("float32")
    for trial in range(2):
        ratios = random_ratios(groups, rng)
        model = copy_model(name, source)
        plan = make_plan(model, name, ratios, groups=groups)
        cut_kinds = {k for g in groups if ratios.get(g.name, 0) > 0 for k in g.kinds}
        assert cut_kinds == {k for g in groups if g.prunable for k in g.kinds}
        if name == "det_mv3_db":
            assert cut_kinds == set(KINDS)
        masked = copy_model(name, source)
        mask_removed_channels(masked, groups, plan)
        expected = eval_maps(masked, x)
        assert 0.01 < expected.std(), "maps saturated: the check would be vacuous"
        assert np.abs(expected - eval_maps(source, x)).max() > 1e-3, "masking changed nothing"

        apply_plan(model, plan, groups)
        diff = np.abs(eval_maps(model, x) - expected).max()
        assert diff <= MASK_TOL, f"{name} trial {trial}: max |diff| {diff:.3g}"
        model.train()
        with paddle.no_grad():
            assert model(paddle.to_tensor(x))["maps"].shape == [1, 3, 128, 160]


def test_flops_shares_and_table(discovered):
    model, groups = discovered["det_mv3_db"]
    shares = group_flops_share(model, groups, (640, 640))
    assert shares["head.thresh.conv1"] == 0.0  # not in the inference graph
    # The lateral FPN convs + the p*_conv inputs they feed, and the concat-fed head conv dominate.
    assert shares["neck.in2_conv"] > 0.4 and shares["head.binarize.conv1"] > 0.3
    assert 1.5 < sum(shares.values()) < 2.1  # each conv counts for its input and its output group
    table = format_table(groups, shares)
    assert "neck.p5_conv" in table and "no: train-only head.thresh branch" in table


def test_trace_maps_every_parameter_to_a_structured_key(discovered):
    model, _ = discovered["ppocrv4_det"]
    graph = trace(model, (64, 64), training=False)
    assert set(graph.params.values()) <= set(model.state_dict())
    assert not any(key.startswith("head.thresh.") for key in graph.params.values())  # eval graph
    assert len(graph.outputs) == 1 and graph.shapes[graph.outputs[0]] == (1, 1, 64, 64)


class _Transposing(paddle.nn.Layer):
    """conv -> transpose (unsupported) -> conv, and a second branch concatenated on channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.conv2 = paddle.nn.Conv2D(8, 4, 1)
        self.conv3 = paddle.nn.Conv2D(3, 6, 1)
        self.conv4 = paddle.nn.Conv2D(10, 2, 1)

    def forward(self, x):
        y = self.conv2(paddle.transpose(paddle.nn.functional.relu(self.conv1(x)), [0, 1, 3, 2]))
        return {"maps": self.conv4(paddle.concat([y, self.conv3(x)], axis=1))}


def test_unsupported_ops_fix_channels_and_concat_offsets_are_recorded():
    with paddle.utils.unique_name.guard():
        model = _Transposing()
    groups = _by_name(discover_groups(model))
    assert groups["conv1"].reason == "touches unsupported op transpose2"
    assert groups["conv2"].prunable and groups["conv3"].prunable
    assert groups["conv4"].reason == REASON_OUTPUT
    consumer = {m.param: m.indices for m in groups["conv3"].members if m.role == CONSUMER}
    assert consumer == {"conv4.weight": (4, 5, 6, 7, 8, 9)}
