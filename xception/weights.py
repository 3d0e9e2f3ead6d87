"""Load and save Xception weights: this project's checkpoints, timm ``legacy_xception`` and Cadene's
``pretrainedmodels`` Xception.

Accepted layouts (converted to this model's keys, then every name and shape is checked):

* a bare state_dict, or one wrapped under ``"state_dict"``, ``"model"``, ``"model_state_dict"``
  or ``"state_dict_ema"``; keys may carry DDP's ``module.`` or ``torch.compile``'s ``_orig_mod.`` prefix;
* Cadene's classifier name ``last_linear`` (renamed to ``fc``);
* very old checkpoints storing pointwise weights as ``(C_out, C_in)`` and depthwise weights
  as ``(C, kh, kw)`` (reshaped to ``(C_out, C_in, 1, 1)`` and ``(C, 1, kh, kw)``);
* checkpoints from before BatchNorm had ``num_batches_tracked`` (the model's value is kept).

Files are read with ``torch.load(weights_only=True)`` (no arbitrary unpickling) or, for
``.safetensors``, with the ``safetensors`` package when it is installed. Nothing is downloaded.

Pretrained ImageNet weights of the paper's network are timm's ``legacy_xception`` file (or
Cadene's ``xception-43020ad28.pth``), fetched once by the user and passed as a path.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from typing import NamedTuple, Union

import torch
from torch import nn

from .layers import is_separable

StateDict = dict[str, torch.Tensor]
PathOrStateDict = Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor]]

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema")
_PREFIXES = ("module.", "_orig_mod.")


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model (the message names the path or keys)."""


def torch_load(path: str, mmap: bool = False) -> object:
    """``torch.load(path, weights_only=True)`` onto the CPU, failing with a ``CheckpointError`` that says
    what is wrong with the file (empty, truncated, not a torch file, pickled Python objects)."""
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): an interrupted write or copy")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - every unreadable file ends up here, with its own message
        message = str(error)
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
        if unsafe or isinstance(error, pickle.UnpicklingError):
            what = unsafe.group(1) if unsafe else "a Python object"
            raise CheckpointError(
                f"checkpoint {path!r} holds pickled Python objects ({what}), not only tensors and plain "
                "containers; this project reads files with weights_only=True, which never runs code from a "
                "file. Save the weights as a state_dict (xception.save_weights(model, path), or "
                "torch.save(model.state_dict(), path)) or as .safetensors") from None
        first_sentence = message.split(". ")[0].strip() if message else ""
        raise CheckpointError(f"checkpoint {path!r} is not a readable torch file (truncated, corrupted or "
                              f"another format): {type(error).__name__}: {first_sentence or repr(error)}") from None


def read_checkpoint(path: str | os.PathLike[str]) -> StateDict:
    """The tensors of a checkpoint file, unwrapped (see the module docstring); nothing else is unpickled."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist or is not a file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise CheckpointError(f"{path!r} is a .safetensors file but the safetensors package is not "
                                  "installed (pip install safetensors)") from error
        try:
            return dict(load_file(path, device="cpu"))
        except Exception as error:
            raise CheckpointError(f"cannot read safetensors checkpoint {path!r}: {error}") from error
    return unwrap(torch_load(path), source=repr(path))


def unwrap(content: object, source: str = "the checkpoint") -> StateDict:
    """The state_dict inside ``content`` (itself, or under a wrapper key), checked to hold only tensors."""
    if isinstance(content, Mapping):
        for key in _WRAPPER_KEYS:
            inner = content.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                content = inner
                break
    if not isinstance(content, Mapping) or not content:
        raise CheckpointError(f"{source} is not a state_dict (a non-empty mapping of names to tensors), "
                              f"got {type(content).__name__}")
    for key, value in content.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source} is not a state_dict: entry {key!r} is a {type(value).__name__}, "
                                  "not a tensor (expected names mapped to tensors, optionally under one of "
                                  f"{list(_WRAPPER_KEYS)})")
    return dict(content)


def _separable_weight_names(model: nn.Module) -> dict[str, str]:
    """``"<prefix>.conv1.weight" -> "depthwise"`` and ``"<prefix>.pointwise.weight" -> "pointwise"``."""
    names = {}
    for prefix, module in model.named_modules():
        if is_separable(module):
            names[f"{prefix}.conv1.weight"] = "depthwise"
            names[f"{prefix}.pointwise.weight"] = "pointwise"
    return names


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> StateDict:
    """Rename and reshape a timm / Cadene / wrapped state_dict to ``model``'s layout (no checks)."""
    converted: StateDict = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if key.startswith("last_linear."):
            key = "fc." + key[len("last_linear."):]
        converted[key] = value
    separable = _separable_weight_names(model)
    for key, value in converted.items():
        kind = separable.get(key)
        if kind == "pointwise" and value.dim() == 2:
            converted[key] = value[:, :, None, None]
        elif kind == "depthwise" and value.dim() == 3:
            converted[key] = value[:, None]
    return converted


