"""The Paddle Inference format: export a dygraph detector, find an export's files, run it on CPU or GPU.

One module so that measurement (latency, size), parity checks against the shipped PP-OCRv4 model and the
export of a chosen trial all save and run models the same way.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import paddle
from paddle import nn
from paddle.base import framework
from paddle.base.layer_helper import LayerHelper
from paddle.static import InputSpec

from train.dy2static_cache import convert_each_class_once
from train.errors import ConfigError
from train.models.detector import check_input_size
from train.models.zoo import simplify_for_inference

EXPORT_PREFIX = "inference"
PIR_MODEL_FILE = "inference.json"
LEGACY_MODEL_FILE = "inference.pdmodel"  # what jit.save writes when the old IR is enabled (FLAGS_enable_pir_api=0)
PARAMS_FILE = "inference.pdiparams"
# Program formats by name: PIR (Paddle 3; PaddleOCR 3 / PaddleX read it first) and the legacy program (RapidOCR,
# PaddleOCR 2.x, Paddle Lite's opt and older C++ deploy tools). Both use the same, byte-identical params file.
PROGRAM_FILES = {"pir": PIR_MODEL_FILE, "legacy": LEGACY_MODEL_FILE}


def inference_files(model_dir: str | Path, program: str | None = None) -> tuple[Path, Path]:
    """(program file, params file) of an exported model. ``program``: ``pir`` or ``legacy``; None takes the PIR
    ``inference.json`` when there is one, else the legacy ``inference.pdmodel``."""
    model_dir = Path(model_dir)
    params_file = model_dir / PARAMS_FILE
    names = list(PROGRAM_FILES.values()) if program is None else [PROGRAM_FILES[program]]
    for name in names:
        if (model_dir / name).is_file() and params_file.is_file():
            return model_dir / name, params_file
    raise ConfigError(f"{model_dir}: no exported inference model ({' or '.join(names)} with {PARAMS_FILE})")


def exported_programs(model_dir: str | Path) -> list[str]:
    """The program formats an export folder holds (``pir``, ``legacy``), in ``PROGRAM_FILES`` order."""
    return [name for name, file in PROGRAM_FILES.items() if (Path(model_dir) / file).is_file()]


@contextmanager
def eval_mode(model: nn.Layer) -> Iterator[nn.Layer]:
    """The model in eval mode for the duration, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


@contextmanager
def _fresh_struct_names() -> Iterator[None]:
    # The program records every op's layer path ("/PPLCNetV3_1/ConvBNLayer/...") numbered by a process-global
    # tree that grows with each export: without a fresh root, the same model exported later in a process writes
    # a different (longer) file, and size_bytes would depend on what ran before.
    saved = framework._name_struct
    framework._name_struct = framework.NameStruct()
    try:
        yield
    finally:
        framework._name_struct = saved


_block_threads: list[int] = []  # the thread counts of the dygraph_threads blocks this process is in, innermost last


