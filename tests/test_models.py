"""The detector zoo against PaddleOCR's own code: keys, parameter names, initialisers and numerics.

The fixtures in ``shared/reference`` were produced by PaddleOCR's layer code (see its README). They sit next to
the repository checkout (CI copies ``shared/`` beside the clone); without them these tests skip.
"""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import numpy as np
import paddle
import pytest
from numerics import assert_close

from train.errors import ConfigError
from train.models import zoo
from train.models.db_head import PixelShuffledConv
from train.models.pplcnet_v3 import LearnableAffineBlock, LearnableRepLayer
from train.weights import load_checkpoint, load_detector, load_state_strict

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
pytestmark = pytest.mark.skipif(
    not REFERENCE_DIR.is_dir(), reason=f"PaddleOCR reference fixtures not found at {REFERENCE_DIR}"
)

# (fixture folder, constructor) of every training form; PaddleOCR trains these and saved their fixtures.
TRAINING_FORMS = {
    "det_mv3_db": zoo.det_mv3_db,
    "ppocrv3_det": zoo.ppocrv3_det,
    "ppocrv4_det": lambda: zoo.ppocrv4_det(deploy=False),
}


def _read_keys(path: Path) -> list[tuple[str, list[int]]]:
    rows = [line.split("\t") for line in path.read_text().splitlines() if line]
    return [(row[0], json.loads(row[1])) for row in rows]


def _keys_and_shapes(model: paddle.nn.Layer) -> list[tuple[str, list[int]]]:
    return [(key, list(tensor.shape)) for key, tensor in model.state_dict().items()]


def _loaded(name: str) -> tuple[paddle.nn.Layer, paddle.Tensor]:
    model = TRAINING_FORMS[name]()
    load_checkpoint(model, REFERENCE_DIR / name / "weights.pdparams")
    model.eval()
    return model, paddle.to_tensor(np.load(REFERENCE_DIR / name / "input.npy"))


@pytest.mark.parametrize(
    ("folder", "build", "key_file"),
    [
        ("det_mv3_db", zoo.det_mv3_db, "keys.tsv"),
        ("ppocrv3_det", zoo.ppocrv3_det, "keys.tsv"),
        ("ppocrv4_det", lambda: zoo.ppocrv4_det(deploy=False), "keys.tsv"),
        ("ppocrv4_det", lambda: zoo.ppocrv4_det(deploy=True), "keys_deploy.tsv"),
    ],
    ids=["det_mv3_db", "ppocrv3_det", "ppocrv4_det-training", "ppocrv4_det-deploy"],
)
def test_state_dict_keys_order_and_shapes_equal_paddleocr(folder, build, key_file):
    assert _keys_and_shapes(build()) == _read_keys(REFERENCE_DIR / folder / key_file)


@pytest.mark.parametrize("name", list(TRAINING_FORMS))
def test_auto_parameter_names_and_initialisers_equal_paddleocr(name):
    """Same classes in the same order give PaddleOCR's auto names and, from the same seed, its initial weights.

    The fixtures were saved after re-drawing only BN statistics/affines and learnable affine scalars, so every
    other tensor still holds PaddleOCR's seeded initial value.
    """
    with open(REFERENCE_DIR / name / "weights.pdparams", "rb") as handle:
        reference = pickle.load(handle)
    paddle.seed(0)
    np.random.seed(0)
    model = TRAINING_FORMS[name]()
    state = model.state_dict()
    assert {k: t.name for k, t in state.items()} == reference["StructuredToParameterName@@"]
    redrawn = (".bn.", ".conv_bn1.", ".conv_bn2.", ".identity.", ".lab.")
    for key, tensor in state.items():
        if not any(part in key for part in redrawn):
            np.testing.assert_array_equal(tensor.numpy(), reference[key], err_msg=key)


@pytest.mark.parametrize("name", list(TRAINING_FORMS))
def test_forward_matches_paddleocr_eval_and_train(name):
    model, x = _loaded(name)
    features = np.load(REFERENCE_DIR / name / "features_eval.npz")
    with paddle.no_grad():
        backbone_out = model.backbone(x)
        neck_out = model.neck(backbone_out)
        eval_maps = model.head(neck_out)["maps"]
        assert len(backbone_out) == 4
        for i, feature in enumerate(backbone_out):
            assert_close(feature.numpy(), features[f"backbone_out_{i}"], f"backbone_out_{i}")
        assert_close(neck_out.numpy(), features["neck_out"], "neck_out")
        assert_close(eval_maps.numpy(), np.load(REFERENCE_DIR / name / "output_eval_maps.npy"), "eval maps")
        assert model(x)["maps"].shape == [1, 1, 256, 320]
        model.train()
        train_maps = model(x)["maps"].numpy()
    # The binary map, sigmoid(50 * (shrink - thresh)), multiplies their kernel-dependent deviations by up to 12.5:
    # shrink and thresh are compared with the fixture, the binary map with its formula.
    expected = np.load(REFERENCE_DIR / name / "output_train_maps.npy")
    assert_close(train_maps[:, :2], expected[:, :2], "train shrink/thresh maps")
    shrink, thresh, binary = train_maps[:, 0], train_maps[:, 1], train_maps[:, 2]
    np.testing.assert_allclose(binary, 1 / (1 + np.exp(-50 * (shrink - thresh))), rtol=1e-5, atol=1e-6)


