"""Data for training and evaluation: an ImageFolder reader, an embedded synthetic set, transforms, sharding.

Everything here is plain PIL and torch (no torchvision); PIL is imported only when an image file is
read, so the embedded set and ``--help`` work without it. Random augmentation
draws from a generator seeded by ``(seed, epoch, index)``, never from a global
RNG, so an epoch's batches are the same whatever the number of workers, and a
run resumed mid-epoch sees exactly the images the uninterrupted run saw.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

SYNTHETIC_CLASSES = ("circle", "ring", "square", "triangle", "cross", "diamond",
                     "stripes", "checkerboard", "dots", "grid")


class DataError(ValueError):
    """The data cannot be used (missing or empty folder, unreadable image); the message says which."""


@dataclass(frozen=True)
class Preprocess:
    """timm-style preprocessing: ``img_size`` crops, ``crop_pct`` for eval, ``(x/255 - mean) / std``."""

    img_size: int
    mean: Tuple[float, ...] = (0.5, 0.5, 0.5)
    std: Tuple[float, ...] = (0.5, 0.5, 0.5)
    crop_pct: float = 0.8975
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5

    @property
    def resize_size(self) -> int:
        """The shorter side an eval image is resized to before its center crop."""
        return int(math.floor(self.img_size / self.crop_pct))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: ``(..., 3, H, W)`` uint8 to float32, normalized."""
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (images.float() / 255.0 - mean) / std


def sample_crop(height: int, width: int, scale: Tuple[float, float], ratio: Tuple[float, float],
                generator: torch.Generator) -> Tuple[int, int, int, int]:
    """A random-resized-crop box ``(top, left, h, w)``: area fraction in ``scale``, aspect in ``ratio``.

    Ten tries, then the largest center crop with an aspect inside ``ratio`` (as timm/torchvision do).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        draws = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(draws[2] * (height - h + 1))
            left = int(draws[3] * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch (a fixed mix, independent of workers and ranks)."""
    return (((seed * 1_000_003) ^ (epoch * 998_244_353)) * 1_000_000_007 + index) % (2 ** 63 - 1)


