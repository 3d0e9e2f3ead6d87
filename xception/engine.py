"""Pieces shared by train / evaluate / predict: devices, distributed setup, autocast, evaluation loop, progress."""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data import DataError


def at_least(minimum: Union[int, float], kind: type = int) -> Callable[[str], Union[int, float]]:
    """An argparse ``type``: a number of ``kind`` no smaller than ``minimum`` (argparse's error names the option
    and the value)."""

    def parse(text: str) -> Union[int, float]:
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'" for text that is not a number
    return parse


@dataclass
class Dist:
    """Where this process stands in a (possibly one-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:INDEX") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r}: CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def init_distributed(device_name: str = "auto") -> Dist:
    """Join the ``torchrun`` job described by RANK / WORLD_SIZE / LOCAL_RANK (nccl on GPU, gloo on CPU).

    Without those variables (or with WORLD_SIZE=1) this is a single process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size <= 1:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, device)


def cleanup_distributed(synchronize: bool = False) -> None:
    """Tear the process group down; with ``synchronize``, once every rank has come here (a barrier)."""
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def autocast(device: torch.device, enabled: bool, dtype: Optional[torch.dtype] = None):
    """bf16 autocast on CPU, fp16 (or ``dtype``) on GPU; a no-op context when disabled."""
    if not enabled:
        return nullcontext()
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def all_reduce_sum(values: torch.Tensor, ctx: Dist) -> torch.Tensor:
    """Sum of ``values`` over ranks (float64 on the CPU for gloo, on the device for nccl)."""
    if not ctx.enabled:
        return values
    tensor = values.to(ctx.device if ctx.device.type == "cuda" else "cpu", torch.float64)
    dist.all_reduce(tensor)
    return tensor.cpu()


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, ctx: Dist, amp: bool = False, channels_last: bool = False,
                   progress_label: Optional[str] = None, skipped=None) -> Dict[str, float]:
    """Top-1 / top-5 accuracy, mean loss and images/s of ``model`` over ``loader`` (summed over ranks).

    ``loader`` yields ``data.collate``'s ``(images, labels, unreadable)``; unreadable images go to
    ``skipped`` (a ``data.SkippedImages``), or stop the evaluation when it is None.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, images
    bar = Progress(len(loader), progress_label) if progress_label and ctx.is_main else None
    start = time.perf_counter()
    for images, labels, unreadable in loader:
        if unreadable:
            if skipped is None:
                raise DataError(unreadable[0].reason)
            skipped.add(unreadable)
        if images is None:
            continue
        images = images.to(ctx.device, non_blocking=True)
        labels = labels.to(ctx.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(ctx.device, amp):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels.unsqueeze(1)
        totals += torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item(),
                                hits[:, 0].sum().item(), hits.any(dim=1).sum().item(), labels.numel()],
                               dtype=torch.float64)
        if bar:
            bar.update(1, acc=f"{100 * totals[1] / max(totals[3], 1):.2f}%")
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    seconds = time.perf_counter() - start
    if bar:
        bar.close()
    totals = all_reduce_sum(totals, ctx)
    model.train(was_training)
    count = max(float(totals[3]), 1.0)
    return {"loss": float(totals[0]) / count, "top1": 100.0 * float(totals[1]) / count,
            "top5": 100.0 * float(totals[2]) / count, "images": int(totals[3]),
            "seconds": seconds, "images_per_s": float(totals[3]) / max(seconds, 1e-9)}


class Progress:
    """A rich progress bar on a terminal; on a pipe, nothing (the callers print per-epoch lines)."""

    def __init__(self, total: int, description: str) -> None:
        self._progress = None
        if not sys.stderr.isatty():
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
            TimeElapsedColumn, TimeRemainingColumn

        self._progress = RichProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), console=Console(stderr=True), transient=False)
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, stats="")

    def update(self, advance: int = 1, **stats) -> None:
        if self._progress is not None:
            text = " ".join(f"{key}={value}" for key, value in stats.items())
            self._progress.update(self._task, advance=advance, stats=text)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
