"""Inference-time folding: BatchNorm into the convolution before it, ReLU into the separable conv after it.

In eval mode a ``BatchNorm2d`` is the per-channel affine map
``y = (z - mean) * gamma / sqrt(var + eps) + beta``; when ``z = W x + b`` is a
convolution, ``y = (W * s) x + ((b - mean) * s + beta)`` with
``s = gamma / sqrt(var + eps)``, so the BN disappears into the weights. For a
separable convolution only the pointwise (last, linear) part is rescaled.
The scale and shift are computed in float64 (``kernels.batch_norm_folded``, the same fold that
``kernels.run_sequential`` applies on the fly in evaluation); the scale is rounded to the weights' dtype
and multiplied into them.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels

from .layers import is_separable


def _check_batchnorm(bn: nn.Module) -> nn.BatchNorm2d:
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"expected an nn.BatchNorm2d to fold, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot fold {bn}: it has no running statistics (track_running_stats=False)")
    return bn


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.Module) -> None:
    """Rescale ``conv`` (``weight: (C_out, C_in/groups, kh, kw)``) in place so that ``conv(x)``
    equals ``bn(conv(x))`` of the eval-mode ``bn``; ``conv`` gains a bias if it had none."""
    bn = _check_batchnorm(bn)
    if conv.out_channels != bn.num_features:
        raise ValueError(f"conv.out_channels={conv.out_channels} does not match bn.num_features={bn.num_features}")
    weight, bias = kernels.batch_norm_folded(conv.weight, conv.bias, bn)
    conv.weight.copy_(weight)
    if conv.bias is None:
        conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(bias)


def fold_batchnorm_into_separable(separable: nn.Module, bn: nn.Module) -> None:
    """Fold eval-mode ``bn`` into the pointwise half of a separable convolution (in place)."""
    if not is_separable(separable):
        raise TypeError(f"expected a separable convolution, got {type(separable).__name__}")
    fold_batchnorm(separable.pointwise, bn)


def fuse_sequential(sequence: nn.Sequential) -> None:
    """Fuse every ``[ReLU] -> separable conv -> BN`` run of ``sequence`` in place.

    The BN folds into the conv and becomes ``nn.Identity``; a ReLU directly
    before the conv becomes ``nn.Identity`` and the conv's ``relu_input`` is
    set, so the whole run is one kernel call. Indices are kept (``state_dict``
    keys of the remaining weights do not move).
    """
    for index in range(len(sequence)):
        module = sequence[index]
        if not is_separable(module):
            continue
        if index + 1 < len(sequence) and isinstance(sequence[index + 1], nn.BatchNorm2d):
            fold_batchnorm_into_separable(module, sequence[index + 1])
            sequence[index + 1] = nn.Identity()
        if index > 0 and isinstance(sequence[index - 1], nn.ReLU):
            module.relu_input = True
            sequence[index - 1] = nn.Identity()
