"""The DB detector: backbone -> neck -> head, with PaddleOCR's sub-layer names (``backbone``, ``neck``, ``head``)."""

from __future__ import annotations

import paddle
from paddle import nn

from train.errors import ConfigError


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


# State-dict prefixes of the DB detector's parts that pruning and loading treat specially: everything under the
# head, and the head's threshold branch, which runs only in training (the DB loss) and never reaches inference.
HEAD_PREFIX = "head."
TRAIN_ONLY_PREFIX = "head.thresh."

# The detectors' FPN halves the input 5 times and adds upsampled maps back: sides must divide evenly.
INPUT_MULTIPLE = 32


def check_input_size(input_size, key: str = "input_size", minimum: int = INPUT_MULTIPLE) -> tuple[int, int]:
    """``input_size`` as ``(height, width)``: both multiples of 32 and at least ``minimum``, else a ConfigError
    naming ``key`` (the config key the value came from)."""
    size = tuple(int(side) for side in input_size)
    if len(size) != 2 or any(side < minimum or side % INPUT_MULTIPLE for side in size):
        raise ConfigError(f"{key}={list(size)}: need [height, width], multiples of {INPUT_MULTIPLE}, "
                          f"each >= {minimum}")
    return size  # type: ignore[return-value]
