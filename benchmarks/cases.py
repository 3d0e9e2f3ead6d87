"""What the suites measure: layer shapes, the model, and the grid of cases.

A ``Case`` is one measurement: a shape at a batch size, dtype, memory layout,
mode and provider. ``build_cases`` turns the command-line choices into the
ordered list of cases; the work counts (FLOPs, minimal bytes) live here too,
so every row states the same arithmetic.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

SUITES = ("layers", "model", "shortcut", "smoke")
LAYER_MODES = ("fwd", "bwd", "full")
MODEL_MODES = ("eval", "train")
LAYOUTS = ("channels_last", "nchw")
DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Every speedup in the report is relative to this provider in this layout.
BASELINE_PROVIDER = "eager"
BASELINE_LAYOUT = "channels_last"


@dataclass(frozen=True)
class Shape:
    """One separable convolution.

    Depthwise ``k x k`` (``stride``, padding ``k // 2`` unless ``pad`` says otherwise) on ``(N, cin, h, w)``,
    then 1x1 to ``cout`` channels. In the shortcut suite: a dense ``k x k`` convolution instead.
    """

    name: str
    cin: int
    cout: int
    h: int
    w: int
    k: int = 3
    stride: int = 1
    pad: Optional[int] = None

    @property
    def padding(self) -> int:
        return self.k // 2 if self.pad is None else self.pad

    @property
    def out_hw(self) -> Tuple[int, int]:
        ho = (self.h + 2 * self.padding - self.k) // self.stride + 1
        wo = (self.w + 2 * self.padding - self.k) // self.stride + 1
        return ho, wo

    def as_dict(self) -> dict:
        return asdict(self)


def _xception_shape(cin: int, cout: int, hw: int) -> Shape:
    return Shape(f"{cin}->{cout}@{hw}", cin, cout, hw, hw)


# The separable convolutions of Xception at a 299x299 input (entry, middle and exit flows).
XCEPTION_LAYERS: Tuple[Shape, ...] = tuple(
    _xception_shape(cin, cout, hw)
    for cin, cout, hw in (
        (64, 128, 147), (128, 128, 147),
        (128, 256, 74), (256, 256, 74),
        (256, 728, 37), (728, 728, 37),
        (728, 728, 19), (728, 1024, 19),
        (1024, 1536, 10), (1536, 2048, 10),
    )
)

# A sweep with square maps and Cin == Cout, to show where each provider wins.
SWEEP_LAYERS: Tuple[Shape, ...] = tuple(
    Shape(f"sweep {c}->{c}@{hw}", c, c, hw, hw) for c in (32, 128, 512) for hw in (8, 28, 56, 112)
)

# The 1x1, stride 2 shortcut convolutions of Xception's strided blocks (suite "shortcut": the eager
# nn.Conv2d against kernels.PointwiseConv2d; depthwise fields k=1 and stride 2 describe the 1x1 conv).
SHORTCUT_LAYERS: Tuple[Shape, ...] = tuple(
    Shape(f"shortcut {cin}->{cout}@{hw}", cin, cout, hw, hw, k=1, stride=2)
    for cin, cout, hw in ((64, 128, 147), (128, 256, 74), (256, 728, 37), (728, 1024, 19))
)
# ... and the stem's two dense 3x3 convolutions without padding (nn.Conv2d against kernels.Conv2d).
STEM_LAYERS: Tuple[Shape, ...] = (
    Shape("stem 3->32@299", 3, 32, 299, 299, k=3, stride=2, pad=0),
    Shape("stem 32->64@149", 32, 64, 149, 149, k=3, stride=1, pad=0),
)
# The providers that the shortcut suite compares: on every other backend the module is F.conv2d.
SHORTCUT_PROVIDERS = ("eager", "cpp")

# Tiny shapes: the pipeline end to end in seconds (tests, smoke runs).
TINY_LAYERS: Tuple[Shape, ...] = (
    Shape("tiny 8->16@12", 8, 16, 12, 12),
    Shape("tiny 16->16@7 s2", 16, 16, 7, 7, k=3, stride=2),
)

SHAPE_SETS: Dict[str, Tuple[Shape, ...]] = {
    "xception": XCEPTION_LAYERS,
    "sweep": SWEEP_LAYERS,
    "tiny": TINY_LAYERS,
}

# The model suite's "shape": the whole network at its native input size.
MODEL_SHAPE = Shape("xception 299x299", 3, 1000, 299, 299, k=3, stride=2)


def separable_flops(shape: Shape, batch: int, depthwise: bool = True) -> float:
    """Forward FLOPs (2 per multiply-add) of depthwise + pointwise: ``2*N*Ho*Wo*(C*kh*kw + C*Cout)``;
    without ``depthwise`` (the shortcut suite's dense conv), ``2*N*Ho*Wo*C*Cout*kh*kw``."""
    ho, wo = shape.out_hw
    dense = shape.cin * shape.cout * shape.k * shape.k
    per_pixel = shape.cin * shape.cout + shape.cin * shape.k * shape.k if depthwise else dense
    return 2.0 * batch * ho * wo * per_pixel


def separable_bytes(shape: Shape, batch: int, element_size: int, mode: str, depthwise: bool = True) -> float:
    """Minimal memory traffic: every tensor read or written once.

    fwd: input, both weights, output. bwd: grad_output, input (to recompute),
    weights, grad_input and both weight gradients. full: the sum. Without ``depthwise``,
    the dense conv's weight only.
    """
    ho, wo = shape.out_hw
    x = batch * shape.cin * shape.h * shape.w
    y = batch * shape.cout * ho * wo
    dense = shape.cin * shape.cout * shape.k * shape.k
    weights = shape.cin * shape.k * shape.k + shape.cin * shape.cout if depthwise else dense
    forward = x + weights + y
    backward = y + x + weights + x + weights
    return float(element_size * {"fwd": forward, "bwd": backward, "full": forward + backward}[mode])


def mode_flops(forward_flops: float, mode: str) -> float:
    """Backward is about twice the forward (grad wrt input and wrt weights)."""
    return forward_flops * {"fwd": 1.0, "eval": 1.0, "bwd": 2.0, "full": 3.0, "train": 3.0}[mode]


@dataclass(frozen=True)
class Case:
    suite: str
    shape: Shape
    batch: int
    dtype: str
    layout: str
    mode: str
    provider: str

    @property
    def group(self) -> tuple:
        """Cases that compare against the same baseline."""
        return (self.suite, self.shape.name, self.batch, self.dtype, self.mode)

    @property
    def label(self) -> str:
        return f"{self.suite} {self.shape.name} N={self.batch} {self.dtype} {self.layout} {self.mode} {self.provider}"


def resolve_shapes(names: Optional[Sequence[str]], default: Iterable[Shape], option: str = "--shapes") -> List[Shape]:
    """``names``: shape-set names (``xception``, ``sweep``, ``tiny``) or substrings of shape names; a name that
    matches nothing is a ValueError naming the command-line ``option`` it came from."""
    if not names:
        return list(default)
    pool = list(XCEPTION_LAYERS) + list(SWEEP_LAYERS) + list(TINY_LAYERS)
    chosen: List[Shape] = []
    for name in names:
        matches = list(SHAPE_SETS[name]) if name in SHAPE_SETS else [s for s in pool if name in s.name]
        if not matches:
            raise ValueError(f"{option}: {name!r} matches no shape; use one of {list(SHAPE_SETS)} or part of a "
                             f"name such as {XCEPTION_LAYERS[0].name!r}")
        chosen.extend(s for s in matches if s not in chosen)
    return chosen


def build_cases(
    suites: Sequence[str],
    providers: Sequence[str],
    model_providers: Sequence[str],
    dtypes: Sequence[str],
    batches: Sequence[int],
    modes: Sequence[str],
    layouts: Sequence[str],
    shapes: Optional[Sequence[str]] = None,
    full: bool = False,
    train_batches: Sequence[int] = (8,),
    eager_both_layouts: bool = True,
) -> List[Case]:
    """The ordered list of cases. The baseline of each group runs first.

    ``eager_both_layouts``: also run the eager pair in the layout(s) not asked
    for (NCHW and channels_last side by side), unless the user chose layouts.
    """
    cases: List[Case] = []
    for suite in suites:
        if suite == "model":
            # "<backend>-fused" (BN folded too, eval only), "<backend>-unfused", "eager", "compile".
            def model_layouts(provider: str) -> List[str]:
                if provider == BASELINE_PROVIDER and eager_both_layouts:
                    return [BASELINE_LAYOUT, "nchw"]
                return [BASELINE_LAYOUT]

            ordered = sorted(model_providers, key=lambda p: p != BASELINE_PROVIDER)
            if {"fwd", "full", "eval"} & set(modes):
                for batch, dtype in itertools.product(batches, dtypes):
                    cases += [Case("model", MODEL_SHAPE, batch, dtype, layout, "eval", p)
                              for p in ordered for layout in model_layouts(p)]
            if {"full", "train"} & set(modes):
                for batch, dtype in itertools.product(train_batches, dtypes):
                    cases += [Case("model", MODEL_SHAPE, batch, dtype, layout, "train", p)
                              for p in ordered if not p.endswith("-fused") for layout in model_layouts(p)]
            continue
        if suite == "shortcut":  # its own six shapes, eager against cpp only (--shapes picks among the layers)
            chosen = sorted(set(providers) & set(SHORTCUT_PROVIDERS), key=lambda p: p != BASELINE_PROVIDER)
            for shape in SHORTCUT_LAYERS + STEM_LAYERS:
                for batch, dtype, mode in itertools.product(batches, dtypes, modes):
                    for provider in chosen:
                        cases += [Case(suite, shape, batch, dtype, layout, mode, provider)
                                  for layout in ([BASELINE_LAYOUT] if provider == BASELINE_PROVIDER else layouts)]
            continue
        default = TINY_LAYERS if suite == "smoke" else (
            XCEPTION_LAYERS + SWEEP_LAYERS if full else XCEPTION_LAYERS)
        for shape in resolve_shapes(shapes, default):
            for batch, dtype, mode in itertools.product(batches, dtypes, modes):
                ordered = sorted(providers, key=lambda p: p != BASELINE_PROVIDER)
                for provider in ordered:
                    provider_layouts = list(layouts)
                    if provider == BASELINE_PROVIDER and eager_both_layouts:
                        provider_layouts = list(dict.fromkeys([BASELINE_LAYOUT, *LAYOUTS]))
                    elif provider == BASELINE_PROVIDER:
                        provider_layouts = sorted(provider_layouts, key=lambda x: x != BASELINE_LAYOUT)
                    for layout in provider_layouts:
                        cases.append(Case(suite, shape, batch, dtype, layout, mode, provider))
    return cases
