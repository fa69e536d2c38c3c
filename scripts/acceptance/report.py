"""A section's verdict and the Markdown report of the acceptance run."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Section:
    """One section: its name, whether it passed, a table or lines, and notes.

    Attributes:
        name: the section's title.
        passed: True (pass), False (fail) or None (not run here: ``skipped`` says why).
        rows: table rows (dicts with the same keys), may be empty.
        lines: free lines under the table.
        seconds: wall time of the section.
        skipped: why the section did not run (no CUDA, no torchvision), or "".
    """

    name: str
    passed: bool | None = True
    rows: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str = ""

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIPPED"}[self.passed]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "/")


def table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return out


def markdown(title: str, header: list[str], sections: list[Section]) -> str:
    failed = [s.name for s in sections if s.passed is False]
    lines = [f"# {title}", "", *header, "",
             f"**{len(failed)} failed section(s)**" + (f": {', '.join(failed)}" if failed else ""), "",
             "| section | verdict | seconds |", "|---|---|---|"]
    lines += [f"| {s.name} | {s.verdict} | {s.seconds:.1f} |" for s in sections]
    for s in sections:
        lines += ["", f"## {s.name}: {s.verdict}", ""]
        if s.skipped:
            lines.append(f"Not run: {s.skipped}.")
        lines += table(s.rows)
        if s.rows and s.lines:
            lines.append("")
        lines += [f"- {line}" for line in s.lines]
    return "\n".join(lines) + "\n"


def write(out_dir: str, text: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpu_acceptance.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path
