"""PPLCNetV3 backbone (PP-OCRv4 mobile detection), with re-parameterizable blocks in two forms.

*Training form*: each ``LearnableRepLayer`` sums an identity BN, a 1x1 conv-BN and ``conv_kxk_num`` kxk conv-BNs.
*Deploy form*: the branches are fused into one ``reparam_conv`` (what PaddleOCR exports and what released
inference models contain). ``rep()`` turns the first into the second in place; ``deploy=True`` builds the second
directly, e.g. to load a released inference model.

Class names matter beyond style: Paddle derives auto parameter names from them (``learnable_affine_block_N.w_0``),
and sub-layer names/order give the state_dict keys, which must equal PaddleOCR's.
"""

from __future__ import annotations

from dataclasses import dataclass

import paddle
from paddle import ParamAttr, nn
from paddle.nn.initializer import Constant, KaimingNormal
from paddle.regularizer import L2Decay

from train.errors import ConfigError

# State_dict key fragments that tell a checkpoint's form (checkpoint loading reads them, ``train.weights``).
TRAINING_BRANCH_KEY = ".conv_kxk."
FUSED_KEY = ".reparam_conv."


@dataclass(frozen=True)
class _BlockSpec:
    kernel: int
    in_channels: int
    out_channels: int
    stride: int
    use_se: bool


# Detection configuration (unscaled widths); stages blocks3..blocks6 give the features at strides 4/8/16/32.
_DET_STAGES: dict[str, tuple[_BlockSpec, ...]] = {
    "blocks2": (_BlockSpec(3, 16, 32, 1, False),),
    "blocks3": (_BlockSpec(3, 32, 64, 2, False), _BlockSpec(3, 64, 64, 1, False)),
    "blocks4": (_BlockSpec(3, 64, 128, 2, False), _BlockSpec(3, 128, 128, 1, False)),
    "blocks5": (
        _BlockSpec(3, 128, 256, 2, False),
        _BlockSpec(5, 256, 256, 1, False),
        _BlockSpec(5, 256, 256, 1, False),
        _BlockSpec(5, 256, 256, 1, False),
        _BlockSpec(5, 256, 256, 1, False),
    ),
    "blocks6": (
        _BlockSpec(5, 256, 512, 2, True),
        _BlockSpec(5, 512, 512, 1, True),
        _BlockSpec(5, 512, 512, 1, False),
        _BlockSpec(5, 512, 512, 1, False),
    ),
}
# Output widths of the 1x1 "layer_list" convs: MobileNetV3-large's det widths, so the neck config is shared.
_DET_OUT_WIDTHS = (16, 24, 56, 480)
_STEM_CHANNELS = 16


