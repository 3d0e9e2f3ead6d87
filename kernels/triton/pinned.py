"""Tile configs pinned from a file: ``SEPCONV_TRITON_CONFIGS=path.json``.

A pin fixes the tile config a kernel runs with, per dtype family ("16bit" or "fp32"), in place of
autotuning (or of the first config under ``SEPCONV_TRITON_AUTOTUNE=0``). The config need not be one
of the kernel's own: ``python -m benchmarks.triton_sweep --pins FILE`` writes the fastest config it
timed for each kernel it swept, and ``benchmarks/gpu_check.sh`` then times the layers and the model
with those. For split mode's transposed depthwise kernel a pin may also fix its tile of input
pixels (``split.TRANSPOSED_TILES``).

The file::

    {"format": "sepconv-triton-configs/1",
     "pins": [{"kernel": "depthwise", "family": "16bit",
               "kwargs": {"BLOCK_P": 8, "BLOCK_C": 64, "ROWS": 2, "COLS": 4},
               "num_warps": 4, "num_stages": 1},
              {"kernel": "transposed", "family": "16bit", "kwargs": {"BLOCK_Q": 8, "BLOCK_C": 32},
               "num_warps": 2, "num_stages": 1, "tile": [2, 3]}]}

Other keys of the file and of a pin (where and when it was measured) are kept but not read. A file
that is missing, not JSON, or names an unknown kernel, family or meta-parameter raises ValueError
naming the file and the entry, at the first launch that reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple

import triton

from . import CONFIGS_ENV as PINS_ENV

FORMAT = "sepconv-triton-configs/1"
FAMILIES = ("16bit", "fp32")


class Pin(NamedTuple):
    config: triton.Config
    tile: Optional[Tuple[int, int]]  # the transposed kernel's (rows, columns) of input pixels, else None


def kernel_tables() -> Dict[str, dict]:
    """Kernel name -> {family: autotuned kernel}: the kernels a pin (and ``benchmarks.triton_sweep``) can name."""
    from . import backward, forward, split

    return {"forward": forward.forward_autotuned, "depthwise": split.depthwise_autotuned,
            "transposed": split.transposed_autotuned, "grad_hidden": backward.grad_hidden_autotuned,
            "grad_input": backward.grad_input_autotuned, "grad_pointwise": backward.grad_pointwise_autotuned}


def _parse(entry: object, where: str, tables: Dict[str, dict]) -> Tuple[str, str, Pin]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {entry!r}")
    kernel, family = entry.get("kernel"), entry.get("family")
    if kernel not in tables:
        raise ValueError(f"{where}: kernel={kernel!r} is not one of {sorted(tables)}")
    if family not in FAMILIES:
        raise ValueError(f"{where}: family={family!r} is not one of {list(FAMILIES)}")
    kwargs = entry.get("kwargs")
    if not isinstance(kwargs, dict) or not kwargs:
        raise ValueError(f"{where}: kwargs={kwargs!r} is not an object of meta-parameters")
    autotuned = tables[kernel][family]
    params = set(autotuned.fn.arg_names)
    required = set(autotuned.configs[0].kwargs)
    unknown = sorted(set(kwargs) - params)
    missing = sorted(required - set(kwargs))
    if unknown or missing:
        raise ValueError(f"{where}: kwargs {sorted(kwargs)} for kernel {kernel!r}: "
                         + (f"unknown {unknown}" if unknown else f"missing {missing}"))
    for name, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            if not (isinstance(value, bool) and name == "UNROLL_TAPS"):
                raise ValueError(f"{where}: {name}={value!r} is not a positive integer")
    warps, stages = entry.get("num_warps"), entry.get("num_stages")
    if warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"{where}: num_warps={warps!r} is not a power of two from 1 to 32")
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"{where}: num_stages={stages!r} is not a positive integer")
    tile = entry.get("tile")
    if tile is not None:
        if kernel != "transposed":
            raise ValueError(f"{where}: tile={tile!r}: only the 'transposed' kernel has a tile")
        if (not isinstance(tile, list) or len(tile) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in tile)):
            raise ValueError(f"{where}: tile={tile!r} is not [rows, columns] of positive integers")
        tile = (tile[0], tile[1])
    return kernel, family, Pin(triton.Config(dict(kwargs), num_warps=warps, num_stages=stages), tile)


def _load(path) -> Tuple[dict, Dict[Tuple[str, str], Pin]]:
    """The file at ``path`` as it is, and its pins: (kernel, family) -> Pin (a later entry for the same pair wins)."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{PINS_ENV}={str(path)!r}: cannot read a JSON file there: {error}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or not isinstance(document.get("pins"),
                                                                                          list):
        raise ValueError(f"{PINS_ENV}={str(path)!r}: not a pinned-configs file (expected an object with "
                         f"\"format\": {FORMAT!r} and a list \"pins\")")
    tables = kernel_tables()
    pins = {}
    for index, entry in enumerate(document["pins"]):
        kernel, family, pin = _parse(entry, f"{PINS_ENV}={str(path)!r}, pins[{index}]", tables)
        pins[(kernel, family)] = pin
    return document, pins


