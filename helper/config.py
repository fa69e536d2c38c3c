"""The validated, read-only configuration of a run (what ``config.json`` holds).

The flags are parsed by :mod:`helper.cli`'s parser, validated and completed by
:mod:`helper.common_flags` (both entry scripts) and ``helper/student_flags.py`` (the
distillation flags), then frozen here.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping


class Config(Mapping[str, Any]):
    """A read-only mapping with attribute access: ``cfg.epochs`` or ``cfg["epochs"]``."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"config has no field {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the configuration is read-only once validated")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def replace(self, **changes: Any) -> "Config":
        """Returns a copy with some fields changed (used only before the run starts)."""
        return Config({**self._values, **changes})
