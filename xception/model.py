"""Xception (Chollet 2017, arXiv:1610.02357) on fused depthwise-separable convolutions.

The network is described as data: an entry flow of three strided blocks, a
middle flow of ``middle_blocks`` identical blocks and a one-block exit flow,
then two separable convs and the classifier. At ``width=1`` and
``middle_blocks=8`` it is exactly the paper's network and timm's
``legacy_xception`` (22,855,952 parameters with 1000 classes), with the same
``state_dict`` keys, so timm / Cadene checkpoints load (``xception.load_weights``).

Modules and keys (``block{i}`` are numbered from 1 across the three flows)::

    conv1 (3x3/2, no pad) bn1 act1  conv2 (3x3, no pad) bn2 act2          stride 2,  64 ch
    block1   64 -> 128   (no leading ReLU)                                 stride 4
    block2  128 -> 256                                                     stride 8
    block3  256 -> 728                                                     stride 16
    block4 .. block11  728 -> 728 x3, identity shortcut                    stride 16
    block12 728 -> 728 -> 1024                                             stride 32
    conv3 SepConv 1024 -> 1536 bn3 act3  conv4 SepConv 1536 -> 2048 bn4 act4
    global average pool, dropout, fc
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Union

import torch
from torch import nn

import kernels

from .fuse import fold_batchnorm, fold_batchnorm_into_separable, fuse_sequential
from .layers import (SEPARABLE_KINDS, Block, BlockSpec, batch_norm, batch_norm_relu, is_separable, make_divisible,
                     separable_conv, stem_conv)

DEFAULT_CFG: dict[str, Any] = {
    "input_size": (3, 299, 299),
    "pool_size": (10, 10),
    "crop_pct": 0.8975,
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "num_classes": 1000,
    "first_conv": "conv1",
    "classifier": "fc",
}

# Channel counts of the paper's network (width 1).
STEM_CHANNELS = (32, 64)
ENTRY_FLOW = (
    BlockSpec((128, 128), stride=2, start_with_relu=False),
    BlockSpec((256, 256), stride=2),
    BlockSpec((728, 728), stride=2),
)
MIDDLE_BLOCK = BlockSpec((728, 728, 728))
EXIT_FLOW = (BlockSpec((728, 1024), stride=2),)
HEAD_CHANNELS = (1536, 2048)


def _scaled(spec: BlockSpec, width: float) -> BlockSpec:
    return BlockSpec(tuple(make_divisible(c * width) for c in spec.channels), spec.stride, spec.start_with_relu)


class Xception(nn.Module):
    """The Xception image classifier.

    Args:
        num_classes: classifier outputs (0: no classifier, ``forward`` returns pooled features).
        in_chans: input image channels.
        drop_rate: dropout probability before the classifier (applied in training only).
        backend: ``kernels`` backend of every separable conv (``"auto"``, ``"torch"``, ``"cpp"``,
            ``"triton"``); only for ``separable="fused"``.
        middle_blocks: number of middle-flow blocks (8 in the paper).
        width: multiplier of every channel count, each rounded to a multiple of 8.
        separable: ``"fused"`` (``kernels.SeparableConv2d``, one op per separable conv) or
            ``"conv2d"`` (two plain ``nn.Conv2d`` calls; same ``state_dict`` keys).
        features_only: ``forward`` returns the feature maps at strides 2, 4, 8, 16, 32 picked by
            ``out_indices`` instead of logits, and the model has no classifier.
        out_indices: which of those five feature maps ``features_only`` returns.
        fold_relu: apply each ReLU that precedes a separable conv inside that conv
            (``relu_input=True``; the ReLU's slot holds an ``nn.Identity``), and on the fused
            kind each ReLU right after a stem or head BatchNorm inside that BatchNorm
            (``relu_output=True``). Exact in training and inference, and it saves a pass over
            the activations each way. Default: on for ``separable="fused"``, off for
            ``"conv2d"`` (where it would cost an extra copy).

    Shape: ``(N, in_chans, H, W)`` with ``H, W >= 71`` (any size, NCHW or channels_last) to
    ``(N, num_classes)``, or a list of ``(N, C_i, H_i, W_i)`` with ``features_only``.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        backend: str = "auto",
        middle_blocks: int = 8,
        width: float = 1.0,
        separable: str = "fused",
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3, 4),
        fold_relu: bool | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (("num_classes", num_classes, 0), ("in_chans", in_chans, 1),
                                 ("middle_blocks", middle_blocks, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(drop_rate, (int, float)) or not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be a float in [0, 1), got {drop_rate!r}")
        if not isinstance(width, (int, float)) or isinstance(width, bool) or not width > 0:
            raise ValueError(f"width must be a positive number, got {width!r}")
        if separable not in SEPARABLE_KINDS:
            raise ValueError(f"separable must be one of {list(SEPARABLE_KINDS)}, got {separable!r}")
        if separable == "conv2d" and backend != "auto":
            raise ValueError(f"backend={backend!r} needs separable='fused'; separable='conv2d' uses nn.Conv2d")
        out_indices = tuple(out_indices)
        if not out_indices or any(isinstance(i, bool) or i not in range(5) for i in out_indices) \
                or len(set(out_indices)) != len(out_indices):
            raise ValueError(f"out_indices must be distinct ints in 0..4, got {out_indices!r}")

        if fold_relu is None:
            fold_relu = separable == "fused"
        elif not isinstance(fold_relu, bool):
            raise ValueError(f"fold_relu must be a bool or None, got {fold_relu!r}")
        self.separable = separable
        self.drop_rate = float(drop_rate)
        self.features_only = bool(features_only)
        self.out_indices = tuple(sorted(out_indices))
        self.fused = False
        self.default_cfg = dict(DEFAULT_CFG, num_classes=num_classes)

        stem1, stem2 = (make_divisible(c * width) for c in STEM_CHANNELS)
        self.conv1 = stem_conv(separable, in_chans, stem1, 2, backend)
        self.bn1, self.act1 = batch_norm_relu(separable, stem1, backend, fold_relu)
        self.conv2 = stem_conv(separable, stem1, stem2, 1, backend)
        self.bn2, self.act2 = batch_norm_relu(separable, stem2, backend, fold_relu)

        flows = (list(ENTRY_FLOW), [MIDDLE_BLOCK] * middle_blocks, list(EXIT_FLOW))
        specs = [_scaled(spec, width) for flow in flows for spec in flow]
        channels = stem2
        self.block_names: tuple[str, ...] = tuple(f"block{i + 1}" for i in range(len(specs)))
        for name, spec in zip(self.block_names, specs):
            block = Block(channels, spec, separable, backend, fold_relu)
            self.add_module(name, block)
            channels = block.out_channels

        head1, head2 = (make_divisible(c * width) for c in HEAD_CHANNELS)
        self.conv3 = separable_conv(separable, channels, head1, backend)
        self.bn3 = batch_norm(separable, head1, backend)
        self.act3: nn.Module = nn.Identity() if fold_relu else nn.ReLU(inplace=True)
        self.conv4 = separable_conv(separable, head1, head2, backend)
        self.conv4.relu_input = fold_relu
        self.bn4, self.act4 = batch_norm_relu(separable, head2, backend, fold_relu)
        self.num_features = head2

        # Feature taps as in timm (a ReLU'd block output is what the next block's first ReLU yields;
        # with fold_relu that slot is an nn.Identity, and forward_intermediates applies the ReLU).
        entry = len(ENTRY_FLOW)
        last = self.block_names[-1]
        self._stage_blocks = (
            (), self.block_names[:1], self.block_names[1:2], self.block_names[2:entry + middle_blocks], (last,))
        all_features = [
            {"num_chs": stem2, "reduction": 2, "module": "act2"},
            {"num_chs": specs[0].channels[-1], "reduction": 4, "module": "block2.rep.0"},
            {"num_chs": specs[1].channels[-1], "reduction": 8, "module": "block3.rep.0"},
            {"num_chs": specs[entry + middle_blocks - 1].channels[-1], "reduction": 16, "module": f"{last}.rep.0"},
            {"num_chs": head2, "reduction": 32, "module": "act4"},
        ]
        self.feature_info: list[dict[str, Any]] = (
            [all_features[i] for i in self.out_indices] if self.features_only else all_features)

        self.num_classes = 0 if self.features_only else num_classes
        self.drop = nn.Dropout(self.drop_rate)
        self.fc: nn.Module = nn.Linear(head2, num_classes) if self.num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # --- backends -------------------------------------------------------------------------------

    def separable_convs(self) -> list[nn.Module]:
        """Every separable convolution of the network, in forward order."""
        return [module for module in self.modules() if is_separable(module)]

    @property
    def backend(self) -> str:
        if self.separable != "fused":
            return "conv2d"
        return self.conv3.backend

    def set_backend(self, name: str) -> Xception:
        """Run every separable conv, BatchNorm, shortcut and stem conv on ``kernels`` backend ``name``
        (``"auto"``, ``"torch"``, ...)."""
        if self.separable != "fused":
            raise ValueError(f"set_backend({name!r}) needs separable='fused'; this model has separable="
                             f"{self.separable!r} (plain nn.Conv2d)")
        if name != "auto" and name not in kernels.dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {['auto', *kernels.dispatch.BACKENDS]}, got {name!r}")
        for module in self.modules():
            if is_separable(module) or isinstance(module, (kernels.BatchNorm2d, kernels.PointwiseConv2d,
                                                           kernels.Conv2d)):
                module.backend = name
        return self

    # --- forward --------------------------------------------------------------------------------

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.run_sequential((self.conv1, self.bn1, self.act1, self.conv2, self.bn2, self.act2), x)

    def _exit(self, x: torch.Tensor) -> torch.Tensor:
        return self.act4(kernels.run_sequential((self.conv3, self.bn3, self.act3, self.conv4, self.bn4), x))

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.conv1.in_channels:
            raise ValueError(f"input must be (N, {self.conv1.in_channels}, H, W), got shape {tuple(x.shape)}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_chans, H, W)`` to the last feature map ``(N, num_features, H/32, W/32)`` (after ReLU)."""
        self._check_input(x)
        x = self._stem(x)
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self._exit(x)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps at strides 2, 4, 8, 16, 32 selected by ``out_indices``.

        Map ``i`` has ``feature_info``'s ``num_chs`` channels; maps 1-3 are the
        ReLU'd outputs of blocks 1, 2 and the last middle block (what timm's
        feature hooks on ``block2.rep.0`` etc. return).
        """
        self._check_input(x)
        features = []
        last_index = self.out_indices[-1]
        for index, blocks in enumerate(self._stage_blocks):
            if index == 0:
                x = self._stem(x)
            for name in blocks:
                x = getattr(self, name)(x)
            if index == 4:
                x = self._exit(x)
            if index in self.out_indices:
                features.append(torch.relu(x) if index in (1, 2, 3) else x)
            if index == last_index:
                break
        return features

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(N, num_features, h, w)`` to logits ``(N, num_classes)`` (or pooled features with ``pre_logits``)."""
        x = self.drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            return self.forward_intermediates(x)
        return self.forward_head(self.forward_features(x))

    # --- classifier -----------------------------------------------------------------------------

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised ``fc`` with ``num_classes`` outputs (0: ``nn.Identity``)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if self.features_only:
            raise ValueError("reset_classifier: a features_only model has no classifier")
        self.num_classes = num_classes
        self.default_cfg["num_classes"] = num_classes
        weight = self.conv4.pointwise.weight
        self.fc = (nn.Linear(self.num_features, num_classes, device=weight.device, dtype=weight.dtype)
                   if num_classes else nn.Identity())

    # --- inference fusion -----------------------------------------------------------------------

    @torch.no_grad()
    def fuse_for_inference(self, pack_weights: bool = True) -> Xception:
        """Fold every BatchNorm into the conv before it and every ReLU into the separable conv after it.

        Each ``ReLU -> SeparableConv -> BN`` becomes one separable-conv call with
        ``relu_input=True`` and a pointwise bias; the stem convs and the
        shortcut convs absorb their BN too. Folded modules become
        ``nn.Identity`` (the remaining ``state_dict`` keys do not move, but BN
        entries disappear and biases appear). Eval mode only; the fused model
        cannot be put back into training mode. With ``pack_weights`` the
        separable convs keep their pointwise weights packed for the cpp backend
        (``kernels.SeparableConv2d.pack_for_inference``: the same results, less
        time at small batches, as much memory again as those weights). Returns ``self``.
        """
        if self.training:
            raise RuntimeError("fuse_for_inference() needs eval mode: call model.eval() first "
                               "(training-mode BatchNorm uses batch statistics and cannot be folded)")
        for module in self.modules():
            if isinstance(module, kernels.SeparableConv2d):
                module.pack_for_inference(pack_weights)
        if self.fused:
            return self
        for conv_name, bn_name, act_name in (("conv1", "bn1", "act1"), ("conv2", "bn2", "act2")):
            fold_batchnorm(getattr(self, conv_name), getattr(self, bn_name))
            self._unfold_output_relu(bn_name, act_name)
        for name in self.block_names:
            block = getattr(self, name)
            fuse_sequential(block.rep)
            if block.skip is not None:
                fold_batchnorm(block.skip, block.skipbn)
                block.skipbn = nn.Identity()
        fold_batchnorm_into_separable(self.conv3, self.bn3)
        self.bn3 = nn.Identity()
        fold_batchnorm_into_separable(self.conv4, self.bn4)
        self._unfold_output_relu("bn4", "act4")
        self.conv4.relu_input = True
        self.act3 = nn.Identity()
        self.fused = True
        return self

    def _unfold_output_relu(self, bn_name: str, act_name: str) -> None:
        """Replace a folded BN by ``nn.Identity``; a ReLU it applied (``relu_output``) goes back in its slot."""
        if getattr(getattr(self, bn_name), "relu_output", False):
            setattr(self, act_name, nn.ReLU(inplace=True))
        setattr(self, bn_name, nn.Identity())

    def train(self, mode: bool = True) -> Xception:
        if mode and getattr(self, "fused", False):
            raise RuntimeError("this model was fused for inference (fuse_for_inference); it cannot train")
        return super().train(mode)


WeightsSource = Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor], None]