def classifier_outputs(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The number of classes of the classifier in a (raw or converted) state_dict; None without one."""
    for key, value in state_dict.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        if key in ("fc.weight", "last_linear.weight") and value.dim() == 2:
            return int(value.shape[0])
    return None


def load_weights(model: nn.Module, path_or_state_dict: PathOrStateDict, strict: bool = True, *,
                 replace_classifier: bool = False) -> LoadResult:
    """Load a checkpoint (file path or state_dict) into ``model``, checking every name and shape.

    A shape mismatch raises; with ``strict`` (default) a missing or unexpected
    key raises too, otherwise they are skipped and returned. A classifier
    (``fc.*`` / ``last_linear.*``) of another number of classes than the
    model's is skipped when ``strict`` is False or ``replace_classifier`` is
    True (fine-tuning: every other key is still checked); the model keeps its
    own classifier and ``fc.weight`` / ``fc.bias`` are listed in
    ``missing_keys``. A classifier in the checkpoint is ignored when the model
    has none (``features_only`` or ``num_classes=0``). BatchNorm
    ``num_batches_tracked`` entries may be absent. Raises ``CheckpointError``
    (a ``ValueError``) naming the offending keys or file.
    """
    if getattr(model, "fused", False):
        raise CheckpointError("load_weights: the model was fused for inference; load weights before "
                              "fuse_for_inference()")
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = repr(os.fspath(path_or_state_dict))
        state_dict = read_checkpoint(path_or_state_dict)
    else:
        source = "the state_dict"
        state_dict = unwrap(path_or_state_dict, source)
    state_dict = convert_state_dict(state_dict, model)
    expected = model.state_dict()
    if not isinstance(getattr(model, "fc", None), nn.Linear):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    replaced: list[str] = []
    if isinstance(getattr(model, "fc", None), nn.Linear) and (replace_classifier or not strict):
        classifier = {k: v for k, v in state_dict.items() if k.startswith("fc.")}
        if any(k not in classifier or classifier[k].shape != v.shape for k, v in expected.items()
               if k.startswith("fc.")):
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
            replaced = [k for k in expected if k.startswith("fc.")]

    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    required_missing = [k for k in missing if k not in replaced]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    def listed(items: list[str]) -> str:  # a file of another architecture differs in hundreds of keys
        return "; ".join(items[:8]) + (f"; ... ({len(items)} in all)" if len(items) > 8 else "")

    problems = []
    if mismatched:
        problems.append("shape mismatch: " + listed(mismatched))
    if strict and required_missing:
        problems.append(f"missing keys: {listed(required_missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {listed(unexpected)}")
    if problems:
        raise CheckpointError(f"cannot load {source} into {type(model).__name__}: " + " | ".join(problems))

    merged = {k: state_dict.get(k, v) for k, v in expected.items()}
    model.load_state_dict(merged, strict=True)
    return LoadResult(missing, unexpected)


def matching_model(state_dict: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> tuple[str, int]:
    """The registered model (``xception.MODELS``) whose layout ``state_dict`` has, and its number of classes
    (0 without a classifier). Every name and shape is compared, on the meta device (nothing allocated)."""
    from .model import MODELS

    num_classes = classifier_outputs(state_dict) or 0
    for name, build in MODELS.items():
        with torch.device("meta"):
            model = build(num_classes=num_classes, separable="conv2d")
        converted = convert_state_dict(state_dict, model)
        expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        if all(k in converted and converted[k].shape == v.shape for k, v in expected.items()) and \
                all(k in expected or k.endswith("num_batches_tracked") for k in converted):
            return name, num_classes
    raise CheckpointError(f"{source} fits none of the models {sorted(MODELS)}: its names or shapes differ from "
                          "each (compare with xception.create_model(name).state_dict())")


def save_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model.state_dict()`` to ``path`` atomically (temporary file, then rename)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    os.close(handle)
    try:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
