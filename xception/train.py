"""Train Xception on an ImageFolder tree, or on the embedded synthetic set when no ``--data`` is given.

    python -m xception.train                          # embedded set, small variant, tuned preset
    python -m xception.train --data DIR --model xception --img-size 299 --amp
    torchrun --nproc_per_node 2 -m xception.train ...   # DDP: the global --batch-size is split over ranks

Each run has its own folder OUT (``--out``, default ``runs/train/<start time>``);
an existing run folder is refused unless ``--resume`` continues it or
``--overwrite`` replaces it. Checkpoints (``OUT/last.pt`` every epoch and on
SIGINT/SIGTERM, ``OUT/best.pt`` on a new best validation accuracy) are written
atomically. ``--resume OUT/last.pt`` alone continues exactly where the run
stopped: the run's arguments come from the checkpoint (a flag that would change
the run, such as --batch-size or --data, is refused; --epochs, --workers,
--threads, --device, --backend, --log-interval, --max-steps may change and are
logged), then its weights, optimizer, schedule, epoch and step, RNG states and
data order. ``OUT/metrics.jsonl`` holds one JSON record per epoch (and per
``--log-interval`` steps), each with the run's id.

``--weights FILE`` starts from pretrained weights (any layout
``xception.load_weights`` reads: this project's files, timm's
``legacy_xception``, Cadene's, ``.safetensors``); a classifier of another
number of classes than the data has is replaced by a new one (fine-tuning).

Defaults: with ``--data``, the paper's recipe (Xception, 299 px, SGD momentum
0.9, lr 0.045 x0.94 every 2 epochs, weight decay 1e-5). Without it, a preset
tuned for the embedded set: xception_tiny, 72 px, 24 epochs of global batch
64, lr 0.1 x0.88 every epoch, crops of 60-100 percent of the image area.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import secrets
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

from kernels import BackendUnavailableError, resolve_backend

from . import checkpoint as ckpt
from .data import DataError, Preprocess, ShardedBatches, SkippedImages, collate, folder_splits, synthetic_splits
from .weights import classifier_outputs, load_weights, matching_model, read_checkpoint
from .engine import (Dist, Progress, all_reduce_sum, at_least, autocast, cleanup_distributed, evaluate_model,
                     init_distributed)

# The paper's schedule (Chollet 2017, ImageNet): SGD momentum 0.9, lr 0.045 decayed x0.94 every 2 epochs.
PAPER = dict(model="xception", img_size=299, epochs=60, batch_size=32, lr=0.045, lr_decay=0.94, lr_step=2,
             weight_decay=1e-5, scale=(0.08, 1.0), warmup_epochs=0)
# The embedded set: tuned so xception_tiny reaches >= 90% validation accuracy in minutes on 2 CPU cores.
EMBEDDED = dict(model="xception_tiny", img_size=72, epochs=24, batch_size=64, lr=0.1, lr_decay=0.88, lr_step=1,
                weight_decay=1e-5, scale=(0.6, 1.0), warmup_epochs=0)

EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}

# What --resume does with each flag given next to it: a RUN_DEFINING flag must repeat the saved value
# (anything else would be another run); a CHANGEABLE one replaces it and is logged; PER_INVOCATION ones
# are never restored from the checkpoint.
RUN_DEFINING = ("data", "val_split", "img_size", "crop_scale", "crop_pct", "per_class", "model", "drop_rate",
                "weights", "batch_size", "accum_steps", "lr", "lr_decay", "lr_step", "warmup_epochs",
                "weight_decay", "momentum", "seed", "amp", "amp_dtype", "channels_last")
CHANGEABLE = ("epochs", "workers", "max_bad_images", "backend", "device", "threads", "log_interval", "out")
PER_INVOCATION = ("resume", "overwrite", "max_steps")
# The files a run writes into its folder; an existing folder holding any of them is another run's.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")


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
    data.add_argument("--workers", type=at_least(0), default=0, help="data loader worker processes (default: 0)")
    data.add_argument("--max-bad-images", type=float, default=0.01, metavar="FRACTION",
                      help="skip unreadable images with a warning naming each; stop when more than this fraction "
                           "of the training set is unreadable (default: 0.01)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, choices=("xception", "xception_tiny"), help=preset("model"))
    model.add_argument("--backend", default="auto", choices=("auto", "torch", "cpp", "triton"),
                       help="separable-conv kernels (default: auto)")
    model.add_argument("--drop-rate", type=float, default=0.0, help="dropout before the classifier (default: 0)")
    model.add_argument("--weights", metavar="FILE",
                       help="start from these weights (fine-tuning): this project's files, timm legacy_xception, "
                            "Cadene or .safetensors; a classifier of another number of classes is replaced")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=None, help=preset("epochs"))
    optim.add_argument("--batch-size", type=int, default=None,
                       help="global batch size, split over ranks and --accum-steps " + preset("batch_size"))
    optim.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation micro-batches per step")
    optim.add_argument("--lr", type=float, default=None, help="base learning rate " + preset("lr"))
    optim.add_argument("--lr-decay", type=float, default=None, help="lr multiplier every --lr-step epochs "
                       + preset("lr_decay"))
    optim.add_argument("--lr-step", type=int, default=None, help=preset("lr_step"))
    optim.add_argument("--warmup-epochs", type=at_least(0), default=None,
                       help="linear lr warmup " + preset("warmup_epochs"))
    optim.add_argument("--weight-decay", type=at_least(0.0, float), default=None, help=preset("weight_decay"))
    optim.add_argument("--momentum", type=at_least(0.0, float), default=0.9, help="SGD momentum (default: 0.9)")
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0, help="seeds the model init, data order and augmentation")
    run.add_argument("--out", default=None, metavar="DIR",
                     help="this run's folder: checkpoints and metrics.jsonl (default: runs/train/<start time>); "
                          "an existing run folder is refused unless --resume or --overwrite")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run in an existing --out folder (its last.pt, best.pt, metrics.jsonl)")
    run.add_argument("--resume", metavar="FILE",
                     help="continue the run saved in FILE (e.g. OUT/last.pt) with its own arguments, in its folder")
    run.add_argument("--amp", action="store_true", help="mixed precision: bf16 on CPU, fp16 + GradScaler on GPU")
    run.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default=None,
                     help="autocast dtype (default: bfloat16 on CPU, float16 on GPU)")
    run.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    run.add_argument("--threads", type=at_least(1), default=None, help="torch.set_num_threads (default: torch's)")
    run.add_argument("--log-interval", type=at_least(0), default=0, help="also log every N steps to metrics.jsonl")
    run.add_argument("--max-steps", type=at_least(0), default=0,
                     help="stop after this many steps in total as if interrupted (for tests and smoke runs)")
    return parser


def given_flags(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> set:
    """The destinations of the flags ``argv`` names explicitly (not filled in from defaults)."""
    explicit = copy.deepcopy(parser)
    for action in explicit._actions:
        action.default = argparse.SUPPRESS
    return set(vars(explicit.parse_args(argv)))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def default_run_folder(root: str = os.path.join("runs", "train")) -> str:
    """``runs/train/<YYYYmmdd-HHMMSS>`` (with ``-2``, ``-3``... when a run started in the same second)."""
    base = os.path.join(root, time.strftime("%Y%m%d-%H%M%S"))
    folder, count = base, 1
    while os.path.exists(folder):
        count += 1
        folder = f"{base}-{count}"
    return folder


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The run's arguments: from ``argv`` and the presets, or with ``--resume`` from the checkpoint
    (see ``RUN_DEFINING`` and ``CHANGEABLE``); ``args.resume_changes`` lists what a resume changed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        args = resumed_args(args, given_flags(parser, argv))
    else:
        args.resume_changes = []
        defaults = PAPER if args.data else EMBEDDED
        for key, value in defaults.items():
            name = "crop_scale" if key == "scale" else key
            if getattr(args, name) is None:
                setattr(args, name, list(value) if isinstance(value, tuple) else value)
        if args.val_split is None:
            args.val_split = 0.0 if args.data else 0.2
        if args.data:
            args.data = os.path.abspath(args.data)  # a resume from another directory finds the same data
        if args.out is None:
            args.out = default_run_folder()
    for name in ("epochs", "batch_size", "img_size", "lr_step", "accum_steps", "per_class"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.img_size < 32:
        raise ValueError(f"--img-size must be >= 32, got {args.img_size}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.lr_decay <= 0:
        raise ValueError(f"--lr-decay must be positive, got {args.lr_decay}")
    low, high = args.crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"--crop-scale MIN MAX must have 0 < MIN <= MAX <= 1, got {low} {high}")
    if not 0.0 < args.crop_pct <= 1.0:
        raise ValueError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if not 0.0 <= args.max_bad_images <= 1.0:
        raise ValueError(f"--max-bad-images must be in [0, 1], got {args.max_bad_images}")
    return args


def resumed_args(args: argparse.Namespace, given: set) -> argparse.Namespace:
    """The arguments saved in ``args.resume``, with the flags in ``given`` applied where they may change."""
    state = ckpt.load(args.resume, mmap=True)
    saved = state.get("args")
    if not isinstance(saved, dict):
        raise ckpt.CheckpointError(f"checkpoint {args.resume!r} holds no training arguments, so it cannot be "
                                   f"resumed; to start a new run from its weights use --weights {args.resume}")
    resumed = build_parser().parse_args([])  # defaults for flags that older checkpoints lack
    for name, value in saved.items():
        if hasattr(resumed, name) and name not in PER_INVOCATION:
            setattr(resumed, name, value)
    changes = []
    for name in sorted(given - set(PER_INVOCATION)):
        new, old = getattr(args, name), getattr(resumed, name)
        if name == "data" and new is not None:
            new = os.path.abspath(new)
        if new == old or (isinstance(old, (list, tuple)) and list(old) == list(new)):
            continue
        if name not in CHANGEABLE:
            raise ValueError(f"{flag(name)} {new} would change the run in {args.resume!r}, which was trained with "
                             f"{flag(name)} {old}; leave it out to continue that run, or start a new run")
        changes.append(f"{flag(name)} {old} -> {new}")
        setattr(resumed, name, new)
    for name in PER_INVOCATION:
        setattr(resumed, name, getattr(args, name))
    if "out" not in given:
        resumed.out = os.path.dirname(args.resume) or "."
    finished = int(state.get("epoch", 0))
    if resumed.epochs < finished:
        raise ValueError(f"--epochs {resumed.epochs}: the run in {args.resume!r} has already finished {finished} "
                         "epochs; give more to train further")
    resumed.resume_changes = changes
    return resumed


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
    finished = False
    try:
        status = _train(args, ctx, stop, on_step, xception)
        finished = True
        return status
    finally:
        stop.restore()
        # A rank that returned waits for the others before the teardown: one tearing down while another
        # still wrote its checkpoint left that one in destroy_process_group for good, now and then (gloo,
        # torch 2.6). After an error there is no barrier: the other ranks may never come to it.
        cleanup_distributed(synchronize=finished)


def _train(args, ctx: Dist, stop: StopRequest, on_step, xception) -> int:
    chunks = ctx.world_size * args.accum_steps
    if args.batch_size % chunks:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by world size x --accum-steps = "
                         f"{ctx.world_size} x {args.accum_steps}")
    prepare_run_folder(args, ctx)
    preprocess, train_set, val_set = build_data(args)
    if len(train_set) < args.batch_size:
        raise DataError(f"--batch-size {args.batch_size} is larger than the training set ({len(train_set)} images)")
    classes = train_set.classes

    seed_everything(args.seed)
    model_kwargs = dict(num_classes=len(classes), drop_rate=args.drop_rate)
    model = xception.create_model(args.model, backend=args.backend, **model_kwargs)
    if args.weights and not args.resume:
        note = load_starting_weights(model, args.weights, args.model)
        if ctx.is_main:
            print(note, flush=True)
    model = model.to(ctx.device)
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
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    skipped = SkippedImages(len(train_set), args.max_bad_images)
    val_skipped = SkippedImages(len(val_set) if val_set is not None else 0, args.max_bad_images)
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
        run_id = str(state.get("run_id", run_id))
        for path, reason in state.get("skipped_images", {}).items():
            skipped.reasons[path] = reason
        if ctx.is_main:
            changed = f"; changed: {', '.join(args.resume_changes)}" if args.resume_changes else ""
            print(f"resumed run {run_id} from {args.resume}: epoch {start_epoch}, step {start_step}{changed}",
                  flush=True)

    train_model: nn.Module = model
    if ctx.enabled:
        train_model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                              else None)

    metrics_path = os.path.join(args.out, "metrics.jsonl")
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")

    def log(record: dict) -> None:
        log_json(metrics_path, {"run": run_id, **record})

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
            "run_id": run_id,
            "skipped_images": dict(skipped.reasons),
            "args": {key: getattr(args, key) for key in ARG_NAMES},
            "metrics": metrics or {},
        }


    sampler_args = dict(global_batch=args.batch_size, world_size=ctx.world_size, rank=ctx.rank,
                        accum_steps=args.accum_steps, seed=args.seed)
    steps_per_epoch = ShardedBatches(len(train_set), **sampler_args).steps_per_epoch()
    total_steps = start_epoch * steps_per_epoch + start_step
    if ctx.is_main:
        log({"type": "resume" if args.resume else "start", "epoch": start_epoch, "step": start_step,
             "resumed_from": args.resume, "changes": args.resume_changes,
             "args": {key: getattr(args, key) for key in ARG_NAMES}})
        compute_dtype = torch.float32
        if args.amp:
            compute_dtype = amp_dtype or (torch.float16 if ctx.device.type == "cuda" else torch.bfloat16)
        running = resolve_backend(args.backend, ctx.device, compute_dtype)
        print(f"run {run_id} in {args.out}", flush=True)
        print(f"training {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, backend "
              f"{running}{' (auto)' if args.backend == 'auto' else ''}) on "
              f"{'embedded set' if not args.data else args.data}: {len(train_set)} train / "
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
                images, labels, unreadable = next(batches)
                if unreadable:
                    skipped.add(unreadable)
                if images is None:
                    if ctx.enabled:  # every rank must run each micro-batch's backward (DDP's all-reduce)
                        raise DataError(f"every image of a micro-batch is unreadable: {unreadable[0].reason}")
                    continue
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
                log({"type": "step", "epoch": epoch, "step": step + 1, "global_step": total_steps,
                     "loss": float(local[0] / max(float(local[2]), 1.0)), "lr": lr,
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
                  "train_seconds": float(partial[3]), "skipped_images": len(skipped)}
        if val_set is not None:
            result = evaluate_model(model, val_loader(val_set, args, ctx), ctx, args.amp, args.channels_last,
                                    skipped=val_skipped)
            record.update(val_loss=result["loss"], val_top1=result["top1"], val_top5=result["top5"],
                          val_images_per_s=result["images_per_s"])
        if ctx.is_main:
            improved = record.get("val_top1", -1.0) > best_top1
            best_top1 = max(best_top1, record.get("val_top1", -1.0))
            log(record)
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
        # prepare_run_folder left no other run's files in the folder: these are this run's
        names = ", ".join(name for name in RUN_FILES if os.path.exists(os.path.join(args.out, name)))
        print(f"done: run {run_id} wrote {names} in {args.out}"
              + (f"; skipped {len(skipped) + len(val_skipped)} unreadable images" if skipped or val_skipped else ""),
              flush=True)
    return 0


def load_starting_weights(model: nn.Module, path: str, model_name: str) -> str:
    """Load ``--weights`` into ``model`` (a classifier of another size is replaced); what happened, in words."""
    state_dict = read_checkpoint(path)
    try:
        result = load_weights(model, state_dict, replace_classifier=True)
    except ckpt.CheckpointError as error:
        try:
            name, _ = matching_model(state_dict, repr(path))
        except ckpt.CheckpointError:
            raise error from None
        if name != model_name:
            raise ckpt.CheckpointError(f"--weights {path!r} holds a {name!r} model, but this run builds "
                                       f"{model_name!r}: pass --model {name}") from None
        raise
    if result.missing_keys:
        outputs = classifier_outputs(state_dict)
        return (f"--weights {path}: loaded; its classifier ({outputs or 'no'} classes) does not fit the "
                f"{model.num_classes} classes of this data, so a new classifier is trained (fine-tuning)")
    return f"--weights {path}: loaded, classifier included"


def prepare_run_folder(args: argparse.Namespace, ctx: Dist) -> None:
    """Create ``args.out``; refuse one that holds another run's files unless ``--overwrite`` (then remove them)."""
    resuming_here = bool(args.resume) and os.path.isdir(args.out) and os.path.samefile(
        os.path.dirname(os.path.abspath(args.resume)), args.out)
    existing = [name for name in RUN_FILES if os.path.exists(os.path.join(args.out, name))]
    if existing and not resuming_here:
        if not args.overwrite:
            raise ValueError(f"--out {args.out!r} already holds a run ({', '.join(existing)}): continue it with "
                             f"--resume {os.path.join(args.out, 'last.pt')}, replace it with --overwrite, or "
                             "choose another --out")
        if ctx.is_main:
            for name in existing:
                os.remove(os.path.join(args.out, name))
            print(f"--overwrite: removed {', '.join(existing)} of the earlier run in {args.out}", flush=True)
    if ctx.is_main:
        os.makedirs(args.out, exist_ok=True)


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


ARG_NAMES = tuple(action.dest for action in build_parser()._actions if action.dest != "help")


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
