"""What recovery and adaptive-BN screening need from a plan, as plain data (train/ must not import prune/).

Both compare the pruned student with its unpruned teacher channel by channel, so they need, for a tensor axis of
the student, which teacher channels it kept. That is read from the groups' members: every pruned group removes
its dropped channels from each (parameter, axis) it touches, which covers concat-fed convs, depthwise
passthroughs and the head's input alike.
"""
from __future__ import annotations

from prune.groups import ChannelGroup
from prune.plan import PruningPlan

HEAD_INPUT = ("head.binarize.conv1.weight", 1)


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


def neck_feature_channels(plan: PruningPlan, groups: list[ChannelGroup], neck_channels: int) -> list[int]:
    """Teacher neck-output channels (= input channels of the head's first conv) the student keeps, for feature
    distillation (``train.recovery.recover(feature_channels=...)``); ``neck_channels``: unpruned width."""
    param, axis = HEAD_INPUT
    return kept_channels(plan, groups, param, axis, neck_channels)
