"""Xception (Chollet 2017) built on the fused separable convolutions of ``kernels``.

    import xception
    model = xception.create_model("xception", num_classes=1000)      # or xception.xception(...)
    xception.load_weights(model, "legacy_xception.pth")              # timm / Cadene / own checkpoints
    model = xception.xception(weights="legacy_xception.pth")         # the same in one call
    tuned = xception.xception(num_classes=10, weights="legacy_xception.pth")  # new classifier: fine-tuning
    model.eval().fuse_for_inference()                                 # BN + ReLU folded into the kernels

Weights files are read from disk only (nothing is downloaded); timm's ``legacy_xception``
weights are the paper's network trained on ImageNet.
"""

from .layers import Block, BlockSpec, Conv2dSeparable, make_divisible
from .model import DEFAULT_CFG, MODELS, Xception, create_model, xception, xception_tiny
from .weights import CheckpointError, LoadResult, load_weights, read_checkpoint, save_weights

__all__ = [
    "DEFAULT_CFG",
    "MODELS",
    "Block",
    "BlockSpec",
    "CheckpointError",
    "Conv2dSeparable",
    "LoadResult",
    "Xception",
    "create_model",
    "load_weights",
    "make_divisible",
    "read_checkpoint",
    "save_weights",
    "xception",
    "xception_tiny",
]