def make_divisible(value: float, divisor: int = 16, min_value: int | None = None) -> int:
    """Round a scaled channel count to a multiple of ``divisor`` (16 here, unlike MobileNetV3's 8)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class LearnableAffineBlock(nn.Layer):
    """``x * scale + bias`` with two learnable scalars (learning rate ``lr_mult * lab_lr``).

    The operand order ``x * scale`` is deliberate: PaddleSlim's prune worker asserts on ``scale * x`` (the
    scalar as the first operand of elementwise_mul); both orders are bitwise identical.
    """

    def __init__(
        self, scale_value: float = 1.0, bias_value: float = 0.0, lr_mult: float = 1.0, lab_lr: float = 0.1
    ) -> None:
        super().__init__()
        self.scale = self.create_parameter(
            shape=[1], default_initializer=Constant(scale_value), attr=ParamAttr(learning_rate=lr_mult * lab_lr)
        )
        self.bias = self.create_parameter(
            shape=[1], default_initializer=Constant(bias_value), attr=ParamAttr(learning_rate=lr_mult * lab_lr)
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x * self.scale + self.bias


class ConvBNLayer(nn.Layer):
    """Conv (KaimingNormal, no bias, 'same' padding) + BatchNorm2D without weight decay on the BN affine."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int = 1, lr_mult: float = 1.0
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2D(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            weight_attr=ParamAttr(initializer=KaimingNormal(), learning_rate=lr_mult),
            bias_attr=False,
        )
        self.bn = nn.BatchNorm2D(
            out_channels,
            weight_attr=ParamAttr(regularizer=L2Decay(0.0), learning_rate=lr_mult),
            bias_attr=ParamAttr(regularizer=L2Decay(0.0), learning_rate=lr_mult),
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.bn(self.conv(x))


class Act(nn.Layer):
    """Hardswish followed by a learnable affine block."""

    def __init__(self, lr_mult: float = 1.0, lab_lr: float = 0.1) -> None:
        super().__init__()
        self.act = nn.Hardswish()
        self.lab = LearnableAffineBlock(lr_mult=lr_mult, lab_lr=lab_lr)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.lab(self.act(x))


def _fuse_conv_bn(kernel: paddle.Tensor, bn: nn.BatchNorm2D) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Fold an eval-mode BN into the preceding conv's kernel and a bias (same op order as PaddleOCR)."""
    std = (bn._variance + bn._epsilon).sqrt()
    return kernel * (bn.weight / std).reshape((-1, 1, 1, 1)), bn.bias - bn._mean * bn.weight / std


class LearnableRepLayer(nn.Layer):
    """Re-parameterizable conv: ``lab(identity_bn(x) + conv_1x1(x) + sum(conv_kxk(x)))`` then ``Act`` unless stride 2.

    The identity BN exists only for ``in == out`` and stride 1, the 1x1 branch only for kernel > 1. In deploy
    form the same function is ``lab(reparam_conv(x))`` followed by the same activation rule. Stride-2 layers
    still own an ``act`` (PaddleOCR's key layout) that is never applied.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        num_conv_branches: int = 1,
        lr_mult: float = 1.0,
        lab_lr: float = 0.1,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = groups
        self.padding = (kernel_size - 1) // 2
        self.is_repped = deploy
        if not deploy:
            self.identity = (
                nn.BatchNorm2D(
                    in_channels,
                    weight_attr=ParamAttr(learning_rate=lr_mult),
                    bias_attr=ParamAttr(learning_rate=lr_mult),
                )
                if out_channels == in_channels and stride == 1
                else None
            )
            self.conv_kxk = nn.LayerList(
                [
                    ConvBNLayer(in_channels, out_channels, kernel_size, stride, groups=groups, lr_mult=lr_mult)
                    for _ in range(num_conv_branches)
                ]
            )
            self.conv_1x1 = (
                ConvBNLayer(in_channels, out_channels, 1, stride, groups=groups, lr_mult=lr_mult)
                if kernel_size > 1
                else None
            )
        self.lab = LearnableAffineBlock(lr_mult=lr_mult, lab_lr=lab_lr)
        self.act = Act(lr_mult=lr_mult, lab_lr=lab_lr)
        if deploy:
            self.reparam_conv = self._new_reparam_conv()

    def _new_reparam_conv(self) -> nn.Conv2D:
        return nn.Conv2D(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.is_repped:
            out = self.reparam_conv(x)
        else:
            # Same summation order as PaddleOCR, so float32 results are bitwise comparable.
            out = 0
            if self.identity is not None:
                out += self.identity(x)
            if self.conv_1x1 is not None:
                out += self.conv_1x1(x)
            for branch in self.conv_kxk:
                out += branch(x)
        out = self.lab(out)
        if self.stride != 2:
            out = self.act(out)
        return out

    def refresh_channel_counts(self) -> None:
        """Re-read the channel counts ``rep()`` builds the fused conv from out of the conv weights (after pruning
        cut them), so a pruned training-form layer still fuses correctly."""
        conv = self.reparam_conv if self.is_repped else self.conv_kxk[0].conv
        self.in_channels, self.out_channels, self.groups = conv._in_channels, conv._out_channels, conv._groups

    @paddle.no_grad()
    def rep(self) -> None:
        """Fuse the branches into ``reparam_conv`` in place and delete them (no-op if already fused).

        Uses the BNs' running statistics, i.e. the eval-mode function. The new conv gets an auto parameter name
        from the current ``unique_name`` generator: call through ``zoo.reparameterize`` so it cannot collide.
        """
        if self.is_repped:
            return
        kernel, bias = self._fused_kernel_bias()
        self.reparam_conv = self._new_reparam_conv()
        self.reparam_conv.weight.set_value(kernel)
        self.reparam_conv.bias.set_value(bias)
        del self.conv_kxk
        del self.conv_1x1
        del self.identity
        self.is_repped = True

    @paddle.no_grad()
    def fold_affine(self) -> int:
        """Fold ``lab`` (``x * scale + bias`` right after the fused conv) into ``reparam_conv`` and drop it: the same
        function without two full-size elementwise ops. Inference-only (the layer loses its ``lab`` parameters); a
        no-op in the training form or once folded. Returns the number of affines folded (0 or 1).
        """
        if not self.is_repped or isinstance(self.lab, nn.Identity):
            return 0
        _scale_conv_output(self.reparam_conv, self.lab.scale, self.lab.bias)
        self.lab = nn.Identity()
        return 1

    def _fused_kernel_bias(self) -> tuple[paddle.Tensor, paddle.Tensor]:
        kernel_kxk: paddle.Tensor | int = 0
        bias_kxk: paddle.Tensor | int = 0
        for branch in self.conv_kxk:
            kernel, bias = _fuse_conv_bn(branch.conv.weight, branch.bn)
            kernel_kxk += kernel
            bias_kxk += bias
        kernel_1x1: paddle.Tensor | int = 0
        bias_1x1: paddle.Tensor | int = 0
        if self.conv_1x1 is not None:
            kernel_1x1, bias_1x1 = _fuse_conv_bn(self.conv_1x1.conv.weight, self.conv_1x1.bn)
            pad = self.kernel_size // 2
            kernel_1x1 = nn.functional.pad(kernel_1x1, [pad, pad, pad, pad])
        kernel_id: paddle.Tensor | int = 0
        bias_id: paddle.Tensor | int = 0
        if self.identity is not None:
            kernel_id, bias_id = _fuse_conv_bn(self._identity_kernel(), self.identity)
        return kernel_kxk + kernel_1x1 + kernel_id, bias_kxk + bias_1x1 + bias_id

    def _identity_kernel(self) -> paddle.Tensor:
        """A kxk (grouped) kernel that maps each input channel to itself through the centre tap."""
        per_group = self.in_channels // self.groups
        kernel = paddle.zeros(
            [self.in_channels, per_group, self.kernel_size, self.kernel_size], dtype=self.identity.weight.dtype
        )
        centre = self.kernel_size // 2
        for c in range(self.in_channels):
            kernel[c, c % per_group, centre, centre] = 1
        return kernel


def _scale_conv_output(conv: nn.Conv2D, scale: paddle.Tensor, bias: paddle.Tensor) -> None:
    """``conv`` becomes ``conv(x) * scale + bias`` (scalars), exactly up to float rounding."""
    conv.weight.set_value(conv.weight * scale)
    conv.bias.set_value(conv.bias * scale + bias)


def _scale_conv_input(conv: nn.Conv2D, scale: paddle.Tensor, bias: paddle.Tensor) -> None:
    """``conv`` becomes ``conv(x * scale + bias)`` (scalars). Exact only for a 1x1 conv without padding: a padded
    kxk conv would see ``bias`` at the border where the original saw zeros."""
    assert list(conv.weight.shape[2:]) == [1, 1] and conv._padding in (0, [0, 0], [0, 0, 0, 0]), (
        "only a 1x1 conv without padding absorbs an input affine exactly")
    conv.bias.set_value(conv.bias + bias * conv.weight.sum(axis=[1, 2, 3]))
    conv.weight.set_value(conv.weight * scale)


class SELayer(nn.Layer):
    """Squeeze-and-excitation with ``nn.Hardsigmoid()`` defaults (slope 1/6), unlike MobileNetV3's SEModule."""

    def __init__(self, channels: int, reduction: int = 4, lr_mult: float = 1.0) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2D(1)
        self.conv1 = nn.Conv2D(
            channels,
            channels // reduction,
            1,
            weight_attr=ParamAttr(learning_rate=lr_mult),
            bias_attr=ParamAttr(learning_rate=lr_mult),
        )
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2D(
            channels // reduction,
            channels,
            1,
            weight_attr=ParamAttr(learning_rate=lr_mult),
            bias_attr=ParamAttr(learning_rate=lr_mult),
        )
        self.hardsigmoid = nn.Hardsigmoid()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        gate = self.hardsigmoid(self.conv2(self.relu(self.conv1(self.avg_pool(x)))))
        return paddle.multiply(x, gate)


class LCNetV3Block(nn.Layer):
    """Depthwise ``LearnableRepLayer``, optional SE, pointwise ``LearnableRepLayer``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        dw_size: int,
        use_se: bool = False,
        conv_kxk_num: int = 4,
        lr_mult: float = 1.0,
        lab_lr: float = 0.1,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.use_se = use_se
        self.dw_conv = LearnableRepLayer(
            in_channels,
            in_channels,
            dw_size,
            stride=stride,
            groups=in_channels,
            num_conv_branches=conv_kxk_num,
            lr_mult=lr_mult,
            lab_lr=lab_lr,
            deploy=deploy,
        )
        if use_se:
            self.se = SELayer(in_channels, lr_mult=lr_mult)
        self.pw_conv = LearnableRepLayer(
            in_channels,
            out_channels,
            1,
            stride=1,
            num_conv_branches=conv_kxk_num,
            lr_mult=lr_mult,
            lab_lr=lab_lr,
            deploy=deploy,
        )

    @paddle.no_grad()
    def simplify_for_inference(self) -> int:
        """Fold both ``LearnableRepLayer``s' inner affines into their convs, and the depthwise layer's activation
        affine into the pointwise 1x1 conv it feeds when no SE sits between (``LearnableRepLayer.fold_affine``).
        The pointwise layer's activation affine stays: it feeds a padded kxk conv or leaves the backbone.
        """
        folded = self.dw_conv.fold_affine() + self.pw_conv.fold_affine()
        affine = self.dw_conv.act.lab
        if self.use_se or self.dw_conv.stride == 2 or not self.pw_conv.is_repped or isinstance(affine, nn.Identity):
            return folded
        _scale_conv_input(self.pw_conv.reparam_conv, affine.scale, affine.bias)
        self.dw_conv.act.lab = nn.Identity()
        return folded + 1

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.dw_conv(x)
        if self.use_se:
            x = self.se(x)
        return self.pw_conv(x)


class PPLCNetV3(nn.Layer):
    """PPLCNetV3 detection backbone (``det=True`` only); ``forward`` returns 4 features after ``layer_list``.

    ``conv1`` is conv + BN with no activation (matches both PaddleOCR and the exported v4 program).
    ``lr_mult_list`` holds 6 learning-rate multipliers: stem, then blocks2..blocks6.
    """

    def __init__(
        self,
        scale: float = 1.0,
        conv_kxk_num: int = 4,
        lr_mult_list: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
        lab_lr: float = 0.1,
        det: bool = True,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        if not det:
            raise ConfigError("PPLCNetV3 det=False (the recognition variant) is not supported here; use det=True")
        if len(lr_mult_list) != 6:
            raise ConfigError(f"PPLCNetV3 lr_mult_list needs 6 values, got {len(lr_mult_list)}: {lr_mult_list}")
        self.scale = scale
        self.det = det
        self.conv1 = ConvBNLayer(3, make_divisible(_STEM_CHANNELS * scale), 3, 2, lr_mult=lr_mult_list[0])
        for stage_index, (stage_name, specs) in enumerate(_DET_STAGES.items(), start=1):
            stage = nn.Sequential(
                *[
                    LCNetV3Block(
                        make_divisible(spec.in_channels * scale),
                        make_divisible(spec.out_channels * scale),
                        stride=spec.stride,
                        dw_size=spec.kernel,
                        use_se=spec.use_se,
                        conv_kxk_num=conv_kxk_num,
                        lr_mult=lr_mult_list[stage_index],
                        lab_lr=lab_lr,
                        deploy=deploy,
                    )
                    for spec in specs
                ]
            )
            setattr(self, stage_name, stage)
        stage_widths = [make_divisible(_DET_STAGES[f"blocks{i}"][-1].out_channels * scale) for i in range(3, 7)]
        self.out_channels = [int(width * scale) for width in _DET_OUT_WIDTHS]
        self.layer_list = nn.LayerList(
            [nn.Conv2D(c_in, c_out, 1) for c_in, c_out in zip(stage_widths, self.out_channels)]
        )

    def forward(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        x = self.blocks2(self.conv1(x))
        features = []
        for stage in (self.blocks3, self.blocks4, self.blocks5, self.blocks6):
            x = stage(x)
            features.append(x)
        return [project(feature) for project, feature in zip(self.layer_list, features)]
