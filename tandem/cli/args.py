"""Argument types the commands share."""

import argparse


def step_tokens(value: str) -> int | str:
    """--max-step-tokens: a count or "auto" (the commands check the count's range, with advice)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or 'auto', got {value!r}") from None


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
