"""Argument types the commands share."""

import argparse
import os
from pathlib import Path

from tandem.errors import TandemError


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


def check_threads(flag: str, n: int | None) -> None:
    """A thread count: None (the default) or 1..4 per core this process may use."""
    if n is None:
        return
    from tandem.ops.cpu import MAX_THREADS_PER_CORE

    cores = len(os.sched_getaffinity(0))
    if not 1 <= n <= MAX_THREADS_PER_CORE * cores:
        raise TandemError(f"{flag} must be in 1..{MAX_THREADS_PER_CORE * cores} ({MAX_THREADS_PER_CORE} per core of "
                          f"the {cores} this process may use), got {n}")


def _short(path: str, limit: int = 80) -> str:
    return repr(path) if len(path) <= limit else repr(path[:limit]) + f"... ({len(path)} characters)"


def check_path(what: str, path: str | None) -> None:
    """Refuse, in one line, a path the OS cannot even look up (a name too long, a folder above it
    that may not be searched); a missing one is left to the command, which says what it should be."""
    if path is None:
        return
    if not path:
        raise TandemError(f"{what} is empty: give a path")
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as e:
        raise TandemError(f"{what} {_short(path)}: {e.strerror}") from None


def check_output(flag: str, path: str | None) -> None:
    """A file the command will write: refused before the work, not after it."""
    if path is None:
        return
    check_path(flag, path)
    p = Path(path)
    if p.is_dir():
        raise TandemError(f"{flag} {_short(path)} is a folder: give the name of a file to write")
    if not p.parent.is_dir():
        raise TandemError(f"{flag} {_short(path)}: the folder {_short(str(p.parent))} does not exist")
