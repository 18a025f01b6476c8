"""Differentiable Binarization head (Liao et al., https://arxiv.org/abs/1911.08947).

Two identical branches at stride 4 -> stride 1: ``binarize`` predicts the shrink (probability) map and
``thresh`` the threshold map. Only ``binarize`` runs at inference, so released inference models do not carry
``thresh`` weights.
"""

from __future__ import annotations

import math

import paddle
import paddle.nn.functional as F
from paddle import ParamAttr, nn
from paddle.nn.initializer import Constant, KaimingUniform, Uniform

from train.errors import ConfigError

THRESH_INITS = ("keep", "copy", "fresh")


def _bn_relu(channels: int) -> nn.BatchNorm:
    # Legacy nn.BatchNorm with the ReLU fused in: PaddleOCR's layout (and auto names batch_norm_N).
    return nn.BatchNorm(
        num_channels=channels,
        param_attr=ParamAttr(initializer=Constant(1.0)),
        bias_attr=ParamAttr(initializer=Constant(1e-4)),
        act="relu",
    )


def _transposed_x2(in_channels: int, out_channels: int) -> nn.Conv2DTranspose:
    bound = 1.0 / math.sqrt(in_channels)
    return nn.Conv2DTranspose(
        in_channels,
        out_channels,
        kernel_size=2,
        stride=2,
        weight_attr=ParamAttr(initializer=KaimingUniform()),
        bias_attr=ParamAttr(initializer=Uniform(-bound, bound)),
    )


class PixelShuffledConv(nn.Layer):
    """A x2 transposed conv (kernel 2, stride 2, no padding) computed as a 1x1 conv to 4x the channels followed by
    a depth-to-space (``pixel_shuffle``): the same sums (bit-identical maps measured), a cheaper engine path.

    Paddle Inference's oneDNN transposed conv to one channel writes a channel-blocked map and then adds its bias
    over it: on PP-OCRv4 at 640x640 the head's last transposed conv and its bias add took 12% of a −50% model's
    time; as a 1x1 conv it is 0.90x (2 threads) / 0.86x (1 thread) the whole model's latency (README "Export").
    """

    def __init__(self, deconv: nn.Conv2DTranspose) -> None:
        super().__init__()
        weight = deconv.weight  # [in, out, 2, 2]
        assert list(weight.shape[2:]) == [2, 2] and deconv._stride == [2, 2] and deconv._groups == 1 and \
            deconv._padding in (0, [0, 0], [0, 0, 0, 0]), "only a x2 transposed conv with kernel 2 is a pixel shuffle"
        in_channels, out_channels = weight.shape[:2]
        self.conv = nn.Conv2D(in_channels, out_channels * 4, 1)
        # Output channel o*4 + a*2 + b of the 1x1 conv is tap (a, b) of output channel o: pixel_shuffle's order.
        self.conv.weight.set_value(weight.transpose([1, 2, 3, 0]).reshape([out_channels * 4, in_channels, 1, 1]))
        bias = deconv.bias if deconv.bias is not None else paddle.zeros([out_channels])
        self.conv.bias.set_value(paddle.repeat_interleave(bias, 4))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.pixel_shuffle(self.conv(x), 2)


class Head(nn.Layer):
    """3x3 conv -> BN+ReLU -> x2 transposed conv -> BN+ReLU -> x2 transposed conv to 1 channel -> sigmoid."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        mid = in_channels // 4
        self.conv1 = nn.Conv2D(in_channels, mid, 3, padding=1, weight_attr=ParamAttr(), bias_attr=False)
        self.conv_bn1 = _bn_relu(mid)
        self.conv2 = _transposed_x2(mid, mid)
        self.conv_bn2 = _bn_relu(mid)
        self.conv3 = _transposed_x2(mid, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.conv_bn1(self.conv1(x))
        x = self.conv_bn2(self.conv2(x))
        return F.sigmoid(self.conv3(x))

    @paddle.no_grad()
    def simplify_for_inference(self) -> int:
        """The last transposed conv (to one channel) becomes a ``PixelShuffledConv``, in place; 1 if it changed.
        The middle one stays: on many channels oneDNN's transposed conv is the faster path (1.02-1.06x measured)."""
        if isinstance(self.conv3, PixelShuffledConv):
            return 0
        self.conv3 = PixelShuffledConv(self.conv3)
        return 1


class DBHead(nn.Layer):
    """Eval: ``{'maps': shrink}`` (N,1,H,W). Train: ``{'maps': concat([shrink, thresh, binary], 1)}`` (N,3,H,W).

    ``binary = 1 / (1 + exp(-k * (shrink - thresh)))`` is the differentiable step with amplification ``k``.
    """

    def __init__(self, in_channels: int, k: int = 50) -> None:
        super().__init__()
        self.k = k
        self.binarize = Head(in_channels)
        self.thresh = Head(in_channels)

    def step_function(self, shrink: paddle.Tensor, thresh: paddle.Tensor) -> paddle.Tensor:
        return paddle.reciprocal(1 + paddle.exp(-self.k * (shrink - thresh)))

    @paddle.no_grad()
    def init_thresh(self, how: str) -> None:
        """Set the train-only ``thresh`` branch before training: "keep" leaves it, "copy" copies ``binarize`` (the
        shapes must match: not after the head's input was pruned), "fresh" re-initialises it as a new branch.

        It never runs at inference (released inference models do not carry it), and matters only through the
        DB loss. A fresh branch has the unpruned width (``thresh`` is never pruned), its first conv's input cut
        to the (possibly pruned) neck width.
        """
        if how == "keep":
            return
        target = self.thresh.state_dict()
        if how == "copy":
            source = self.binarize.state_dict()
            mismatched = [k for k in target if list(target[k].shape) != list(source[k].shape)]
            if mismatched:
                raise ConfigError(f"thresh_init=copy: head.binarize.{mismatched[0]} has shape "
                                  f"{list(source[mismatched[0]].shape)} but head.thresh has "
                                  f"{list(target[mismatched[0]].shape)} (pruned head); use thresh_init=fresh or keep")
        elif how == "fresh":
            with paddle.utils.unique_name.guard("thresh_init_"):
                source = Head(4 * self.thresh.conv1.weight.shape[0]).state_dict()
        else:
            raise ConfigError(f"thresh_init={how!r}: expected one of {list(THRESH_INITS)}")
        for key, tensor in target.items():
            tensor.set_value(source[key][tuple(slice(0, n) for n in tensor.shape)])

    def shrink_map(self, x: paddle.Tensor) -> paddle.Tensor:
        """The probability (shrink) map alone, in either mode: what inference returns and distillation targets."""
        return self.binarize(x)

    def forward(self, x: paddle.Tensor) -> dict[str, paddle.Tensor]:
        shrink = self.shrink_map(x)
        if not self.training:
            return {"maps": shrink}
        thresh = self.thresh(x)
        return {"maps": paddle.concat([shrink, thresh, self.step_function(shrink, thresh)], axis=1)}
