"""Top-1 / top-5 accuracy and images/s of a trained model.

    python -m xception.evaluate --weights runs/train/RUN/best.pt      # the split that run held out
    python -m xception.evaluate --weights best.pt --data DIR [--val-split 0.1]
    python -m xception.evaluate --weights legacy_xception.pth --data IMAGENET_VAL_DIR

A checkpoint written by ``xception.train`` brings its model, classes,
preprocessing (image size, crop_pct, mean/std) and data settings: without
``--data`` the embedded set's validation split of that run (its --per-class and
--val-split); with the run's own ``--data`` its hold-out. Other weights files
(``xception.save_weights``, timm ``legacy_xception``, Cadene, ``.safetensors``)
are matched to a model by their names and shapes; they carry no class names, so
the data's sorted class folders are taken as the classifier's classes in order,
and the preprocessing is the model's default (299 px, crop 0.8975, mean/std 0.5)
unless ``--img-size`` says otherwise. With ``--data``, ``DIR/val`` is used when it
exists, else the ``--val-split`` hold-out of ``DIR``, else all of ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

import torch

from kernels import BackendUnavailableError

from . import checkpoint as ckpt
from .data import DataError, ImageFolder, Preprocess, SkippedImages, find_images, folder_splits, synthetic_splits
from .engine import Dist, at_least, evaluate_model, pick_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m xception.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, metavar="FILE",
                        help="a checkpoint of xception.train, or weights in any layout xception.load_weights reads")
    parser.add_argument("--data", help="ImageFolder root; omitted: the embedded validation split")
    parser.add_argument("--val-split", type=float, default=None,
                        help="hold-out fraction of DIR to evaluate (default: as trained when DIR is the run's data, "
                             "else DIR/val, else all of DIR; on the embedded set: as trained, else 0.2)")
    parser.add_argument("--per-class", type=at_least(1), default=None,
                        help="embedded set: images per class (default: as trained, else 600)")
    parser.add_argument("--model", default=None, choices=("xception", "xception_tiny"),
                        help="the model of a weights file without one (default: found from its names and shapes)")
    parser.add_argument("--img-size", type=at_least(32), default=None,
                        help="eval crop size (default: as trained, else the model's 299)")
    parser.add_argument("--max-bad-images", type=float, default=0.01, metavar="FRACTION",
                        help="skip unreadable images with a warning; stop past this fraction (default: 0.01)")
    parser.add_argument("--batch-size", type=at_least(1), default=100)
    parser.add_argument("--workers", type=at_least(0), default=0)
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "cpp", "triton"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CPU, fp16 on GPU")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=at_least(1), default=None)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return parser


def preprocess_of(saved: Dict[str, Any], model: torch.nn.Module, img_size: Optional[int] = None) -> Preprocess:
    """The preprocessing a checkpoint saved, else the model's default config; ``img_size`` overrides the size."""
    settings = saved.get("preprocess")
    if isinstance(settings, dict):
        return Preprocess(int(img_size or settings["img_size"]), tuple(settings["mean"]), tuple(settings["std"]),
                          float(settings["crop_pct"]))
    cfg = model.default_cfg
    return Preprocess(int(img_size or cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]),
                      float(cfg["crop_pct"]))


def data_settings(args: argparse.Namespace, trained: Dict[str, Any]) -> Dict[str, Any]:
    """``--data``, ``--val-split`` and ``--per-class`` with the unset ones taken from the run that trained the
    model (``trained``: its saved arguments) where they describe the same data; ``source`` says which."""
    same_data = (args.data is None and trained and trained.get("data") is None) or (
        args.data is not None and trained.get("data") is not None
        and os.path.abspath(args.data) == os.path.abspath(trained["data"]))
    settings = {"data": args.data, "val_split": args.val_split, "per_class": args.per_class, "as_trained": []}
    for name in ("val_split", "per_class"):
        if settings[name] is None and same_data and trained.get(name) is not None:
            settings[name] = trained[name]
            settings["as_trained"].append(name)
    if settings["per_class"] is None:
        settings["per_class"] = 600
    if args.data is None and settings["val_split"] is None:
        settings["val_split"] = 0.2
    return settings


def evaluation_set(settings: Dict[str, Any], preprocess: Preprocess, classes: Optional[List[str]],
                   num_classes: int):
    data, val_split = settings["data"], settings["val_split"]
    if data is None:
        _, val = synthetic_splits(preprocess, settings["per_class"], val_split)
    elif val_split and not os.path.isdir(os.path.join(data, "val")):
        _, val = folder_splits(data, preprocess, val_split)
        if val is None:
            raise DataError(f"--val-split {val_split} holds out no images of {data!r}")
    else:
        root = os.path.join(data, "val") if os.path.isdir(os.path.join(data, "val")) else data
        found, samples = find_images(root)
        val = ImageFolder(samples, found, preprocess, train=False)
    if classes is not None and list(val.classes) != list(classes):
        raise DataError(f"the classes in the data ({len(val.classes)}: {val.classes[:5]}...) differ from the "
                        f"checkpoint's ({len(classes)}: {classes[:5]}...)")
    if len(val.classes) != num_classes:
        raise DataError(f"the data has {len(val.classes)} classes, the model's classifier {num_classes}")
    return val


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        model, saved = ckpt.load_for_inference(args.weights, args.backend, args.model)
        preprocess = preprocess_of(saved, model, args.img_size)
        classes = list(saved["classes"]) if "classes" in saved else None
        settings = data_settings(args, saved.get("args") or {})
        dataset = evaluation_set(settings, preprocess, classes, model.num_classes)
        if classes is None and not args.json:
            print(f"{args.weights} names no classes: the data's {len(dataset.classes)} sorted class folders are "
                  "taken as the classifier's classes, in order", file=sys.stderr)
        if settings["as_trained"]:
            print("as trained: " + ", ".join(f"--{name.replace('_', '-')} {settings[name]}"
                                             for name in settings["as_trained"]), file=sys.stderr)
        ctx = Dist(device=pick_device(args.device))
        model = model.to(ctx.device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        batches = [list(range(i, min(i + args.batch_size, len(dataset)))) for i in range(0, len(dataset),
                                                                                       args.batch_size)]
        from .train import make_loader

        skipped = SkippedImages(len(dataset), args.max_bad_images)
        result = evaluate_model(model, make_loader(dataset, batches, args.workers), ctx, args.amp, args.channels_last,
                                progress_label="evaluate", skipped=skipped)
    except (DataError, ckpt.CheckpointError, BackendUnavailableError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result.update(weights=args.weights, model=saved["model_name"], data=args.data or "embedded", backend=args.backend,
                  img_size=preprocess.img_size, val_split=settings["val_split"], skipped_images=len(skipped),
                  **({"per_class": settings["per_class"]} if args.data is None else {}))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']} on {result['data']} ({result['images']} images): top-1 {result['top1']:.2f}%  "
              f"top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  {result['images_per_s']:.1f} images/s"
              + (f"  ({len(skipped)} unreadable images skipped)" if len(skipped) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