class SyntheticShapes(torch.utils.data.Dataset):
    """The embedded data set: procedurally drawn shapes and textures, generated in memory.

    ``per_class`` images of each of :data:`SYNTHETIC_CLASSES`, ``size`` x ``size``
    RGB uint8, random colours, positions, sizes, angles and noise, fully
    determined by ``seed``. Items are ``(image, label)`` with ``image`` the
    transformed float tensor ``(3, img_size, img_size)``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                 preprocess: Preprocess, train: bool, seed: int = 0) -> None:
        self.images = images
        self.labels = labels
        self.classes = list(classes)
        self.preprocess = preprocess
        self.train = train
        self.seed = seed

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image = self.images[index]
        if self.train:
            image = train_transform_tensor(image, self.preprocess, sample_seed(self.seed, epoch, index))
        else:
            image = eval_transform_tensor(image, self.preprocess)
        return image, int(self.labels[index])


def _resize_tensor(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image.float()
    resized = F.interpolate(image.float().unsqueeze(0), size=size, mode="bicubic", align_corners=False,
                            antialias=True)
    return resized.squeeze(0).clamp_(0, 255)


def train_transform_tensor(image: torch.Tensor, preprocess: Preprocess, seed: int) -> torch.Tensor:
    """Random resized crop + horizontal flip + normalize of a ``(3, H, W)`` uint8 tensor."""
    generator = torch.Generator().manual_seed(seed)
    top, left, h, w = sample_crop(image.shape[-2], image.shape[-1], preprocess.scale, preprocess.ratio, generator)
    crop = _resize_tensor(image[:, top:top + h, left:left + w], (preprocess.img_size, preprocess.img_size))
    if torch.rand((), generator=generator).item() < preprocess.hflip:
        crop = crop.flip(-1)
    return preprocess.normalize(crop)


def eval_transform_tensor(image: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """Resize the shorter side to ``img_size / crop_pct``, center crop ``img_size``, normalize."""
    height, width = image.shape[-2:]
    short = preprocess.resize_size
    if height <= width:
        size = (short, max(short, int(round(width * short / height))))
    else:
        size = (max(short, int(round(height * short / width))), short)
    image = _resize_tensor(image, size)
    top = (size[0] - preprocess.img_size) // 2
    left = (size[1] - preprocess.img_size) // 2
    return preprocess.normalize(image[:, top:top + preprocess.img_size, left:left + preprocess.img_size])


# --------------------------------------------------------------------------- the embedded set


def _rotate(x: torch.Tensor, y: torch.Tensor, angle: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    cos, sin = torch.cos(angle), torch.sin(angle)
    return x * cos + y * sin, -x * sin + y * cos


def _draw_class(kind: int, count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` masks ``(count, size, size)`` in [0, 1] of class ``kind``."""
    def uniform(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(count, 1, 1, generator=generator))

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y = coords.view(1, size, 1).expand(count, size, size)
    x = coords.view(1, 1, size).expand(count, size, size)
    name = SYNTHETIC_CLASSES[kind]
    angle = uniform(0.0, math.pi)
    if name in ("stripes", "checkerboard", "dots", "grid"):
        period = uniform(0.12, 0.28)
        u, v = _rotate(x - uniform(0, 1), y - uniform(0, 1), angle)
        if name == "stripes":
            return (torch.sin(2 * math.pi * u / period) > 0).float()
        if name == "checkerboard":
            return ((torch.floor(u / period) + torch.floor(v / period)) % 2).float()
        fu = u / period - torch.floor(u / period) - 0.5
        fv = v / period - torch.floor(v / period) - 0.5
        if name == "dots":
            return (fu ** 2 + fv ** 2 < uniform(0.06, 0.1)).float()
        line = uniform(0.08, 0.14)
        return ((fu.abs() < line) | (fv.abs() < line)).float()
    # A single shape inside the central crop: radius r, center keeping it within the image's inner 84%.
    radius = uniform(0.16, 0.3)
    cx = 0.08 + radius + (0.84 - 2 * radius) * torch.rand(count, 1, 1, generator=generator)
    cy = 0.08 + radius + (0.84 - 2 * radius) * torch.rand(count, 1, 1, generator=generator)
    dx, dy = x - cx, y - cy
    dist = torch.sqrt(dx ** 2 + dy ** 2)
    if name == "circle":
        return (dist < radius).float()
    if name == "ring":
        return ((dist < radius) & (dist > radius * uniform(0.45, 0.7))).float()
    if name == "square":
        u, v = _rotate(dx, dy, uniform(-0.3, 0.3))
        return ((u.abs() < radius * 0.85) & (v.abs() < radius * 0.85)).float()
    if name == "diamond":
        u, v = _rotate(dx, dy, uniform(-0.3, 0.3))
        return (u.abs() + v.abs() < radius * 1.1).float()
    if name == "cross":
        u, v = _rotate(dx, dy, angle)
        arm = radius * uniform(0.22, 0.35)
        return (((u.abs() < arm) & (v.abs() < radius)) | ((v.abs() < arm) & (u.abs() < radius))).float()
    if name == "triangle":
        u, v = _rotate(dx, dy, angle)
        inside = torch.ones_like(u, dtype=torch.bool)
        for k in range(3):  # three half-planes whose normals point 120 degrees apart
            theta = 2 * math.pi * k / 3
            inside &= (u * math.cos(theta) + v * math.sin(theta)) < radius * 0.5
        return inside.float()
    raise AssertionError(name)


