"""tools/pseudo_label_quality.py on a trained (6-iteration) MMT-PSM run: per class and threshold, counts that
follow from the definitions (no prediction passes 1.01: precision 1 by convention, recall 0)."""
import json
import os
import runpy

import pytest
from common import REPO

TOOL = runpy.run_path(os.path.join(REPO, "tools", "pseudo_label_quality.py"))


def test_quality_per_class_and_threshold(trained_mmt_psm, tmp_path):
    out = str(tmp_path / "q.json")
    res = TOOL["main"]([trained_mmt_psm.output_dir, "--gt", "shared_train", "--crops", "2", "--thresholds", "0",
                        "1.01", "--output", out])
    assert set(res) == {"cytoplasm@0", "cytoplasm@1.01", "nucleus@0", "nucleus@1.01"}
    for c in ("cytoplasm", "nucleus"):
        assert res[f"{c}@1.01"]["pseudo_labels_per_crop"] == 0.0
        assert (res[f"{c}@1.01"]["precision"], res[f"{c}@1.01"]["recall"]) == (1.0, 0.0)
        assert res[f"{c}@0"]["objects_per_crop"] == res[f"{c}@1.01"]["objects_per_crop"] > 0
        assert 0.0 <= res[f"{c}@0"]["recall"] <= 1.0
    with open(out) as f:
        assert json.load(f)["result"] == res


def test_supervised_run_is_rejected(tmp_path):
    (tmp_path / "config.yaml").write_text("MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n")
    with pytest.raises(ValueError, match="teacher-student"):
        TOOL["main"]([str(tmp_path)])
