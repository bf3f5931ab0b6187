"""The page of a `check` run (report.html): the verdicts as a table, their plots, and the config checked."""

from __future__ import annotations

import html
from pathlib import Path

from deeprecipe.engine.atomic import atomic_text

COLORS = {"pass": "#2e7d32", "warn": "#ef6c00", "fail": "#c62828", "skip": "#777"}


def write_page(run_dir: Path, title: str, verdicts: list, cfg_text: str) -> Path:
    rows = "".join(
        f"<tr><td>{html.escape(v.name)}</td><td style='color:{COLORS.get(v.status, '#000')};font-weight:bold'>"
        f"{v.status}</td><td>{html.escape(v.measured)}</td><td>{html.escape(v.expected)}</td>"
        f"<td>{html.escape(v.advice)}</td><td>{v.seconds:.1f}s</td></tr>"
        for v in verdicts
    )
    figs = "".join(
        f"<h3>{html.escape(v.name)}: {html.escape(p)}</h3>"
        + (
            f"<img src='{html.escape(p)}'>"
            if p.endswith(".png")
            else f"<pre>{html.escape((run_dir / p).read_text()[:5000])}</pre>"
        )
        for v in verdicts
        for p in v.plots
    )
    page = (
        "<!doctype html><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;"
        "vertical-align:top}img{max-width:100%;border:1px solid #eee}pre{background:#f6f6f6;padding:8px}</style>"
        f"<h1>{html.escape(title)}</h1><table><tr><th>check</th><th>verdict</th><th>measured</th>"
        f"<th>expected</th><th>advice</th><th>time</th></tr>{rows}</table><h2>Plots</h2>{figs}"
        f"<h2>Config</h2><pre>{html.escape(cfg_text)}</pre>"
    )
    atomic_text(run_dir / "report.html", page)
    return run_dir / "report.html"
