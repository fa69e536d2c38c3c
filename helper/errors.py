"""User-facing errors: one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A problem with the user's input or environment (bad flag, missing data or teacher).

    The entry scripts turn it into ``error: <message>`` on stderr and exit status 2.
    """


def exit_on_user_error(main: F) -> F:
    """Decorates an entry point so that :class:`UserError` ends it with one clean line."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
