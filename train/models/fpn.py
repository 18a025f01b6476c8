"""DB necks: ``DBFPN`` (det_mv3_db) and ``RSEFPN`` (PP-OCRv3/v4), fusing 4 backbone features at stride 4.

Both build a top-down pyramid with nearest x2 upsampling, reduce each level to ``out_channels // 4`` and
concatenate the levels (upsampled x8/x4/x2/x1) into ``out_channels`` channels at stride 4.
"""

from __future__ import annotations

from collections.abc import Sequence

import paddle
import paddle.nn.functional as F
from paddle import ParamAttr, nn
from paddle.nn.initializer import KaimingUniform

from train.models.mobilenet_v3 import SEModule


def _upsample(x: paddle.Tensor, factor: int) -> paddle.Tensor:
    return F.upsample(x, scale_factor=factor, mode="nearest", align_mode=1)


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2D:
    return nn.Conv2D(
        in_channels,
        out_channels,
        kernel_size,
        padding=kernel_size // 2,
        weight_attr=ParamAttr(initializer=KaimingUniform()),
        bias_attr=False,
    )


def _top_down(c2: paddle.Tensor, c3: paddle.Tensor, c4: paddle.Tensor, c5: paddle.Tensor) -> tuple[paddle.Tensor, ...]:
    """Top-down pathway on already projected inputs: returns (in5, out4, out3, out2)."""
    out4 = c4 + _upsample(c5, 2)
    out3 = c3 + _upsample(out4, 2)
    out2 = c2 + _upsample(out3, 2)
    return c5, out4, out3, out2


def _fuse(p5: paddle.Tensor, p4: paddle.Tensor, p3: paddle.Tensor, p2: paddle.Tensor) -> paddle.Tensor:
    return paddle.concat([_upsample(p5, 8), _upsample(p4, 4), _upsample(p3, 2), p2], axis=1)


class DBFPN(nn.Layer):
    """Plain FPN: 1x1 lateral convs ``in2..in5_conv``, 3x3 output convs ``p5..p2_conv`` (no bias, no BN)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.in2_conv = _conv(in_channels[0], out_channels, 1)
        self.in3_conv = _conv(in_channels[1], out_channels, 1)
        self.in4_conv = _conv(in_channels[2], out_channels, 1)
        self.in5_conv = _conv(in_channels[3], out_channels, 1)
        self.p5_conv = _conv(out_channels, out_channels // 4, 3)
        self.p4_conv = _conv(out_channels, out_channels // 4, 3)
        self.p3_conv = _conv(out_channels, out_channels // 4, 3)
        self.p2_conv = _conv(out_channels, out_channels // 4, 3)

    def forward(self, features: Sequence[paddle.Tensor]) -> paddle.Tensor:
        c2, c3, c4, c5 = features
        in5, out4, out3, out2 = _top_down(
            self.in2_conv(c2), self.in3_conv(c3), self.in4_conv(c4), self.in5_conv(c5)
        )
        return _fuse(self.p5_conv(in5), self.p4_conv(out4), self.p3_conv(out3), self.p2_conv(out2))


class RSELayer(nn.Layer):
    """Conv followed by an SE block (hardsigmoid slope 0.2), with the SE output added back when ``shortcut``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, shortcut: bool = True) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.in_conv = _conv(in_channels, out_channels, kernel_size)
        self.se_block = SEModule(out_channels)
        self.shortcut = shortcut

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.in_conv(x)
        return x + self.se_block(x) if self.shortcut else self.se_block(x)


class RSEFPN(nn.Layer):
    """FPN whose lateral (``ins_conv``) and output (``inp_conv``) convs are ``RSELayer``s."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, shortcut: bool = True) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.ins_conv = nn.LayerList()
        self.inp_conv = nn.LayerList()
        # Interleaved construction, as in PaddleOCR: it fixes the auto parameter names (conv2d_N).
        for width in in_channels:
            self.ins_conv.append(RSELayer(width, out_channels, 1, shortcut=shortcut))
            self.inp_conv.append(RSELayer(out_channels, out_channels // 4, 3, shortcut=shortcut))

    def forward(self, features: Sequence[paddle.Tensor]) -> paddle.Tensor:
        lateral = [conv(feature) for conv, feature in zip(self.ins_conv, features)]
        in5, out4, out3, out2 = _top_down(*lateral)
        return _fuse(self.inp_conv[3](in5), self.inp_conv[2](out4), self.inp_conv[1](out3), self.inp_conv[0](out2))
