"""tools/acdc_protocol.py: a run counts only when its LAST iteration was evaluated; mean +- std over seeds."""
import json
import os
import runpy
import sys

import pytest
from common import (
    REPO,  # noqa: E402
    protocol_run_dir,
)

TOOL = runpy.run_path(os.path.join(REPO, "tools", "acdc_protocol.py"))


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


def test_largest_component_rescoring_collects_finished_runs_only(tmp_path):
    """--largest-component trains nothing: it reads (or makes) each finished run's re-scored evaluation and
    writes its own table beside the protocol's; an unfinished run is a failure naming the command to run."""
    out = tmp_path / "out"
    out.mkdir()
    run = protocol_run_dir(out, [{"iteration": 1199, "sem_seg_volume/Dice": 0.79}], max_iter=1200)
    os.rename(run, out / "mixed_seed1")
    (out / "mixed_seed1" / "largest_component").mkdir()
    rescored = {"sem_seg_volume/Dice": 0.81, "sem_seg_volume/Dice-RV": 0.75, "sem_seg_volume_teacher/Dice": 0.7,
                "sem_seg_volume_teacher/Dice-RV": 0.6}
    (out / "mixed_seed1" / "largest_component" / "eval_results.json").write_text(json.dumps(rescored))
    rc = TOOL["main"](["--largest-component", "--arms", "mixed", "supervised_p3", "--seeds", "1", "--output", str(out)])
    assert rc == 1
    res = json.loads((out / "largest_component" / "results.json").read_text())
    assert res["table"]["mixed"]["Dice"] == [0.81, 0.0, 1] and res["table"]["mixed (teacher)"]["Dice"][0] == 0.7
    assert res["failures"] == [f"supervised_p3 seed 1 has no final results in {out}/supervised_p3_seed1: "
                               "train it first"]
    assert not (out / "results.md").exists()  # the protocol's own table is left alone


def test_largest_component_rescoring_evaluates_the_final_model_with_the_switch(tmp_path, monkeypatch):
    """A finished run without a re-scored evaluation gets one: train_net --eval-only of its config and final
    weights, TEST.VOLUME_LARGEST_COMPONENT True, into <run>/largest_component; a second call reuses it."""
    out = tmp_path / "out"
    out.mkdir()
    run = protocol_run_dir(out, [{"iteration": 1199, "sem_seg_volume/Dice": 0.79}], max_iter=1200)
    os.rename(run, out / "mixed_seed2")
    run_dir = str(out / "mixed_seed2")
    calls = []

    def fake_train(root, config, opts, log_dir, threads, what):
        calls.append((config, list(opts), log_dir))
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "eval_results.json"), "w") as f:
            json.dump({"sem_seg_volume/Dice": 0.8}, f)

    fn = TOOL["rescore_largest_component"]
    monkeypatch.setitem(fn.__globals__, "train", fake_train)
    args = type("Args", (), {"output": str(out), "threads": 1})()
    assert fn("mixed", 2, args)["sem_seg_volume/Dice"] == 0.8
    lc = os.path.join(run_dir, "largest_component")
    assert calls == [(os.path.join(run_dir, "config.yaml"),
                      ["--eval-only", "MODEL.WEIGHTS", os.path.join(run_dir, "model_final.pth"), "OUTPUT_DIR", lc,
                       "TEST.VOLUME_LARGEST_COMPONENT", "True"], lc)]
    assert fn("mixed", 2, args)["sem_seg_volume/Dice"] == 0.8 and len(calls) == 1  # done once


STUB_TRAIN_NET = r"""
import json, os, sys
argv = sys.argv[1:]
out = argv[argv.index("OUTPUT_DIR") + 1]
with open(os.path.join(out, "argv.json"), "w") as f:
    json.dump(argv, f)
with open(os.path.join(out, "config.yaml"), "w") as f:
    f.write("SOLVER:\n  MAX_ITER: 1\n")
with open(os.path.join(out, "metrics.json"), "w") as f:
    metrics = {"sem_seg_volume/" + m: 0.5 for m in json.loads(os.environ["ACDC_METRICS"])}
    f.write(json.dumps({"iteration": 0, **metrics}) + "\n")
"""
MOBILENET_OPTS = ["MODEL.BACKBONE.NAME", "build_mobilenet_v2_unet_backbone",
                  "MODEL.WEIGHTS", "pretrained/mobilenet_v2_imagenet.pth", "INPUT.FIXED_SIZE", "(256, 256)"]