def make_synthetic(per_class: int = 600, size: int = 80, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The embedded images ``(10 * per_class, 3, size, size)`` uint8 and labels ``(10 * per_class,)`` int64.

    Foreground and background colours differ by at least 0.35 in some channel; Gaussian noise
    (sigma up to 0.08) is added. Deterministic in ``seed``.
    """
    if per_class < 1 or size < 16:
        raise ValueError(f"per_class must be >= 1 and size >= 16, got per_class={per_class}, size={size}")
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for kind in range(len(SYNTHETIC_CLASSES)):
        mask = _draw_class(kind, per_class, size, generator).unsqueeze(1)
        background = torch.rand(per_class, 3, 1, 1, generator=generator)
        foreground = torch.rand(per_class, 3, 1, 1, generator=generator)
        gap = (foreground - background).abs().amax(dim=1, keepdim=True)
        shift = torch.where(background > 0.5, -0.5, 0.5)
        foreground = torch.where(gap < 0.35, (background + shift).clamp(0, 1), foreground)
        noise = torch.randn(per_class, 3, size, size, generator=generator) * (
            0.08 * torch.rand(per_class, 1, 1, 1, generator=generator))
        picture = background + mask * (foreground - background) + noise
        images.append((picture.clamp(0, 1) * 255).round().to(torch.uint8))
        labels.append(torch.full((per_class,), kind, dtype=torch.int64))
    order = torch.randperm(len(SYNTHETIC_CLASSES) * per_class, generator=generator)
    return torch.cat(images)[order], torch.cat(labels)[order]


def synthetic_splits(preprocess: Preprocess, per_class: int = 600, val_split: float = 0.2,
                     seed: int = 0) -> Tuple[SyntheticShapes, SyntheticShapes]:
    """The embedded train and validation sets (the data is fixed: ``seed`` only seeds augmentation)."""
    if not 0.0 < val_split < 1.0:
        raise ValueError(f"val_split must be in (0, 1) for the embedded set, got {val_split}")
    images, labels = make_synthetic(per_class, size=preprocess.resize_size, seed=1234)
    num_val = int(round(len(labels) * val_split))
    train = SyntheticShapes(images[num_val:], labels[num_val:], SYNTHETIC_CLASSES, preprocess, True, seed)
    val = SyntheticShapes(images[:num_val], labels[:num_val], SYNTHETIC_CLASSES, preprocess, False, seed)
    return train, val


# --------------------------------------------------------------------------- image folders


def find_images(root: str) -> Tuple[List[str], List[Tuple[str, int]]]:
    """Class names (sorted subfolder names) and ``(path, label)`` samples of an ImageFolder tree."""
    if not os.path.isdir(root):
        raise DataError(f"data folder {root!r} does not exist or is not a directory")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    samples = []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(folder, file), label))
    if not samples:
        raise DataError(f"data folder {root!r} holds no images: expected class subfolders with "
                        f"{', '.join(IMAGE_EXTENSIONS)} files (found {len(classes)} subfolders)")
    return classes, samples


def pil_image_module():
    """``PIL.Image``, or a ``DataError`` saying that reading image files needs pillow."""
    try:
        from PIL import Image
    except ImportError as error:
        raise DataError(f"reading image files needs pillow, which is not installed here ({error}): "
                        "pip install pillow") from error
    return Image


def load_image(path: str) -> Image.Image:
    """The image at ``path`` as RGB; a ``DataError`` naming the file if it cannot be read."""
    Image = pil_image_module()  # noqa: N806 - the module, named as PIL names it
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path!r}: {type(error).__name__}: {error}") from error


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1)


def train_transform_pil(image: Image.Image, preprocess: Preprocess, seed: int) -> torch.Tensor:
    Image = pil_image_module()  # noqa: N806
    generator = torch.Generator().manual_seed(seed)
    top, left, h, w = sample_crop(image.height, image.width, preprocess.scale, preprocess.ratio, generator)
    image = image.resize((preprocess.img_size, preprocess.img_size), Image.BICUBIC,
                         box=(left, top, left + w, top + h))
    if torch.rand((), generator=generator).item() < preprocess.hflip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return preprocess.normalize(_pil_to_tensor(image))


def eval_transform_pil(image: Image.Image, preprocess: Preprocess) -> torch.Tensor:
    Image = pil_image_module()  # noqa: N806
    short = preprocess.resize_size
    if image.width <= image.height:
        size = (short, max(short, int(round(image.height * short / image.width))))
    else:
        size = (max(short, int(round(image.width * short / image.height))), short)
    image = image.resize(size, Image.BICUBIC)
    left = (size[0] - preprocess.img_size) // 2
    top = (size[1] - preprocess.img_size) // 2
    image = image.crop((left, top, left + preprocess.img_size, top + preprocess.img_size))
    return preprocess.normalize(_pil_to_tensor(image))


class ImageFolder(torch.utils.data.Dataset):
    """``root/<class>/**/<image>`` read with PIL; items ``(image (3, img_size, img_size), label)``."""

    def __init__(self, samples: Sequence[Tuple[str, int]], classes: Sequence[str], preprocess: Preprocess,
                 train: bool, seed: int = 0) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.preprocess = preprocess
        self.train = train
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[index]
        pil_image_module()  # a missing pillow stops the run; an unreadable file is skipped
        try:
            image = load_image(path)
        except DataError as error:
            return Unreadable(path, str(error))
        if self.train:
            return train_transform_pil(image, self.preprocess, sample_seed(self.seed, epoch, index)), label
        return eval_transform_pil(image, self.preprocess), label


def folder_splits(root: str, preprocess: Preprocess, val_split: float = 0.0,
                  seed: int = 0) -> Tuple[ImageFolder, Optional[ImageFolder]]:
    """Train and validation sets of an ImageFolder tree.

    With ``root/train`` and ``root/val`` subfolders those are used; otherwise
    ``val_split`` of ``root``'s images (a fixed random subset) is held out, or
    none when it is 0.
    """
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        classes, train_samples = find_images(train_dir)
        val_classes, val_samples = find_images(val_dir)
        if val_classes != classes:
            raise DataError(f"class folders of {train_dir!r} and {val_dir!r} differ: "
                            f"{sorted(set(classes) ^ set(val_classes))}")
    else:
        classes, samples = find_images(root)
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"val_split must be in [0, 1), got {val_split}")
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(1234)).tolist()
        num_val = int(round(len(samples) * val_split))
        val_samples = [samples[i] for i in sorted(order[:num_val])]
        train_samples = [samples[i] for i in sorted(order[num_val:])]
        if not train_samples:
            raise DataError(f"val_split={val_split} leaves no training images in {root!r}")
    train = ImageFolder(train_samples, classes, preprocess, True, seed)
    val = ImageFolder(val_samples, classes, preprocess, False, seed) if val_samples else None
    return train, val


# --------------------------------------------------------------------------- batching and sharding


class ShardedBatches(torch.utils.data.Sampler):
    """The micro-batches one rank reads in one epoch, as lists of ``(index, epoch)``.

    Each epoch permutes the data set with ``seed + epoch`` (or keeps its order
    when ``shuffle`` is False) and cuts it into global batches of
    ``global_batch`` samples (the last, partial one dropped when ``drop_last``).
    A global batch is split into ``world_size * accum_steps`` equal consecutive
    chunks: rank ``r`` reads chunks ``r * accum_steps ... (r + 1) * accum_steps - 1``.
    So one process accumulating ``W`` micro-batches computes what ``W`` ranks do.
    ``start_step`` skips the first global batches (a resumed epoch).
    """

    def __init__(self, size: int, global_batch: int, world_size: int = 1, rank: int = 0, accum_steps: int = 1,
                 shuffle: bool = True, seed: int = 0, epoch: int = 0, start_step: int = 0,
                 drop_last: bool = True) -> None:
        chunks = world_size * accum_steps
        if global_batch < 1 or global_batch % chunks:
            raise ValueError(f"batch size {global_batch} must be a positive multiple of world size x accum steps "
                             f"= {world_size} x {accum_steps}")
        self.size, self.global_batch, self.world_size, self.rank = size, global_batch, world_size, rank
        self.accum_steps, self.shuffle, self.seed, self.epoch = accum_steps, shuffle, seed, epoch
        self.start_step, self.drop_last = start_step, drop_last
        self.micro_batch = global_batch // chunks

    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.size // self.global_batch
        return math.ceil(self.size / self.global_batch)

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch() - self.start_step) * self.accum_steps

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        for step in range(self.start_step, self.steps_per_epoch()):
            batch = order[step * self.global_batch:(step + 1) * self.global_batch]
            for micro in range(self.accum_steps):
                start = (self.rank * self.accum_steps + micro) * self.micro_batch
                yield [(int(i), self.epoch) for i in batch[start:start + self.micro_batch]]


@dataclass(frozen=True)
class Unreadable:
    """What a data set returns for an image it cannot read (the loader skips it; see :class:`SkippedImages`)."""

    path: str
    reason: str


def collate(batch) -> Tuple[Optional[torch.Tensor], torch.Tensor, List[Unreadable]]:
    """``(images (N, 3, H, W), labels (N,), unreadable)``: the readable items stacked (images is None when
    there are none), the unreadable ones listed."""
    unreadable = [item for item in batch if isinstance(item, Unreadable)]
    items = [item for item in batch if not isinstance(item, Unreadable)]
    images = torch.stack([image for image, _ in items]) if items else None
    return images, torch.tensor([label for _, label in items], dtype=torch.int64), unreadable


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class SkippedImages:
    """Images skipped because they cannot be read: each is named once, and more than ``max_fraction`` of
    the ``dataset_size`` images stops the run with a ``DataError``."""

    def __init__(self, dataset_size: int, max_fraction: float, report: Callable[[str], None] = _warn) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"--max-bad-images must be in [0, 1], got {max_fraction}")
        self.dataset_size, self.max_fraction, self.report = dataset_size, max_fraction, report
        self.limit = int(max_fraction * dataset_size)
        self.reasons: dict = {}

    def __len__(self) -> int:
        return len(self.reasons)

    def add(self, unreadable: Sequence[Unreadable]) -> None:
        for item in unreadable:
            if item.path in self.reasons:
                continue
            self.reasons[item.path] = item.reason
            if len(self.reasons) > self.limit:
                raise DataError(f"{len(self.reasons)} unreadable images, more than --max-bad-images "
                                f"{self.max_fraction} of {self.dataset_size} images allows ({self.limit}); "
                                f"the last: {item.reason}")
            self.report(f"skipping it: {item.reason} ({len(self.reasons)} skipped so far, at most "
                        f"{self.limit} allowed)")
