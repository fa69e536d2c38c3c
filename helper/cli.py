"""The command-line parser of both entry scripts: one-line usage errors, every default in
``--help``, and one parse that tells the values from the flags the user typed.

The parser records each flag it is given (its own and its argument groups'), so nothing
here reads argparse's private attributes.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: …)`` to every option's help that does not already state it (as
    the standard ``ArgumentDefaultsHelpFormatter`` does, with ``off`` for a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default is not argparse.SUPPRESS and action.option_strings
                and "default" not in text and action.dest != "help"):
            shown = "off" if action.default is False else action.default
            text += f" (default: {shown})"
        return text


class _RecordingGroup:
    """An argument group that tells its parser about each flag added to it."""

    def __init__(self, group: Any, record: list[argparse.Action]) -> None:
        self._group, self._record = group, record

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = self._group.add_argument(*args, **kwargs)
        self._record.append(action)
        return action


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr and exit status 2, whose
    ``--help`` shows every flag's default, and which knows its flags (:attr:`flags`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.flags: list[argparse.Action] = []  # before super(): it adds --help
        self.building = True  # argparse's own groups (positionals, options) stay plain
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.building = False
        self.suppressed: dict[str, Any] = {}  # the defaults while :meth:`parse` runs

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:  # type: ignore[override]
        action = super().add_argument(*args, **kwargs)
        self.flags.append(action)
        return action

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        group = super().add_argument_group(*args, **kwargs)
        return group if self.building else _RecordingGroup(group, self.flags)

    def format_help(self) -> str:
        """``--help`` during :meth:`parse` shows the real defaults, not the suppressed ones."""
        if not self.suppressed:
            return super().format_help()
        for action in self.flags:
            action.default = self.suppressed.get(action.dest, action.default)
        try:
            return super().format_help()
        finally:
            for action in self.flags:
                if action.dest in self.suppressed:
                    action.default = argparse.SUPPRESS

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    def option_names(self) -> dict[str, str]:
        """Destination → the flag as users write it (``gamma`` → ``-r``, ``nce_k`` → ``--nce_k``)."""
        out = {}
        for action in self.flags:
            if action.option_strings and action.dest != "help":
                short = [o for o in action.option_strings if not o.startswith("--")]
                out[action.dest] = (short or action.option_strings)[0]
        return out

    def parse(self, argv: Optional[Sequence[str]] = None) -> tuple[dict[str, Any], set[str]]:
        """Parses ``argv`` (``sys.argv[1:]`` when None) once.

        Returns:
            Every flag's value (given or default) and the destinations of the flags the user
            wrote (``--resume`` reconciles only those with the saved run).
        """
        defaults = {}
        for action in self.flags:
            if action.dest != "help":
                defaults[action.dest] = action.default
                action.default = argparse.SUPPRESS  # only what is typed lands in the namespace
        self.suppressed = defaults
        try:
            given = vars(self.parse_args(list(argv) if argv is not None else None))
        finally:
            self.suppressed = {}
            for action in self.flags:
                if action.dest in defaults:
                    action.default = defaults[action.dest]
        values = {dest: self._converted(dest, value) for dest, value in defaults.items()}
        values.update(given)
        return values, set(given)

    def _converted(self, dest: str, default: Any) -> Any:
        """A default as argparse would give it: a string default goes through the flag's type."""
        action = next(a for a in self.flags if a.dest == dest)
        if isinstance(default, str) and action.type is not None:
            return action.type(default)
        return default


def option_names(parser: OneLineParser) -> dict[str, str]:
    """Destination → the flag as users write it (see :meth:`OneLineParser.option_names`)."""
    return parser.option_names()
