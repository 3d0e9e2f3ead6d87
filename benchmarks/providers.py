"""The implementations compared side by side, and the callable each case times.

Layer providers:
    cpp, triton, torch   ``kernels.separable_conv2d(..., backend=name)`` (triton: its fused kernels,
                         ``SEPCONV_TRITON_MODE=fused`` whatever the variable says outside)
    triton-split         ``backend="triton"`` with ``SEPCONV_TRITON_MODE=split`` (depthwise kernel + GEMM)
    auto                 ``backend="auto"``: what a user gets (on CUDA, cuDNN or a Triton mode per layer,
                         from the dispatch table or, with ``SEPCONV_TUNE=1``, the tuner)
    eager                ``nn.Conv2d(C, C, k, groups=C)`` then ``nn.Conv2d(C, Cout, 1)`` (the baseline)
    compile              ``torch.compile`` of that eager pair (static shapes, one compile per case)
Model providers (``<backend>`` may be ``triton-split`` or ``auto`` too):
    <backend>-fused      ``Xception(separable="fused", backend=b)`` after ``fuse_for_inference()`` (eval only)
    <backend>-unfused    ``Xception(separable="fused", backend=b)`` as built: BatchNorm left as modules (each
                         ReLU applied inside the separable conv after it: ``fold_relu``, the default)
    eager                ``Xception(separable="conv2d")`` (plain nn.Conv2d pairs)
    compile              ``torch.compile`` of that eager model

``availability`` says why a provider cannot run (None when it can); ``prepare``
builds the inputs and returns the closure to time. Modes: ``fwd`` (no grad),
``bwd`` (backward only, graph retained), ``full`` (forward + backward); for the
model, ``eval`` (no grad) and ``train`` (forward, loss, backward, SGD step).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.triton import MODE_ENV, environ

from .cases import DTYPES, Case, Shape

BACKEND_PROVIDERS = ("cpp", "triton", "torch")
# Providers beyond the backends' own: name -> (backend, SEPCONV_TRITON_MODE).
MODE_PROVIDERS = {"triton-split": ("triton", "split"), "auto": ("auto", None)}
LAYER_PROVIDERS = BACKEND_PROVIDERS + tuple(MODE_PROVIDERS) + ("eager", "compile")
MODEL_BASE_PROVIDERS = ("eager", "compile")

TRITON_CPU_REASON = ("triton on CPU runs in the Triton interpreter (TRITON_INTERPRET=1), a correctness tool: "
                     "never benchmarked")


@dataclass
class Prepared:
    """What a case times: ``fn`` (one call), plus options for the GPU timer."""

    fn: Callable[[], object]
    grad_to_none: List[torch.Tensor] = field(default_factory=list)
    keepalive: list = field(default_factory=list)
    # backend="auto" cases: the implementations one call ran ("cpp", "torch", "triton_split", or several
    # joined by commas for a model whose layers differ), seen on an untimed call after preparing.
    ran: Optional[str] = None
    # Where the call runs in another process (benchmarks.isolated): its peak memory and its page faults so far.
    memory: Optional[Callable[[], Optional[float]]] = None
    faults: Optional[Callable[[], int]] = None
    # A provider with a Triton mode (triton, triton-split): ``fn`` sets SEPCONV_TRITON_MODE around each call;
    # ``bare`` is the call without it and ``setting`` enters the mode (see ``timed``).
    bare: Optional[Callable[[], object]] = None
    setting: Optional[Callable[[], ContextManager]] = None

    @contextlib.contextmanager
    def timed(self) -> Iterator[Callable[[], object]]:
        """The callable to time many calls of in a row: ``fn``, or inside the provider's Triton mode, entered once
        for all of them, the call without the per-call switch (a few microseconds of environment updates that
        would otherwise be timed with every call of a triton provider, and not with the eager pair's)."""
        if self.setting is None:
            yield self.fn
            return
        with self.setting():
            yield self.bare


class _ImplementationsSeen(TorchDispatchMode):
    """Collects the implementations whose separable-conv ops run (namespaces ``sepconv_<name>``)."""

    def __init__(self):
        super().__init__()
        self.names: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace.startswith("sepconv_"):
            self.names.add(func.namespace[len("sepconv_"):])
        return func(*args, **(kwargs or {}))


def implementations_run(call: Callable[[], object]) -> str:
    """The implementations one call of ``call`` runs, sorted and joined by commas ("none" if no op ran)."""
    with _ImplementationsSeen() as seen:
        call()
    return ",".join(sorted(seen.names)) or "none"


def model_providers_for(backends: Sequence[str], compile: bool = True) -> List[str]:
    """Model providers for these project backends, then the eager model (and its torch.compile)."""
    names: List[str] = []
    for backend in backends:
        names += [f"{backend}-fused", f"{backend}-unfused"]
    return names + [p for p in MODEL_BASE_PROVIDERS if compile or p != "compile"]


def backend_and_mode(name: str) -> Tuple[str, Optional[str]]:
    """A backend provider's backend and the ``SEPCONV_TRITON_MODE`` it runs in (None: leave the variable)."""
    if name in MODE_PROVIDERS:
        return MODE_PROVIDERS[name]
    return name, ("fused" if name == "triton" else None)


@contextlib.contextmanager
def triton_mode(mode: Optional[str]):
    """``SEPCONV_TRITON_MODE=mode`` inside the block (nothing when ``mode`` is None)."""
    if mode is None:
        yield
        return
    with environ(MODE_ENV, mode):
        yield


def backend_reason(name: str, device: str, dtype: torch.dtype) -> Optional[str]:
    """Why project backend ``name`` (or a mode provider) cannot be benchmarked here (None when it can)."""
    import kernels
    from kernels.dispatch import BACKENDS

    name = backend_and_mode(name)[0]

    if name == "auto":  # auto always finds something to run
        return None
    if name == "triton" and device == "cpu":
        return TRITON_CPU_REASON
    if name not in BACKENDS:
        return f"unknown backend {name!r}"
    reason = kernels.available_backends().get(name)
    if reason:
        return reason
    return BACKENDS[name].supports(torch.device(device), dtype)


def import_xception():
    """The model package, or raise ImportError saying why it is unusable."""
    try:
        module = importlib.import_module("xception")
    except Exception as error:  # noqa: BLE001 - any import failure means "unavailable"
        raise ImportError(f"xception model not importable: {type(error).__name__}: {error}") from error
    if not hasattr(module, "Xception"):
        raise ImportError("xception model not importable: the xception package has no Xception class yet")
    return module


def compile_reason() -> Optional[str]:
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    return None


def availability(suite: str, provider: str, device: str, dtype_name: str) -> Optional[str]:
    """None when ``provider`` can run this suite on ``device`` in ``dtype_name``, else the reason."""
    dtype = DTYPES[dtype_name]
    if device == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    if suite == "model":
        try:
            import_xception()
        except ImportError as error:
            return str(error)
        if provider == "compile":
            return compile_reason()
        if provider == "eager":
            return None
        backend, _, variant = provider.rpartition("-")
        if variant not in ("fused", "unfused") or not backend:
            return f"unknown model provider {provider!r}"
        return backend_reason(backend, device, dtype)
    if provider in BACKEND_PROVIDERS or provider in MODE_PROVIDERS:
        return backend_reason(provider, device, dtype)
    if provider == "compile":
        return compile_reason()
    if provider == "eager":
        return None
    return f"unknown provider {provider!r}"


def _memory_format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _eager_pair(shape: Shape) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(shape.cin, shape.cin, shape.k, shape.stride, shape.padding, groups=shape.cin, bias=False),
        nn.Conv2d(shape.cin, shape.cout, 1, bias=False),
    )


