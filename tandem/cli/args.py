"""Argument types the commands share."""

import argparse


def hot_count(value: str) -> int | str:
    """--gpu-experts: a count >= 0 or "auto"."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or 'auto', got {value!r}")
    return n
