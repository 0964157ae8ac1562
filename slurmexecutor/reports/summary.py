"""A run's short HTML summary with a progress bar: what Jupyter shows for an executor
(`SlurmExecutor._repr_html_`) or a run read back (`RunInfo._repr_html_`)."""

from __future__ import annotations

import html

IN_FLIGHT = ("running", "pending", "unknown")  # no result yet


def summary_html(run_id: str, backend: str, live: bool, counts: dict[str, int],
                 total: int, note: str = "") -> str:
    """`counts`: calls per status ("in flight": those without a result yet)."""
    finished = sum(n for name, n in counts.items() if name != "in flight")
    failed = counts.get("failed", 0) + counts.get("lost", 0)
    share = finished / total if total else 0.0
    text = ", ".join(f"{n} {name}" for name, n in counts.items() if n or name == "done")
    color = "#d62728" if failed else "#4a7fc1"
    return (f"<div class='slurmexecutor-run'><b>slurmexecutor run {html.escape(run_id)}</b> "
            f"({html.escape(backend or '?')}, {'live' if live else 'finished'}): "
            f"{html.escape(text)} of {total} calls ({share:.0%} finished)"
            f"{' · ' + html.escape(note) if note else ''}"
            f"<div style='width:300px;height:8px;background:#eee'><div class='progress' "
            f"style='width:{share * 100:.1f}%;height:8px;background:{color}'></div></div></div>")
