"""MobileNetV3 backbone, detection variant (PaddleOCR ``det_mobilenet_v3``), returning 4 stage features.

Sub-layer names, construction order and layer classes follow PaddleOCR exactly: checkpoints are keyed by the
structured names, and the auto-generated parameter names (``conv2d_N.w_0``, ``batch_norm_N.w_0``) come from the
layer classes and the order in which they are built, which PaddleSlim and ``.pdiparams.info`` files rely on.
"""

from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn.functional as F
from paddle import nn

from train.errors import ConfigError

SUPPORTED_SCALES = (0.35, 0.5, 0.75, 1.0, 1.25)


@dataclass(frozen=True)
class _BlockSpec:
    kernel: int
    expand: int
    out: int
    use_se: bool
    act: str
    stride: int


# MobileNetV3-large as configured for detection: the stage boundaries fall on the stride-2 blocks after the
# third one, which yields features at strides 4/8/16/32.
_LARGE = (
    _BlockSpec(3, 16, 16, False, "relu", 1),
    _BlockSpec(3, 64, 24, False, "relu", 2),
    _BlockSpec(3, 72, 24, False, "relu", 1),
    _BlockSpec(5, 72, 40, True, "relu", 2),
    _BlockSpec(5, 120, 40, True, "relu", 1),
    _BlockSpec(5, 120, 40, True, "relu", 1),
    _BlockSpec(3, 240, 80, False, "hardswish", 2),
    _BlockSpec(3, 200, 80, False, "hardswish", 1),
    _BlockSpec(3, 184, 80, False, "hardswish", 1),
    _BlockSpec(3, 184, 80, False, "hardswish", 1),
    _BlockSpec(3, 480, 112, True, "hardswish", 1),
    _BlockSpec(3, 672, 112, True, "hardswish", 1),
    _BlockSpec(5, 672, 160, True, "hardswish", 2),
    _BlockSpec(5, 960, 160, True, "hardswish", 1),
    _BlockSpec(5, 960, 160, True, "hardswish", 1),
)
_LARGE_LAST_CHANNELS = 960
_STEM_CHANNELS = 16


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a scaled channel count to a multiple of ``divisor``, never dropping more than 10 %."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _activate(x: paddle.Tensor, act: str | None) -> paddle.Tensor:
    if act is None:
        return x
    if act == "relu":
        return F.relu(x)
    if act == "hardswish":
        return F.hardswish(x)
    raise ValueError(f"unknown activation {act!r}")


class ConvBNLayer(nn.Layer):
    """Conv (no bias) + legacy ``nn.BatchNorm`` + optional activation, as in PaddleOCR's MobileNetV3.

    ``nn.BatchNorm`` rather than ``BatchNorm2D`` because that is what PaddleOCR builds: the class decides the
    auto parameter names (``batch_norm_N``), which must match released checkpoints' ``.info`` files.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int,
        groups: int = 1,
        act: str | None = None,
    ) -> None:
        super().__init__()
        self.act = act
        self.conv = nn.Conv2D(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups, bias_attr=False
        )
        self.bn = nn.BatchNorm(num_channels=out_channels, act=None)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return _activate(self.bn(self.conv(x)), self.act)


class SEModule(nn.Layer):
    """Squeeze-and-excitation with ``hardsigmoid(slope=0.2, offset=0.5)``.

    The 0.2 slope is what exported PaddleOCR models use (also in RSEFPN's ``RSELayer``); Paddle's default 1/6
    changes the reference maps by up to 0.1.
    """

    def __init__(self, in_channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2D(1)
        self.conv1 = nn.Conv2D(in_channels, in_channels // reduction, 1)
        self.conv2 = nn.Conv2D(in_channels // reduction, in_channels, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        gate = F.relu(self.conv1(self.avg_pool(x)))
        gate = F.hardsigmoid(self.conv2(gate), slope=0.2, offset=0.5)
        return x * gate


class ResidualUnit(nn.Layer):
    """Inverted residual: 1x1 expand, depthwise kxk, optional SE, 1x1 linear projection, identity shortcut."""

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        use_se: bool,
        act: str,
    ) -> None:
        super().__init__()
        self.if_shortcut = stride == 1 and in_channels == out_channels
        self.if_se = use_se
        self.expand_conv = ConvBNLayer(in_channels, mid_channels, 1, 1, 0, act=act)
        self.bottleneck_conv = ConvBNLayer(
            mid_channels, mid_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=mid_channels, act=act
        )
        if use_se:
            self.mid_se = SEModule(mid_channels)
        self.linear_conv = ConvBNLayer(mid_channels, out_channels, 1, 1, 0, act=None)

    def forward(self, inputs: paddle.Tensor) -> paddle.Tensor:
        x = self.bottleneck_conv(self.expand_conv(inputs))
        if self.if_se:
            x = self.mid_se(x)
        x = self.linear_conv(x)
        if self.if_shortcut:
            x = paddle.add(inputs, x)
        return x


class MobileNetV3(nn.Layer):
    """MobileNetV3-large detection backbone; ``forward`` returns the outputs of ``stage0..stage3``.

    ``disable_se=True`` is the PP-OCRv3 student setting (no SE in the backbone, SE moves to the RSEFPN neck).
    ``out_channels`` lists the 4 feature widths for the neck ([16, 24, 56, 480] at scale 0.5).
    """

    def __init__(
        self, in_channels: int = 3, model_name: str = "large", scale: float = 0.5, disable_se: bool = False
    ) -> None:
        super().__init__()
        if model_name != "large":
            raise ConfigError(f"MobileNetV3 model_name={model_name!r} is not supported; use 'large'")
        if scale not in SUPPORTED_SCALES:
            raise ConfigError(f"MobileNetV3 scale={scale} is not supported; use one of {SUPPORTED_SCALES}")
        self.disable_se = disable_se

        inplanes = make_divisible(_STEM_CHANNELS * scale)
        self.conv = ConvBNLayer(in_channels, inplanes, 3, 2, 1, act="hardswish")

        stages: list[list[nn.Layer]] = []
        block_list: list[nn.Layer] = []
        self.out_channels: list[int] = []
        for i, spec in enumerate(_LARGE):
            # The first stride-2 block (index 1) stays in stage 0 so that stage 0 ends at stride 4.
            if spec.stride == 2 and i > 2:
                self.out_channels.append(inplanes)
                stages.append(block_list)
                block_list = []
            out = make_divisible(scale * spec.out)
            block_list.append(
                ResidualUnit(
                    in_channels=inplanes,
                    mid_channels=make_divisible(scale * spec.expand),
                    out_channels=out,
                    kernel_size=spec.kernel,
                    stride=spec.stride,
                    use_se=spec.use_se and not disable_se,
                    act=spec.act,
                )
            )
            inplanes = out
        last = make_divisible(scale * _LARGE_LAST_CHANNELS)
        block_list.append(ConvBNLayer(inplanes, last, 1, 1, 0, act="hardswish"))
        stages.append(block_list)
        self.out_channels.append(last)

        self.stages = [nn.Sequential(*blocks) for blocks in stages]
        for i, stage in enumerate(self.stages):
            self.add_sublayer(f"stage{i}", stage)

    def forward(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        x = self.conv(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
