"""The DB detector: backbone -> neck -> head, with PaddleOCR's sub-layer names (``backbone``, ``neck``, ``head``)."""

from __future__ import annotations

import paddle
from paddle import nn


class DBDetector(nn.Layer):
    """Wraps three parts with the contract of PaddleOCR's ``BaseModel``.

    The backbone returns 4 stage features, the neck fuses them into one stride-4 map, the head returns
    ``{'maps': ...}`` (see ``DBHead``). The sub-layer names and their order make the state_dict keys
    (``backbone.*``, ``neck.*``, ``head.*``), which PaddleOCR checkpoints use.
    """

    def __init__(self, backbone: nn.Layer, neck: nn.Layer, head: nn.Layer) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head

    def forward(self, x: paddle.Tensor) -> dict[str, paddle.Tensor]:
        return self.head(self.neck(self.backbone(x)))
