"""The pre/post-processing an exported detector needs, as a PaddleOCR-style `inference.yml` beside the model.

PaddleOCR's `tools/export_model.py` writes this file (Global / PreProcess.transform_ops / PostProcess) so that its
predictors, PaddleX and RapidOCR-style pipelines can run an inference model without the training config. We write
the same layout and read back the two parts our own predictor needs (resize limits, DB post-processing).
PaddleOCR 3 / PaddleX refuses a folder whose `Global.model_name` is not the model name it is given (one of its
own, e.g. `PP-OCRv4_mobile_det`: `ModelSpec.paddlex_name`), and takes the resize limits from its own arguments
(`text_det_limit_side_len`, `text_det_limit_type`), not from this file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from train.errors import ConfigError

CONFIG_FILE = "inference.yml"
DEFAULT_POSTPROCESS = {"thresh": 0.3, "box_thresh": 0.6, "max_candidates": 1000, "unclip_ratio": 1.5,
                       "use_dilation": False, "score_mode": "fast"}


@dataclass(frozen=True)
class DeployConfig:
    """Resize-for-test limits and DBPostProcess arguments of an exported detector."""

    model_name: str = "det"
    limit_side_len: int = 960
    limit_type: str = "max"
    postprocess: dict = field(default_factory=lambda: dict(DEFAULT_POSTPROCESS))

    def to_paddleocr(self) -> dict:
        """The PaddleOCR `inference.yml` structure (what `dump_infer_config` writes for DB detectors)."""
        return {
            "Global": {"model_name": self.model_name},
            "PreProcess": {"transform_ops": [
                {"DecodeImage": {"channel_first": False, "img_mode": "BGR"}},
                {"DetResizeForTest": {"limit_side_len": self.limit_side_len, "limit_type": self.limit_type}},
                {"NormalizeImage": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "scale": "1./255.",
                                    "order": "hwc"}},
                {"ToCHWImage": None},
                {"KeepKeys": {"keep_keys": ["image", "shape"]}},
            ]},
            "PostProcess": {"name": "DBPostProcess", **self.postprocess},
        }

    def write(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / CONFIG_FILE
        path.write_text(yaml.safe_dump(self.to_paddleocr(), sort_keys=False))
        return path


def read_deploy_config(model_dir: str | Path) -> DeployConfig:
    """The `inference.yml` of `model_dir`; an export without one (e.g. the shipped PP-OCRv4 model) gets defaults."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.exists():
        return DeployConfig()
    try:
        data = yaml.safe_load(path.read_text())
        ops = {name: args for op in data["PreProcess"]["transform_ops"] for name, args in op.items()}
        resize = ops["DetResizeForTest"] or {}
        post = {k: v for k, v in data["PostProcess"].items() if k != "name"}
        return DeployConfig(model_name=str(data.get("Global", {}).get("model_name", "det")),
                            limit_side_len=int(resize.get("limit_side_len", 960)),
                            limit_type=str(resize.get("limit_type", "max")),
                            postprocess={**DEFAULT_POSTPROCESS, **{k: v for k, v in post.items()
                                                                   if k in DEFAULT_POSTPROCESS}})
    except (yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{path}: not a PaddleOCR det inference config ({type(exc).__name__}: {exc})") from None


