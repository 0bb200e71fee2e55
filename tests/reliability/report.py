"""``tests/reliability/REPORT.md``: what the suite held, injected, tried and lost.

Each case adds a :class:`Section` (keyed by its number in issue 17) while it
runs; at the end of the session the report is rewritten with this run's
sections, keeping the previous run's for cases that did not run (a partial
``./scripts/test tests/reliability/test_4_load.py`` refreshes only case 4).
"""

from __future__ import annotations

import datetime as _dt
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

REPORT_PATH = Path(__file__).with_name("REPORT.md")
_HEADING = re.compile(r"^## (\d+)\. ", re.MULTILINE)


@dataclass
class Section:
    """One case's figures: rows of (what, figure) plus free lines."""

    number: int
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, what: str, figure: object) -> None:
        if isinstance(figure, dict):
            figure = ", ".join(f"{key}: {value}" for key, value in figure.items())
        self.rows.append((what, str(figure)))

    def note(self, line: str) -> None:
        self.notes.append(line)

    def render(self) -> str:
        out = [f"## {self.number}. {self.title}", ""]
        if self.rows:
            out += ["| what | figure |", "|---|---|"]
            out += [f"| {what} | {figure.replace('|', '/')} |" for what, figure in self.rows]
            out.append("")
        out += [f"- {line}" for line in self.notes]
        return "\n".join(out).rstrip() + "\n"


SECTIONS: dict[int, Section] = {}


def section(number: int, title: str) -> Section:
    """The section of case ``number`` for this run (a fresh one the first time)."""
    found = SECTIONS.get(number)
    if found is None or found.title != title:
        found = SECTIONS[number] = Section(number, title)
    return found


def _previous() -> dict[int, str]:
    try:
        text = REPORT_PATH.read_text(encoding="utf-8")
    except OSError:
        return {}
    starts = [(int(m.group(1)), m.start()) for m in _HEADING.finditer(text)]
    kept: dict[int, str] = {}
    for index, (number, start) in enumerate(starts):
        end = starts[index + 1][1] if index + 1 < len(starts) else len(text)
        kept[number] = text[start:end].rstrip() + "\n"
    return kept


def write_report() -> None:
    """Rewrite REPORT.md: this run's sections, the previous run's for the others."""
    if not SECTIONS:
        return
    merged = _previous()
    for number, sec in SECTIONS.items():
        merged[number] = sec.render()
    when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        "# Reliability report\n\n"
        "Written by `tests/reliability/` (`./scripts/test tests/reliability`): every case runs "
        "against `ghar-core serve` on loopback with a PostgreSQL, a PgBouncer (transaction "
        "mode) and a local identity provider of the suite's own. Figures are from the last "
        f"run ({when}, {platform.python_implementation()} {platform.python_version()}, "
        "a shared 2-core machine); sections of cases not run then are kept from earlier runs. "
        "Latencies are client-side wall times in milliseconds.\n"
    )
    body = "\n".join(merged[number] for number in sorted(merged))
    REPORT_PATH.write_text(header + "\n" + _summary(body) + "\n" + body, encoding="utf-8")


def _summary(body: str) -> str:
    """What was lost in each case, and the defects still open, gathered from the sections."""
    lines = ["## Summary", ""]
    opened: list[str] = []
    for part in re.split(r"^(?=## \d+\. )", body, flags=re.MULTILINE):
        heading = _HEADING.match(part)
        if heading is None:
            continue
        lost = re.search(r"^\| lost \| (.*) \|$", part, re.MULTILINE)
        if lost is not None:
            lines.append(f"- case {heading.group(1)}, lost: {lost.group(1)}")
        opened += re.findall(r"^- OPEN (.*)$", part, re.MULTILINE)
    lines += [f"- open {what}" for what in opened] or ["- open defects: none"]
    return "\n".join(lines) + "\n"
