"""Trace a dygraph detector into a plain list of ops, so channel coupling can be read off the real dataflow.

Paddle 3.1.1 builds PIR programs by default, but the legacy ``Program`` still exposes every op's named input and
output slots and its attributes, which is what the coupling rules need; the trace therefore runs inside
``paddle.pir_utils.OldIrGuard()``. ``paddle.jit.to_static`` is applied to the bound ``forward`` (not the layer),
so the model object is left untouched, and dynamic mode is restored even if tracing fails (a failed trace
otherwise leaves the whole process in static mode). Program variable names of parameters are Paddle's auto
names (``conv2d_3.w_0``); they are mapped back to the model's structured state_dict keys here, so nothing
downstream ever sees an auto name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import paddle
from paddle.static import InputSpec

from train.dy2static_cache import convert_each_class_once
from train.models.detector import check_input_size as check_model_input_size

# Attributes the coupling rules read; copying only these keeps the trace plain data.
_ATTRS = ("axis", "groups", "dim", "keep_dim", "reduce_all", "data_format", "data_layout")
CONV_OPS = ("conv2d", "depthwise_conv2d")
TRANSPOSED_CONV_OPS = ("conv2d_transpose",)
# The FPN and DB-head strides multiply up to 32, and a 64-pixel side keeps the deepest map larger than 1x1,
# so a 1x1 activation is always a squeeze (SE) tensor and never a real feature map.
MIN_INPUT_SIDE = 64


@dataclass(frozen=True)
class Op:
    """One program op: its type, input/output variable names per slot, and the attributes the rules need."""

    index: int
    type: str
    inputs: Mapping[str, tuple[str, ...]]
    outputs: Mapping[str, tuple[str, ...]]
    attrs: Mapping[str, Any]

    def input(self, slot: str) -> str | None:
        names = self.inputs.get(slot, ())
        return names[0] if names else None

    def output(self, slot: str) -> str | None:
        names = self.outputs.get(slot, ())
        return names[0] if names else None


@dataclass(frozen=True)
class TracedGraph:
    """A model's forward as ops in program order, with static shapes and parameter keys.

    ``params`` maps program variable names of the parameters the ops use to structured state_dict keys (in eval
    mode the ``head.thresh`` parameters are absent); ``input`` is the image
    variable and ``outputs`` the variables of the model's (flattened) outputs.
    """

    ops: tuple[Op, ...]
    shapes: Mapping[str, tuple[int, ...]]
    params: Mapping[str, str]
    input: str
    outputs: tuple[str, ...]


def check_input_size(input_size: tuple[int, int]) -> tuple[int, int]:
    """``input_size`` as (H, W) ints, or ``ConfigError`` if the detector cannot be traced at that size."""
    return check_model_input_size(input_size, minimum=MIN_INPUT_SIDE)


def parameter_keys(model: paddle.nn.Layer) -> dict[str, str]:
    """Paddle variable name -> structured state_dict key for every tensor of ``model``'s state_dict.

    Two tensors with one name cannot be told apart in a program (a model built outside
    ``paddle.utils.unique_name.guard()`` can have them), so that is refused.
    """
    keys: dict[str, str] = {}
    for key, tensor in model.state_dict().items():
        if tensor.name in keys:
            raise ValueError(
                f"parameters {keys[tensor.name]!r} and {key!r} share the variable name {tensor.name!r}; "
                "build the model inside paddle.utils.unique_name.guard() (the zoo constructors do)"
            )
        keys[tensor.name] = key
    return keys


def _flatten_outputs(outputs: Any) -> list[Any]:
    if isinstance(outputs, Mapping):
        return [v for key in sorted(outputs) for v in _flatten_outputs(outputs[key])]
    if isinstance(outputs, (list, tuple)):
        return [v for item in outputs for v in _flatten_outputs(item)]
    return [outputs]


def trace(model: paddle.nn.Layer, input_size: tuple[int, int] = (64, 64), training: bool = True) -> TracedGraph:
    """Trace ``model`` on a ``[1, 3, H, W]`` input in train (default) or eval mode; the model is left unchanged.

    Train mode is the default because it includes the train-only ``head.thresh`` branch, whose first conv also
    consumes the neck output and must be cut with it.
    """
    height, width = check_input_size(input_size)
    keys = parameter_keys(model)
    convert_each_class_once()
    was_training = model.training
    model.train() if training else model.eval()
    try:
        with paddle.pir_utils.OldIrGuard():
            static_forward = paddle.jit.to_static(
                model.forward, input_spec=[InputSpec([1, 3, height, width], "float32", "x")], full_graph=True
            )
            program = static_forward.concrete_program
            block = program.main_program.global_block()
            ops = tuple(
                Op(
                    index=i,
                    type=op.type,
                    inputs={slot: tuple(op.input(slot)) for slot in op.input_names if op.input(slot)},
                    outputs={slot: tuple(op.output(slot)) for slot in op.output_names if op.output(slot)},
                    attrs={name: op.attr(name) for name in _ATTRS if op.has_attr(name)},
                )
                for i, op in enumerate(block.ops)
            )
            shapes = {name: tuple(var.shape) for name, var in block.vars.items()}
            inputs = [v for v in program.inputs if isinstance(v, paddle.static.Variable)]
            outputs = tuple(v.name for v in _flatten_outputs(program.outputs))
    finally:
        if not paddle.in_dynamic_mode():
            paddle.disable_static()
        model.train() if was_training else model.eval()
    assert len(inputs) == 1, f"expected one image input, traced {len(inputs)}"
    # The program declares every parameter of the layer; keep those the traced forward reads.
    used = {name for op in ops for slots in (op.inputs, op.outputs) for names in slots.values() for name in names}
    params = {name: keys[name] for name in shapes if name in keys and name in used}
    return TracedGraph(ops=ops, shapes=shapes, params=params, input=inputs[0].name, outputs=outputs)


def conv_macs(graph: TracedGraph) -> dict[str, int]:
    """Multiply-accumulates of every conv (plain, depthwise, transposed) in ``graph``, keyed by filter key.

    ``out_elements * in_channels_per_group * kernel_area`` for convs, ``in_elements * out_channels_per_group *
    kernel_area`` for transposed convs; biases, BN and activations are not counted.
    """
    macs: dict[str, int] = {}
    for op in graph.ops:
        if op.type in CONV_OPS:
            filter_shape = graph.shapes[op.input("Filter")]
            active = graph.shapes[op.output("Output")]
        elif op.type in TRANSPOSED_CONV_OPS:
            filter_shape = graph.shapes[op.input("Filter")]
            active = graph.shapes[op.input("Input")]
        else:
            continue
        key = graph.params[op.input("Filter")]
        macs[key] = macs.get(key, 0) + math.prod(active) * math.prod(filter_shape[1:])
    return macs
