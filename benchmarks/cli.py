"""Argument types shared by the benchmark commands: a bad value is an argparse error naming it."""

from __future__ import annotations

import argparse
from typing import List, Sequence


def choices(kind: str, allowed: Sequence[str]):
    """An argparse type: a comma-separated list, each item in ``allowed`` (duplicates dropped, order kept)."""
    def parse(text: str) -> List[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{kind}: empty list {text!r}")
        for item in items:
            if item not in allowed:
                raise argparse.ArgumentTypeError(f"unknown {kind} {item!r}; choose from {', '.join(allowed)}")
        return list(dict.fromkeys(items))
    return parse


def positive_ints(text: str) -> List[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