def read(path) -> Dict[Tuple[str, str], Pin]:
    """The pins of the file at ``path``: (kernel, family) -> Pin (a later entry for the same pair wins)."""
    return _load(path)[1]


def entry(kernel: str, family: str, config: triton.Config, tile: Optional[Tuple[int, int]] = None,
          **extra) -> dict:
    """A file entry pinning ``config`` (and ``tile``) for ``kernel`` in ``family``; ``extra`` keys are kept as they
    are (where and how fast it was measured)."""
    pin = dict(kernel=kernel, family=family, kwargs=dict(config.kwargs), num_warps=config.num_warps,
               num_stages=config.num_stages)
    if tile is not None:
        pin["tile"] = list(tile)
    pin.update(extra)
    return pin


def write(path, entries: list, **info) -> None:
    """Writes (atomically) a pins file at ``path`` with ``entries`` added to the ones it holds; an entry replaces
    an older one for the same kernel and family. ``info``: top-level keys (device, run) recorded as they are."""
    path = Path(path)
    # A malformed file is reported, not overwritten.
    document = _load(path)[0] if path.exists() else {"format": FORMAT, "pins": []}
    document.update(info)
    replaced = {(e["kernel"], e["family"]) for e in entries}
    document["pins"] = [e for e in document["pins"] if (e["kernel"], e["family"]) not in replaced] + list(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    temporary.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(temporary, path)


_cache: Tuple[Optional[str], Dict[Tuple[str, str], Pin], Dict[int, Tuple[str, str]]] = (None, {}, {})


def _current() -> Tuple[Dict[Tuple[str, str], Pin], Dict[int, Tuple[str, str]]]:
    """The pins of ``SEPCONV_TRITON_CONFIGS`` (read once per value of the variable) and, per autotuned kernel's
    id, its (kernel, family)."""
    global _cache
    path = os.environ.get(PINS_ENV) or None
    if path != _cache[0]:
        pins = read(path) if path is not None else {}
        names = {id(autotuned): (kernel, family)
                 for kernel, table in kernel_tables().items() for family, autotuned in table.items()}
        _cache = (path, pins, names)
    return _cache[1], _cache[2]


def config_for(autotuned) -> Optional[triton.Config]:
    """The pinned config of ``autotuned`` (one of ``kernel_tables()``'s kernels), or None."""
    if not os.environ.get(PINS_ENV):
        return None
    pins, names = _current()
    pin = pins.get(names.get(id(autotuned), ("", "")))
    return pin.config if pin is not None else None


def transposed_tile(family: str) -> Optional[Tuple[int, int]]:
    """The pinned tile of the transposed depthwise kernel in ``family``, or None."""
    if not os.environ.get(PINS_ENV):
        return None
    pin = _current()[0].get(("transposed", family))
    return pin.tile if pin is not None else None


def describe() -> Optional[list]:
    """The pins in force, one line each ("depthwise 16bit: BLOCK_P=8,...,warps=4,stages=1"), or None without
    ``SEPCONV_TRITON_CONFIGS`` (what a benchmark row records)."""
    if not os.environ.get(PINS_ENV):
        return None
    lines = []
    for (kernel, family), pin in sorted(_current()[0].items()):
        meta = ",".join(f"{k}={v}" for k, v in pin.config.kwargs.items())
        tile = f"TILE={pin.tile[0]}x{pin.tile[1]}," if pin.tile is not None else ""
        lines.append(f"{kernel} {family}: {tile}{meta},warps={pin.config.num_warps},stages={pin.config.num_stages}")
    return lines
