"""tools/quickstart.py's report: the pseudo-label line averages the monitor's records per class, and the verdict
says what the two runs' numbers say (no hard-coded claim)."""
import json
import os
import runpy

from common import REPO

TOOL = runpy.run_path(os.path.join(REPO, "tools", "quickstart.py"))


def _metrics(tmp_path, rows):
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(tmp_path)


def test_pseudo_label_line_averages_the_monitor_records(tmp_path):
    rows = [{"iteration": 9, "total_loss": 1.0},
            {"iteration": 109, "pseudo_quality/images": 2, "pseudo_quality/cytoplasm/precision@0.5": 0.5,
             "pseudo_quality/cytoplasm/recall@0.5": 0.2, "pseudo_quality/cytoplasm/precision": 0.1,
             "pseudo_quality/cytoplasm/recall": 0.4, "pseudo_quality/cytoplasm/matched_iou": 0.6},
            {"iteration": 119, "pseudo_quality/images": 2, "pseudo_quality/cytoplasm/precision@0.5": 0.7,
             "pseudo_quality/cytoplasm/recall@0.5": 0.4, "pseudo_quality/cytoplasm/precision": 0.3,
             "pseudo_quality/cytoplasm/recall": 0.6, "pseudo_quality/cytoplasm/matched_iou": 0.8}]
    line = TOOL["pseudo_label_line"](_metrics(tmp_path, rows))
    assert "mean of 2 checks" in line
    assert "cytoplasm precision 0.60 recall 0.30 (all scores: 0.20 / 0.50), matched IoU 0.70" in line


def test_pseudo_label_line_without_monitor_says_how_to_switch_it_on(tmp_path):
    assert "SEMI.PSEUDO_MONITOR_PERIOD" in TOOL["pseudo_label_line"](_metrics(tmp_path, [{"iteration": 1}]))


def test_verdict_follows_the_numbers():
    sup = {"segm/AP": 40.0, "cell/AJI-cytoplasm": 50.0}
    assert "teacher trails supervised training: segm AP -2.0, AJI-cytoplasm -1.0" in TOOL["verdict"](
        sup, {"segm/AP": 38.0, "cell/AJI-cytoplasm": 49.0})
    assert "teacher beats supervised" in TOOL["verdict"](sup, {"segm/AP": 41.0, "cell/AJI-cytoplasm": 50.5})
    assert "is mixed against" in TOOL["verdict"](sup, {"segm/AP": 41.0, "cell/AJI-cytoplasm": 49.0})