def test_reparameterize_gives_paddleocr_deploy_form_and_numerics():
    model, x = _loaded("ppocrv4_det")
    names_before = {p.name for p in model.parameters()}
    zoo.reparameterize(model)
    assert zoo.is_deploy_form(model)
    assert _keys_and_shapes(model) == _read_keys(REFERENCE_DIR / "ppocrv4_det" / "keys_deploy.tsv")
    names = [p.name for p in model.parameters()]
    assert len(names) == len(set(names)), "rep() must not reuse an existing auto name (PaddleSlim/jit.save break)"
    assert all(n.startswith(zoo.REP_NAME_PREFIX) for n in set(names) - names_before)
    with paddle.no_grad():
        deploy_maps = model(x)["maps"].numpy()
    assert_close(deploy_maps, np.load(REFERENCE_DIR / "ppocrv4_det" / "output_eval_deploy_maps.npy"), "deploy")
    # Fusion re-associates float32 sums: PaddleOCR itself measures 8.1e-5 against the multi-branch output.
    assert_close(deploy_maps, np.load(REFERENCE_DIR / "ppocrv4_det" / "output_eval_maps.npy"), "fused vs branches")

    state_before = {k: v.numpy() for k, v in model.state_dict().items()}
    zoo.reparameterize(model)
    assert all(np.array_equal(v.numpy(), state_before[k]) for k, v in model.state_dict().items())


def test_deploy_form_built_directly_runs_the_fused_function():
    trained, x = _loaded("ppocrv4_det")
    zoo.reparameterize(trained)
    direct = zoo.ppocrv4_det(deploy=True)
    assert all(layer.is_repped for layer in direct.sublayers() if isinstance(layer, LearnableRepLayer))
    load_state_strict(direct, trained.state_dict(), source="reparameterized training form")
    direct.eval()
    with paddle.no_grad():
        np.testing.assert_array_equal(direct(x)["maps"].numpy(), trained(x)["maps"].numpy())


@pytest.mark.parametrize(
    "build", [zoo.det_mv3_db, zoo.ppocrv3_det, lambda: zoo.ppocrv4_det(deploy=False), zoo.ppocrv4_det]
)
def test_building_twice_gives_identical_auto_names(build):
    first = [p.name for p in build().parameters()]
    second = [p.name for p in build().parameters()]
    assert first == second
    assert len(first) == len(set(first))


def test_build_detector_by_name_and_unknown_name():
    assert zoo.MODEL_NAMES == ("det_mv3_db", "ppocrv3_det", "ppocrv4_det")
    assert len(zoo.build_detector("ppocrv4_det", deploy=False).state_dict()) == 905
    with pytest.raises(ConfigError, match=r"'det_r50'.*det_mv3_db, ppocrv3_det, ppocrv4_det"):
        zoo.build_detector("det_r50")


def test_inference_form_keeps_the_function_and_leaves_the_original():
    """The affines folded into their convs, for the pretrained values and for others: 37 of 56 gone (the rest feed
    padded convs or SE blocks, leave the backbone or sit unused in stride-2 layers); the heads' last transposed
    conv a pixel-shuffled 1x1 conv; same maps; the original untouched; a second pass a no-op."""
    pretrained = load_detector("ppocrv4_det", "pretrained")
    x = paddle.to_tensor(np.random.default_rng(1).uniform(-1, 1, (1, 3, 256, 320)).astype(np.float32))
    retrained = copy.deepcopy(pretrained)
    rng = np.random.default_rng(0)
    for name, param in retrained.named_parameters():
        if ".lab." in name:
            param.set_value(np.float32([rng.uniform(0.7, 1.4) if name.endswith("scale") else rng.uniform(-0.3, 0.3)]))
    paddle.seed(0)
    mv3 = zoo.det_mv3_db()

    def affines(model):
        return sum(isinstance(layer, LearnableAffineBlock) for layer in model.sublayers())

    for model, rewrites in ((pretrained, 37 + 2), (retrained, 37 + 2), (mv3, 2)):
        model.eval()
        simplified = copy.deepcopy(model)
        assert zoo.simplify_for_inference(simplified) == rewrites and zoo.simplify_for_inference(simplified) == 0
        assert affines(simplified) == affines(model) - (rewrites - 2)
        assert isinstance(simplified.head.binarize.conv3, PixelShuffledConv)
        assert isinstance(model.head.binarize.conv3, paddle.nn.Conv2DTranspose)
        with paddle.no_grad():
            expected, actual = model(x)["maps"].numpy(), simplified(x)["maps"].numpy()
        # Same kernels in one process: only the folded products' rounding differs (2e-6 measured); dropping one
        # affine's bias or scale, or a pixel shuffle in the wrong order, moves the maps by 1e-2 or more.
        assert float(np.abs(actual - expected).max()) <= 1e-5
    assert affines(pretrained) == 56 and affines(mv3) == 0
