"""Channel importance within a group, computed from the model's current (loaded, trained) producer filters.

PaddleSlim's pruners copy the weights when they are built; built before loading a checkpoint they rank random
init filters (the seed recipe's bug). Here the ranking reads the tensors at call time, so it always sees
whatever the model holds now. A channel is described by the filters that *produce* it, concatenated over all
producers of the group (e.g. every conv of a residual chain, or an expand conv and its SE gate conv).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import paddle

from prune.groups import ChannelGroup

Criterion = Literal["fpgm", "l1"]
CRITERIA: tuple[str, ...] = ("fpgm", "l1")


def producer_filters(model: paddle.nn.Layer, group: ChannelGroup) -> np.ndarray:
    """``[channels, features]`` float64 matrix: row j = channel j's producer filters, flattened and concatenated."""
    state = model.state_dict()
    blocks = []
    for member in group.producers:
        weights = np.moveaxis(state[member.param].numpy(), member.axis, 0)[list(member.indices)]
        blocks.append(weights.reshape(group.channels, -1).astype(np.float64))
    return np.concatenate(blocks, axis=1)


def channel_scores(filters: np.ndarray, criterion: Criterion) -> np.ndarray:
    """Importance per row; higher is more important.

    ``l1``: sum of absolute weights. ``fpgm`` (He et al., CVPR 2019): sum of Euclidean distances to all other
    filters; the filters nearest the geometric median are the most replaceable by the others.
    """
    if criterion == "l1":
        return np.abs(filters).sum(axis=1)
    if criterion == "fpgm":
        squared = (filters**2).sum(axis=1)
        distances = squared[:, None] + squared[None, :] - 2.0 * filters @ filters.T
        return np.sqrt(np.maximum(distances, 0.0)).sum(axis=1)
    raise ValueError(f"unknown criterion {criterion!r}; known: {CRITERIA}")


def rank_channels(model: paddle.nn.Layer, group: ChannelGroup, criterion: Criterion = "fpgm") -> np.ndarray:
    """Channel indices of ``group``, most important first (ties keep the lower index first)."""
    scores = channel_scores(producer_filters(model, group), criterion)
    return np.argsort(-scores, kind="stable")
