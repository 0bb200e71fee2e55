"""The runner's report: ``latest.md``, ``latest.json`` and one PNG chart per suite.

Everything here reads the suites' JSON files (see ``benchmarks/__init__.py``
for their ``summary`` rows); nothing measures. Charts are horizontal bars of
ratios to each group's baseline, coloured by role, on a log axis when the
ratios span more than a factor of ten, so a 40x peer and a 1.05x overhead
are both readable.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("ours", "baseline", "peer", "reference")
COLOURS = {"ours": "#1f6fb4", "baseline": "#8c8c8c", "peer": "#e07b39", "reference": "#c9c9c9"}
_KEYS = ("group", "label", "role", "value", "unit", "ratio", "better")


@dataclass
class SuiteResult:
    """One suite in the report: how its run went and what it wrote."""

    name: str
    title: str
    status: str  # "ok", "failed (exit N)", "timed out", "not run", "earlier run"
    seconds: float | None = None
    command: str = ""
    results: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def summary(self) -> list[dict[str, Any]]:
        rows = (self.results or {}).get("summary")
        return rows if isinstance(rows, list) else []


def check_summary(rows: object) -> list[str]:
    """What is wrong with a suite's ``summary`` (empty when it keeps the contract)."""
    if not isinstance(rows, list) or not rows:
        return ["its JSON has no 'summary' rows (see benchmarks/__init__.py)"]
    problems = []
    baselines: dict[str, int] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(key in row for key in _KEYS):
            problems.append(f"summary[{i}] lacks one of {', '.join(_KEYS)}")
            continue
        if row["role"] not in ROLES:
            problems.append(f"summary[{i}] role {row['role']!r} is not one of {ROLES}")
        if row["better"] not in ("lower", "higher"):
            problems.append(f"summary[{i}] better must be 'lower' or 'higher'")
        if not all(isinstance(row[k], int | float) and row[k] > 0 for k in ("value", "ratio")):
            problems.append(f"summary[{i}] value and ratio must be positive numbers")
        baselines[row["group"]] = baselines.get(row["group"], 0) + (row["role"] == "baseline")
    problems += [f"group {g!r} has {n} baselines, not 1" for g, n in baselines.items() if n != 1]
    return problems


def _groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    return groups


def _number(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def draw_chart(suite: SuiteResult, path: Path, *, note: str) -> None:
    """One panel per summary group: bars of ratio to the group's baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, NullFormatter

    groups = _groups(suite.summary)
    heights = [1.1 + 0.42 * len(rows) for rows in groups.values()]  # room for a 2-line title
    fig, axes = plt.subplots(
        len(groups),
        1,
        figsize=(11, sum(heights) + 1.0),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, (group, rows) in zip(axes[:, 0], groups.items(), strict=True):
        baseline = next(r for r in rows if r["role"] == "baseline")
        ratios = [float(r["ratio"]) for r in rows]
        labels = [textwrap.shorten(str(r["label"]), 56, placeholder="...") for r in rows]
        y = list(range(len(rows)))[::-1]
        ax.barh(y, ratios, color=[COLOURS[r["role"]] for r in rows], height=0.62)
        ax.set_yticks(y, labels, fontsize=9)
        ax.axvline(1.0, color="#444444", linestyle="--", linewidth=0.9)
        wide = max(ratios) / min(ratios) > 10
        if wide:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}x"))
        low, high = min(*ratios, 1.0), max(*ratios, 1.0)
        ax.set_xlim((low / 1.6) if wide else 0, high * (2.4 if wide else 1.3))
        for yi, row in zip(y, rows, strict=True):
            text = f"{row['ratio']:.2f}x  ({_number(float(row['value']))} {row['unit']})"
            ax.annotate(
                text,
                (float(row["ratio"]), yi),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8.5,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.6, "alpha": 0.85},
            )
        direction = "lower is better" if baseline["better"] == "lower" else "higher is better"
        title = (
            f"{group}: ratio to {textwrap.shorten(str(baseline['label']), 60, placeholder='...')}"
            f" ({direction})"
        )
        # Left-aligned over the bars, a long title ran off the figure's right edge.
        ax.set_title(textwrap.fill(title, 100), fontsize=10, loc="left")
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", color="#e6e6e6", linewidth=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    present = {r["role"] for r in suite.summary}
    handles = [Patch(color=COLOURS[r], label=r) for r in ROLES if r in present]
    top = 1 - 0.45 / (sum(heights) + 1.0)  # room for the title and the legend under it
    fig.suptitle(suite.title, x=0.01, y=0.995, ha="left", va="top", fontsize=12, weight="bold")
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.005, 1 - 0.28 / (sum(heights) + 1.0)),
        ncol=len(handles),
        fontsize=9,
        frameon=False,
    )
    fig.text(0.01, 0.005, note, fontsize=8, color="#555555")
    fig.tight_layout(rect=(0, 0.02, 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_markdown(suites: list[SuiteResult], meta: dict[str, Any], charts: set[str]) -> str:
    """``latest.md``: where the run came from, then per suite its headline ratios and chart."""
    quick = meta["quick"]
    lines = [
        "# Benchmarks: the latest run" + (" (quick)" if quick else ""),
        "",
        f"Generated by `{meta['command']}` at {meta['generated_at']} (commit "
        f"{meta['commit']}), Python {meta['python']}, {meta['cpus']} CPUs, load average "
        f"{meta['load_before']} before / {meta['load_after']} after; database: "
        f"{meta['database']}.",
        "",
        "**A shared, noisy 2-core machine: read the ratios, not the absolute numbers.** "
        "Each suite measures ours, the baseline and the peers side by side in one run; its "
        "own table has every figure and says how it was measured. Every figure of this run "
        "is in `latest.json`.",
    ]
    if quick:
        lines += [
            "",
            "> A `--quick` run: tiny samples that prove every suite works. Not for reading "
            "performance.",
        ]
    lines += ["", "| suite | status | seconds | table |", "|---|---|---:|---|"]
    for s in suites:
        seconds = f"{s.seconds:.0f}" if s.seconds is not None else "-"
        table = f"[{s.name}.md]({s.name}.md)" if s.results is not None else "-"
        lines.append(f"| {s.title} | {s.status} | {seconds} | {table} |")
    for s in suites:
        lines += ["", f"## {s.title}", ""]
        if s.problems:
            lines += [f"- {p}" for p in s.problems] + [""]
        if s.name in charts:
            lines += [f"![{s.title}]({s.name}.png)", ""]
        if not s.summary:
            continue
        lines += ["| group | variant | role | value | ratio |", "|---|---|---|---:|---:|"]
        for row in s.summary:
            lines.append(
                f"| {row['group']} | {row['label']} | {row['role']} | "
                f"{_number(float(row['value']))} {row['unit']} | {row['ratio']:.2f}x |"
            )
    return "\n".join(lines) + "\n"
