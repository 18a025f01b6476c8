"""Shared command-line behaviour: user errors become one line on stderr and exit code 2.

Hydra catches exceptions raised inside a task and prints a long report; a user who mistyped a path should instead
see one line that names the problem. `SystemExit` passes through Hydra untouched, so it is the way out.
"""
from __future__ import annotations

import functools
import logging
import sys
from typing import Callable, TypeVar

from train.errors import UserError

F = TypeVar("F", bound=Callable[..., object])


def exit_on_user_error(main: F) -> F:
    """Run `main`; turn a `UserError` into `error: <message>` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            logging.getLogger(main.__module__).debug("user error", exc_info=True)
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]


def print_result_line(line: str) -> None:
    """Print the machine-readable last stdout line of a command (flushed, so it really is last)."""
    sys.stderr.flush()
    print(line, flush=True)
