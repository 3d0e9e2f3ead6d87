"""Train Xception on an ImageFolder tree, or on the embedded synthetic set when no ``--data`` is given.

    python -m xception.train                          # embedded set, small variant, tuned preset
    python -m xception.train --data DIR --model xception --img-size 299 --amp
    torchrun --nproc_per_node 2 -m xception.train ...   # DDP: the global --batch-size is split over ranks

Checkpoints (``OUT/last.pt`` every epoch and on SIGINT/SIGTERM, ``OUT/best.pt``
on a new best validation accuracy) are written atomically; ``--resume
OUT/last.pt`` continues exactly where the run stopped (weights, optimizer,
schedule, epoch and step, RNG states, data order). ``OUT/metrics.jsonl`` holds
one JSON record per epoch (and per ``--log-interval`` steps).

Defaults: with ``--data``, the paper's recipe (Xception, 299 px, SGD momentum
0.9, lr 0.045 x0.94 every 2 epochs, weight decay 1e-5). Without it, a preset
tuned for the embedded set: xception_tiny, 72 px, 24 epochs of global batch
64, lr 0.1 x0.88 every epoch, crops of 60-100 percent of the image area.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kernels import BackendUnavailableError

from . import checkpoint as ckpt
from .data import DataError, Preprocess, ShardedBatches, collate, folder_splits, synthetic_splits
from .engine import Dist, Progress, all_reduce_sum, autocast, cleanup_distributed, evaluate_model, init_distributed

# The paper's schedule (Chollet 2017, ImageNet): SGD momentum 0.9, lr 0.045 decayed x0.94 every 2 epochs.
PAPER = dict(model="xception", img_size=299, epochs=60, batch_size=32, lr=0.045, lr_decay=0.94, lr_step=2,
             weight_decay=1e-5, scale=(0.08, 1.0), warmup_epochs=0)
# The embedded set: tuned so xception_tiny reaches >= 90% validation accuracy in minutes on 2 CPU cores.
EMBEDDED = dict(model="xception_tiny", img_size=72, epochs=24, batch_size=64, lr=0.1, lr_decay=0.88, lr_step=1,
                weight_decay=1e-5, scale=(0.6, 1.0), warmup_epochs=0)

EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


def build_parser() -> argparse.ArgumentParser:
    def preset(key: str) -> str:
        return f"(default: {PAPER[key]} with --data, {EMBEDDED[key]} on the embedded set)"

    parser = argparse.ArgumentParser(
        prog="python -m xception.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="ImageFolder root (class subfolders of images, or train/ and val/); "
                                     "omitted: the embedded synthetic set (10 classes of shapes and textures)")
    data.add_argument("--val-split", type=float, default=None,
                      help="fraction held out for validation when DIR has no train/ val/ split "
                           "(default: 0 with --data, 0.2 on the embedded set)")
    data.add_argument("--img-size", type=int, default=None, help="training crop size " + preset("img_size"))
    data.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                      help="random-resized-crop area range " + preset("scale"))
    data.add_argument("--crop-pct", type=float, default=0.8975, help="eval center-crop fraction (default: 0.8975)")
    data.add_argument("--per-class", type=int, default=600, help="embedded set: images per class (default: 600)")
    data.add_argument("--workers", type=int, default=0, help="data loader worker processes (default: 0)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, choices=("xception", "xception_tiny"), help=preset("model"))
    model.add_argument("--backend", default="auto", choices=("auto", "torch", "cpp", "triton"),
                       help="separable-conv kernels (default: auto)")
    model.add_argument("--drop-rate", type=float, default=0.0, help="dropout before the classifier (default: 0)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=None, help=preset("epochs"))
    optim.add_argument("--batch-size", type=int, default=None,
                       help="global batch size, split over ranks and --accum-steps " + preset("batch_size"))
    optim.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation micro-batches per step")
    optim.add_argument("--lr", type=float, default=None, help="base learning rate " + preset("lr"))
    optim.add_argument("--lr-decay", type=float, default=None, help="lr multiplier every --lr-step epochs "
                       + preset("lr_decay"))
    optim.add_argument("--lr-step", type=int, default=None, help=preset("lr_step"))
    optim.add_argument("--warmup-epochs", type=int, default=None, help="linear lr warmup " + preset("warmup_epochs"))
    optim.add_argument("--weight-decay", type=float, default=None, help=preset("weight_decay"))
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0, help="seeds the model init, data order and augmentation")
    run.add_argument("--out", default="runs/train", help="checkpoints and metrics.jsonl go here")
    run.add_argument("--resume", metavar="PATH", help="continue from this checkpoint (e.g. OUT/last.pt)")
    run.add_argument("--amp", action="store_true", help="mixed precision: bf16 on CPU, fp16 + GradScaler on GPU")
    run.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default=None,
                     help="autocast dtype (default: bfloat16 on CPU, float16 on GPU)")
    run.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    run.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    run.add_argument("--log-interval", type=int, default=0, help="also log every N steps to metrics.jsonl")
    run.add_argument("--max-steps", type=int, default=0,
                     help="stop after this many steps in total as if interrupted (for tests and smoke runs)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    defaults = PAPER if args.data else EMBEDDED
    for key, value in defaults.items():
        name = "crop_scale" if key == "scale" else key
        if getattr(args, name) is None:
            setattr(args, name, list(value) if isinstance(value, tuple) else value)
    if args.val_split is None:
        args.val_split = 0.0 if args.data else 0.2
    for name in ("epochs", "batch_size", "img_size", "lr_step", "accum_steps", "per_class"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.img_size < 32:
        raise ValueError(f"--img-size must be >= 32, got {args.img_size}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if not 0.0 < args.crop_pct <= 1.0:
        raise ValueError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class StopRequest:
    """Set by SIGINT/SIGTERM; the loop finishes its step, writes a checkpoint and exits non-zero."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._previous = {}

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread
                pass

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name} received: finishing the current step, then writing a checkpoint "
              "(send it again to abort at once)", file=sys.stderr, flush=True)