def _build(num_classes: int | None, weights: WeightsSource, **kwargs: Any) -> Xception:
    """An ``Xception(**kwargs)``, with ``weights`` (a file of any layout ``load_weights`` reads) loaded.

    ``num_classes=None`` takes the classifier size of ``weights`` (1000 without weights). A
    classifier of another size than ``num_classes`` is not loaded: the model keeps its new one
    (fine-tuning); every other weight must fit.
    """
    if "pretrained" in kwargs:
        raise TypeError("pretrained=: nothing is downloaded here; pass weights=PATH, a weights file you fetched "
                        "(e.g. timm's legacy_xception for the paper's network), or a state_dict")
    if weights is None:
        return Xception(num_classes=1000 if num_classes is None else num_classes, **kwargs)
    from .weights import classifier_outputs, load_weights, read_checkpoint, unwrap

    state_dict = read_checkpoint(weights) if isinstance(weights, (str, os.PathLike)) else unwrap(weights)
    if num_classes is None:
        num_classes = classifier_outputs(state_dict) or 1000
    model = Xception(num_classes=num_classes, **kwargs)
    load_weights(model, state_dict, replace_classifier=True)
    return model


def xception(num_classes: int | None = None, in_chans: int = 3, drop_rate: float = 0.0, backend: str = "auto",
             weights: WeightsSource = None, **kwargs: Any) -> Xception:
    """The paper's Xception: 8 middle blocks, width 1, 22.9M parameters, 299x299 input.

    ``weights``: a file (timm ``legacy_xception``, Cadene, ``save_weights``, ``xception.train``
    checkpoints, ``.safetensors``) or a state_dict to start from; see :func:`_build` for
    ``num_classes`` (default: the file's classifier size, else 1000).
    """
    return _build(num_classes, weights, in_chans=in_chans, drop_rate=drop_rate, backend=backend, **kwargs)


def xception_tiny(num_classes: int | None = None, in_chans: int = 3, drop_rate: float = 0.0, backend: str = "auto",
                  weights: WeightsSource = None, **kwargs: Any) -> Xception:
    """A small Xception for small data and fast tests: 2 middle blocks, width 0.25.

    Same block structure as the paper's network, channels scaled by 1/4 and
    rounded to multiples of 8 (stem 8/16, entry 32/64/184, exit 256, head
    384/512), 0.73M parameters at 10 classes; works on inputs down to
    32x32 (e.g. CIFAR-10), where its last feature map is 1x1.
    ``weights`` and ``num_classes`` as for :func:`xception`.
    """
    kwargs.setdefault("middle_blocks", 2)
    kwargs.setdefault("width", 0.25)
    return _build(num_classes, weights, in_chans=in_chans, drop_rate=drop_rate, backend=backend, **kwargs)


MODELS: dict[str, Callable[..., Xception]] = {"xception": xception, "xception_tiny": xception_tiny}


def create_model(name: str, **kwargs: Any) -> Xception:
    """Build a registered model by name (``"xception"``, ``"xception_tiny"``); ``weights=PATH`` loads a file."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)
