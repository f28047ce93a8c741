"""tools/own_data_protocol.py: per seed a labeled subset + unlabeled folder, then every arm as the README's own-data
command (exact DATASETS.* keys, seed and stream seed), resumable, mean +- std and paired differences; and the
MobileNetV2 configs differ from their R50 configs by the backbone keys only."""
import json
import os
import runpy

import pytest
from common import REPO
from detectron2.config import get_cfg
from user_data import write_user_dataset

import mmt_psm.core.protocol as protocol
from mmt_psm.config import add_mmt_psm_config
from mmt_psm.core.splits import make_split

TOOL = runpy.run_path(os.path.join(REPO, "tools", "own_data_protocol.py"))
BACKBONE_KEYS = {"MODEL.WEIGHTS", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "MODEL.BACKBONE.NAME",
                 "MODEL.BACKBONE.FREEZE_AT", "MODEL.FPN.IN_FEATURES", "INPUT.FORMAT", "OUTPUT_DIR"}


def _flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _cfg(path, opts=()):
    cfg = get_cfg()
    add_mmt_psm_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, path))
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.mark.parametrize("arm", ["supervised", "mmt_psm", "mmt_psm_plus"])
def test_mobilenet_configs_are_their_r50_configs_with_the_backbone_swapped(arm):
    mobile, r50 = _flat(_cfg(TOOL["ARMS"][arm])), _flat(_cfg(f"configs/{arm}_R50.yaml"))
    assert {k for k in mobile if mobile[k] != r50[k]} == BACKBONE_KEYS
    assert mobile["MODEL.BACKBONE.NAME"] == "build_mobilenet_v2_fpn_backbone" and mobile["INPUT.FORMAT"] == "RGB"
    assert mobile["MODEL.WEIGHTS"] == TOOL["WEIGHTS"] and mobile["MODEL.FPN.IN_FEATURES"] == ["m2", "m3", "m4", "m5"]
    assert mobile["MODEL.PIXEL_MEAN"] == [123.675, 116.28, 103.53] and mobile["MODEL.BACKBONE.FREEZE_AT"] == 2


def _data(tmp_path):
    paths = write_user_dataset(str(tmp_path / "data"), n_train=5, n_test=2, n_unlabeled=0)
    return ["--images-json", paths["train"], "--image-root", paths["image_root"], "--test-json", paths["test"],
            "--test-root", paths["image_root"]], paths


def test_data_keys_of_each_arm_are_the_readme_commands(tmp_path):
    argv, paths = _data(tmp_path)
    args = TOOL["parse_args"]([*argv, "--output", str(tmp_path / "out"), "--dry-run"])
    d = str(tmp_path / "out" / "data" / "seed2")
    train = f"own_labeled_seed2:{d}/labeled.json:{paths['image_root']}"
    test = f"own_test:{paths['test']}:{paths['image_root']}"
    common = {"DATASETS.TRAIN": '("own_labeled_seed2",)', "DATASETS.TEST": '("own_test",)',
              "DATASETS.SPLIT_FILE": '""', "MODEL.ROI_HEADS.NUM_CLASSES": "1"}
    assert TOOL["dataset_overrides"]("supervised", 2, args, 1) == {
        "DATASETS.REGISTER": f'("{train}", "{test}")', **common}
    for arm in ("mmt_psm", "mmt_psm_plus"):
        assert TOOL["dataset_overrides"](arm, 2, args, 1) == {
            "DATASETS.REGISTER": f'("{train}", "{test}", "own_unlabeled_seed2:{d}/unlabeled")', **common,
            "DATASETS.TRAIN_UNLABELED": '("own_unlabeled_seed2",)'}
    # every arm's command line merges into a valid config: the keys exist, the values parse
    for arm in TOOL["ARMS"]:
        cmd = TOOL["command"](arm, 2, args, 1)
        opts = cmd[cmd.index("--resume") + 1:]
        cfg = _cfg(TOOL["ARMS"][arm], opts)
        assert cfg.DATASETS.REGISTER[0] == train and cfg.DATASETS.SPLIT_FILE == "" and cfg.SEED == 2
        assert cfg.INPUT.CROP.SIZE == [256, 256] and cfg.TEST.DETECTIONS_PER_IMAGE == 1000
        assert cfg.SEMI.IMS_PER_BATCH_UNLABELED == (0 if arm == "supervised" else 2)


