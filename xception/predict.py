"""The top-5 classes of one or more images under a trained model.

    python -m xception.predict photo.jpg --weights runs/train/RUN/best.pt
    python -m xception.predict photo.jpg --weights legacy_xception.pth --classes imagenet_classes.txt

A checkpoint written by ``xception.train`` brings its class names and
preprocessing. Other weights files (``xception.save_weights``, timm
``legacy_xception``, Cadene, ``.safetensors``) carry neither: ``--classes FILE``
(one name a line, in the classifier's order) names the classes, else they print
as ``class <index>``; the preprocessing is the model's default unless
``--img-size`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from kernels import BackendUnavailableError

from . import checkpoint as ckpt
from .data import DataError, eval_transform_pil, load_image
from .engine import at_least, pick_device
from .evaluate import preprocess_of


def predict(model: torch.nn.Module, images: torch.Tensor, classes: List[str], k: int = 5):
    """``images``: ``(N, 3, H, W)`` preprocessed. Returns per image a list of ``(class name, probability)``."""
    with torch.no_grad():
        probabilities = model(images).float().softmax(dim=1)
    top = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
    return [[(classes[int(i)], float(p)) for p, i in zip(values, indices)]
            for values, indices in zip(top.values, top.indices)]


def class_names(path: Optional[str], saved: Optional[List[str]], num_classes: int, weights: str) -> List[str]:
    """``--classes FILE`` (one name a line), else the checkpoint's names, else ``class <index>``."""
    if path is not None:
        try:
            with open(path) as file:
                names = [line.strip() for line in file if line.strip()]
        except OSError as error:
            raise DataError(f"--classes {path!r}: {type(error).__name__}: {error}") from error
        source = f"--classes {path!r}"
    elif saved is not None:
        names, source = list(saved), f"checkpoint {weights!r}"
    else:
        return [f"class {index}" for index in range(num_classes)]
    if len(names) != num_classes:
        raise DataError(f"{source} names {len(names)} classes for a {num_classes}-class model")
    return names


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xception.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--weights", required=True, metavar="FILE",
                        help="a checkpoint of xception.train, or weights in any layout xception.load_weights reads")
    parser.add_argument("--classes", metavar="FILE", help="class names, one a line, in the classifier's order "
                                                          "(default: the checkpoint's, else 'class <index>')")
    parser.add_argument("--model", default=None, choices=("xception", "xception_tiny"),
                        help="the model of a weights file without one (default: found from its names and shapes)")
    parser.add_argument("--img-size", type=at_least(32), default=None,
                        help="eval crop size (default: as trained, else 299)")
    parser.add_argument("--top", type=at_least(1), default=5, help="how many classes to print (default: 5)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "cpp", "triton"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
        model, saved = ckpt.load_for_inference(args.weights, args.backend, args.model)
        model = model.to(device)
        preprocess = preprocess_of(saved, model, args.img_size)
        classes = class_names(args.classes, saved.get("classes"), model.num_classes, args.weights)
        batch = torch.stack([eval_transform_pil(load_image(path), preprocess) for path in args.images]).to(device)
        results = predict(model, batch, classes, args.top)
    except (DataError, ckpt.CheckpointError, BackendUnavailableError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path, ranked in zip(args.images, results):
        print(path)
        for name, probability in ranked:
            print(f"  {probability:7.2%}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
