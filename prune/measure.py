"""What a (pruned) detector costs at inference: FLOPs, parameters, exported size and CPU latency.

Everything here describes the **inference graph**: the model in eval mode, where ``DBHead`` returns only the
probability map and the train-only ``head.thresh`` branch never runs. Counts come from one eval-mode forward
with hooks on the layers that actually execute, so they follow the real weight shapes of a pruned model and
need no layer attribute to be right.

FLOPs definition (``count_flops``): per layer that runs, the operations ``paddle.flops`` counts (multiply-
accumulates for convolutions), except for transposed convolutions:

- convolution: ``output elements x (weight.shape[1] x kernel elements + 1 if bias)``
  (``weight.shape[1]`` is ``in_channels / groups``, so depthwise convs count one input channel);
- transposed convolution: ``input elements x weight.shape[1] x kernel elements + output elements if bias``
  (each input value is scattered into ``out_channels / groups`` kernels). ``paddle.flops`` applies the
  convolution rule to it, which over-counts by ``stride^2`` (4x for the DB head's x2 deconvs: 278 M instead of
  69 M on PP-OCRv4 at 640x640); this is the rule of fvcore and of the transposed conv's own definition;
- BatchNorm: 2 per element; adaptive average pooling: ``(window elements + 1)`` per output element;
  average pooling: 1 per output element;
- everything else 0: activations (ReLU, hardswish, sigmoid...), the learnable affine scalars of PPLCNetV3,
  upsampling, elementwise adds, concats.

Params (``count_params``): number of values in the Paddle parameters of the layers that run in eval mode, in
the inference form the export saves (``train.inference.inference_form``: PPLCNetV3's foldable scalar affines
folded into their convs, the head's last transposed conv as a 1x1 conv), i.e. exactly the tensors the exported
inference program stores. Paddle keeps BatchNorm running mean/variance as parameters, so they are included (as
in ``paddle.flops``' "Total Params"); ``head.thresh`` is excluded, and so are parameters a layer holds but never
applies (PPLCNetV3's stride-2 activation scalars).

Latency (``measure_latency``): the model exported with ``paddle.jit.save`` (Paddle 3 PIR: ``inference.json`` +
``inference.pdiparams``) and run by Paddle Inference on CPU with a fixed thread count, oneDNN on by default,
batch 1 at a fixed input size; untimed warm-up runs, then the median wall time of the timed runs, each
including the copy of the input in and of the output out.

Command line: ``python -m prune.measure model=ppocrv4_det [plan=path.json [weights=pruned.pdparams]]``
(config ``conf/prune_measure.yaml``); last stdout line ``flops=<int> params=<int> latency_ms=<float>
size_bytes=<int>``, with a plan followed by ``latency_ratio=<float> latency_ratio_low=<float>
latency_ratio_high=<float>`` (timed interleaved with the unpruned model, ``prune.latency``; ``latency_ms`` is then
the median of the candidate's timed rounds, ``measure_against``).
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import paddle
from omegaconf import DictConfig
from paddle import nn

from prune.latency import LatencyRatio, interleaved_ratio, round_settings
from prune.plan import PruningPlan, apply_plan, load_pruned
from train.cli import exit_on_user_error, print_result_line, run_app
from train.errors import CheckpointError, ConfigError
from train.inference import InferenceSession, eval_mode, export_inference, exported_size, inference_form
from train.locks import quiet_host
from train.models.detector import check_input_size
from train.schema import checked_fields
from train.weights import load_detector

SCHEMA_VERSION = 1
# The detectors' FPN halves the input 5 times and adds upsampled maps back: sides must divide evenly.
# Which layers run does not depend on the input size, so parameters are counted on a small forward.
PARAMS_PROBE_SIZE = (64, 64)


_CONVS = (nn.Conv1D, nn.Conv2D, nn.Conv3D)
_TRANSPOSED_CONVS = (nn.Conv1DTranspose, nn.Conv2DTranspose, nn.Conv3DTranspose)
_BATCH_NORMS = (nn.BatchNorm, nn.BatchNorm1D, nn.BatchNorm2D, nn.BatchNorm3D)
_AVG_POOLS = (nn.AvgPool1D, nn.AvgPool2D, nn.AvgPool3D)
_ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1D, nn.AdaptiveAvgPool2D, nn.AdaptiveAvgPool3D)


@dataclass(frozen=True)
class Measurement:
    """Cost of one model at one input size (definitions in the module docstring)."""

    flops: int
    params: int
    latency_ms: float
    size_bytes: int
    input_size: tuple[int, int]
    threads: int
    runs: int
    warmup: int = 3
    use_mkldnn: bool = True

    def result_line(self) -> str:
        """The command's machine-readable last stdout line."""
        return (f"flops={self.flops} params={self.params} latency_ms={self.latency_ms:.3f} "
                f"size_bytes={self.size_bytes}")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict with the schema version."""
        return {"schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measurement:
        """Inverse of ``to_json``; another schema version or unknown keys raise ConfigError."""
        data = checked_fields(cls, data, SCHEMA_VERSION)
        return cls(**{**data, "input_size": tuple(data["input_size"])})


def _numel(tensor: paddle.Tensor) -> int:
    return int(np.prod(tensor.shape))


def _kernel_numel(layer: nn.Layer) -> int:
    return int(np.prod(layer.weight.shape[2:]))


def _bias_ops(layer: nn.Layer, output: paddle.Tensor) -> int:
    return _numel(output) if layer.bias is not None else 0


def conv_macs(layer: nn.Layer, inputs: tuple, output: paddle.Tensor) -> int | None:
    """Multiply-accumulates of one call of a (transposed) conv, biases not counted; None for other layers.

    A conv's are counted per output value, a transposed conv's per input value (see module docstring)."""
    if isinstance(layer, _TRANSPOSED_CONVS):  # weight [C_in, C_out / groups, k...]
        return _numel(inputs[0]) * layer.weight.shape[1] * _kernel_numel(layer)
    if isinstance(layer, _CONVS):  # weight [C_out, C_in / groups, k...]
        return _numel(output) * layer.weight.shape[1] * _kernel_numel(layer)
    return None


def _layer_flops(layer: nn.Layer, inputs: tuple, output: paddle.Tensor) -> int | None:
    """FLOPs of one call of ``layer`` (see module docstring); None for a layer type without a rule."""
    macs = conv_macs(layer, inputs, output)
    if macs is not None:
        return macs + _bias_ops(layer, output)
    if isinstance(layer, _BATCH_NORMS):
        return 2 * _numel(inputs[0])
    if isinstance(layer, _AVG_POOLS):
        return _numel(output)
    if isinstance(layer, _ADAPTIVE_AVG_POOLS):
        window = np.prod(np.array(inputs[0].shape[2:]) // np.array(output.shape[2:]))
        return int(window + 1) * _numel(output)
    return None


def _has_unruled_weights(layer: nn.Layer) -> bool:
    # A layer with a matrix/kernel weight that no rule covers would silently count 0 FLOPs; scalars and vectors
    # (affine scales, biases) belong to elementwise layers, which count 0 by definition.
    return any(len(p.shape) >= 2 for p in layer.parameters(include_sublayers=False))


def hooked_forward(model: nn.Layer, input_size: tuple[int, int], hook: Callable[[nn.Layer, tuple, Any], None],
                   layers: Callable[[nn.Layer], bool] = lambda layer: True) -> None:
    """One eval-mode forward of a (1, 3, H, W) batch of ones with ``hook(layer, inputs, output)`` called after each
    sublayer that ``layers`` selects (the model's mode is restored, the hooks removed)."""
    handles = [layer.register_forward_post_hook(hook) for layer in model.sublayers(include_self=True) if layers(layer)]
    try:
        with eval_mode(model), paddle.no_grad():
            model(paddle.ones([1, 3, *input_size], dtype="float32"))
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class _Trace:
    layer_flops: dict[str, int]
    params: int


def _trace(model: nn.Layer, input_size: tuple[int, int]) -> _Trace:
    """One eval-mode forward of a (1, 3, H, W) batch with hooks counting FLOPs and collecting executed layers."""
    names = {id(layer): name for name, layer in model.named_sublayers(include_self=True)}
    flops: dict[str, int] = {}
    executed: dict[int, nn.Layer] = {}
    unruled: list[str] = []

    def hook(layer: nn.Layer, inputs: tuple, output: Any) -> None:
        executed[id(layer)] = layer
        count = _layer_flops(layer, inputs, output)
        if count is None:
            if _has_unruled_weights(layer):
                unruled.append(f"{names[id(layer)]} ({type(layer).__name__})")
            return
        name = names[id(layer)]
        flops[name] = flops.get(name, 0) + count  # a layer called twice costs twice

    hooked_forward(model, input_size, hook)
    if unruled:
        raise NotImplementedError(f"no FLOPs rule for layer(s) with weights: {', '.join(sorted(set(unruled)))}")

    seen: set[int] = set()
    params = 0
    for layer in executed.values():
        for param in layer.parameters(include_sublayers=False):
            if id(param) not in seen:
                seen.add(id(param))
                params += _numel(param)
    return _Trace(layer_flops=flops, params=params)


def layer_flops(model: nn.Layer, input_size: tuple[int, int] = (640, 640)) -> dict[str, int]:
    """FLOPs of every counted layer of the inference graph, keyed by structured layer name, in execution order."""
    return _trace(model, check_input_size(input_size)).layer_flops


def count_flops(model: nn.Layer, input_size: tuple[int, int] = (640, 640)) -> int:
    """FLOPs of the eval-mode inference graph at batch 1 (definition in the module docstring)."""
    return sum(layer_flops(model, input_size).values())


def count_params(model: nn.Layer) -> int:
    """Parameter values the inference graph reads (excludes ``head.thresh``; see the module docstring)."""
    return _trace(inference_form(model), PARAMS_PROBE_SIZE).params


def _check_timing(threads: int, warmup: int, runs: int) -> None:
    if threads < 1 or warmup < 0 or runs < 1:
        raise ConfigError(f"threads={threads}, warmup={warmup}, runs={runs}: need threads >= 1, warmup >= 0, "
                          "runs >= 1")


def _median_latency_ms(session: InferenceSession, input_size: tuple[int, int], warmup: int, runs: int) -> float:
    # Values do not change the work done; a fixed seed keeps runs comparable anyway.
    batch = np.random.default_rng(0).random((1, 3, *input_size), dtype=np.float32)
    times = []
    with quiet_host():  # the other workers of the host pause their training and evaluation meanwhile
        for _ in range(warmup):
            session(batch)
        for _ in range(runs):
            start = time.perf_counter()
            session(batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def measure_latency(
    model: nn.Layer | str | Path,
    input_size: tuple[int, int] = (640, 640),
    threads: int = 2,
    warmup: int = 3,
    runs: int = 10,
    use_mkldnn: bool = True,
) -> float:
    """Median latency in ms of Paddle Inference at batch 1 on CPU (module docstring has the protocol).

    ``model`` is a layer (exported to a temporary directory first) or the directory of an exported model.
    """
    input_size = check_input_size(input_size)
    _check_timing(threads, warmup, runs)
    if isinstance(model, nn.Layer):
        with tempfile.TemporaryDirectory(prefix="measure-") as tmp:
            export_inference(model, tmp)
            return measure_latency(tmp, input_size, threads, warmup, runs, use_mkldnn)
    return _median_latency_ms(InferenceSession(model, threads, use_mkldnn), input_size, warmup, runs)


def _measured(model: nn.Layer, folder: Path, input_size: tuple[int, int], threads: int, warmup: int,
              use_mkldnn: bool) -> Callable[[float, int], Measurement]:
    """Export ``model`` to ``folder`` and count it; returns the ``Measurement`` to complete with its latency (ms)
    and the number of timed runs it came from."""
    trace = _trace(model, input_size)
    export_inference(model, folder)
    size_bytes = exported_size(folder)
    params = count_params(model)

    def with_latency(latency_ms: float, runs: int) -> Measurement:
        return Measurement(flops=sum(trace.layer_flops.values()), params=params, latency_ms=latency_ms,
                           size_bytes=size_bytes, input_size=input_size, threads=threads, runs=runs, warmup=warmup,
                           use_mkldnn=use_mkldnn)

    return with_latency


def measure(
    model: nn.Layer,
    input_size: tuple[int, int] = (640, 640),
    threads: int = 2,
    warmup: int = 3,
    runs: int = 10,
    use_mkldnn: bool = True,
) -> Measurement:
    """FLOPs, params, exported size and latency of ``model``'s inference graph; the model is left unchanged."""
    input_size = check_input_size(input_size)
    _check_timing(threads, warmup, runs)
    with tempfile.TemporaryDirectory(prefix="measure-") as tmp:
        with_latency = _measured(model, Path(tmp), input_size, threads, warmup, use_mkldnn)
        return with_latency(measure_latency(tmp, input_size, threads, warmup, runs, use_mkldnn), runs)


def measure_against(
    model: nn.Layer,
    reference: nn.Layer,
    input_size: tuple[int, int] = (640, 640),
    threads: int = 2,
    use_mkldnn: bool = True,
    warmup: int = 3,
    **rounds: Any,
) -> tuple[Measurement, LatencyRatio]:
    """``measure`` of ``model`` whose latency comes from timing it interleaved with ``reference``
    (``prune.latency.timed_rounds``; ``warmup`` untimed runs of each, ``rounds``: its round settings).

    Each model is exported once and timed once, in one quiet spell of the host: ``latency_ms`` is the median of the
    candidate's timed rounds (``runs`` records how many), beside the ratio with its interval.
    """
    input_size = check_input_size(input_size)
    _check_timing(threads, warmup, 1)
    with tempfile.TemporaryDirectory(prefix="measure-") as tmp:
        candidate_dir, reference_dir = Path(tmp) / "candidate", Path(tmp) / "reference"
        with_latency = _measured(model, candidate_dir, input_size, threads, warmup, use_mkldnn)
        export_inference(reference, reference_dir)
        ratio = interleaved_ratio(candidate_dir, reference_dir, input_size, threads=threads, use_mkldnn=use_mkldnn,
                                  warmup=warmup, **rounds)
    return with_latency(ratio.candidate_ms, ratio.rounds), ratio


def load_measured_model(name: str, checkpoint: str | None, plan: str | None, weights: str | None) -> nn.Layer:
    """The model a command line names: ``name`` loaded from ``checkpoint``, pruned by ``plan`` if given.

    With ``weights`` (needs ``plan``) a fresh model is pruned by the plan and loads those pruned weights.
    """
    if plan is None:
        if weights is not None:
            raise ConfigError(f"weights={weights} needs plan=<the plan these weights were pruned with>; "
                              "unpruned weights go in model.checkpoint=")
        return load_detector(name, checkpoint)
    if not Path(plan).is_file():
        raise ConfigError(f"plan={plan}: file not found")
    if weights is not None and not Path(weights).is_file():
        raise CheckpointError(f"weights={weights}: file not found")
    pruning_plan = PruningPlan.load(plan)
    if pruning_plan.model != name:
        raise ConfigError(f"plan={plan} is for model {pruning_plan.model!r}, not model={name}")
    if weights is not None:
        return load_pruned(name, pruning_plan, weights)
    return apply_plan(load_detector(name, checkpoint), pruning_plan)


@hydra.main(version_base="1.3", config_path="../conf", config_name="prune_measure")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    check_input_size(cfg.measure.input_size, key="measure.input_size")
    settings = cfg.measure
    rounds = round_settings(settings)
    model = load_measured_model(cfg.model.name, cfg.model.checkpoint, cfg.plan, cfg.weights)
    if cfg.plan is None:
        print_result_line(measure(model, input_size=tuple(settings.input_size), threads=settings.threads,
                                  warmup=settings.warmup, runs=settings.runs,
                                  use_mkldnn=settings.use_mkldnn).result_line())
        return
    # A pruned model: its latency is timed interleaved with the unpruned one (prune.latency).
    result, ratio = measure_against(model, load_detector(cfg.model.name, cfg.model.checkpoint),
                                    tuple(settings.input_size), threads=settings.threads,
                                    use_mkldnn=settings.use_mkldnn, **rounds)
    print(f"latency ratio {ratio.ratio:.3f} (95% interval {ratio.low:.3f}-{ratio.high:.3f}, {ratio.rounds} "
          f"rounds; {ratio.candidate_ms:.2f} vs {ratio.reference_ms:.2f} ms)")
    print_result_line(f"{result.result_line()} latency_ratio={ratio.ratio:.4f} latency_ratio_low={ratio.low:.4f}"
                      f" latency_ratio_high={ratio.high:.4f}")


if __name__ == "__main__":
    run_app(main)
