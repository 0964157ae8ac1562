"""Shared by the benchmarks: plain-text tables."""

from __future__ import annotations


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:]))
        return "  ".join([first, *rest])

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def load_line() -> str:
    """The machine's load average: the benchmarks share it with whatever else runs."""
    import os

    return "load average (1, 5, 15 min) at the end: " + ", ".join(
        f"{load:.1f}" for load in os.getloadavg())
