"""What a command says while it works: notes and warnings on stderr, progress bars.

The library reports through these two functions only, so a caller (the CLI, a test, a script)
sees every note in one place and can turn progress bars off with one flag.
"""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def notify(message: str) -> None:
    """A note or warning for the user, on stderr (stdout stays for results)."""
    print(message, file=sys.stderr, flush=True)


def progress(iterable: Iterable[T] | None = None, desc: str = "", enabled: bool = True, total: int | None = None):
    """A tqdm bar that disappears when done; `enabled=False` shows nothing."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False)
