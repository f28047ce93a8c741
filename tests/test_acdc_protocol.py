"""tools/acdc_protocol.py: a run counts only when its LAST iteration was evaluated; mean +- std over seeds."""
import json
import os
import runpy

import pytest
from common import protocol_run_dir

TOOL = runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "acdc_protocol.py"))


def test_intermediate_evaluation_is_not_a_final_result(tmp_path):
    mid = {"iteration": 599, "sem_seg_volume/Dice": 0.4}
    d = protocol_run_dir(tmp_path, [{"iteration": 19, "total_loss": 1.0}, mid], max_iter=1200)
    assert TOOL["final_results"](d) is None
    with open(os.path.join(d, "metrics.json"), "a") as f:
        f.write(json.dumps({"iteration": 1199, "sem_seg_volume/Dice": 0.6}) + "\n")
    assert TOOL["final_results"](d)["sem_seg_volume/Dice"] == 0.6


def test_summary_mean_std_over_seeds_and_other_model():
    metrics = TOOL["METRICS"]
    run = lambda v: {**{f"sem_seg_volume/{m}": v for m in metrics},  # noqa: E731
                     **{f"sem_seg_volume_student/{m}": v + 1 for m in metrics}}
    table = TOOL["summarize"]({"lcc": {1: run(0.2), 2: run(0.4)}})
    assert table["lcc"]["Dice"] == [pytest.approx(0.3), pytest.approx(0.1), 2]
    assert table["lcc (student)"]["HD95"][0] == pytest.approx(1.3)
    md = TOOL["markdown"](table, [1, 2])
    assert "| lcc | 2 | 0.300 +- 0.100" in md
