"""User-facing errors: one line on stderr and a non-zero exit, never a traceback.

A leaf module (standard library only) so that every layer may raise :class:`UserError`:
``dataset/`` for data that cannot be obtained, ``helper/`` for flags, files and runs.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A problem with the user's input or environment (bad flag, missing data or teacher).

    The entry scripts turn it into ``error: <message>`` on stderr and exit status 2.
    """


def exit_on_user_error(main: F) -> F:
    """Decorates an entry point: :class:`UserError` ends it with one clean line (exit 2),
    Ctrl-C with ``interrupted`` (exit 130), and a closed output pipe (``| head``) quietly
    (exit 141, the shell's status for SIGPIPE)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            result = main(*args, **kwargs)
            sys.stdout.flush()  # a pipe closed early fails here, not at interpreter exit
            return result
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except BrokenPipeError:
            silence_stdout()
            sys.exit(141)

    return wrapper  # type: ignore[return-value]


def silence_stdout() -> None:
    """Points stdout at /dev/null, so that the interpreter's last flush after a closed pipe
    raises nothing (the recipe of the Python docs' note on SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced by an object without a file
        pass
