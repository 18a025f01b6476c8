"""What recovery and adaptive-BN screening need from a plan, as plain data (train/ must not import prune/).

Both compare the pruned student with its unpruned teacher channel by channel, so they need, for a tensor axis of
the student, which teacher channels it kept. That is read from the groups' members: every pruned group removes
its dropped channels from each (parameter, axis) it touches, which covers concat-fed convs, depthwise
passthroughs and the head's input alike. Where the distilled features enter the next part of the model (the
neck's inputs, the head's input) is the model's ``ModelSpec`` (``train.models.zoo``).
"""
from __future__ import annotations

import paddle

from prune.groups import ChannelGroup
from prune.plan import PruningPlan
from train.models.zoo import model_spec


def kept_channels(plan: PruningPlan, groups: list[ChannelGroup], param: str, axis: int, size: int) -> list[int]:
    """Teacher indices along ``axis`` of state_dict tensor ``param`` (``size`` long unpruned) that ``plan`` keeps,
    sorted, i.e. in the student's order."""
    removed: set[int] = set()
    for group in groups:
        kept = plan.kept.get(group.name)
        if kept is None:
            continue
        dropped = set(range(group.channels)) - set(kept)
        for member in group.members:
            if member.param == param and member.axis == axis:
                removed.update(member.indices[j] for j in dropped)
    return [c for c in range(size) if c not in removed]


def neck_feature_channels(plan: PruningPlan, groups: list[ChannelGroup], teacher: paddle.nn.Layer) -> list[int]:
    """Teacher neck-output channels (= input channels of the head's first conv) the student keeps, for feature
    distillation (``train.recovery.recover(feature_channels=...)``); the width is read from the unpruned
    ``teacher``."""
    param = model_spec(plan.model).head_input
    return kept_channels(plan, groups, param, 1, teacher.state_dict()[param].shape[1])


def backbone_feature_channels(plan: PruningPlan, groups: list[ChannelGroup],
                              teacher: paddle.nn.Layer) -> list[list[int]]:
    """Per backbone output (the neck's inputs, in order), the teacher channels the student keeps, for
    ``train.recovery.recover(backbone_channels=...)``; widths are read from the unpruned ``teacher``."""
    state = teacher.state_dict()
    return [kept_channels(plan, groups, param, 1, state[param].shape[1])
            for param in model_spec(plan.model).neck_inputs]
