"""report.html: one page a person opens to see a run at a glance (config, metrics, plots, the command)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from deeprecipe.engine import plots
from deeprecipe.engine.atomic import atomic_text
from deeprecipe.engine.run import read_metrics, read_status


def _fmt(v) -> str:
    if v is None:  # a class absent from the split (segmentation IoU)
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v[:20]) + (" ..." if len(v) > 20 else "")
    return html.escape(str(v))


def per_class(final: dict, names: list[str]) -> tuple[str, set[str]]:
    """The final metrics that hold one value per class (test_precision, test_recall, ...) as one table with a row
    per class name, and the keys it shows; ("", set()) when there are none."""
    keys = [k for k, v in final.items() if isinstance(v, list) and names and len(v) == len(names)]
    if not keys:
        return "", set()
    head = "<tr><th>class</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>"
    rows = "".join(
        f"<tr><th>{html.escape(str(n))}</th>" + "".join(f"<td>{_fmt(final[k][i])}</td>" for k in keys) + "</tr>"
        for i, n in enumerate(names)
    )
    return "<h3>Per class</h3><table>" + head + rows + "</table>", set(keys)


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if rows:
        plots.curves(rows, run_dir / "plots" / "curves.png")
    status = read_status(run_dir)
    final = status.get("final", {})
    cmds = (run_dir / "commands.txt").read_text().splitlines() if (run_dir / "commands.txt").exists() else []
    cfg = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    imgs = sorted((run_dir / "plots").glob("*.png"), key=lambda p: (p.name != "curves.png", p.name))
    samples = sorted((run_dir / "plots").glob("*.txt"))
    videos = sorted((run_dir / "plots").glob("*.mp4"))
    spec = json.loads((run_dir / "spec.json").read_text()) if (run_dir / "spec.json").exists() else {}
    classes, shown = per_class(final, spec.get("class_names") or [])
    parts = [
        "<!doctype html><meta charset='utf-8'><title>deeprecipe run " + html.escape(run_dir.name) + "</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        "img{max-width:100%;border:1px solid #eee;margin:6px 0}"
        "pre{background:#f6f6f6;padding:8px;overflow:auto}</style>",
        f"<h1>{html.escape(run_dir.name)}</h1>",
        f"<p>status: <b>{html.escape(str(status.get('status', '?')))}</b> · step {status.get('step', '?')} · "
        f"recipe {html.escape(str(status.get('recipe', '')))} · task {html.escape(str(status.get('task', '')))}</p>",
        "<h2>Command</h2><pre>" + html.escape("\n".join(cmds)) + "</pre>",
        "<h2>Final metrics</h2>"
        + (f"<p>weights: {html.escape(str(status['weights']))}</p>" if status.get("weights") else "")
        + "<table>"
        + "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in final.items() if k not in shown)
        + "</table>"
        + classes,
    ]
    if status.get("best"):
        at = f" at step {status['best_step']}" if status.get("best_step") is not None else ""
        split = status.get("best_split", "val")
        parts.append(f"<p>best on {split}: " + html.escape(json.dumps(status["best"])) + at + "</p>")
    parts.append("<h2>Plots</h2>" + "".join(f"<h3>{html.escape(p.stem)}</h3><img src='plots/{p.name}'>" for p in imgs))
    for s in samples:
        parts.append(f"<h3>{html.escape(s.stem)}</h3><pre>{html.escape(s.read_text()[:5000])}</pre>")
    for v in videos:  # episodes of a driving run
        parts.append(f"<h3>{html.escape(v.stem)}</h3><video controls src='plots/{v.name}'></video>")
    # sections that verbs run after training add (robustness, embedding, drift): HTML they wrote, escaped there
    parts += [p.read_text() for p in sorted(run_dir.glob("report-*.html"))]
    parts.append("<h2>Config</h2><pre>" + html.escape(cfg) + "</pre>")
    out = run_dir / "report.html"
    atomic_text(out, "\n".join(parts))
    return out
