"""Channel groups: the sets of (parameter, axis, channel indices) that must be cut together.

One rule for every op, in the spirit of Torch-Pruning: the traced forward is read op by op and channel-level
nodes ``(tensor, channel)`` are merged with a union-find whenever an op ties channels together:

- conv (groups 1): its output channels are new (filter axis 0 = *producer*, ranked); its input channels are
  read by filter axis 1 (*consumer*). Transposed conv: filter axis 0 consumer, axis 1 producer.
- depthwise conv, BatchNorm, element-wise activations, pooling, interpolation, scale, ...: input channel c *is*
  output channel c (their parameters ride along as *passthrough*).
- element-wise add/sub/mul/div: channel-aligned operands (residuals, FPN upsample+add, SE gates ``[N,C,1,1]``,
  biases) are the same channels as the output; scalar operands (learnable affine blocks) are ignored.
- concat on the channel axis: input k's channel c is output channel ``offset_k + c``.
- anything else touching a 4-D activation (reshape, transpose, matmul, split, unknown ops) makes those
  channels *fixed*, as are the model input and the model outputs.

A group is the set of connected components with the same producers (e.g. all convs of a residual chain, the
4 FPN lateral convs tied by upsample+add, one concat-fed conv with its offsets in the consumers). PaddleSlim
2.6 has no concat rule and drops concat-fed convs silently; here every conv gets a group and a group that
cannot be cut says why.

``python -m prune.groups model=det_mv3_db`` prints the groups of a zoo model.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import hydra
import paddle
from omegaconf import DictConfig

from prune.graph import CONV_OPS, TRANSPOSED_CONV_OPS, Op, TracedGraph, conv_macs, trace
from train.cli import exit_on_user_error, print_result_line, run_app
from train.models.detector import HEAD_PREFIX, TRAIN_ONLY_PREFIX
from train.models.zoo import build_detector

PRODUCER = "producer"
PASSTHROUGH = "passthrough"
CONSUMER = "consumer"
KINDS = ("residual", "depthwise", "se", "fpn_add", "concat", "head", "transposed")

# The DB head's threshold branch runs only in training (DB loss); channels it alone produces never reach
# inference, so cutting them would only save training compute and would change nothing measurable.
REASON_THRESH = f"train-only {TRAIN_ONLY_PREFIX.rstrip('.')} branch"
REASON_OUTPUT = "feeds model output"
REASON_INPUT = "model input"

_ELEMENTWISE = ("elementwise_add", "elementwise_sub", "elementwise_mul", "elementwise_div")
_INTERPOLATE = ("nearest_interp_v2", "bilinear_interp_v2", "nearest_interp", "bilinear_interp")
# Ops whose output channel c depends only on input channel c (slot X -> Out).
_CHANNELWISE = (
    "relu", "relu6", "hard_swish", "hard_sigmoid", "sigmoid", "swish", "silu", "leaky_relu", "gelu", "tanh",
    "exp", "reciprocal", "scale", "cast", "dropout", "clip", "assign", "pool2d",
) + _INTERPOLATE
_BN_PARAM_SLOTS = ("Scale", "Bias", "Mean", "Variance")
_SPATIAL_AXES = {2, 3, -1, -2}


@dataclass(frozen=True)
class Member:
    """Axis ``axis`` of state_dict tensor ``param``; ``indices[j]`` is its index for channel j of the group."""

    param: str
    axis: int
    indices: tuple[int, ...]
    role: str


@dataclass(frozen=True)
class ChannelGroup:
    """Channels cut together, named by the structured layer name of the first producer (program order).

    ``members`` lists every tensor slice that moves with the group; ``kinds`` says which structures couple it
    (subset of ``KINDS``); ``reason`` is empty when ``prunable``, otherwise why not.
    """

    name: str
    channels: int
    members: tuple[Member, ...]
    kinds: tuple[str, ...]
    prunable: bool
    reason: str

    @property
    def producers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.role == PRODUCER)


@dataclass
class _Slot:
    """A channel axis of a parameter (``key``, ``axis``) or of an activation (``key`` = var name, axis 1)."""

    base: int
    size: int
    role: str = ""
    first_op: int = -1


@dataclass
class _Coupling:
    """Union-find over channel nodes, filled by walking a ``TracedGraph``."""

    graph: TracedGraph
    parent: list[int] = field(default_factory=list)
    vars: dict[str, _Slot] = field(default_factory=dict)
    params: dict[tuple[str, int], _Slot] = field(default_factory=dict)
    fixed: list[tuple[int, str]] = field(default_factory=list)
    tags: list[tuple[int, str]] = field(default_factory=list)
    param_alias: dict[str, str] = field(default_factory=dict)
    producer_op: dict[str, str] = field(default_factory=dict)
    param_shapes: dict[str, tuple[int, ...]] = field(init=False)

    def __post_init__(self) -> None:
        self.param_shapes = {key: self.graph.shapes[var] for var, key in self.graph.params.items()}

    # -- nodes -------------------------------------------------------------------------------------------------
    def _new_slot(self, size: int) -> _Slot:
        slot = _Slot(base=len(self.parent), size=size)
        self.parent.extend(range(slot.base, slot.base + size))
        return slot

    def is_activation(self, var: str) -> bool:
        return var not in self.graph.params and var not in self.param_alias and len(self.graph.shapes[var]) == 4

    def channels(self, var: str) -> int:
        return self.graph.shapes[var][1]

    def var_slot(self, var: str) -> _Slot:
        if var not in self.vars:
            self.vars[var] = self._new_slot(self.channels(var))
        return self.vars[var]

    def find(self, node: int) -> int:
        root = node
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[node] != root:
            self.parent[node], node = root, self.parent[node]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    # -- rules ---------------------------------------------------------------------------------------------------
    def tie(self, a: str, b: str, offset: int = 0) -> None:
        """Channel c of activation ``a`` is channel ``offset + c`` of activation ``b``."""
        slot_a, slot_b = self.var_slot(a), self.var_slot(b)
        for c in range(slot_a.size):
            self.union(slot_a.base + c, slot_b.base + offset + c)

    def attach(self, key: str, axis: int, role: str, var: str, op: Op) -> None:
        """Index i along ``axis`` of parameter ``key`` belongs to channel i of activation ``var``."""
        shape = self.param_shapes[key]
        slot = self.params.get((key, axis))
        if slot is None:
            slot = self.params[(key, axis)] = self._new_slot(shape[axis])
            slot.role, slot.first_op = role, op.index
        assert slot.role == role, f"{key} axis {axis} is both {slot.role} and {role}"
        var_slot = self.var_slot(var)
        assert var_slot.size == slot.size, f"{key} axis {axis}: {slot.size} channels vs {var_slot.size} in {var}"
        for c in range(slot.size):
            self.union(slot.base + c, var_slot.base + c)

    def fix(self, var: str, reason: str) -> None:
        slot = self.var_slot(var)
        self.fixed.extend((slot.base + c, reason) for c in range(slot.size))

    def tag(self, var: str, kind: str) -> None:
        slot = self.var_slot(var)
        self.tags.extend((slot.base + c, kind) for c in range(slot.size))

    def activations_of(self, op: Op) -> list[str]:
        return [v for slots in (op.inputs, op.outputs) for names in slots.values() for v in names
                if self.is_activation(v)]

    def unsupported(self, op: Op, what: str = "") -> None:
        for var in self.activations_of(op):
            self.fix(var, f"touches unsupported op {what or op.type}")

    def touches_activation(self, op: Op) -> bool:
        return bool(self.activations_of(op))

    # -- ops -----------------------------------------------------------------------------------------------------
    def visit(self, op: Op) -> None:
        for names in op.outputs.values():
            for name in names:
                self.producer_op[name] = op.type
        if op.attrs.get("data_format") == "NHWC" or op.attrs.get("data_layout") == "NHWC":
            self.unsupported(op, f"{op.type} (NHWC)")
        elif op.type in CONV_OPS:
            self.conv(op)
        elif op.type in TRANSPOSED_CONV_OPS:
            self.transposed_conv(op)
        elif op.type == "batch_norm":
            self.batch_norm(op)
        elif op.type in _ELEMENTWISE:
            self.elementwise(op)
        elif op.type in _CHANNELWISE:
            self.channelwise(op, op.input("X"), op.output("Out"))
        elif op.type == "reduce_mean":
            self.reduce_mean(op)
        elif op.type == "concat":
            self.concat(op)
        elif op.type == "reshape2" and op.input("X") in self.graph.params:
            self.reshape_param(op)
        elif self.touches_activation(op):
            self.unsupported(op)

    def conv(self, op: Op) -> None:
        x, out, weight = op.input("Input"), op.output("Output"), op.input("Filter")
        if weight not in self.graph.params or op.input("Bias"):
            self.unsupported(op)
            return
        key, groups = self.graph.params[weight], op.attrs.get("groups", 1)
        if groups == 1:
            self.attach(key, 0, PRODUCER, out, op)
            self.attach(key, 1, CONSUMER, x, op)
        elif groups == self.channels(x) == self.channels(out):
            self.attach(key, 0, PASSTHROUGH, out, op)
            self.tie(x, out)
            self.tag(out, "depthwise")
        else:
            self.unsupported(op, f"grouped {op.type}")

    def transposed_conv(self, op: Op) -> None:
        x, out, weight = op.input("Input"), op.output("Output"), op.input("Filter")
        if weight not in self.graph.params or op.attrs.get("groups", 1) != 1 or op.input("Bias"):
            self.unsupported(op)
            return
        key = self.graph.params[weight]
        self.attach(key, 0, CONSUMER, x, op)
        self.attach(key, 1, PRODUCER, out, op)
        self.tag(out, "transposed")

    def batch_norm(self, op: Op) -> None:
        x, y = op.input("X"), op.output("Y")
        self.tie(x, y)
        for slot in _BN_PARAM_SLOTS:
            self.attach(self.graph.params[op.input(slot)], 0, PASSTHROUGH, y, op)

    def channelwise(self, op: Op, x: str, out: str) -> None:
        if self.is_activation(x) and self.is_activation(out) and self.channels(x) == self.channels(out):
            self.tie(x, out)
        elif self.touches_activation(op):
            self.unsupported(op)

    def reduce_mean(self, op: Op) -> None:
        dims = set(op.attrs.get("dim", ()))
        if op.attrs.get("keep_dim") and not op.attrs.get("reduce_all") and dims and dims <= _SPATIAL_AXES:
            self.channelwise(op, op.input("X"), op.output("Out"))
        else:
            self.unsupported(op)

    def reshape_param(self, op: Op) -> None:
        """A 1-D parameter reshaped to ``[1, C, 1, 1]`` (how a conv bias is added) stays that parameter."""
        param, out = op.input("X"), op.output("Out")
        shape, out_shape = self.graph.shapes[param], self.graph.shapes[out]
        if len(shape) == 1 and len(out_shape) == 4 and out_shape[1] == shape[0] and math.prod(out_shape) == shape[0]:
            self.param_alias[out] = self.graph.params[param]
        elif self.is_activation(out):
            # A parameter in some other 4-D layout: whatever it is combined with cannot be cut along with it.
            self.fix(out, f"touches unsupported op {op.type}")

    def elementwise(self, op: Op) -> None:
        out = op.output("Out")
        if not self.is_activation(out):
            if self.touches_activation(op):
                self.unsupported(op)
            return
        channels = self.channels(out)
        activations = []
        for operand in (op.input("X"), op.input("Y")):
            shape = self.graph.shapes[operand]
            if self.is_activation(operand) and shape[1] == channels:
                activations.append(operand)
            elif operand in self.param_alias and shape[1] == channels:
                self.attach(self.param_alias[operand], 0, PASSTHROUGH, out, op)
            elif operand in self.graph.params and shape == (channels,) and op.attrs.get("axis") == 1:
                self.attach(self.graph.params[operand], 0, PASSTHROUGH, out, op)
            elif math.prod(shape) == 1:
                continue
            else:
                self.unsupported(op, f"{op.type} (broadcast over channels)")
                return
        for operand in activations:
            self.tie(operand, out)
        if op.type == "elementwise_add" and len(activations) == 2:
            upsampled = any(self.producer_op.get(a) in _INTERPOLATE for a in activations)
            self.tag(out, "fpn_add" if upsampled else "residual")

    def concat(self, op: Op) -> None:
        out, parts = op.output("Out"), op.inputs.get("X", ())
        axis = op.attrs.get("axis")
        if op.input("AxisTensor") or not self.is_activation(out) or not all(self.is_activation(p) for p in parts):
            self.unsupported(op)
        elif axis in (1, -3):
            offset = 0
            for part in parts:
                self.tie(part, out, offset)
                offset += self.channels(part)
            self.tag(out, "concat")
        elif axis in _SPATIAL_AXES:
            for part in parts:
                self.tie(part, out)
        else:
            self.unsupported(op)

    def squeeze_tags(self) -> None:
        """1x1 activations are squeeze-and-excitation tensors (trace inputs are large enough, see graph.py)."""
        for var in list(self.vars):
            if self.graph.shapes[var][2:] == (1, 1):
                self.tag(var, "se")


def _couple(graph: TracedGraph) -> _Coupling:
    coupling = _Coupling(graph)
    for op in graph.ops:
        coupling.visit(op)
    coupling.fix(graph.input, REASON_INPUT)
    for out in graph.outputs:
        coupling.fix(out, REASON_OUTPUT)
    coupling.squeeze_tags()
    return coupling


def _layer_name(param_key: str) -> str:
    return param_key.rsplit(".", 1)[0]


def _build_group(coupling: _Coupling, roots: list[int], slots_of: dict[int, dict[tuple[str, int], list[int]]],
                 reasons: dict[int, str], tags: dict[int, set[str]]) -> ChannelGroup:
    params = coupling.params
    producers = sorted({s for r in roots for s in slots_of[r] if params[s].role == PRODUCER},
                       key=lambda s: params[s].first_op)
    first = producers[0]
    roots = sorted(roots, key=lambda r: slots_of[r][first][0])
    all_slots = sorted({s for r in roots for s in slots_of[r]}, key=lambda s: (params[s].first_op, s))
    reason = next((reasons[r] for r in roots if r in reasons), "")
    members = []
    for slot in all_slots:
        per_channel = [slots_of[r].get(slot, []) for r in roots]
        if any(len(indices) != 1 for indices in per_channel):
            reason = reason or f"uneven coupling of {slot[0]} axis {slot[1]}"
            continue
        members.append(Member(slot[0], slot[1], tuple(i[0] for i in per_channel), params[slot].role))
    if not reason and all(key.startswith(TRAIN_ONLY_PREFIX) for key, _ in producers):
        reason = REASON_THRESH
    kinds = set().union(*(tags.get(r, set()) for r in roots))
    if any(key.startswith(HEAD_PREFIX) for key, _ in producers):
        kinds.add("head")
    return ChannelGroup(
        name=_layer_name(first[0]),
        channels=len(roots),
        members=tuple(members),
        kinds=tuple(k for k in KINDS if k in kinds),
        prunable=not reason,
        reason=reason,
    )


def groups_from_graph(graph: TracedGraph) -> list[ChannelGroup]:
    """Channel groups of a traced model, ordered by their first producer in program order."""
    coupling = _couple(graph)
    slots_of: dict[int, dict[tuple[str, int], list[int]]] = defaultdict(lambda: defaultdict(list))
    for slot_key, slot in coupling.params.items():
        for i in range(slot.size):
            slots_of[coupling.find(slot.base + i)][slot_key].append(i)
    reasons: dict[int, str] = {}
    for node, reason in coupling.fixed:
        reasons.setdefault(coupling.find(node), reason)
    tags: dict[int, set[str]] = defaultdict(set)
    for node, kind in coupling.tags:
        tags[coupling.find(node)].add(kind)

    by_producers: dict[frozenset[tuple[str, int]], list[int]] = defaultdict(list)
    for root, slots in slots_of.items():
        producers = frozenset(s for s in slots if coupling.params[s].role == PRODUCER)
        if producers:
            by_producers[producers].append(root)
    groups = [_build_group(coupling, roots, slots_of, reasons, tags) for roots in by_producers.values()]
    groups.sort(key=lambda g: coupling.params[(g.producers[0].param, g.producers[0].axis)].first_op)
    return _unique_names(groups)


def _unique_names(groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """Channels of one layer split over several groups cannot be named (or cut) by that layer alone."""
    counts: dict[str, int] = defaultdict(int)
    for group in groups:
        counts[group.name] += 1
    seen: dict[str, int] = defaultdict(int)
    result = []
    for group in groups:
        if counts[group.name] > 1:
            seen[group.name] += 1
            group = ChannelGroup(f"{group.name}#{seen[group.name]}", group.channels, group.members, group.kinds,
                                 False, group.reason or f"channels of {group.name} split across groups")
        result.append(group)
    return result


def discover_groups(model: paddle.nn.Layer, input_size: tuple[int, int] = (64, 64)) -> list[ChannelGroup]:
    """The channel groups of ``model`` (traced in train mode so ``head.thresh`` is a consumer); deterministic."""
    return groups_from_graph(trace(model, input_size, training=True))


def group_flops_share(model: paddle.nn.Layer, groups: Iterable[ChannelGroup],
                      input_size: tuple[int, int] = (640, 640)) -> dict[str, float]:
    """Per group, the share of the *inference* graph's conv MACs that scales linearly with the group's width.

    Cutting a fraction r of one group's channels (and nothing else) removes r times this share of the conv MACs
    (``graph.conv_macs``: eval-mode trace, depthwise and transposed convs included). A conv contributes to the
    group of its input channels and to that of its output channels, so shares add up to about 2; a concat
    consumer contributes the fraction of its input channels that comes from the group; train-only groups get 0.
    """
    macs = conv_macs(trace(model, input_size, training=False))
    total = sum(macs.values())
    shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    return {
        g.name: sum(macs[m.param] * len(m.indices) / shapes[m.param][m.axis] for m in g.members if m.param in macs)
        / total
        for g in groups
    }


def format_table(groups: list[ChannelGroup], shares: dict[str, float]) -> str:
    """One row per group: name, members, channels, kinds, inference FLOPs share (see ``group_flops_share``),
    prunable or why not."""
    width = max(len(g.name) for g in groups)
    lines = [f"{'group':<{width}}  {'members':>7}  {'channels':>8}  {'kinds':<28}  {'flops':>6}  prunable"]
    for g in groups:
        status = "yes" if g.prunable else f"no: {g.reason}"
        lines.append(f"{g.name:<{width}}  {len(g.members):>7}  {g.channels:>8}  {','.join(g.kinds) or '-':<28}  "
                     f"{shares[g.name]:>6.1%}  {status}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="prune_groups")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    # Groups depend on the architecture only, so no weights are loaded.
    model = build_detector(cfg.model.name)
    groups = discover_groups(model)
    shares = group_flops_share(model, groups, tuple(cfg.input_size))
    print(format_table(groups, shares))
    print_result_line(f"groups={len(groups)} prunable={sum(g.prunable for g in groups)}")


if __name__ == "__main__":
    run_app(main)
