"""tools/psm_seeds.py: per-run figures, mean +- std over runs and paired differences against a hand computation."""
import json
import os
import runpy

import pytest
from common import REPO

TOOL = runpy.run_path(os.path.join(REPO, "tools", "psm_seeds.py"))


def _run(root, name: str, folder: str, aji: float, dice: float, paper_aji: float) -> str:
    run = root / name
    (run / folder).mkdir(parents=True, exist_ok=True)
    full = {"AJI": aji, "AJI_pooled": aji, "F1": 0.7, "Dice": dice, "IoU": 0.6, "AP50": 68.0, "num_images": 14}
    with open(run / folder / "metrics.json", "w") as f:
        json.dump({"full_image": full, "paper_protocol": {"AJI": paper_aji, "F1": 0.7, "Dice": dice}}, f)
    return str(run)


def test_mean_std_and_paired_difference(tmp_path):
    runs = [_run(tmp_path, "seed1", "predictions", 0.50, 0.70, 0.52), _run(tmp_path, "seed2", "predictions", 0.60,
                                                                            0.80, 0.58)]
    _run(tmp_path, "seed1", "tta", 0.53, 0.70, 0.52)
    _run(tmp_path, "seed2", "tta", 0.59, 0.80, 0.58)
    text = TOOL["report"](runs, ["predictions", "tta"])
    # AJI mean 0.55, population std 0.05; paper AJI 0.52 / 0.58 -> 0.55 +- 0.03; Dice 0.75 +- 0.05; AP50 one decimal
    assert ("| predictions | 2 | 0.550 +- 0.050 | 0.550 +- 0.050 | 0.700 +- 0.000 | 0.750 +- 0.050 | 0.600 +- 0.000 "
            "| 68.0 +- 0.0 | 0.550 +- 0.030 | 0.700 +- 0.000 | 0.750 +- 0.050 |") in text
    # tta: AJI 0.53 / 0.59 -> 0.56 +- 0.03; paired differences +0.03 and -0.01 -> +0.01 +- 0.02, higher on 1 of 2
    assert ("| tta | 2 | 0.560 +- 0.030 | 0.560 +- 0.030 | 0.700 +- 0.000 | 0.750 +- 0.050 | 0.600 +- 0.000 "
            "| 68.0 +- 0.0 | 0.550 +- 0.030 | 0.700 +- 0.000 | 0.750 +- 0.050 |") in text
    assert "| seed1 | 0.5000 | 0.5300 |" in text
    assert "AJI tta - predictions, paired: +0.0100 +- 0.0200 (higher on 1 of 2 runs)" in text


def test_missing_metrics_names_the_file_and_the_command(tmp_path):
    run = _run(tmp_path, "seed1", "predictions", 0.5, 0.7, 0.5)
    with pytest.raises(FileNotFoundError, match=r"seed1/tta/metrics\.json does not exist: run tools/psm_stage\.py "
                                                r"predict"):
        TOOL["report"]([run], ["predictions", "tta"])
    with open(os.path.join(run, "predictions", "metrics.json"), "w") as f:
        json.dump({"per_image": []}, f)
    with pytest.raises(ValueError, match=r"predictions/metrics\.json has no 'full_image' block"):
        TOOL["report"]([run], ["predictions"])
