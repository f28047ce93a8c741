"""tools/isbi_protocol.py: every arm's overrides make a valid config of one shared protocol; a run counts only
when its LAST iteration was evaluated; mean +- std over seeds of teacher and student."""
import json
import os
import runpy

import pytest
from common import REPO, protocol_run_dir
from detectron2.config import get_cfg

from mmt_psm.config import add_mmt_psm_config

TOOL = runpy.run_path(os.path.join(REPO, "tools", "isbi_protocol.py"))


def _arm_cfg(arm, seed=2):
    cfg = get_cfg()
    add_mmt_psm_config(cfg)
    cfg.merge_from_file(TOOL["BASE"])
    opts = []
    for k, v in TOOL["ARMS"][arm].items():
        opts += [k, v.format(s=seed)]
    cfg.merge_from_list(opts)
    return cfg


def test_arms_share_architecture_schedule_and_dropout_and_differ_only_in_what_is_compared():
    cfgs = {arm: _arm_cfg(arm) for arm in TOOL["ARMS"]}
    for cfg in cfgs.values():
        assert cfg.MODEL.META_ARCHITECTURE == "MMTPSMRCNN"
        assert (cfg.SOLVER.MAX_ITER, cfg.SEMI.BURN_IN_ITERS, cfg.SEMI.IMS_PER_BATCH_LABELED) == (200, 50, 2)
        assert cfg.MODEL.MMT_PSM.STUDENT_BOX_DROPOUT == 0.5
    assert cfgs["supervised_n2"].DATASETS.SPLIT_FILE == "datasets/splits/isbi2015_train_n2_seed2.json"
    assert cfgs["supervised_n2"].SEMI.IMS_PER_BATCH_UNLABELED == 0 and not cfgs["supervised_n6"].DATASETS.SPLIT_FILE
    assert cfgs["mmt_psm"].DATASETS.SPLIT_FILE == cfgs["mean_teacher"].DATASETS.SPLIT_FILE
    assert cfgs["mmt_psm"].MODEL.MMT_PSM.MINING and not cfgs["mean_teacher"].MODEL.MMT_PSM.MINING
    plus, paper = cfgs["mmt_psm_plus"].MODEL.MMT_PSM, cfgs["mmt_psm"].MODEL.MMT_PSM
    assert plus.MASK_DISTILL and not paper.MASK_DISTILL and not paper.FUSE_ALL_VIEWS
    assert not plus.MGD_LOSS and paper.MGD_LOSS and cfgs["mmt_psm_fuse_distill"].MODEL.MMT_PSM.MGD_LOSS
    # the plus config file holds exactly the protocol's plus switches and the cap of arm mmt_psm_plus_cap16
    assert cfgs["mmt_psm_plus_cap16"].MODEL.MMT_PSM.MASK_DISTILL_MAX_POSITIVES == 16
    assert plus.MASK_DISTILL_MAX_POSITIVES == 0
    full = get_cfg()
    add_mmt_psm_config(full)
    full.merge_from_file(os.path.join(REPO, "configs", "mmt_psm_plus_R50.yaml"))
    for key, value in TOOL["PLUS_CONFIG"].items():
        node = full
        for part in key.split("."):
            node = node[part]
        assert str(node) == value, key


def test_intermediate_evaluation_is_not_a_final_result(tmp_path):
    d = protocol_run_dir(tmp_path, [{"iteration": 19, "total_loss": 1.0}, {"iteration": 149, "segm/AP": 10.0}],
                         max_iter=300)
    assert TOOL["final_results"](d) is None
    with open(os.path.join(d, "metrics.json"), "a") as f:
        f.write(json.dumps({"iteration": 299, "segm/AP": 20.0, "segm_student/AP": 21.0, "total_loss": 1}) + "\n")
    assert TOOL["final_results"](d) == {"segm/AP": 20.0, "segm_student/AP": 21.0}


def test_summary_mean_std_over_seeds_of_teacher_and_student():
    metrics = TOOL["METRICS"]

    def run(v):
        out = {m: v for m in metrics}
        out.update({m.replace("/", "_student/", 1): v + 1 for m in metrics})
        return out

    table = TOOL["summarize"]({"mmt_psm": {1: run(20.0), 2: run(30.0)}})
    assert table["mmt_psm (teacher)"]["segm/AP"] == [pytest.approx(25.0), pytest.approx(5.0), 2]
    assert table["mmt_psm (student)"]["cell/AJI-cytoplasm"][0] == pytest.approx(26.0)
    md = TOOL["markdown"](table, [1, 2])
    assert "| mmt_psm (teacher) | 2 | 25.0 +- 5.0" in md


def test_missing_split_file_is_an_error_naming_the_command(capsys):
    with pytest.raises(SystemExit):
        TOOL["main"](["--seeds", "987", "--report-only"])
    assert "make_splits.py --dataset isbi2015_train --count 2 --seed 987" in capsys.readouterr().err