def lr_at(args: argparse.Namespace, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Step decay every ``lr_step`` epochs, after an optional linear warmup (per step)."""
    progress = epoch + step / max(steps_per_epoch, 1)
    if args.warmup_epochs and progress < args.warmup_epochs:
        return args.lr * (progress + 1 / max(steps_per_epoch, 1)) / args.warmup_epochs
    return args.lr * args.lr_decay ** (epoch // args.lr_step)


def build_data(args: argparse.Namespace):
    preprocess = Preprocess(args.img_size, crop_pct=args.crop_pct, scale=tuple(args.crop_scale))
    if args.data:
        train_set, val_set = folder_splits(args.data, preprocess, args.val_split, args.seed)
    else:
        train_set, val_set = synthetic_splits(preprocess, args.per_class, args.val_split, args.seed)
    return preprocess, train_set, val_set


def make_loader(dataset, batch_sampler, workers: int):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                                       collate_fn=collate, generator=torch.Generator(),
                                       persistent_workers=False)


def val_loader(val_set, args: argparse.Namespace, ctx: Dist):
    indices = list(range(ctx.rank, len(val_set), ctx.world_size))
    per_rank = max(1, args.batch_size // ctx.world_size)
    batches = [indices[i:i + per_rank] for i in range(0, len(indices), per_rank)]
    return make_loader(val_set, batches, args.workers)


def log_json(path: str, record: dict) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


def train(args: argparse.Namespace, on_step: Optional[Callable[[int, int], bool]] = None) -> int:
    """Run the training that ``args`` describes; the exit status (0, or 130/143 when interrupted).

    ``on_step(epoch, step)`` is called after each optimizer step; returning True
    stops like a signal would (a checkpoint is written, status 130).
    """
    import xception

    ctx = init_distributed(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    stop = StopRequest()
    stop.install()
    try:
        return _train(args, ctx, stop, on_step, xception)
    finally:
        stop.restore()
        cleanup_distributed()


def _train(args, ctx: Dist, stop: StopRequest, on_step, xception) -> int:
    chunks = ctx.world_size * args.accum_steps
    if args.batch_size % chunks:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by world size x --accum-steps = "
                         f"{ctx.world_size} x {args.accum_steps}")
    preprocess, train_set, val_set = build_data(args)
    if len(train_set) < args.batch_size:
        raise DataError(f"--batch-size {args.batch_size} is larger than the training set ({len(train_set)} images)")
    classes = train_set.classes

    seed_everything(args.seed)
    model_kwargs = dict(num_classes=len(classes), drop_rate=args.drop_rate)
    model = xception.create_model(args.model, backend=args.backend, **model_kwargs).to(ctx.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, momentum=args.momentum)
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp_dtype else None
    use_scaler = args.amp and ctx.device.type == "cuda" and amp_dtype in (None, torch.float16)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=use_scaler)

    start_epoch, start_step, best_top1 = 0, 0, -1.0
    partial = torch.zeros(4, dtype=torch.float64)  # this epoch so far: loss sum, hits, images, seconds
    if args.resume:
        state = ckpt.load(args.resume)
        weights = ckpt.check_compatible(state, args.resume, args.model, model_kwargs, model)
        if state.get("classes") is not None and list(state["classes"]) != list(classes):
            raise ckpt.CheckpointError(f"checkpoint {args.resume!r} was trained on classes {state['classes'][:5]}..., "
                                       f"this data has {classes[:5]}...")
        if "optimizer" not in state:
            raise ckpt.CheckpointError(f"checkpoint {args.resume!r} holds weights only; it cannot be resumed")
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        best_top1 = float(state.get("best_top1", -1.0))
        partial = state.get("partial", partial).to(torch.float64)
        ckpt.set_rng_state(state["rng"])
        if ctx.is_main:
            print(f"resumed from {args.resume}: epoch {start_epoch}, step {start_step}", flush=True)

    train_model: nn.Module = model
    if ctx.enabled:
        train_model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                              else None)

    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")

    def snapshot(epoch: int, step: int, metrics: Optional[dict] = None) -> dict:
        return {
            "format": ckpt.FORMAT,
            "model": {"name": args.model, "kwargs": dict(model_kwargs)},
            "state_dict": model.state_dict(),
            "classes": list(classes),
            "preprocess": {"img_size": preprocess.img_size, "mean": list(preprocess.mean),
                           "std": list(preprocess.std), "crop_pct": preprocess.crop_pct},
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if use_scaler else {},
            "epoch": epoch, "step": step, "partial": partial.clone(), "best_top1": best_top1,
            "rng": ckpt.rng_state(),
            "args": {key: value for key, value in vars(args).items()},
            "metrics": metrics or {},
        }

    sampler_args = dict(global_batch=args.batch_size, world_size=ctx.world_size, rank=ctx.rank,
                        accum_steps=args.accum_steps, seed=args.seed)
    steps_per_epoch = ShardedBatches(len(train_set), **sampler_args).steps_per_epoch()
    total_steps = start_epoch * steps_per_epoch + start_step
    if ctx.is_main:
        print(f"training {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, backend "
              f"{args.backend}) on {'embedded set' if not args.data else args.data}: {len(train_set)} train / "
              f"{len(val_set) if val_set else 0} val images, {len(classes)} classes, {args.img_size}px, "
              f"{ctx.world_size} process(es) on {ctx.device}, global batch {args.batch_size}, "
              f"{steps_per_epoch} steps/epoch", flush=True)

    for epoch in range(start_epoch, args.epochs):
        first_step = start_step if epoch == start_epoch else 0
        if first_step == 0:
            partial.zero_()
        sampler = ShardedBatches(len(train_set), epoch=epoch, start_step=first_step, **sampler_args)
        batches = iter(make_loader(train_set, sampler, args.workers))
        train_model.train()
        bar = Progress(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}") if ctx.is_main else None
        if bar:
            bar.update(first_step)
        interrupted = None
        for step in range(first_step, steps_per_epoch):
            started = time.perf_counter()
            lr = lr_at(args, epoch, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            local = torch.zeros(3, dtype=torch.float64)
            for micro in range(args.accum_steps):
                images, labels = next(batches)
                images = images.to(ctx.device, non_blocking=True).contiguous(memory_format=memory_format)
                labels = labels.to(ctx.device, non_blocking=True)
                sync = ctx.enabled and micro < args.accum_steps - 1
                with (train_model.no_sync() if sync else nullcontext()):
                    with autocast(ctx.device, args.amp, amp_dtype):
                        logits = train_model(images)
                    loss = F.cross_entropy(logits.float(), labels)
                    scaler.scale(loss / args.accum_steps).backward()
                local += torch.tensor([loss.item() * labels.numel(),
                                       (logits.argmax(1) == labels).sum().item(), labels.numel()], dtype=torch.float64)
            scaler.step(optimizer)
            scaler.update()
            if not math.isfinite(float(local[0])):
                raise FloatingPointError(f"loss is not finite at epoch {epoch} step {step}; lower --lr")
            step_seconds = time.perf_counter() - started
            partial += torch.cat([local, torch.tensor([step_seconds], dtype=torch.float64)])
            total_steps += 1
            if bar:
                seen = max(float(partial[2]), 1.0)
                bar.update(1, loss=f"{partial[0] / seen:.4f}", acc=f"{100 * partial[1] / seen:.1f}%",
                           img_s=f"{ctx.world_size * partial[2] / max(float(partial[3]), 1e-9):.0f}", lr=f"{lr:.4g}")
            if ctx.is_main and args.log_interval and total_steps % args.log_interval == 0:
                log_json(metrics_path, {"type": "step", "epoch": epoch, "step": step + 1, "global_step": total_steps,
                                        "loss": float(local[0] / local[2]), "lr": lr,
                                        "images_per_s": ctx.world_size * float(local[2]) / step_seconds})
            if on_step is not None and on_step(epoch, step):
                stop.signal = stop.signal or signal.SIGINT
            wants_stop = stop.signal is not None
            if args.max_steps and total_steps >= args.max_steps:
                wants_stop = True
            if ctx.enabled:
                flag = all_reduce_sum(torch.tensor([float(wants_stop)]), ctx)
                wants_stop = bool(flag[0] > 0)
            if wants_stop and step + 1 < steps_per_epoch:
                interrupted = (epoch, step + 1)
                break
            if wants_stop:
                interrupted = (epoch + 1, 0)
                break
        if bar:
            bar.close()

        if interrupted is not None and interrupted[1] != 0:
            return _stop(args, ctx, stop, snapshot, interrupted, last_path)

        sums = all_reduce_sum(partial[:3].clone(), ctx)
        seen = max(float(sums[2]), 1.0)
        record = {"type": "epoch", "epoch": epoch + 1, "lr": lr_at(args, epoch, steps_per_epoch - 1, steps_per_epoch),
                  "train_loss": float(sums[0]) / seen, "train_top1": 100 * float(sums[1]) / seen,
                  "train_images_per_s": float(sums[2]) / max(float(partial[3]), 1e-9),
                  "train_seconds": float(partial[3])}
        if val_set is not None:
            result = evaluate_model(model, val_loader(val_set, args, ctx), ctx, args.amp, args.channels_last)
            record.update(val_loss=result["loss"], val_top1=result["top1"], val_top5=result["top5"],
                          val_images_per_s=result["images_per_s"])
        if ctx.is_main:
            improved = record.get("val_top1", -1.0) > best_top1
            best_top1 = max(best_top1, record.get("val_top1", -1.0))
            log_json(metrics_path, record)
            print(f"epoch {epoch + 1}/{args.epochs}: train loss {record['train_loss']:.4f} "
                  f"acc {record['train_top1']:.2f}% ({record['train_images_per_s']:.0f} img/s)"
                  + (f", val loss {record['val_loss']:.4f} top-1 {record['val_top1']:.2f}% "
                     f"top-5 {record['val_top5']:.2f}%" if "val_top1" in record else ""), flush=True)
            state = snapshot(epoch + 1, 0, record)
            ckpt.save_atomic(state, last_path)
            if improved:
                ckpt.save_atomic(state, best_path)
        if interrupted is not None:
            return _stop(args, ctx, stop, None, interrupted, last_path)
    if ctx.is_main:
        print(f"done: checkpoints in {args.out} (last.pt, best.pt), metrics in {metrics_path}", flush=True)
    return 0


def _stop(args, ctx: Dist, stop: StopRequest, snapshot, position, last_path: str) -> int:
    """Write the checkpoint of an interrupted run (unless the epoch-end one already is) and say how to go on."""
    epoch, step = position
    if ctx.is_main:
        if snapshot is not None:
            ckpt.save_atomic(snapshot(epoch, step), last_path)
        why = signal.Signals(stop.signal).name if stop.signal else f"--max-steps {args.max_steps}"
        print(f"stopped by {why} at epoch {epoch} step {step}; checkpoint written to {last_path}; "
              f"continue with --resume {last_path}", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED.get(stop.signal, 1) if stop.signal else 0


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = parse_args(argv)
        return train(args)
    except (DataError, ckpt.CheckpointError, BackendUnavailableError, ValueError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted (no checkpoint written for the current step)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
