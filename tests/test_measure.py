"""FLOPs / params / size / latency of the inference graph, and the `prune.measure` command.

FLOPs are checked against hand counts on tiny hand-built models (the definition in prune/measure.py) and against
paddle.flops on the zoo; latency runs the real Paddle Inference predictor with oneDNN, whose output must equal
the dygraph model's so the time is taken on the right program.
"""
from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

import numpy as np
import paddle
import pytest
from paddle import nn
from paddle.base.proto import framework_pb2

from conftest import run_cli
from prune.measure import (Measurement, count_flops, count_params, layer_flops, measure, measure_against,
                           measure_latency)
from train.inference import (COMPILE_MIN_FORWARDS, PARAMS_FILE, PIR_MODEL_FILE, ExportedDetector, InferenceSession,
                             current_threads, dygraph_threads, export_inference, exported_size, fast_forward,
                             inference_form)
from train.errors import ConfigError
from train.models import zoo
from train.trainer import save_weights
from train.weights import load_detector

RESULT_LINE = re.compile(r"^flops=(\d+) params=(\d+) latency_ms=(\d+\.\d+) size_bytes=(\d+)$")
PLAN_RESULT_LINE = re.compile(r"^flops=(\d+) params=(\d+) latency_ms=(\d+\.\d+) size_bytes=(\d+) "
                              r"latency_ratio=(\d+\.\d+) latency_ratio_low=(\d+\.\d+) latency_ratio_high=(\d+\.\d+)$")
# paddle.flops itself calls int() on 1-element arrays, which numpy 1.25+ deprecates.
PADDLE_FLOPS_WARNING = "ignore:Conversion of an array with ndim > 0:DeprecationWarning"
# Probability maps of the exported program vs the dygraph model (oneDNN may reorder float sums).
PREDICTOR_TOL = 1e-4


