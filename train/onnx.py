"""ONNX: convert an exported Paddle program with paddle2onnx and run it with onnxruntime on CPU.

RapidOCR's default engine and most deployment stacks (mobile, browser, C++ servers) run ONNX. The converter reads
the legacy program (``inference.pdmodel``). Pitfall (``../shared/NOTES.md``): with its default
``optimize_tool="polygraphy"`` paddle2onnx lets polygraphy pip-install ``onnx_graphsurgeon`` and numpy 2 into the
running environment, which breaks paddle and opencv; ``onnxoptimizer`` does the same graph folding without that.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from train.errors import ConfigError
from train.inference import LEGACY_MODEL_FILE, PARAMS_FILE

ONNX_FILE = "inference.onnx"
OPSET = 11  # what PaddleOCR's own paddle2onnx recipe uses; every op of the DB detectors converts at 11


def convert_to_onnx(model_dir: str | Path, out_file: str | Path) -> Path:
    """``model_dir``'s legacy program + params -> ``out_file`` (ONNX, dynamic N/H/W input like the program)."""
    import paddle2onnx  # imported here: only the export needs the converter

    model_dir = Path(model_dir)
    program, params = model_dir / LEGACY_MODEL_FILE, model_dir / PARAMS_FILE
    if not program.is_file() or not params.is_file():
        raise ConfigError(f"{model_dir}: ONNX conversion needs the legacy program {LEGACY_MODEL_FILE} and "
                          f"{PARAMS_FILE}")
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its progress
        paddle2onnx.export(str(program), str(params), str(out_file), opset_version=OPSET,
                           optimize_tool="onnxoptimizer")
    return Path(out_file)


class OnnxSession:
    """An onnxruntime CPU session over an exported ``.onnx``; call it with a float32 NCHW batch like
    ``train.inference.InferenceSession``."""

    def __init__(self, path: str | Path, threads: int = 2) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # the converter leaves unused initializers, reported one warning each
        self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """The model's first output (the probability map, (N, 1, H, W)) for ``batch``."""
        return self._session.run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})[0]