def set_dygraph_threads(threads: int) -> None:
    """Threads of this process's dygraph CPU kernels from now on (and of processes it starts)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    paddle.base.core.set_num_threads(threads)


def _process_threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def current_threads() -> int:
    """The threads dygraph CPU kernels run on here and now: what a program run in their place should use."""
    return _block_threads[-1] if _block_threads else _process_threads()


@contextmanager
def dygraph_threads(threads: int) -> Iterator[None]:
    """Dygraph CPU kernels on `threads` threads for the block (then the enclosing block's, or the process's
    OMP_NUM_THREADS, again)."""
    paddle.base.core.set_num_threads(threads)
    _block_threads.append(threads)
    try:
        yield
    finally:
        _block_threads.pop()
        paddle.base.core.set_num_threads(current_threads())


@contextmanager
def single_threaded() -> Iterator[None]:
    """Dygraph CPU kernels on one thread for the block (then the process's OMP_NUM_THREADS again).

    With several threads the GEMMs split their sums differently from a Paddle Inference predictor's, and on a
    full-size image the probability maps of the same program then differ by a few 1e-5 (float32; either is ~4e-5
    from the float64 result). On one thread each side, dygraph and the exported program agree to the last bit, so
    a parity check measures the export and nothing else.
    """
    with dygraph_threads(1):
        yield


def export_inference(model: nn.Layer, out_dir: str | Path, input_size: tuple[int, int] | None = None,
                     formats: tuple[str, ...] = ("pir",)) -> list[Path]:
    """Save the eval-mode model for Paddle Inference into ``out_dir`` in each of ``formats`` (``PROGRAM_FILES``);
    returns the program files' paths.

    ``input_size=None`` exports a dynamic (N, 3, H, W) input as PaddleOCR does; a size fixes (1, 3, H, W).
    Several formats share one params file: the second save must write the same bytes, which is checked.
    What is saved is ``inference_form(model)``: a copy with cheaper equivalents of some layers (the same function
    with fewer or faster ops); ``model`` itself is left as it is. ``paddle.jit.save`` is given a layer,
    which converts a copy of ``forward``: the model stays an ordinary dygraph layer (``paddle.jit.to_static(model)``
    would replace its ``forward`` for good).
    """
    unknown = [f for f in formats if f not in PROGRAM_FILES]
    if unknown or not formats:
        raise ConfigError(f"program formats {list(formats)}: expected some of {list(PROGRAM_FILES)}")
    shape = [None, 3, None, None] if input_size is None else [1, 3, *check_input_size(input_size)]
    out_dir = Path(out_dir)
    convert_each_class_once()
    deployed = inference_form(model)
    params: bytes | None = None
    for program in formats:
        program_ir = paddle.pir_utils.OldIrGuard() if program == "legacy" else nullcontext()
        with eval_mode(deployed), _fresh_struct_names(), program_ir, warnings.catch_warnings():
            # The detectors return {"maps": ...}: with one key, the "sorted by key" order it warns about is moot.
            warnings.filterwarnings("ignore", message="Found 'dict' in given outputs")
            paddle.jit.save(deployed, str(out_dir / EXPORT_PREFIX), input_spec=[InputSpec(shape, "float32", "x")])
        written = (out_dir / PARAMS_FILE).read_bytes()
        if params is not None and written != params:
            raise RuntimeError(f"{out_dir}: the {program} save wrote other parameters than the first one")
        params = written
    return [out_dir / PROGRAM_FILES[program] for program in formats]


class ChannelBiasConv2D(nn.Conv2D):
    """``nn.Conv2D`` whose legacy static program adds its bias the way PaddleOCR's exports do.

    Paddle 3's legacy (old IR) conv adds a bias through ``reshape2`` + ``elementwise_add(axis=-1)``, which Paddle
    Inference's legacy oneDNN passes do not fuse into the conv: our legacy programs (what RapidOCR and PaddleOCR
    2.x load) ran each bias add, and then each activation, as ops of their own over the whole feature map. Here the
    bias is added by ``elementwise_add(axis=1)`` of the parameter itself, the pattern the conv-bias fusion pass
    matches. Dygraph and PIR programs run ``nn.Conv2D.forward`` unchanged. Uses Paddle's ``_conv_nd`` and
    ``LayerHelper`` (verified on Paddle 3.1.1; ``tests/test_measure.py`` counts the ops of the program).
    """

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if (self.bias is None or self._padding_mode != "zeros" or paddle.in_dynamic_mode()
                or paddle.framework.in_pir_mode()):
            return super().forward(x)
        out = nn.functional.conv._conv_nd(
            x, self.weight, bias=None, stride=self._stride, padding=self._updated_padding,
            padding_algorithm=self._padding_algorithm, dilation=self._dilation, groups=self._groups,
            data_format=self._data_format, channel_dim=self._channel_dim, op_type=self._op_type,
            use_cudnn=self._use_cudnn)
        helper = LayerHelper("elementwise_add")
        biased = helper.create_variable_for_type_inference(out.dtype)
        helper.append_op(type="elementwise_add", inputs={"X": [out], "Y": [self.bias]}, outputs={"Out": [biased]},
                         attrs={"axis": 1})
        return biased


def inference_form(model: nn.Layer) -> nn.Layer:
    """``model`` as it is exported: a copy with the layers that have a cheaper inference equivalent rewritten
    (``zoo.simplify_for_inference``) and its biased convs as ``ChannelBiasConv2D``, whose parameters keep the
    original's names (a deep copy appends a process-wide counter to them, and the program records them: the same
    model would write other bytes after every copy made before). The same function, up to float rounding."""
    simplified = copy.deepcopy(model)
    for copied, original in zip(simplified.parameters(), model.parameters(), strict=True):
        copied.name = original.name
    simplify_for_inference(simplified)
    for layer in simplified.sublayers():
        if type(layer) is nn.Conv2D and layer.bias is not None:
            layer.__class__ = ChannelBiasConv2D
    return simplified


def exported_size(model_dir: str | Path) -> int:
    """Bytes of the program file plus the params file of an exported model (what a deployment ships)."""
    return sum(path.stat().st_size for path in inference_files(model_dir))


class InferenceSession:
    """A Paddle Inference CPU predictor over an exported model; call it with a float32 NCHW batch.

    oneDNN and the IR optimisation passes (conv+BN/activation fusion, ...) are what a CPU deployment uses
    (latency); they re-associate float32 sums, so on full-size images the probability map moves by a few 1e-5.
    Parity checks against dygraph turn both off to compare the program itself.
    """

    def __init__(self, model_dir: str | Path, threads: int = 2, use_mkldnn: bool = True, ir_optim: bool = True,
                 program: str | None = None, profile: bool = False) -> None:
        model_file, params_file = inference_files(model_dir, program)
        config = paddle.inference.Config(str(model_file), str(params_file))
        config.disable_gpu()
        config.switch_ir_optim(ir_optim)
        if use_mkldnn:
            config.enable_mkldnn()
        else:
            config.disable_mkldnn()
        config.set_cpu_math_library_num_threads(threads)
        config.disable_glog_info()
        if profile:  # per-op-type times, printed to stdout when the predictor is destroyed (prune.profile)
            config.enable_profile()
        self._predictor = paddle.inference.create_predictor(config)
        self._input = self._predictor.get_input_handle(self._predictor.get_input_names()[0])
        self._outputs = [self._predictor.get_output_handle(name) for name in self._predictor.get_output_names()]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every output of the program for ``batch``, in the program's order."""
        self._input.reshape(list(batch.shape))
        self._input.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
        self._predictor.run()
        return [output.copy_to_cpu() for output in self._outputs]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """The program's first output (the probability map, (N, 1, H, W)) for ``batch``."""
        return self.run(batch)[0]


