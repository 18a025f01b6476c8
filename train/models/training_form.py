"""Give a fused (deploy-form) PPLCNetV3 its BatchNorms back for fine-tuning, then fuse again for export.

The deploy form has a single ``reparam_conv`` per ``LearnableRepLayer`` and no BN in the backbone, so a pruned
model cannot re-normalise its shifted activations while it recovers. ``unfuse`` writes each fused conv back as
one training branch ``conv_kxk.0`` (conv + BN) whose BN is an identity at the data's own statistics:
running mean/var = the conv output's per-channel mean/var on a few batches, scale = sqrt(var + eps), shift =
fused bias + mean. In eval mode the function is unchanged (up to float rounding); in train mode the BN sees
batch statistics close to those running ones, so training starts from the same function instead of from a
normalised one. ``fuse`` folds the branch back into the deploy form (same keys as before ``unfuse``).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import paddle
from paddle import nn

from train.models.pplcnet_v3 import ConvBNLayer, LearnableRepLayer
from train.models.zoo import reparameterize

# Auto parameter names of the new branches: a distinct prefix so they cannot collide with the model's own names
# (Adam state and jit.save key on them).
UNFUSE_NAME_PREFIX = "unfuse_"


# Per fused layer (structured name, e.g. "backbone.blocks3.0.pw_conv"): per-channel mean and variance of its
# conv output without bias.
Statistics = dict[str, tuple[np.ndarray, np.ndarray]]


def _fused_layers(model: nn.Layer) -> dict[str, LearnableRepLayer]:
    return {name: layer for name, layer in model.named_sublayers()
            if isinstance(layer, LearnableRepLayer) and layer.is_repped}


def has_fused_layers(model: nn.Layer) -> bool:
    """Whether ``model`` has fused re-parameterizable layers that ``unfuse`` can write back in training form."""
    return bool(_fused_layers(model))


@paddle.no_grad()
def conv_statistics(model: nn.Layer, images: Iterable[paddle.Tensor]) -> Statistics:
    """Per fused ``LearnableRepLayer``: mean and variance of each output channel of its conv (bias excluded),
    over all pixels of ``images`` (a few input batches), in eval mode."""
    layers = _fused_layers(model)
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(layers, 0)

    def hook_for(name: str, bias: paddle.Tensor):
        def hook(layer: nn.Layer, inputs: tuple, output: paddle.Tensor) -> None:
            x = (output - bias.reshape([1, -1, 1, 1])).astype("float64")
            s, q = x.sum(axis=[0, 2, 3]).numpy(), (x * x).sum(axis=[0, 2, 3]).numpy()
            sums[name] = sums[name] + s if name in sums else s
            squares[name] = squares[name] + q if name in squares else q
            counts[name] += output.shape[0] * output.shape[2] * output.shape[3]
        return hook

    handles = [layer.reparam_conv.register_forward_post_hook(hook_for(name, layer.reparam_conv.bias))
               for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in images:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
        if was_training:
            model.train()
    stats: Statistics = {}
    for name in layers:
        assert counts[name], f"{name} did not run while measuring statistics"
        mean = sums[name] / counts[name]
        stats[name] = (mean, np.maximum(squares[name] / counts[name] - mean * mean, 0.0))
    return stats


def unfuse(model: nn.Layer, images: Iterable[paddle.Tensor] | None = None,
           statistics: Statistics | None = None) -> nn.Layer:
    """Rewrite every fused ``LearnableRepLayer`` of ``model`` in place as one conv + BN branch; returns ``model``.

    The BNs are identities at ``statistics`` (see ``conv_statistics``), measured on ``images`` when not given.
    Passing another model's statistics (e.g. the unpruned teacher's at the kept channels) makes the BN shift and
    scale those of that model, which adaptive BN (``train.recovery.recalibrate_bn``) then maps this model's own
    statistics onto. With neither, the BNs get mean 0 and variance 1: the same eval function, but a poor start for
    train-mode BN. Works on pruned models: the branch takes the fused conv's actual shapes.
    """
    layers = _fused_layers(model)
    if not layers:
        return model
    if statistics is None and images is not None:
        statistics = conv_statistics(model, images)
    with paddle.utils.unique_name.guard(UNFUSE_NAME_PREFIX):
        for name, layer in layers.items():
            fused = layer.reparam_conv
            out_channels, in_per_group, kernel, _ = fused.weight.shape
            branch = ConvBNLayer(in_per_group * fused._groups, out_channels, kernel, fused._stride[0],
                                 groups=fused._groups)
            branch.conv.weight.set_value(fused.weight)
            bn = branch.bn
            if statistics is None:
                mean, var = np.zeros(out_channels), np.ones(out_channels)
            else:
                mean, var = statistics[name]
                if len(mean) != out_channels:
                    raise ValueError(f"statistics for {name} have {len(mean)} channels, the layer {out_channels}")
            eps = bn._epsilon
            bn._mean.set_value(paddle.to_tensor(mean, dtype=bn._mean.dtype))
            bn._variance.set_value(paddle.to_tensor(var, dtype=bn._variance.dtype))
            bn.weight.set_value(paddle.to_tensor(np.sqrt(var + eps), dtype=bn.weight.dtype))
            bn.bias.set_value(fused.bias + paddle.to_tensor(mean, dtype=fused.bias.dtype))
            layer.conv_kxk = nn.LayerList([branch])
            layer.conv_1x1 = None
            layer.identity = None
            del layer.reparam_conv
            layer.is_repped = False
    return model


def fuse(model: nn.Layer) -> nn.Layer:
    """Fuse ``model`` back to the deploy form in place (``zoo.reparameterize``), with ``unfuse``'s one-branch
    layers folded in float64; returns ``model``.

    After fine-tuning, BN scales far from 1 make a float32 fold round visibly (measured: up to 1.4e-5 on the
    probability map of a recovered PP-OCRv4 det); folding in float64 and rounding once keeps the exported model
    within float32 noise (~1e-6) of the fine-tuned one.
    """
    exact = {}
    for layer in model.sublayers():
        if (isinstance(layer, LearnableRepLayer) and not layer.is_repped and layer.identity is None
                and layer.conv_1x1 is None and len(layer.conv_kxk) == 1):
            branch = layer.conv_kxk[0]
            bn = branch.bn
            scale = bn.weight.numpy().astype(np.float64) / np.sqrt(bn._variance.numpy().astype(np.float64)
                                                                  + bn._epsilon)
            kernel = branch.conv.weight.numpy().astype(np.float64) * scale.reshape(-1, 1, 1, 1)
            bias = bn.bias.numpy().astype(np.float64) - bn._mean.numpy().astype(np.float64) * scale
            exact[id(layer)] = (kernel, bias)
    reparameterize(model)
    for layer in model.sublayers():
        if id(layer) in exact:
            kernel, bias = exact[id(layer)]
            layer.reparam_conv.weight.set_value(kernel.astype(np.float32))
            layer.reparam_conv.bias.set_value(bias.astype(np.float32))
    return model
