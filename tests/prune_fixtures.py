"""Helpers shared by the pruning tests: zoo models with non-trivial weights, random plans, channel masking.

Weights are drawn like the PaddleOCR reference fixtures (shared/reference/README.md, step 2), so BN running
statistics, BN affines, learnable affine scalars and conv biases all differ per channel: a wrongly coupled
channel then changes the output instead of hiding behind identical values.
"""

from __future__ import annotations

import numpy as np
import paddle

from prune.groups import CONSUMER, KINDS, ChannelGroup
from prune.plan import PruningPlan
from train.models import zoo
from train.models.pplcnet_v3 import LearnableAffineBlock
from train.weights import load_state_strict

MODELS = ("det_mv3_db", "ppocrv3_det", "ppocrv4_det")


def perturbed(name: str, seed: int = 100, deploy: bool = True, bn_scale: tuple[float, float] = (0.8, 1.2)):
    """Zoo model ``name`` (v4: ``deploy`` form) with per-channel BN stats/affines, LAB scalars and conv biases.

    ``bn_scale`` bounds the BN weights: the v4 training form sums 6 branches per block and saturates its maps
    to 0/1 unless they are small (the reference README re-sets its stats from data for the same reason).
    """
    paddle.seed(seed)
    model = zoo.build_detector(name, deploy=deploy) if name == "ppocrv4_det" else zoo.build_detector(name)
    rng = np.random.RandomState(seed)

    def draw(tensor: paddle.Tensor, low: float, high: float) -> None:
        tensor.set_value(rng.uniform(low, high, tensor.shape).astype("float32"))

    for layer in model.sublayers():
        if isinstance(layer, (paddle.nn.BatchNorm, paddle.nn.BatchNorm2D)):
            draw(layer._mean, -0.1, 0.1)
            draw(layer._variance, 0.5, 1.5)
            draw(layer.weight, *bn_scale)
            draw(layer.bias, -0.1, 0.1)
        elif isinstance(layer, LearnableAffineBlock):
            draw(layer.scale, 0.8, 1.2)
            draw(layer.bias, -0.1, 0.1)
        elif isinstance(layer, (paddle.nn.Conv2D, paddle.nn.Conv2DTranspose)) and layer.bias is not None:
            draw(layer.bias, -0.1, 0.1)
    model.eval()
    return model


def copy_model(name: str, model: paddle.nn.Layer, deploy: bool = True) -> paddle.nn.Layer:
    """A fresh zoo model holding ``model``'s current weights, in eval mode."""
    twin = zoo.build_detector(name, deploy=deploy) if name == "ppocrv4_det" else zoo.build_detector(name)
    load_state_strict(twin, {k: v.numpy() for k, v in model.state_dict().items()}, source="copy")
    twin.eval()
    return twin


def random_ratios(groups: list[ChannelGroup], rng: np.random.RandomState) -> dict[str, float]:
    """Random ratios for ~3/4 of the prunable groups, and at least one cut group of every kind the model has."""
    prunable = [g for g in groups if g.prunable]
    ratios = {g.name: float(rng.uniform(0.1, 0.8)) if rng.rand() < 0.75 else 0.0 for g in prunable}
    for kind in KINDS:
        candidates = [g for g in prunable if kind in g.kinds]
        if candidates and not any(ratios[g.name] > 0 for g in candidates):
            ratios[candidates[0].name] = 0.5
    return ratios


def mask_removed_channels(model: paddle.nn.Layer, groups: list[ChannelGroup], plan: PruningPlan) -> None:
    """Zero, in place, the consumer input weights of every channel the plan removes (nothing else)."""
    state = model.state_dict()
    by_name = {g.name: g for g in groups}
    for name, kept in plan.kept.items():
        group = by_name[name]
        dropped = sorted(set(range(group.channels)) - set(kept))
        for member in group.members:
            if member.role != CONSUMER or not dropped:
                continue
            values = state[member.param].numpy()
            index = [slice(None)] * values.ndim
            index[member.axis] = [member.indices[j] for j in dropped]
            values[tuple(index)] = 0.0
            state[member.param].set_value(values)


def eval_maps(model: paddle.nn.Layer, x: np.ndarray) -> np.ndarray:
    model.eval()
    with paddle.no_grad():
        return model(paddle.to_tensor(x))["maps"].numpy()
