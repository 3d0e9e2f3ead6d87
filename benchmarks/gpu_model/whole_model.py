"""Whole-Xception times on an H200, PREDICTED from the layer predictions and the recorded eager run.

The static model predicts one separable convolution at a time. A whole network
also runs the stem, BatchNorms, ReLUs, pools, skip convolutions and (training)
the loss and optimizer, which no backend of this project changes. So the
network is predicted by substitution: take the eager network's recorded time,
remove the recorded eager time of every separable convolution it runs, and add
the predicted time of the provider's op for the same layer::

    predicted = recorded_eager_network - sum_l n_l * recorded_eager_layer_l + sum_l n_l * predicted_layer_l

``n_l`` counts how often layer shape ``l`` occurs in the network (the middle
flow runs 728->728@19 twenty-five times), read from the model itself. Evaluation
uses the forward rows, a training step the forward+backward rows. The estimate
assumes that an op takes the same time inside the network as alone, and it
inherits the layer model's error (``docs/gpu-model.md``); it is written as
predicted wherever it appears. ``auto`` takes, per layer, the faster of the
recorded cuDNN pair and the predicted Triton modes: what the dispatch table
would hold if a GPU run confirmed the predictions.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch

# Suite mode of the network -> suite mode of its layers.
LAYER_MODE = {"eval": "fwd", "train": "full"}


def layer_counts(image_size: int = 299) -> Counter:
    """Layer name (``"728->728@19"``, as in ``benchmarks.cases``) -> how often Xception runs it."""
    import kernels
    from xception import xception

    counts: Counter = Counter()

    def count(module, inputs, output):
        x = inputs[0]
        counts[f"{module.in_channels}->{module.out_channels}@{x.shape[-1]}"] += 1

    with torch.device("meta"):
        network = xception(backend="torch")
        hooks = [m.register_forward_hook(count) for m in network.modules()
                 if isinstance(m, kernels.SeparableConv2d)]
        network(torch.empty(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    return counts


def _index(rows: Iterable[dict], suite: str) -> Dict[Tuple[str, str, str, str, int], float]:
    """(shape, dtype, mode, provider, batch) -> p50 ms of the rows of ``suite`` that ran."""
    return {(r["shape"], r["dtype"], r["mode"], r["provider"], r["batch"]): r["p50_ms"]
            for r in rows if r.get("suite") == suite and r.get("status") == "ok" and r.get("p50_ms")}


def predict(recorded_rows: Iterable[dict], predicted_rows: Iterable[dict], counts: Mapping[str, int],
            model_shape: str = "xception 299x299") -> List[dict]:
    """One estimate per (dtype, network mode, batch, provider) that every layer has a time for.

    Returns dicts with ``dtype``, ``mode``, ``batch``, ``provider`` (``*-predicted``), ``p50_ms``,
    ``eager_ms`` (the recorded network) and ``layer_share`` (the eager layers' part of it).
    """
    recorded_rows, predicted_rows = list(recorded_rows), list(predicted_rows)
    eager_layers = _index(recorded_rows, "layers")
    eager_networks = {key: ms for key, ms in _index(recorded_rows, "model").items()
                      if key[0] == model_shape and key[3] == "eager"}
    predicted = _index(predicted_rows, "layers")
    providers = sorted({key[3] for key in predicted})
    out = []
    for (_, dtype, net_mode, _, batch), network_ms in sorted(eager_networks.items()):
        mode = LAYER_MODE.get(net_mode)
        if mode is None:
            continue
        eager = {name: eager_layers.get((name, dtype, mode, "eager", batch)) for name in counts}
        if any(ms is None for ms in eager.values()):
            continue
        eager_sum = sum(counts[name] * eager[name] for name in counts)
        choices = {p: {name: predicted.get((name, dtype, mode, p, batch)) for name in counts} for p in providers}
        complete = {p: layer_ms for p, layer_ms in choices.items() if all(ms is not None for ms in layer_ms.values())}
        if complete:
            complete["auto-predicted"] = {name: min([eager[name], *(c[name] for c in complete.values())])
                                          for name in counts}
        for provider, layer_ms in complete.items():
            layers_sum = sum(counts[name] * layer_ms[name] for name in counts)
            out.append(dict(dtype=dtype, mode=net_mode, batch=batch, provider=provider,
                            p50_ms=network_ms - eager_sum + layers_sum, eager_ms=network_ms,
                            layer_share=eager_sum / network_ms))
    return out


def network_rows(estimates: Iterable[dict], run: dict, shape, images: Optional[int] = None) -> List[dict]:
    """The estimates as rows of the benchmark suite's ``model`` format (provider ``*-predicted``)."""
    rows = []
    for e in estimates:
        ms = e["p50_ms"]
        rows.append({
            "suite": "model", "shape": shape.name, "cin": shape.cin, "cout": shape.cout, "h": shape.h, "w": shape.w,
            "k": shape.k, "stride": shape.stride, "batch": e["batch"], "dtype": e["dtype"],
            "layout": "channels_last", "mode": e["mode"], "provider": e["provider"], "status": "ok",
            "reason": (f"predicted: the recorded eager network ({e['eager_ms']:.3f} ms, separable convs "
                       f"{100 * e['layer_share']:.0f}% of it) with every separable conv replaced by its "
                       f"predicted time (benchmarks/gpu_model/whole_model.py); not measured"),
            "p20_ms": ms, "p50_ms": ms, "p80_ms": ms, "repeats": 0, "gflop": None, "gflop_s": None, "gb_s": None,
            "pct_peak": None, "speedup_vs_eager_cl": e["eager_ms"] / ms, "peak_alloc_mb": None, "threads": None,
            "case_wall_s": None, "images_per_s": e["batch"] / ms * 1e3, "minor_faults": None, "run": run,
        })
    return rows
