"""tools/isbi_protocol.py: every arm's overrides make a valid config of one shared protocol; a run counts only
when its LAST iteration was evaluated; mean +- std over seeds of teacher and student."""
import argparse
import json
import os
import runpy
import threading

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
    # the plus config file holds exactly the protocol's plus switches, the cap of arm mmt_psm_plus_cap16 and the
    # unsupervised weight of arm mmt_psm_plus_w1
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
    assert full.SEMI.UNSUP_WEIGHT == float(TOOL["ARMS"]["mmt_psm_plus_w1"]["SEMI.UNSUP_WEIGHT"]) == 1.0
    assert cfgs["mmt_psm"].SEMI.UNSUP_WEIGHT == 5.0  # the paper's weight stays in the paper's setting
    # and the pseudo-label threshold of arm mmt_psm_plus_thr05; the paper's 0.05 stays in the paper's setting
    assert full.MODEL.MMT_PSM.PSEUDO_SCORE_THRESH == float(
        TOOL["ARMS"]["mmt_psm_plus_thr05"]["MODEL.MMT_PSM.PSEUDO_SCORE_THRESH"]) == 0.5
    assert cfgs["mmt_psm"].MODEL.MMT_PSM.PSEUDO_SCORE_THRESH == 0.05


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


def _fake_runs(monkeypatch, started):
    """Replace training by a fake: supervised_n2 writes its burn-in checkpoint (after a pause, so a waiting
    teacher-student run must wait), every run records its overrides and whether that checkpoint existed."""
    import time

    g = TOOL["run_one"].__globals__
    monkeypatch.setitem(g, "POLL_S", 0.01)

    def fake_run_arm(root, arm, seed, run_dir, config, overrides, args, final, describe):
        ckpt = os.path.join(args.output, f"supervised_n2_seed{seed}", "model_0000049.pth")
        if arm == "supervised_n2":
            time.sleep(0.3)
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            open(ckpt, "w").close()
        started.append((arm, seed, dict(overrides), os.path.isfile(ckpt)))
        return {"segm/AP": 1.0}

    monkeypatch.setitem(g, "run_arm", fake_run_arm)


def test_share_burn_in_starts_teacher_student_arms_from_supervised_n2s_checkpoint(tmp_path, monkeypatch):
    started = []
    _fake_runs(monkeypatch, started)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    out = tmp_path / "out"
    # mmt_psm named first and two workers: it must still wait for supervised_n2's checkpoint
    rc = TOOL["main"](["--arms", "mmt_psm", "supervised_n6", "supervised_n2", "--seeds", "1", "--jobs", "2",
                       "--share-burn-in", "--weights", str(weights), "--output", str(out)])
    assert rc == 0
    by_arm = {arm: (ov, had) for arm, _, ov, had in started}
    ckpt = str(out / "supervised_n2_seed1" / "model_0000049.pth")
    overrides, checkpoint_existed = by_arm["mmt_psm"]
    assert overrides["SEMI.BURN_IN_CHECKPOINT"] == ckpt and checkpoint_existed
    for arm in ("supervised_n2", "supervised_n6"):  # the supervised arms train their own first iterations
        assert "SEMI.BURN_IN_CHECKPOINT" not in by_arm[arm][0]
    assert TOOL["order_jobs"](["mmt_psm", "supervised_n2"], [1, 2], True) == [
        ("supervised_n2", 1), ("mmt_psm", 1), ("supervised_n2", 2), ("mmt_psm", 2)]
    assert TOOL["order_jobs"](["mmt_psm", "supervised_n2"], [1], False) == [("mmt_psm", 1), ("supervised_n2", 1)]


def test_without_share_burn_in_every_arm_trains_its_own_burn_in(tmp_path, monkeypatch):
    started = []
    _fake_runs(monkeypatch, started)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    TOOL["main"](["--arms", "mmt_psm", "--seeds", "1", "--weights", str(weights), "--output", str(tmp_path / "o")])
    assert [(a, "SEMI.BURN_IN_CHECKPOINT" in ov) for a, _, ov, _ in started] == [("mmt_psm", False)]


