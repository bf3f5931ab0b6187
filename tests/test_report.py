"""report.html and its curves read well: per-class metrics in a table with class names, fractions on a fixed scale."""

import json
import re

import pytest

from deeprecipe.engine import plots
from deeprecipe.engine.report import write_report


def fake_run(tmp_path, final: dict, names: list[str], rows: list[dict]):
    run = tmp_path / "run"
    (run / "plots").mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"status": "done", "step": 30, "final": final}))
    (run / "spec.json").write_text(json.dumps({"class_names": names}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_report_shows_precision_and_recall_per_class_with_the_class_names(tmp_path):
    final = {"test_acc": 0.5, "test_precision": [0.25, 0.75, 1.0], "test_recall": [0.5, 0.125, None]}
    run = fake_run(tmp_path, final, ["cat", "dog", "fox"], [{"step": 1, "loss": 2.0}])
    page = (write_report(run)).read_text()
    rows = re.findall(r"<tr><th>(\w+)</th><td>([^<]*)</td><td>([^<]*)</td></tr>", page)
    assert rows == [("cat", "0.2500", "0.5000"), ("dog", "0.7500", "0.1250"), ("fox", "1.0000", "-")]
    assert "<th>test_precision</th><th>test_recall</th>" in page
    assert "0.2500, 0.7500" not in page  # no bare list of numbers
    assert "<tr><th>test_acc</th><td>0.5000</td></tr>" in page


def test_accuracy_curves_are_not_zoomed_into_a_tiny_range(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: seen.update({ax.get_title(): ax for ax in fig.axes}))
    accs = [0.983, 0.986, 0.989]
    rows = [{"step": s, "loss": 0.1, "val_acc": a, "val_loss": 0.05 + a / 100} for s, a in zip((10, 20, 30), accs)]
    rows += [{"step": 30, "val_miou": 0.42, "val_bleu": 31.5}]
    plots.curves(rows, tmp_path / "curves.png")
    low, high = seen["val_acc"].get_ylim()
    assert low == pytest.approx(0.9) and 1.0 <= high < 1.01  # the gap to a perfect score shows
    assert seen["val_miou"].get_ylim()[0] == pytest.approx(0.4)
    assert seen["val_bleu"].get_ylim()[1] < 40 and seen["val_loss"].get_ylim()[1] < 1  # other metrics: autoscaled
