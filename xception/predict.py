"""The top-5 classes of one or more images under a trained checkpoint.

    python -m xception.predict photo.jpg --weights runs/train/best.pt
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from kernels import BackendUnavailableError

from . import checkpoint as ckpt
from .data import DataError, eval_transform_pil, load_image
from .engine import pick_device
from .evaluate import preprocess_of


def predict(model: torch.nn.Module, images: torch.Tensor, classes: List[str], k: int = 5):
    """``images``: ``(N, 3, H, W)`` preprocessed. Returns per image a list of ``(class name, probability)``."""
    with torch.no_grad():
        probabilities = model(images).float().softmax(dim=1)
    top = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
    return [[(classes[int(i)], float(p)) for p, i in zip(values, indices)]
            for values, indices in zip(top.values, top.indices)]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xception.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--weights", required=True, help="checkpoint written by xception.train")
    parser.add_argument("--top", type=int, default=5, help="how many classes to print (default: 5)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "cpp", "triton"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        checkpoint = ckpt.load(args.weights)
        device = pick_device(args.device)
        model = ckpt.build_from_checkpoint(checkpoint, args.weights, args.backend).to(device)
        preprocess = preprocess_of(checkpoint, args.weights)
        classes = list(checkpoint.get("classes", []))
        if len(classes) != model.num_classes:
            raise ckpt.CheckpointError(f"checkpoint {args.weights!r} names {len(classes)} classes for a "
                                       f"{model.num_classes}-class model")
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