def test_share_burn_in_errors(tmp_path, monkeypatch):
    started = []
    _fake_runs(monkeypatch, started)
    # supervised_n2 ends without writing the checkpoint: the waiting run fails with the file's name
    g = TOOL["run_one"].__globals__
    monkeypatch.setitem(g, "run_arm", lambda root, arm, *a, **k: {"segm/AP": 1.0})
    ended = {1: threading.Event()}
    ended[1].set()
    args = argparse.Namespace(share_burn_in=True, output=str(tmp_path), opts=[], report_only=False)
    with pytest.raises(RuntimeError, match=r"mmt_psm seed 1: .*supervised_n2_seed1/model_0000049.pth was not"):
        TOOL["run_one"]("mmt_psm", 1, "w", args, ended)
    # no periodic checkpoint after iteration BURN_IN_ITERS - 1
    with pytest.raises(ValueError, match="BURN_IN_ITERS 60 must be a positive multiple of SOLVER.CHECKPOINT_PERIOD 50"):
        TOOL["burn_in_checkpoint"](str(tmp_path), 1, ["SEMI.BURN_IN_ITERS", "60"])
    path = TOOL["burn_in_checkpoint"]("o", 2, ["SEMI.BURN_IN_ITERS", "100"])
    assert path == "o/supervised_n2_seed2/model_0000099.pth"
    # neither supervised_n2 among the arms nor its checkpoint: refused before anything trains
    with pytest.raises(SystemExit):
        TOOL["main"](["--arms", "mmt_psm", "--seeds", "1", "--share-burn-in", "--output", str(tmp_path / "x")])
    assert started == []


def test_base_config_and_one_frame_arm(tmp_path, monkeypatch, capsys):
    """``--base`` trains every arm on that config (here the ImageNet MobileNetV2 protocol), and ``supervised_n1``
    needs its own 1-frame split file (named in the error)."""
    with pytest.raises(SystemExit):
        TOOL["main"](["--arms", "supervised_n1", "--seeds", "987", "--report-only"])
    assert "make_splits.py --dataset isbi2015_train --count 1 --seed 987" in capsys.readouterr().err
    calls = []
    g = TOOL["run_one"].__globals__
    monkeypatch.setitem(g, "run_arm", lambda root, arm, seed, run_dir, config, overrides, *a: calls.append(
        (arm, config, overrides["DATASETS.SPLIT_FILE"])) or {"segm/AP": 1.0})
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    base = os.path.join(REPO, "configs", "cpu", "pretrained_protocol.yaml")
    rc = TOOL["main"](["--arms", "supervised_n1", "supervised_n6", "--seeds", "1", "--base", base,
                       "--weights", str(weights), "--output", str(tmp_path / "out")])
    assert rc == 0
    assert sorted(calls) == [("supervised_n1", base, TOOL["SPLIT_N1"]), ("supervised_n6", base, "''")]
    cfg = get_cfg()
    add_mmt_psm_config(cfg)
    cfg.merge_from_file(base)  # the pretrained protocol differs from the default one only in its start
    assert cfg.MODEL.BACKBONE.NAME == "build_mobilenet_v2_fpn_backbone"
    assert cfg.MODEL.META_ARCHITECTURE == "MMTPSMRCNN"
    assert cfg.SOLVER.MAX_ITER == _arm_cfg("supervised_n2").SOLVER.MAX_ITER


def test_scarce_one_frame_arm_gives_the_teacher_student_arms_its_split_and_burn_in(tmp_path, monkeypatch):
    started = []
    _fake_runs(monkeypatch, started)
    g = TOOL["run_one"].__globals__
    fake = g["run_arm"]

    def run_arm(root, arm, seed, run_dir, config, overrides, args, final, describe):  # n1 writes the checkpoint
        if arm == "supervised_n1":
            ckpt = os.path.join(args.output, "supervised_n1_seed1", "model_0000049.pth")
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            open(ckpt, "w").close()
        return fake(root, arm, seed, run_dir, config, overrides, args, final, describe)

    monkeypatch.setitem(g, "run_arm", run_arm)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    out = tmp_path / "out"
    rc = TOOL["main"](["--arms", "mmt_psm", "supervised_n1", "--seeds", "1", "--jobs", "2", "--scarce",
                       "supervised_n1", "--share-burn-in", "--weights", str(weights), "--output", str(out)])
    assert rc == 0
    by_arm = {arm: ov for arm, _, ov, _ in started}
    assert by_arm["mmt_psm"]["DATASETS.SPLIT_FILE"] == TOOL["SPLIT_N1"]
    assert by_arm["mmt_psm"]["SEMI.BURN_IN_CHECKPOINT"] == str(out / "supervised_n1_seed1" / "model_0000049.pth")
