"""Checkpoints that survive: atomic writes, ``weights_only`` loads, RNG state as plain types, clear mismatches.

A checkpoint is a dict of tensors and plain Python values:

    format       "xception-sepconv/1"
    model        {"name": "xception_tiny", "kwargs": {"num_classes": 10, ...}}
    state_dict   the model's weights (no DDP "module." prefix)
    classes      class names, index = label
    preprocess   {"img_size", "mean", "std", "crop_pct"}
    + for resuming: optimizer, scheduler, scaler, epoch, step (finished global steps of ``epoch``),
      rng (torch/numpy/python states), args, metrics
"""

from __future__ import annotations

import errno
import os
import random
import tempfile
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .weights import CheckpointError, torch_load

FORMAT = "xception-sepconv/1"


def save_atomic(obj: Mapping[str, Any], path: str) -> None:
    """Write ``obj`` with ``torch.save`` to ``path`` so that ``path`` is always whole.

    The bytes go to a temporary file in the same folder, are flushed and
    fsync'ed, then ``os.replace`` swaps it in (and the folder is fsync'ed).
    On any failure (disk full, permissions) the temporary file is removed,
    the previous ``path`` is left untouched, and ``CheckpointError`` says why.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it 0600; a checkpoint is an ordinary file
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        if isinstance(error, OSError):
            why = "no space left on device" if error.errno == errno.ENOSPC else f"{type(error).__name__}: {error}"
            kept = "the previous checkpoint there is unchanged" if os.path.exists(path) else "nothing was written"
            raise CheckpointError(f"cannot write checkpoint {path!r}: {why} ({kept})") from error
        raise
    try:
        directory = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def load(path: str, mmap: bool = False) -> Dict[str, Any]:
    """A checkpoint written by :func:`save_atomic`, read with ``torch.load(weights_only=True)`` onto the CPU
    (``mmap``: tensors are paged in when used, for a cheap look at the plain entries)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    checkpoint = torch_load(path, mmap=mmap)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def model_state(checkpoint: Mapping[str, Any], path: str) -> Dict[str, torch.Tensor]:
    """The weights in a checkpoint: ours (``state_dict``), or a bare state dict."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path!r} holds no model state_dict (keys: {sorted(checkpoint)[:8]})")
    return {key[len("module."):] if key.startswith("module.") else key: value for key, value in state.items()}


def check_compatible(checkpoint: Mapping[str, Any], path: str, model_name: str, model_kwargs: Mapping[str, Any],
                     model: nn.Module) -> Dict[str, torch.Tensor]:
    """The checkpoint's weights if they fit ``model``, else ``CheckpointError`` naming the difference."""
    saved = checkpoint.get("model")
    if isinstance(saved, dict):
        if saved.get("name") != model_name:
            raise CheckpointError(f"checkpoint {path!r} is for model {saved.get('name')!r}, "
                                  f"but this run builds {model_name!r}")
        for key, value in model_kwargs.items():
            if key in saved.get("kwargs", {}) and saved["kwargs"][key] != value and key != "backend":
                raise CheckpointError(f"checkpoint {path!r} has {key}={saved['kwargs'][key]!r}, "
                                      f"but this run builds {model_name!r} with {key}={value!r}")
    state = model_state(checkpoint, path)
    expected = unwrap(model).state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(value.shape)}"
              for key, value in expected.items() if key in state and state[key].shape != value.shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches, e.g. {'; '.join(shapes[:3])}")
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
        saved_name = saved.get("name") if isinstance(saved, dict) else "unknown"
        raise CheckpointError(f"checkpoint {path!r} (model {saved_name!r}) does not fit {model_name!r}: "
                              + "; ".join(parts))
    return state


def rng_state() -> Dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states as tensors and plain types (``weights_only``-safe)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_for_inference(path: str, backend: str = "auto", model_name: Optional[str] = None
                       ) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model in a weights file, in eval mode, and what the file says besides its weights.

    A file written by ``xception.train`` names its model and carries ``classes``,
    ``preprocess`` and ``args``; those entries are returned. Any other layout that
    ``xception.load_weights`` reads (``save_weights`` files, timm ``legacy_xception``,
    Cadene, ``.safetensors``) is matched to a registered model by its names and shapes
    (or built as ``model_name``), and the returned dict holds only ``model_name``.
    """
    import xception
    from .weights import matching_model, read_checkpoint, unwrap

    if not os.path.isfile(path):
        raise CheckpointError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        checkpoint: Mapping[str, Any] = read_checkpoint(path)
    else:
        checkpoint = load(path)
    if isinstance(checkpoint.get("model"), dict) and "name" in checkpoint["model"]:
        model = build_from_checkpoint(checkpoint, path, backend, model_name)
        saved = {key: checkpoint[key] for key in ("classes", "preprocess", "args") if key in checkpoint}
        return model, {"model_name": model_name or checkpoint["model"]["name"], **saved}
    state_dict = unwrap(checkpoint, repr(path))
    name, num_classes = matching_model(state_dict, repr(path)) if model_name is None else (model_name, None)
    model = xception.create_model(name, backend=backend, num_classes=num_classes, weights=state_dict)
    if model.num_classes == 0:
        raise CheckpointError(f"weights file {path!r} holds no classifier (fc / last_linear), so it cannot "
                              "classify images; start a training run from it with --weights")
    return model.eval(), {"model_name": name}


def build_from_checkpoint(checkpoint: Mapping[str, Any], path: str, backend: str = "auto",
                          model_name: Optional[str] = None) -> nn.Module:
    """The model a checkpoint describes, with its weights loaded, in eval mode."""
    import xception

    saved = checkpoint.get("model")
    if not isinstance(saved, dict) or "name" not in saved:
        raise CheckpointError(f"checkpoint {path!r} does not say which model it holds (no 'model' entry); "
                              "it was not written by xception.train")
    name = model_name or saved["name"]
    kwargs = {k: v for k, v in saved.get("kwargs", {}).items() if k != "backend"}
    model = xception.create_model(name, backend=backend, **kwargs)
    model.load_state_dict(check_compatible(checkpoint, path, name, kwargs, model))
    return model.eval()
