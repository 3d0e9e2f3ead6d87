"""The pure-PyTorch oracle for the depthwise-separable convolution.

Every backend is tested against this function. It is deliberately the most
obvious implementation: a grouped ``F.conv2d`` followed by a 1x1 ``F.conv2d``.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

IntOrPair = Union[int, Tuple[int, int]]


def separable_conv2d_reference(
    input: torch.Tensor,
    depthwise_weight: torch.Tensor,
    pointwise_weight: torch.Tensor,
    depthwise_bias: Optional[torch.Tensor] = None,
    pointwise_bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: Union[IntOrPair, str] = 0,
    dilation: IntOrPair = 1,
    *,
    relu_input: bool = False,
) -> torch.Tensor:
    """``pointwise(depthwise(relu?(input)))`` with two ``F.conv2d`` calls.

    Shapes:
        input: ``(N, C, H, W)`` or ``(C, H, W)``
        depthwise_weight: ``(C*M, 1, kh, kw)``
        pointwise_weight: ``(C_out, C*M, 1, 1)``
        depthwise_bias: ``(C*M,)``; pointwise_bias: ``(C_out,)``
    """
    if relu_input:
        input = F.relu(input)
    channels = input.shape[-3]
    hidden = F.conv2d(input, depthwise_weight, depthwise_bias, stride, padding, dilation, groups=channels)
    return F.conv2d(hidden, pointwise_weight, pointwise_bias)
