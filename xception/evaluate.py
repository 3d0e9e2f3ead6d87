"""Top-1 / top-5 accuracy and images/s of a trained checkpoint.

    python -m xception.evaluate --weights runs/train/best.pt              # the embedded validation split
    python -m xception.evaluate --weights best.pt --data DIR [--val-split 0.1]

The model, its classes and its preprocessing (image size, crop_pct, mean/std)
come from the checkpoint. With ``--data``, ``DIR/val`` is used when it exists,
else the ``--val-split`` hold-out of ``DIR`` (the one ``xception.train`` held
out with the same value), else all of ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch

from kernels import BackendUnavailableError

from . import checkpoint as ckpt
from .data import DataError, Preprocess, find_images, folder_splits, synthetic_splits, ImageFolder
from .engine import Dist, evaluate_model, pick_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m xception.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="checkpoint written by xception.train")
    parser.add_argument("--data", help="ImageFolder root; omitted: the embedded validation split")
    parser.add_argument("--val-split", type=float, default=None,
                        help="hold-out fraction of DIR to evaluate (default: DIR/val, else all of DIR; "
                             "0.2 on the embedded set)")
    parser.add_argument("--per-class", type=int, default=600, help="embedded set: images per class (as trained)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "cpp", "triton"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CPU, fp16 on GPU")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return parser


def preprocess_of(checkpoint: dict, path: str) -> Preprocess:
    saved = checkpoint.get("preprocess")
    if not isinstance(saved, dict):
        raise ckpt.CheckpointError(f"checkpoint {path!r} has no preprocessing settings; it was not written by "
                                   "xception.train")
    return Preprocess(int(saved["img_size"]), tuple(saved["mean"]), tuple(saved["std"]), float(saved["crop_pct"]))


def evaluation_set(args: argparse.Namespace, preprocess: Preprocess, classes: List[str]):
    if args.data is None:
        _, val = synthetic_splits(preprocess, args.per_class, args.val_split or 0.2)
    elif args.val_split:
        _, val = folder_splits(args.data, preprocess, args.val_split)
        if val is None:
            raise DataError(f"--val-split {args.val_split} holds out no images of {args.data!r}")
    else:
        root = os.path.join(args.data, "val") if os.path.isdir(os.path.join(args.data, "val")) else args.data
        found, samples = find_images(root)
        val = ImageFolder(samples, found, preprocess, train=False)
    if list(val.classes) != list(classes):
        raise DataError(f"the classes in the data ({len(val.classes)}: {val.classes[:5]}...) differ from the "
                        f"checkpoint's ({len(classes)}: {classes[:5]}...)")
    return val


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        checkpoint = ckpt.load(args.weights)
        model = ckpt.build_from_checkpoint(checkpoint, args.weights, args.backend)
        preprocess = preprocess_of(checkpoint, args.weights)
        classes = list(checkpoint.get("classes", []))
        dataset = evaluation_set(args, preprocess, classes)
        ctx = Dist(device=pick_device(args.device))
        model = model.to(ctx.device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        batches = [list(range(i, min(i + args.batch_size, len(dataset)))) for i in range(0, len(dataset),
                                                                                       args.batch_size)]
        from .train import make_loader

        result = evaluate_model(model, make_loader(dataset, batches, args.workers), ctx, args.amp, args.channels_last,
                                progress_label="evaluate")
    except (DataError, ckpt.CheckpointError, BackendUnavailableError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result.update(weights=args.weights, model=checkpoint["model"]["name"], data=args.data or "embedded",
                  backend=args.backend)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']} on {result['data']} ({result['images']} images): top-1 {result['top1']:.2f}%  "
              f"top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  {result['images_per_s']:.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
