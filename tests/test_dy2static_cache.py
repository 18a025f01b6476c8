"""Paddle's dygraph-to-static conversion, cached per layer class (train.dy2static_cache): the same programs, once."""

from __future__ import annotations

import paddle
import pytest
from paddle.jit.dy2static import program_translator

from prune.graph import trace
from train import dy2static_cache
from train.inference import PROGRAM_FILES, export_inference
from train.models import zoo


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The qualified names of the functions Paddle converts (its own ``_convert``, counted, not replaced)."""
    converted: list[str] = []
    paddle_convert = program_translator.FunctionCache._convert

    def counted(self, func):
        converted.append(func.__qualname__)
        return paddle_convert(self, func)

    monkeypatch.setattr(program_translator.FunctionCache, "_convert", counted)
    # Whatever this process converted before (other tests on this worker) is forgotten: the test sees every class.
    program_translator._FUNCTION_CACHE._converted_static_func_caches.clear()
    return converted


def test_saves_and_traces_convert_each_class_once_and_write_the_programs_paddle_writes(tmp_path, conversions,
                                                                                         monkeypatch):
    paddle.seed(0)
    model = zoo.ppocrv4_det()
    first = export_inference(model, tmp_path / "first")
    trace(model)  # train mode: the head's threshold branch too
    assert len(conversions) == len(set(conversions)), "a forward was converted twice in one save and trace"
    forwards = {name for name in conversions if name.endswith(".forward")}
    assert {"DBDetector.forward", "ChannelBiasConv2D.forward", "LCNetV3Block.forward"} <= forwards

    # Another save, trace and another instance of the model: nothing is converted again.
    conversions.clear()
    export_inference(model, tmp_path / "second", formats=("pir", "legacy"))
    trace(model)
    other = zoo.ppocrv4_det()
    export_inference(other, tmp_path / "other")
    assert conversions == []

    # Paddle's own cache (a layer converted once per instance and save) writes the same programs, byte for byte.
    monkeypatch.setattr(program_translator.FunctionCache, "convert_with_cache",
                        dy2static_cache.PADDLE_CONVERT_WITH_CACHE)
    program_translator._FUNCTION_CACHE._converted_static_func_caches.clear()
    # (The PIR program: a legacy program's variable names carry a process-wide counter, so a second legacy save in
    # one process differs from the first with either cache.)
    paddle_written = export_inference(model, tmp_path / "paddle")
    assert len(conversions) > 2 * len(forwards), "Paddle's own cache converted each class once: nothing to fix"
    assert [p.name for p in first] == [PROGRAM_FILES["pir"]]
    assert first[0].read_bytes() == paddle_written[0].read_bytes()
    assert (tmp_path / "first" / "inference.pdiparams").read_bytes() == (tmp_path / "paddle" /
                                                                           "inference.pdiparams").read_bytes()