def _compiled(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` with static shapes, from an empty cache.

    Dynamo caches compiled code per Python code object (shared by every
    ``nn.Sequential``), so without the reset each case would pile guards and
    recompiles onto the previous cases' entries and hit the recompile limit.
    """
    torch._dynamo.reset()
    return torch.compile(module, dynamic=False)


def _layer_module(case: Case) -> Tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """(the module holding the parameters, the callable to time)."""
    shape = case.shape
    if case.suite == "shortcut":  # a dense conv: nn.Conv2d, or kernels.PointwiseConv2d / kernels.Conv2d on a backend
        if case.provider == "eager":
            conv = nn.Conv2d(shape.cin, shape.cout, shape.k, shape.stride, shape.padding, bias=False)
            return conv, conv
        import kernels

        if shape.k == 1:
            conv = kernels.PointwiseConv2d(shape.cin, shape.cout, stride=shape.stride, bias=False,
                                           backend=case.provider)
        else:
            conv = kernels.Conv2d(shape.cin, shape.cout, shape.k, shape.stride, shape.padding, bias=False,
                                  backend=case.provider)
        return conv, conv
    if case.provider in ("eager", "compile"):
        pair = _eager_pair(case.shape)
        return pair, (_compiled(pair) if case.provider == "compile" else pair)
    import kernels

    module = kernels.SeparableConv2d(case.shape.cin, case.shape.cout, case.shape.k, case.shape.stride,
                                     case.shape.padding, backend=backend_and_mode(case.provider)[0])
    return module, module


def _prepare_grad_call(call: Callable[[], torch.Tensor], inputs: List[torch.Tensor], mode: str) -> Prepared:
    if mode == "fwd":
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return call()
        return Prepared(forward)
    output = call()
    grad_output = torch.randn_like(output)
    if mode == "bwd":
        def backward_only():
            return torch.autograd.grad(output, inputs, grad_output, retain_graph=True)
        return Prepared(backward_only, keepalive=[output])

    def forward_backward():
        return torch.autograd.grad(call(), inputs, grad_output)
    return Prepared(forward_backward)


def prepare_layer(case: Case, device: str) -> Prepared:
    dtype = DTYPES[case.dtype]
    parameters_module, module = _layer_module(case)
    parameters_module.to(device=device, dtype=dtype, memory_format=_memory_format(case.layout))
    shape = case.shape
    x = torch.randn(case.batch, shape.cin, shape.h, shape.w, device=device, dtype=dtype)
    x = x.contiguous(memory_format=_memory_format(case.layout))
    needs_grad = case.mode != "fwd"
    x.requires_grad_(needs_grad)
    parameters = list(parameters_module.parameters())
    for parameter in parameters:
        parameter.requires_grad_(needs_grad)
    prepared = _prepare_grad_call(lambda: module(x), [x, *parameters], case.mode)
    prepared.keepalive += [module, x]
    return prepared


def _build_model(case: Case, xception_module, model_kwargs: Dict) -> nn.Module:
    provider = case.provider
    if provider in ("eager", "compile"):
        return xception_module.Xception(num_classes=1000, separable="conv2d", **model_kwargs)
    backend, _, _ = provider.rpartition("-")
    return xception_module.Xception(num_classes=1000, backend=backend_and_mode(backend)[0], separable="fused",
                                    **model_kwargs)


def prepare_model(case: Case, device: str, model_kwargs: Optional[Dict] = None) -> Prepared:
    xception_module = import_xception()
    dtype = DTYPES[case.dtype]
    torch.manual_seed(0)
    model = _build_model(case, xception_module, model_kwargs or {})
    model.to(device=device, dtype=dtype, memory_format=_memory_format(case.layout))
    shape = case.shape
    x = torch.randn(case.batch, shape.cin, shape.h, shape.w, device=device, dtype=dtype)
    x = x.contiguous(memory_format=_memory_format(case.layout))
    if case.mode == "eval":
        model.eval()
        if case.provider.endswith("-fused"):
            model.fuse_for_inference()
        runner = _compiled(model) if case.provider == "compile" else model

        def evaluate() -> torch.Tensor:
            with torch.inference_mode():
                return runner(x)
        return Prepared(evaluate, keepalive=[model, x])

    model.train()
    runner = _compiled(model) if case.provider == "compile" else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    target = torch.randint(0, 1000, (case.batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def train_step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(runner(x), target)
        loss.backward()
        optimizer.step()
        return loss
    return Prepared(train_step, keepalive=[model, x, optimizer])


def case_backend(case: Case) -> str:
    """The backend provider a case runs: a model provider's part before its "-fused"/"-unfused" ("" for the eager
    model and its compile), a layer case's provider itself."""
    return case.provider.rpartition("-")[0] if case.suite == "model" else case.provider


def prepare(case: Case, device: str, model_kwargs: Optional[Dict] = None) -> Prepared:
    backend = case_backend(case)
    mode = backend_and_mode(backend)[1]
    with triton_mode(mode):
        if case.suite == "model":
            prepared = prepare_model(case, device, model_kwargs)
        else:
            prepared = prepare_layer(case, device)
    if mode is not None:
        call = prepared.fn

        def in_mode():
            with triton_mode(mode):
                return call()
        prepared.fn, prepared.bare, prepared.setting = in_mode, call, functools.partial(triton_mode, mode)
    if backend_and_mode(backend)[0] == "auto":
        # One untimed call first: the tuner (when on) times its candidates on a layer's first call,
        # and those calls would be recorded as run.
        prepared.fn()
        prepared.ran = implementations_run(prepared.fn)
    return prepared


def count_model_flops(batch: int = 1, hw: int = 299, model_kwargs: Optional[Dict] = None) -> float:
    """Forward FLOPs (2 per multiply-add) of the eager Xception, counted from its convs and linear layers."""
    xception_module = import_xception()
    model = xception_module.Xception(num_classes=1000, separable="conv2d", **(model_kwargs or {})).eval()
    total = [0.0]

    def conv_hook(module: nn.Conv2d, inputs, output) -> None:
        kh, kw = module.kernel_size
        total[0] += 2.0 * output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, inputs, output) -> None:
        total[0] += 2.0 * output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    with torch.no_grad():
        model(torch.zeros(batch, 3, hw, hw))
    for handle in handles:
        handle.remove()
    return total[0]
