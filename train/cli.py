"""Shared command-line behaviour: user errors become one line on stderr and exit code 2.

Hydra catches exceptions raised inside a task and prints a long report; a user who mistyped a path should instead
see one line that names the problem. `SystemExit` passes through Hydra untouched, so it is the way out.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable, TypeVar

from hydra.errors import CompactHydraException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

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


def run_app(main: Callable[[], object]) -> None:
    """Call a `@hydra.main` function so that a config Hydra cannot compose (an unknown key or config option, an
    override it cannot parse) ends like any other user error: `error: <what>` as the last stderr line, exit code 2.

    Hydra reports these itself, but with exit code 1 and a hint about HYDRA_FULL_ERROR as the last line, and lets
    them propagate only when HYDRA_FULL_ERROR=1, which is therefore set here. Hydra's own detail (a group's
    options, how to add a key) is still printed above the error line; any other exception keeps its full
    traceback, as a bug should.
    """
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except CompactHydraException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else None
        print(*(str(e) for e in (exc, cause) if e is not None), sep="\n", file=sys.stderr)
        print(f"error: {_summary(exc, cause)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _summary(exc: CompactHydraException, cause: OmegaConfBaseException | None) -> str:
    """One line for a Hydra error; ours when a UserError of ours caused it (e.g. a plugin's constructor raised)."""
    if isinstance(exc.__cause__, UserError):
        return str(exc.__cause__)
    summary = _first_line(exc)
    if isinstance(exc, OverrideParseException):  # its message does not repeat the override
        summary = f"{exc.override}: {summary}"
    if cause is not None:
        summary = f"{summary.rstrip('.')}: {_first_line(cause)}"
    return summary


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def print_warning(message: str) -> None:
    """A problem a command works around (e.g. a corrupt cache it rebuilds): `warning: <message>`, one line on
    stderr, where the user also looks for errors (Hydra sends log records to stdout)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def print_result_line(line: str) -> None:
    """Print the machine-readable last stdout line of a command (flushed, so it really is last)."""
    sys.stderr.flush()
    print(line, flush=True)
