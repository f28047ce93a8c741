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


def test_own_data_gt_entry_and_exclude_labeled_keep_only_the_runs_unlabeled_images(trained_mmt_psm, tmp_path):
    """A COCO file labeling the run's 4 training images and 2 others, given as a DATASETS.REGISTER entry:
    --exclude-labeled measures on the 2 others only (matched by file path), without it on all 6."""
    root = trained_mmt_psm.data_root
    train, test = (json.load(open(os.path.join(root, f"{s}.json"))) for s in ("train", "test"))
    shift = 1 + max(im["id"] for im in train["images"])
    combo = {**train, "images": train["images"] + [{**im, "id": im["id"] + shift} for im in test["images"]],
             "annotations": train["annotations"] + [{**a, "id": a["id"] + 10 ** 6, "image_id": a["image_id"] + shift}
                                                    for a in test["annotations"]]}
    path = tmp_path / "all.json"
    path.write_text(json.dumps(combo))
    entry = f"plq_all:{path}:{os.path.join(root, 'images')}"
    args = [trained_mmt_psm.output_dir, "--gt", entry, "--crops", "2", "--thresholds", "0.5",
            "--output", str(tmp_path / "q.json")]
    assert TOOL["main"](args)["nucleus@0.5"]["images"] == 6
    held_back = TOOL["main"](args + ["--exclude-labeled"])
    assert held_back["nucleus@0.5"]["images"] == len(test["images"]) == 2


def test_supervised_run_is_rejected(tmp_path):
    (tmp_path / "config.yaml").write_text("MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n")
    with pytest.raises(ValueError, match="teacher-student"):
        TOOL["main"]([str(tmp_path)])
