"""tools/benchmark_cell_metrics.py: its synthetic discs by hand, and a small run that checks both paths agree."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
from common import REPO

_SPEC = importlib.util.spec_from_file_location(
    "benchmark_cell_metrics", os.path.join(REPO, "tools", "benchmark_cell_metrics.py"))
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_discs_by_hand():
    """A radius-2 disc holds the 13 pixels with dy^2 + dx^2 <= 4; one at a corner is clipped to its quarter (6)."""
    out = bench.discs(np.array([[5.0, 5.0], [0.0, 0.0]]), np.array([2.0, 2.0]), 12)
    assert out.shape == (2, 12, 12) and out.dtype == bool
    assert int(out[0].sum()) == 13 and out[0, 5, 3] and out[0, 3, 5] and not out[0, 3, 3]
    assert int(out[1].sum()) == 6


def test_small_run_reports_identical_results(capsys):
    assert bench.main(["--size", "96", "--gt", "12", "--pred", "15", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "96x96, 12 GT / 15 predicted masks; identical results" in out
    assert "x faster" in out