def compile_program(layer: nn.Layer, threads: int | None = None) -> InferenceSession:
    """``layer``'s eval-mode forward as a Paddle Inference CPU program (``export_inference``'s form, oneDNN and
    the fusion passes), on ``threads`` threads (default: ``current_threads()``). Use it from the thread that
    compiled it (a oneDNN predictor fails in another).

    Why: work that only runs forwards goes several times faster through the program than through dygraph (the
    PP-OCRv4 teacher on 2 crops of 384 px, one thread: 0.07 s against 0.34 s; the eval split 3.8 s against 8.4 s;
    README "Recovery fine-tuning"). Compiling costs a few seconds (jit.save and the predictor's passes); the
    files are read into the predictor and deleted.
    """
    with tempfile.TemporaryDirectory(prefix="compiled-") as folder:
        export_inference(layer, folder)
        return InferenceSession(folder, threads=current_threads() if threads is None else threads)


def on_cpu() -> bool:
    """Whether paddle computes on the CPU (``set_device``): where compiled programs beat dygraph."""
    return paddle.device.get_device() == "cpu"


# Compiling costs about what 20 dygraph forwards of a full-size eval image do (PP-OCRv4 det: 2.9 s against 0.14 s
# each): below this many forwards (a tiny test run, a handful of images) dygraph finishes first.
COMPILE_MIN_FORWARDS = 20


def worth_compiling(forwards: int) -> bool:
    """Whether ``forwards`` eval forwards of one model go faster through its compiled program here."""
    return on_cpu() and forwards >= COMPILE_MIN_FORWARDS


def fast_forward(model: nn.Layer | ExportedDetector, forwards: int,
                 threads: int | None = None) -> nn.Layer | ExportedDetector:
    """What runs ``forwards`` eval forwards of ``model`` fastest here: on CPU and for enough of them its compiled
    program (``ExportedDetector.compile``, the export's own form: scores are those of what a deployment runs),
    otherwise the model itself."""
    return ExportedDetector.compile(model, threads) if isinstance(model, nn.Layer) and worth_compiling(forwards) \
        else model


class ExportedDetector:
    """An exported model behind the dygraph detector's calling convention (``model(x)["maps"]``, ``eval()``), so
    evaluation scores what a deployment runs with the same code that scores a dygraph model."""

    def __init__(self, session: InferenceSession) -> None:
        self.session = session

    @classmethod
    def load(cls, model_dir: str | Path, threads: int = 2, use_mkldnn: bool = True) -> ExportedDetector:
        """The export in ``model_dir``."""
        return cls(InferenceSession(model_dir, threads=threads, use_mkldnn=use_mkldnn))

    @classmethod
    def compile(cls, model: nn.Layer, threads: int | None = None) -> ExportedDetector:
        """A dygraph detector as its program (``compile_program``): what evaluation runs on CPU."""
        return cls(compile_program(model, threads))

    def eval(self) -> ExportedDetector:
        return self

    def __call__(self, images: paddle.Tensor) -> dict[str, paddle.Tensor]:
        return {"maps": paddle.to_tensor(self.session(images.numpy()))}
