"""Pruning plans: which channels of which group to keep, as data that replays exactly.

A plan records the *kept channel indices* of every pruned group, not just ratios: applying it never re-ranks,
so a fresh model + the plan has exactly the shapes of the pruned model and its saved weights load strictly
(``load_pruned``). PaddleSlim instead re-derives shapes on restore, and ``set_state_dict`` skips every
mismatched tensor with a warning (PaddleOCR #10219); here a mismatch is a ``CheckpointError`` naming the key.

``channels`` holds the size of *every* prunable group of the source model: it fingerprints the architecture,
so a plan applied to another model (or to an already pruned one) is refused instead of half-applied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paddle

from prune.criteria import CRITERIA, Criterion, rank_channels
from prune.graph import check_input_size
from prune.groups import ChannelGroup, discover_groups
from train.errors import ConfigError
from train.models.zoo import MODEL_NAMES, build_detector
from train.weights import load_checkpoint

SCHEMA_VERSION = 1


class PlanError(ConfigError):
    """A plan file or plan value that cannot be used (unreadable, wrong schema, inconsistent indices)."""


def keep_count(channels: int, ratio: float, align: int = 1) -> int:
    """Channels kept when pruning ``ratio`` of ``channels``: ``round(channels * (1 - ratio))``, at least 1.

    With ``align > 1`` the count is rounded *up* to a multiple of ``align`` (never above ``channels``), so an
    aligned plan never prunes more than asked.
    """
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"pruning ratio {ratio}: must be in [0, 1)")
    if align < 1:
        raise ConfigError(f"align={align}: must be >= 1")
    keep = max(1, math.floor(channels * (1.0 - ratio) + 0.5))
    return min(channels, math.ceil(keep / align) * align)


def weights_hash(model: paddle.nn.Layer) -> str:
    """First 16 hex digits of a sha256 over the sorted state_dict keys, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        value = np.ascontiguousarray(state[key].numpy())
        digest.update(f"{key}|{list(value.shape)}|{value.dtype}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]


@dataclass
class PruningPlan:
    """Per-group ratios and kept channel indices for one zoo model, validated on construction.

    ``kept[g]``: sorted kept channel indices of group ``g`` (group order, see ``ChannelGroup.members``);
    ``channels``: size of every prunable group before pruning; ``weights_hash``: of the weights that were ranked.
    """

    model: str
    input_size: tuple[int, int]
    criterion: str
    ratios: dict[str, float]
    kept: dict[str, list[int]]
    channels: dict[str, int]
    weights_hash: str
    align: int = 1
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise PlanError(f"plan schema_version={self.schema_version!r}: expected {SCHEMA_VERSION}")
        if self.model not in MODEL_NAMES:
            raise PlanError(f"plan model={self.model!r}: unknown; known: {', '.join(MODEL_NAMES)}")
        if self.criterion not in CRITERIA:
            raise PlanError(f"plan criterion={self.criterion!r}: known: {', '.join(CRITERIA)}")
        if self.align < 1:
            raise PlanError(f"plan align={self.align}: must be >= 1")
        try:
            self.input_size = check_input_size(self.input_size)
        except ConfigError as exc:
            raise PlanError(f"plan {exc}") from None
        if set(self.kept) != set(self.ratios):
            extra = sorted(set(self.kept) ^ set(self.ratios))[0]
            raise PlanError(f"plan group {extra!r}: needs both a ratio and kept indices")
        for name, ratio in self.ratios.items():
            if not 0.0 <= ratio < 1.0:
                raise PlanError(f"plan group {name!r}: pruning ratio {ratio} must be in [0, 1)")
            if name not in self.channels:
                raise PlanError(f"plan group {name!r}: no channel count in 'channels'")
            channels, kept = self.channels[name], self.kept[name]
            expected = keep_count(channels, ratio, self.align)
            if len(kept) != expected:
                raise PlanError(f"plan group {name!r}: {len(kept)} kept indices, but ratio {ratio} of {channels} "
                                f"channels (align {self.align}) keeps {expected}")
            if kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= channels:
                raise PlanError(f"plan group {name!r}: kept indices must be sorted, unique and in [0, {channels})")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["input_size"] = list(self.input_size)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PruningPlan:
        """Inverse of ``to_json``; missing/unknown keys or wrong types raise ``PlanError``."""
        if not isinstance(data, dict):
            raise PlanError(f"plan: expected a JSON object, found {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        unknown, missing = sorted(set(data) - fields), sorted(required - set(data))
        if unknown or missing:
            raise PlanError(f"plan: unknown key(s) {unknown}, missing key(s) {missing}")
        try:
            return cls(
                model=str(data["model"]),
                input_size=tuple(int(v) for v in data["input_size"]),  # type: ignore[arg-type]
                criterion=str(data["criterion"]),
                ratios={str(k): float(v) for k, v in data["ratios"].items()},
                kept={str(k): [int(i) for i in v] for k, v in data["kept"].items()},
                channels={str(k): int(v) for k, v in data["channels"].items()},
                weights_hash=str(data["weights_hash"]),
                align=int(data.get("align", 1)),
                schema_version=int(data.get("schema_version", SCHEMA_VERSION)),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"plan: malformed value ({type(exc).__name__}: {exc})") from exc

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        """Read a plan written by ``save``; any problem is a ``PlanError`` naming the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanError(f"{path}: cannot read the plan ({type(exc).__name__}: {exc})") from exc
        try:
            return cls.from_json(data)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from exc


def _groups_by_name(model: paddle.nn.Layer, groups: list[ChannelGroup] | None) -> dict[str, ChannelGroup]:
    return {g.name: g for g in (groups if groups is not None else discover_groups(model))}


def make_plan(model: paddle.nn.Layer, model_name: str, ratios: dict[str, float], criterion: Criterion = "fpgm",
              align: int = 1, input_size: tuple[int, int] = (640, 640),
              groups: list[ChannelGroup] | None = None) -> PruningPlan:
    """Rank every group in ``ratios`` on the model's current weights and keep the most important channels.

    ``input_size`` is recorded for measuring the plan (FLOPs, latency); it does not change the groups.
    Unknown or non-prunable group names and ratios outside [0, 1) raise ``ConfigError`` naming them.
    """
    if model_name not in MODEL_NAMES:
        raise ConfigError(f"unknown detector {model_name!r}; known: {', '.join(MODEL_NAMES)}")
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion={criterion!r}: known: {', '.join(CRITERIA)}")
    if align < 1:
        raise ConfigError(f"align={align}: must be >= 1")
    by_name = _groups_by_name(model, groups)
    kept: dict[str, list[int]] = {}
    for name, ratio in ratios.items():
        group = by_name.get(name)
        if group is None:
            raise ConfigError(f"group {name!r} is not a group of {model_name}; list them with "
                              f"`python -m prune.groups model={model_name}`")
        if not group.prunable:
            raise ConfigError(f"group {name!r} of {model_name} is not prunable: {group.reason}")
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"group {name!r}: pruning ratio {ratio} must be in [0, 1)")
        order = rank_channels(model, group, criterion)
        kept[name] = sorted(int(i) for i in order[: keep_count(group.channels, ratio, align)])
    return PruningPlan(
        model=model_name,
        input_size=tuple(input_size),  # type: ignore[arg-type]
        criterion=criterion,
        ratios={name: float(r) for name, r in ratios.items()},
        kept=kept,
        channels={g.name: g.channels for g in by_name.values() if g.prunable},
        weights_hash=weights_hash(model),
        align=align,
    )


def _check_fits(plan: PruningPlan, by_name: dict[str, ChannelGroup]) -> None:
    model_channels = {g.name: g.channels for g in by_name.values() if g.prunable}
    for name, channels in plan.channels.items():
        if name not in model_channels:
            raise ConfigError(f"plan for {plan.model}: group {name!r} is not a prunable group of this model "
                              "(plan made for another model?)")
        if model_channels[name] != channels:
            raise ConfigError(f"plan for {plan.model}: group {name!r} has {channels} channels in the plan but "
                              f"{model_channels[name]} in this model (another model, or already pruned?)")
    for name in model_channels:
        if name not in plan.channels:
            raise ConfigError(f"plan for {plan.model}: this model's prunable group {name!r} is unknown to the plan "
                              "(plan made for another model?)")


def check_plan_fits(plan: PruningPlan, model: paddle.nn.Layer, groups: list[ChannelGroup] | None = None) -> None:
    """ConfigError unless ``plan`` was made for ``model``'s architecture (same prunable groups, same sizes).

    ``apply_plan`` checks the same; calling this first lets a command refuse a plan file before it starts work.
    """
    _check_fits(plan, _groups_by_name(model, groups))


def _kept_slices(plan: PruningPlan, by_name: dict[str, ChannelGroup],
                 sizes: dict[str, list[int]]) -> dict[tuple[str, int], np.ndarray]:
    """Per (state_dict key, axis): the indices to keep, combining every group that cuts that axis."""
    removed: dict[tuple[str, int], set[int]] = defaultdict(set)
    for name, kept in plan.kept.items():
        group = by_name[name]
        dropped = sorted(set(range(group.channels)) - set(kept))
        for member in group.members:
            removed[(member.param, member.axis)].update(member.indices[j] for j in dropped)
    return {
        (key, axis): np.array(sorted(set(range(sizes[key][axis])) - cut), dtype=np.int64)
        for (key, axis), cut in removed.items()
        if cut
    }


def _refresh_layer_attributes(model: paddle.nn.Layer) -> None:
    """Make cached channel counts agree with the sliced weights (Paddle's convs pass ``_groups`` to the kernel)."""
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, paddle.nn.Conv2D):
            out_channels, in_per_group = layer.weight.shape[:2]
            if layer._groups != 1 and layer._groups == layer._in_channels and in_per_group == 1:
                layer._groups = layer._in_channels = out_channels
                layer._op_type = "depthwise_conv2d" if out_channels > 1 else "conv2d"
            else:
                layer._in_channels = in_per_group * layer._groups
            layer._out_channels = out_channels
        elif isinstance(layer, paddle.nn.Conv2DTranspose):
            layer._in_channels, out_per_group = layer.weight.shape[:2]
            layer._out_channels = out_per_group * layer._groups
        elif isinstance(layer, paddle.nn.BatchNorm2D):
            layer._num_features = layer.weight.shape[0]
    # Zoo layers that cache channel counts of their own (PPLCNetV3's re-parameterizable layers) re-read them.
    for layer in model.sublayers(include_self=True):
        if hasattr(layer, "refresh_channel_counts"):
            layer.refresh_channel_counts()


def _storage_place(tensor: paddle.Tensor) -> paddle.CPUPlace | paddle.CUDAPlace:
    """The concrete place type ``DenseTensor.set`` needs (``Tensor.place`` is a generic ``Place``)."""
    place = tensor.place
    return paddle.CUDAPlace(place.gpu_device_id()) if place.is_gpu_place() else paddle.CPUPlace()


def apply_plan(model: paddle.nn.Layer, plan: PruningPlan,
               groups: list[ChannelGroup] | None = None) -> paddle.nn.Layer:
    """Cut ``model`` in place to the plan's kept channels (no re-ranking) and return it.

    Every member tensor is sliced along its axis (its storage replaced, so ``parameters()`` and the state_dict
    stay the same objects; build optimizers afterwards) and conv/BN channel attributes are updated. No
    ``*_backup`` copies are kept. A plan for another architecture raises ``ConfigError``.
    """
    by_name = _groups_by_name(model, groups)
    _check_fits(plan, by_name)
    state = model.state_dict()
    slices = _kept_slices(plan, by_name, {key: list(t.shape) for key, t in state.items()})
    for (key, axis), keep in sorted(slices.items()):
        tensor = state[key]
        tensor.get_tensor().set(np.take(tensor.numpy(), keep, axis=axis), _storage_place(tensor))
        if not tensor.stop_gradient:
            tensor.clear_gradient(False)
    _refresh_layer_attributes(model)
    return model


def prune_model(model: paddle.nn.Layer, model_name: str, ratios: dict[str, float], criterion: Criterion = "fpgm",
                align: int = 1, input_size: tuple[int, int] = (640, 640)) -> tuple[paddle.nn.Layer, PruningPlan]:
    """Rank on the current weights, make the plan and apply it in place: ``(model, plan)``."""
    groups = discover_groups(model)
    plan = make_plan(model, model_name, ratios, criterion, align, input_size, groups)
    return apply_plan(model, plan, groups), plan


def load_pruned(model_name: str, plan: PruningPlan, weights: str | Path) -> paddle.nn.Layer:
    """Fresh zoo model -> ``apply_plan`` -> strict load of ``weights``; in eval mode.

    Weights that do not fit the plan raise ``CheckpointError`` naming the first mismatched key.
    """
    if plan.model != model_name:
        raise ConfigError(f"plan is for model {plan.model!r}, not {model_name!r}")
    model = apply_plan(build_detector(model_name), plan)
    load_checkpoint(model, weights)
    model.eval()
    return model