class ConvBNConv(nn.Layer):
    """3x3 conv (no bias) -> BN -> ReLU -> 1x1 conv (bias): the smallest producer/BN/consumer chain."""

    def __init__(self, mid: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(3, mid, 3, padding=1, bias_attr=False)
        self.bn = nn.BatchNorm2D(mid)
        self.conv2 = nn.Conv2D(mid, 4, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.conv2(nn.functional.relu(self.bn(self.conv1(x))))


class TinyHead(nn.Layer):
    """ConvBNConv + depthwise 3x3 + SE-style pooling + a x2 transposed conv + sigmoid, returning {'maps': ...}."""

    def __init__(self, transposed: bool = True) -> None:
        super().__init__()
        self.body = ConvBNConv()
        self.dw = nn.Conv2D(4, 4, 3, padding=1, groups=4, bias_attr=False)
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.up = nn.Conv2DTranspose(4, 2, kernel_size=2, stride=2) if transposed else None

    def forward(self, x: paddle.Tensor) -> dict[str, paddle.Tensor]:
        y = self.dw(self.body(x))
        y = y * self.pool(y)
        if self.up is not None:
            y = self.up(y)
        return {"maps": nn.functional.sigmoid(y)}


def _hand_flops_tiny_head(side: int, mid: int = 8) -> int:
    pixels = side * side
    return (pixels * mid * 3 * 9              # conv1: output elements x (3 in-channels x 3x3)
            + 2 * mid * pixels                # BN: 2 per element
            + pixels * 4 * (mid + 1)          # conv2 1x1 with bias
            + pixels * 4 * 9                  # depthwise: one input channel per output channel
            + 4 * (pixels + 1)                # adaptive pool to 1x1: (window + 1) per output element
            + 4 * pixels * 2 * 4              # transposed: input elements x out-channels x 2x2 kernel
            + 2 * (2 * side) ** 2)            # ... + its bias once per output element


def _paddle_flops(model: nn.Layer, side: int) -> int:
    # paddle.flops prints a table and leaves counter buffers on layers that did not run: use throwaway models.
    with contextlib.redirect_stdout(io.StringIO()):
        return paddle.flops(model, [1, 3, side, side])


def _slice_param(layer: nn.Layer, name: str, keep: list[int], axis: int) -> None:
    """Replace a parameter by its kept slice, leaving layer attributes (e.g. _out_channels) stale like a pruner."""
    value = np.take(getattr(layer, name).numpy(), keep, axis=axis)
    param = paddle.create_parameter(list(value.shape), "float32")
    param.set_value(value)
    setattr(layer, name, param)


def test_tiny_model_flops_equal_hand_count():
    paddle.seed(0)
    model = TinyHead()
    assert count_flops(model, (32, 32)) == _hand_flops_tiny_head(32)
    assert count_flops(model, (64, 64)) == _hand_flops_tiny_head(64)
    assert list(layer_flops(model, (32, 32))) == ["body.conv1", "body.bn", "body.conv2", "dw", "pool", "up"]


@pytest.mark.filterwarnings(PADDLE_FLOPS_WARNING)
def test_flops_match_paddle_flops_except_transposed_convs():
    assert count_flops(TinyHead(transposed=False), (32, 32)) == _paddle_flops(TinyHead(transposed=False), 32)
    # paddle.flops applies the conv rule to the transposed conv: output elements x (in-channels x 2x2 + bias).
    paddle_up = (2 * 32) ** 2 * 2 * (4 * 4 + 1)
    ours_up = 4 * 32 * 32 * 2 * 4 + 2 * (2 * 32) ** 2
    assert _paddle_flops(TinyHead(), 32) - count_flops(TinyHead(), (32, 32)) == paddle_up - ours_up


def test_flops_and_params_follow_pruned_weight_shapes():
    """A pruned model keeps stale layer attributes; the counts must follow the sliced weights alone."""
    model = ConvBNConv(mid=8)
    side, keep = 32, [0, 2, 3, 5, 7]
    full = count_flops(model, (side, side))
    _slice_param(model.conv1, "weight", keep, axis=0)
    for name in ("weight", "bias", "_mean", "_variance"):
        _slice_param(model.bn, name, keep, axis=0)
    _slice_param(model.conv2, "weight", keep, axis=1)
    assert model.conv1._out_channels == 8  # stale on purpose

    pixels, mid = side * side, len(keep)
    assert count_flops(model, (side, side)) == pixels * mid * 27 + 2 * mid * pixels + pixels * 4 * (mid + 1)
    assert full == pixels * 8 * 27 + 2 * 8 * pixels + pixels * 4 * 9
    assert count_params(model) == mid * 27 + 4 * mid + (4 * mid + 4)


@pytest.fixture(scope="module")
def ppocrv4() -> nn.Layer:
    return load_detector("ppocrv4_det", "pretrained")


@pytest.mark.filterwarnings(PADDLE_FLOPS_WARNING)
def test_ppocrv4_flops_and_params_at_640(ppocrv4: nn.Layer):
    flops = count_flops(ppocrv4, (640, 640))
    # The head's two x2 transposed convs (24->24 from 160x160, 24->1 from 320x320): paddle.flops counts them
    # per output pixel, over-counting their multiply-accumulates 4x.
    paddle_transposed = 24 * 320 * 320 * (24 * 4 + 1) + 1 * 640 * 640 * (24 * 4 + 1)
    ours_transposed = (24 * 160 * 160 * 24 * 4 + 24 * 320 * 320) + (24 * 320 * 320 * 1 * 4 + 640 * 640)
    paddle_flops = _paddle_flops(load_detector("ppocrv4_det", "pretrained"), 640)
    assert paddle_flops == pytest.approx(2.54e9, rel=0.01)  # the figure in shared/NOTES.md
    assert paddle_flops - flops == paddle_transposed - ours_transposed
    assert flops == 2_334_811_720

    params = count_params(ppocrv4)
    thresh = sum(int(np.prod(p.shape)) for p in ppocrv4.head.thresh.parameters())
    total = sum(int(np.prod(p.shape)) for p in ppocrv4.parameters())
    assert params == pytest.approx(1.17e6, rel=0.01)
    assert params <= total - thresh


def test_export_is_pir_and_params_equal_the_exported_tensors(ppocrv4: nn.Layer, tmp_path: Path):
    [model_file] = export_inference(ppocrv4, tmp_path / "a")
    assert model_file == tmp_path / "a" / PIR_MODEL_FILE and (tmp_path / "a" / PARAMS_FILE).is_file()
    exported = paddle.jit.load(str(tmp_path / "a" / "inference"))
    # The export (and count_params) see the inference form: 37 scalar affine pairs folded into convs (4 more never
    # run), and the head's last transposed conv (24 -> 1) as a 1x1 conv to 4 channels: 3 more bias values.
    assert count_params(ppocrv4) == sum(int(np.prod(p.shape)) for p in exported.parameters())
    assert count_params(ppocrv4) == sum(int(np.prod(p.shape)) for n, p in ppocrv4.named_parameters()
                                        if not n.startswith("head.thresh")) - 37 * 2 - 4 * 2 + 3
    # Same model, same bytes, however many exports ran before in the process.
    export_inference(ppocrv4, tmp_path / "b")
    assert exported_size(tmp_path / "a") == exported_size(tmp_path / "b")
    assert exported_size(tmp_path / "a") >= 4 * count_params(ppocrv4)


def test_legacy_program_adds_conv_biases_per_channel(ppocrv4: nn.Layer, tmp_path: Path):
    """Every biased conv's bias is added by elementwise_add(axis=1) of the parameter itself (the pattern Paddle
    Inference's legacy conv-bias fusion matches), not through a reshape2; the one transposed conv left keeps
    Paddle's own pattern. The program still computes the model."""
    export_inference(ppocrv4, tmp_path, formats=("legacy",))
    program = framework_pb2.ProgramDesc()
    program.ParseFromString((tmp_path / "inference.pdmodel").read_bytes())
    ops = program.blocks[0].ops

    def inputs(op, slot):
        return [name for var in op.inputs if var.parameter == slot for name in var.arguments]

    def axis(op):
        return next(attr.i for attr in op.attrs if attr.name == "axis")

    conv_outputs = {name for op in ops if op.type in ("conv2d", "depthwise_conv2d")
                    for var in op.outputs for name in var.arguments}
    bias_adds = [op for op in ops if op.type == "elementwise_add" and inputs(op, "X")[0] in conv_outputs
                 and inputs(op, "Y")[0].endswith(".b_0")]
    biased = [name for name, layer in inference_form(ppocrv4).named_sublayers() if isinstance(layer, nn.Conv2D)
              and layer.bias is not None and not name.startswith("head.thresh")]  # the train-only branch
    assert len(bias_adds) == len(biased) > 50
    assert all(axis(op) == 1 for op in bias_adds)
    assert [op.type for op in ops].count("reshape2") == 1
    batch = np.random.default_rng(3).uniform(-1, 1, (1, 3, 96, 128)).astype(np.float32)
    with paddle.no_grad():
        expected = ppocrv4(paddle.to_tensor(batch))["maps"].numpy()
    assert float(np.abs(InferenceSession(tmp_path, 1, use_mkldnn=False)(batch) - expected).max()) <= 1e-5


# The deployment size for the default model; det_mv3_db (4x the FLOPs) smaller to keep the file quick.
@pytest.mark.parametrize("name, side", [("ppocrv4_det", 640), ("det_mv3_db", 320)])
def test_predictor_with_onednn_equals_dygraph_and_times_it(name: str, side: int, ppocrv4: nn.Layer, tmp_path: Path):
    if name == "ppocrv4_det":
        model = ppocrv4
    else:
        paddle.seed(0)
        model = zoo.det_mv3_db()
        model.eval()
    export_inference(model, tmp_path)
    batch = np.random.default_rng(1).uniform(-1, 1, (1, 3, side, side)).astype(np.float32)
    with paddle.no_grad():
        expected = model(paddle.to_tensor(batch))["maps"].numpy()
    actual = InferenceSession(tmp_path, threads=2, use_mkldnn=True)(batch)
    assert actual.shape == expected.shape == (1, 1, side, side)
    assert float(np.abs(actual - expected).max()) <= PREDICTOR_TOL

    latency = measure_latency(tmp_path, (side, side), threads=2, warmup=1, runs=3)
    assert math.isfinite(latency) and latency > 0


def test_fast_forward_on_cpu_is_the_compiled_program_and_predicts_like_dygraph(ppocrv4: nn.Layer):
    """Evaluation's forwards on CPU: the model's program (what an export runs) on the threads dygraph has here,
    with dygraph's maps up to float rounding, once there are enough forwards to pay for the compile; anything
    already compiled is passed through."""
    with dygraph_threads(1):
        assert current_threads() == 1
        with dygraph_threads(3):
            assert current_threads() == 3
        assert current_threads() == 1
        compiled = fast_forward(ppocrv4, COMPILE_MIN_FORWARDS)
    assert isinstance(compiled, ExportedDetector) and fast_forward(compiled, 100) is compiled
    assert fast_forward(ppocrv4, COMPILE_MIN_FORWARDS - 1) is ppocrv4  # too few forwards to pay for compiling
    batch = np.random.default_rng(5).uniform(-1, 1, (2, 3, 96, 160)).astype(np.float32)
    with paddle.no_grad():
        expected = ppocrv4(paddle.to_tensor(batch))["maps"].numpy()
    actual = compiled.eval()(paddle.to_tensor(batch))["maps"].numpy()
    assert actual.shape == expected.shape == (2, 1, 96, 160)
    assert float(np.abs(actual - expected).max()) <= PREDICTOR_TOL
    assert len(compiled.session.run(batch)) == 1  # a detector's program has one output, the maps


def test_measure_leaves_model_as_it_was_and_round_trips(ppocrv4: nn.Layer):
    ppocrv4.train()
    keys = list(ppocrv4.state_dict())
    try:
        result = measure(ppocrv4, (64, 64), threads=1, warmup=1, runs=2)
        assert ppocrv4.training and list(ppocrv4.state_dict()) == keys
        assert type(ppocrv4.forward).__name__ == "method"  # not replaced by a dy2static function
    finally:
        ppocrv4.eval()
    assert result.flops == count_flops(ppocrv4, (64, 64)) and result.params == count_params(ppocrv4)
    assert result.latency_ms > 0 and result.input_size == (64, 64)
    assert Measurement.from_json(result.to_json()) == result
    assert RESULT_LINE.match(result.result_line())


def test_measure_against_a_reference_times_each_once_and_reports_the_candidate_median(ppocrv4: nn.Layer):
    small = zoo.build_detector("det_mv3_db")
    result, ratio = measure_against(small, ppocrv4, (64, 64), threads=1, warmup=1, min_rounds=12, max_rounds=12)
    assert result.flops == count_flops(small, (64, 64)) and result.params == count_params(small)
    assert (result.latency_ms, result.runs, result.warmup) == (ratio.candidate_ms, 12, 1) and ratio.rounds == 12
    assert 0 < ratio.low <= ratio.ratio <= ratio.high and ratio.reference_ms > 0


def test_bad_input_size_and_timing_are_config_errors(ppocrv4: nn.Layer):
    with pytest.raises(ConfigError, match=r"input_size=\[100, 64\]"):
        measure(ppocrv4, (100, 64))
    with pytest.raises(ConfigError, match="runs=0"):
        measure_latency(ppocrv4, (64, 64), runs=0)


QUICK = ["measure.input_size=[64,64]", "measure.warmup=1", "measure.runs=2"]


def test_cli_last_line(tmp_path: Path, cache_env, ppocrv4: nn.Layer):
    proc = run_cli("prune.measure", [*QUICK, f"hydra.run.dir={tmp_path}"], cache_env)
    assert proc.returncode == 0, proc.stderr
    match = RESULT_LINE.match(proc.stdout.strip().splitlines()[-1])
    assert match, proc.stdout
    flops, params, latency, size = match.groups()
    assert int(flops) == count_flops(ppocrv4, (64, 64)) and int(params) == count_params(ppocrv4)
    assert float(latency) > 0 and int(size) > 4 * int(params)


@pytest.mark.parametrize("args, message", [
    (["plan={tmp}/missing.json"], "error: plan={tmp}/missing.json: file not found"),
    (["weights={tmp}/pruned.pdparams"], "error: weights={tmp}/pruned.pdparams needs plan="),
    (["measure.input_size=[100,100]"], "error: measure.input_size=[100, 100]: need [height, width]"),
])
def test_cli_user_errors_are_one_line(args: list[str], message: str, tmp_path: Path, cache_env):
    args = [a.format(tmp=tmp_path) for a in args]
    proc = run_cli("prune.measure", [*args, f"hydra.run.dir={tmp_path}"], cache_env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(message.format(tmp=tmp_path))
    assert proc.stdout.strip() == ""


# Two groups the search cuts most (the concat-fed FPN conv and the head's first conv): a real, visible saving.
PLAN_RATIOS = {"neck.inp_conv.0.in_conv": 0.5, "head.binarize.conv1": 0.5}


@pytest.fixture(scope="module")
def pruned_files(tmp_path_factory) -> tuple[Path, Path, int, int]:
    """(plan.json, pruned weights, FLOPs at 64x64, params) of PP-OCRv4 pruned by ``PLAN_RATIOS``."""
    from prune.plan import prune_model

    model, plan = prune_model(load_detector("ppocrv4_det", "pretrained"), "ppocrv4_det", PLAN_RATIOS)
    model.eval()
    folder = tmp_path_factory.mktemp("plan")
    plan.save(folder / "plan.json")
    save_weights(model, folder / "pruned.pdparams")
    return folder / "plan.json", folder / "pruned.pdparams", count_flops(model, (64, 64)), count_params(model)


@pytest.mark.parametrize("with_weights", [False, True])
def test_cli_measures_the_pruned_model(with_weights: bool, pruned_files, ppocrv4: nn.Layer, tmp_path: Path,
                                       cache_env):
    plan, weights, flops, params = pruned_files
    args = [f"plan={plan}", *([f"weights={weights}"] if with_weights else [])]
    proc = run_cli("prune.measure", [*QUICK, *args, f"hydra.run.dir={tmp_path}"], cache_env)
    assert proc.returncode == 0, proc.stderr
    match = PLAN_RESULT_LINE.match(proc.stdout.strip().splitlines()[-1])
    assert match, proc.stdout
    assert (int(match[1]), int(match[2])) == (flops, params)
    assert flops < count_flops(ppocrv4, (64, 64)) and params < count_params(ppocrv4)
    ratio, low, high = float(match[5]), float(match[6]), float(match[7])
    assert 0 < low <= ratio <= high


def test_cli_plan_of_another_model_is_one_line_error(pruned_files, tmp_path: Path, cache_env):
    plan = pruned_files[0]
    proc = run_cli("prune.measure", ["model=det_mv3_db", f"plan={plan}", f"hydra.run.dir={tmp_path}"], cache_env)
    assert proc.returncode == 2
    expected = f"error: plan={plan} is for model 'ppocrv4_det', not model=det_mv3_db"
    assert proc.stderr.strip().splitlines()[-1] == expected
