"""Rows, targets and their renderings: a rich table, Markdown and JSON.

Every row may name a baseline row measured in the same run; the ratio is
row ÷ baseline, p50 against p50, p99 against p99, a rate against a rate.

Usage::

    rows = [Row("bare", "bare python3.12", latency=summarize(ms)),
            Row("eval", "eval hello", latency=summarize(ms2), baseline="bare")]
    print(markdown_table(rows))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .stats import Summary, ratio

HEADERS = ("Benchmark", "n", "p50", "p99", "rate / size", "baseline (same run)", "ratio", "notes")


@dataclass
class Row:
    key: str
    label: str
    latency: Summary | None = None  # milliseconds
    value: float | None = None  # a rate or a size, in ``unit``
    unit: str = ""
    baseline: str | None = None  # key of another row
    note: str = ""
    skipped: str | None = None  # the reason, when it could not be measured
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, rows: Sequence[Row]) -> dict[str, Any]:
        base = find(rows, self.baseline)
        ratios = row_ratios(self, base)
        return {
            "key": self.key,
            "label": self.label,
            "latency_ms": self.latency.as_dict() if self.latency else None,
            "value": _round(self.value),
            "unit": self.unit,
            "baseline": self.baseline,
            "ratio": {k: _round(v) for k, v in ratios.items()},
            "note": self.note,
            "skipped": self.skipped,
            "errors": self.errors,
            "extra": self.extra,
        }


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    limit: str
    ok: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        return {True: "met", False: "NOT met", None: "not measured"}[self.ok]


def find(rows: Sequence[Row], key: str | None) -> Row | None:
    if key is None:
        return None
    return next((r for r in rows if r.key == key and r.skipped is None), None)


def row_ratios(row: Row, base: Row | None) -> dict[str, float]:
    if base is None or row.skipped:
        return {}
    pairs: dict[str, tuple[float | None, float | None]] = {}
    if row.latency and base.latency:
        pairs["p50"] = (row.latency.p50, base.latency.p50)
        pairs["p99"] = (row.latency.p99, base.latency.p99)
    if row.value is not None and base.value is not None and row.unit == base.unit:
        pairs["value"] = (row.value, base.value)
    found = {k: ratio(v, b) for k, (v, b) in pairs.items()}
    return {k: v for k, v in found.items() if v is not None}


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{_number(value)} ms"


def fmt_value(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{_number(value)} {unit}".strip()


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def baseline_cell(base: Row | None) -> str:
    if base is None:
        return "-"
    parts = [base.label]
    if base.latency:
        parts.append(f"{fmt_ms(base.latency.p50)} / {fmt_ms(base.latency.p99)}")
    if base.value is not None:
        parts.append(fmt_value(base.value, base.unit))
    return ": ".join([parts[0], " · ".join(parts[1:])]) if len(parts) > 1 else parts[0]


def ratio_cell(ratios: dict[str, float]) -> str:
    if "p50" in ratios:
        return f"{fmt_ratio(ratios['p50'])} / {fmt_ratio(ratios.get('p99'))}"
    return fmt_ratio(ratios.get("value"))


def cells(row: Row, rows: Sequence[Row]) -> list[str]:
    if row.skipped:
        return [row.label, "-", "-", "-", "-", "-", "-", f"skipped: {row.skipped}"]
    base = find(rows, row.baseline)
    lat = row.latency
    note = row.note + (f"; {row.errors} errors" if row.errors else "")
    return [
        row.label,
        str(lat.n) if lat else "1",
        fmt_ms(lat.p50 if lat else None),
        fmt_ms(lat.p99 if lat else None),
        fmt_value(row.value, row.unit),
        baseline_cell(base),
        ratio_cell(row_ratios(row, base)),
        note,
    ]


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        lines.append("| " + " | ".join(_md_escape(c) for c in cells(row, rows)) + " |")
    return "\n".join(lines)


def targets_table(targets: Sequence[Target]) -> str:
    lines = ["| Target | measured | limit | verdict |", "|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {_md_escape(t.name)} | {t.measured} | {t.limit} | {t.verdict} |")
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