def test_runs_build_each_seeds_subset_train_every_arm_resume_and_summarize(tmp_path, monkeypatch, capsys):
    argv, paths = _data(tmp_path)
    out = tmp_path / "out"
    calls = []
    value = {"supervised": 10.0, "mmt_psm": 12.0, "mmt_psm_plus": 13.0}

    def fake_train(root, config, opts, run_dir, threads, what):
        arm, seed = what.split(" seed ")
        calls.append((config, list(opts), threads))
        os.makedirs(run_dir, exist_ok=True)
        open(os.path.join(run_dir, "config.yaml"), "w").write("SOLVER:\n  MAX_ITER: 4\n")
        v = value[arm] + int(seed)
        rec = {"iteration": 3, "segm/AP": v, "cell/AJI": v + 1, "cell/F1": v + 2}
        if arm != "supervised":
            rec.update({"segm_student/AP": v - 1, "cell_student/AJI": v, "cell_student/F1": v + 1})
        open(os.path.join(run_dir, "metrics.json"), "w").write(json.dumps(rec) + "\n")

    monkeypatch.setattr(protocol, "train", fake_train)
    monkeypatch.setitem(TOOL["main"].__globals__, "WEIGHTS", str(tmp_path / "w.pth"))
    run = [*argv, "--labeled-count", "2", "--seeds", "1", "2", "--output", str(out), "--threads", "3",
           "--num-gpus", "2", "SOLVER.MAX_ITER", "4"]
    with pytest.raises(SystemExit):
        TOOL["main"](run)
    assert f"{tmp_path / 'w.pth'} is missing: python tools/prepare_pretrained.py" in capsys.readouterr().err
    (tmp_path / "w.pth").write_bytes(b"")
    assert TOOL["main"](run) == 0
    assert len(calls) == 6 and all(threads == 3 for _, _, threads in calls)
    args = TOOL["parse_args"](run)
    for (arm, seed), (config, opts, _) in zip([(a, s) for s in (1, 2) for a in TOOL["ARMS"]], calls):
        cmd = TOOL["command"](arm, seed, args, 1)  # --dry-run's line is exactly what ran
        assert config == cmd[cmd.index("--config-file") + 1] and opts == cmd[cmd.index("--resume") + 1:]
        assert opts[:2] == ["--num-gpus", "2"] and opts[-2:] == ["SOLVER.MAX_ITER", "4"]  # the user's options last
    for seed in (1, 2):
        labeled = json.load(open(out / "data" / f"seed{seed}" / "labeled.json"))
        assert len(labeled["images"]) == 2 and len(os.listdir(out / "data" / f"seed{seed}" / "unlabeled")) == 3
        # the seed's draw (tools/make_splits.py's rule) over the pool's image ids 1000-1004
        drawn = make_split("x", range(1000, 1005), seed, 2)["labeled_ids"]
        assert sorted(im["id"] for im in labeled["images"]) == drawn
    md = (out / "results.md").read_text()
    assert "| supervised | 2 | 11.5 +- 0.5 | 12.5 +- 0.5 | 13.5 +- 0.5 |" in md
    assert "| mmt_psm (teacher) | 2 | 13.5 +- 0.5 |" in md and "| mmt_psm_plus (student) | 2 | 13.5 +- 0.5 |" in md
    assert "| mmt_psm (teacher) - supervised | 2 | +2.0 +- 0.0 (s1 +2.0, s2 +2.0) |" in md
    res = json.load(open(out / "results.json"))
    assert res["paired"]["mmt_psm_plus (student) - supervised"]["segm/AP"]["per_seed"] == {"1": 2.0, "2": 2.0}
    assert res["protocol"]["SOLVER.MAX_ITER"] == "200"
    # resumable: a second call trains nothing, reuses the subsets
    assert TOOL["main"](run) == 0 and len(calls) == 6
    assert "[skip] mmt_psm seed 2" in capsys.readouterr().out


def test_dry_run_writes_nothing_and_bad_inputs_are_parser_errors(tmp_path, capsys):
    argv, paths = _data(tmp_path)
    out = tmp_path / "out"
    assert TOOL["main"]([*argv, "--seeds", "4", "--arms", "mmt_psm", "--output", str(out), "--dry-run"]) == 0
    line = capsys.readouterr().out.strip()
    assert "DATASETS.TRAIN_UNLABELED '(\"own_unlabeled_seed4\",)'" in line and not out.exists()
    for bad, msg in ((["--images-json", str(tmp_path / "none.json")], f"COCO file {tmp_path / 'none.json'} does"),
                     (["--output", str(tmp_path / "a:b")], "paths may not contain ':'")):
        with pytest.raises(SystemExit):
            TOOL["main"]([*argv, *bad])
        assert msg in capsys.readouterr().err
    rc = TOOL["main"]([*argv, "--labeled-count", "9", "--output", str(out)])
    assert rc == 2 and f"cannot choose 9 of the 5 images of {paths['train']}" in capsys.readouterr().err