def test_mobilenet_overrides_build_every_arm(tmp_path, monkeypatch):
    """The pretrained encoder by trailing overrides (no dry run: train_net is a stub that records its command
    line): every arm's command, parsed by train_net's own parser and loaded by load_config as train_net does,
    names the encoder, its weights and 256 px slices, fine-tunes every layer (FREEZE_AT 0), and builds."""
    from detectron2.modeling import build_model

    from mmt_psm.config import load_config
    from mmt_psm.core import protocol
    from mmt_psm.networks.mobilenet import MobileNetV2UNetEncoder
    from mmt_psm.train_net import argument_parser

    (tmp_path / "train_net.py").write_text(STUB_TRAIN_NET)
    monkeypatch.setattr(protocol, "TRAIN_COMMAND", [sys.executable, str(tmp_path / "train_net.py")])
    monkeypatch.setenv("ACDC_METRICS", json.dumps(TOOL["METRICS"]))
    arms = {"supervised_p3": "SemanticSegmentor", "mixed": "MixedSupervisionSegmentor",
            "mean_teacher": "LCCMeanTeacherSegmentor", "lcc": "LCCMeanTeacherSegmentor"}
    out = tmp_path / "out"
    assert TOOL["main"](["--arms", *arms, "--seeds", "1", "--output", str(out), *MOBILENET_OPTS]) == 0
    for arm, meta in arms.items():
        with open(out / f"{arm}_seed1" / "argv.json") as f:
            args = argument_parser().parse_args(json.load(f))
        cfg = load_config(args.config_file, args.opts)
        assert (cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.BACKBONE.NAME, cfg.MODEL.WEIGHTS) == (
            meta, "build_mobilenet_v2_unet_backbone", "pretrained/mobilenet_v2_imagenet.pth")
        assert tuple(cfg.INPUT.FIXED_SIZE) == (256, 256) and cfg.MODEL.BACKBONE.FREEZE_AT == 0
        assert cfg.DATASETS.TRAIN == ("acdc_p3_seed1_labeled",) and cfg.SEED == 1 and args.resume
        assert meta != "LCCMeanTeacherSegmentor" or cfg.MODEL.LCC.SEPARATION == (arm == "lcc")
        model = build_model(cfg)
        backbones = [model.backbone] if meta == "SemanticSegmentor" else [model.student.backbone,
                                                                         model.teacher.backbone]
        assert all(isinstance(b, MobileNetV2UNetEncoder) and b.body.in_channels == 1 for b in backbones)
        assert all(p.requires_grad for p in backbones[0].parameters())


def test_report_lists_each_runs_dice_at_every_evaluation(tmp_path):
    """The results text gains one line per run that evaluated before its end (TEST.EVAL_PERIOD), none otherwise."""
    out = tmp_path / "out"
    key = "sem_seg_volume/Dice"
    for name, records in (("mixed_seed1", [{"iteration": 299, key: 0.7}, {"iteration": 599, key: 0.8}]),
                          ("supervised_p3_seed1", [{"iteration": 599, key: 0.6}])):
        (out / name).mkdir(parents=True)
        (out / name / "config.yaml").write_text("SOLVER:\n  MAX_ITER: 600\n")
        (out / name / "metrics.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    text = TOOL["trajectories"](str(out), [("supervised_p3", 1), ("mixed", 1)])
    assert text.splitlines()[1:] == ["Mean 3D Dice at each evaluation (reported model):", "",
                                     "- mixed seed 1: it 300 0.700, it 600 0.800"]
    assert TOOL["trajectories"](str(out), [("supervised_p3", 1)]) == ""


def test_lcc_plus_arms_pin_the_loss_normaliser_they_were_measured_with(tmp_path, monkeypatch):
    """configs/acdc/lcc_plus.yaml divides LCC's terms by every pixel; the arms measured before it did keep "kept".
    Read from each arm's train_net command line as the tool writes it (train_net is the recording stub)."""
    from mmt_psm.config import load_config
    from mmt_psm.core import protocol
    from mmt_psm.train_net import argument_parser

    assert load_config(os.path.join(REPO, "configs", "acdc", "lcc_plus.yaml")).MODEL.LCC.LOSS_NORM == "all"
    (tmp_path / "train_net.py").write_text(STUB_TRAIN_NET)
    monkeypatch.setattr(protocol, "TRAIN_COMMAND", [sys.executable, str(tmp_path / "train_net.py")])
    monkeypatch.setenv("ACDC_METRICS", json.dumps(TOOL["METRICS"]))
    expected = {"lcc_plus": ("kept", "joint"), "lcc_plus_bn": ("kept", "labeled"),
                "lcc_plus_bn_all": ("all", "labeled")}
    out = tmp_path / "out"
    assert TOOL["main"](["--arms", *expected, "--seeds", "1", "--output", str(out)]) == 0
    for arm, (norm, bn) in expected.items():
        with open(out / f"{arm}_seed1" / "argv.json") as f:
            args = argument_parser().parse_args(json.load(f))
        cfg = load_config(args.config_file, args.opts)
        assert (cfg.MODEL.LCC.LOSS_NORM, cfg.MODEL.LCC.BN_STATS, cfg.MODEL.LCC.PROJECTION_DIM) == (norm, bn, 32), arm
