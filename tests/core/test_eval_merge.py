"""Teacher/student evaluation: the merged results hold each model's metrics under the right name (SEMI.EVAL_WITH
teacher or student), for one and for several test sets, in Trainer.test and in train_net.py --eval-only."""
import json
import os
from collections import OrderedDict

import pytest
import torch
from common import tiny_cfg, tiny_synthetic
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.testing import flatten_results_dict

from mmt_psm.core import Trainer


class CountingEvaluator(DatasetEvaluator):
    """Counts images and detections: the teacher of these tests predicts nothing, the student many."""

    def reset(self):
        self.images, self.dets = 0, 0

    def process(self, inputs, outputs):
        self.images += len(inputs)
        self.dets += sum(len(o["instances"]) for o in outputs)

    def evaluate(self):
        return OrderedDict(count={"images": float(self.images), "dets": float(self.dets)})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("em"))
    tiny_synthetic(root, prefix="em", n_train=2, n_test=2, n_unlabeled=1)
    name = "em_test_copy"  # a second test set (the first image only)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: DatasetCatalog.get("em_test")[:1])
    MetadataCatalog.get(name).set(**{k: v for k, v in MetadataCatalog.get("em_test").as_dict().items()
                                     if k != "name"})
    return "em"


def _cfg(tmp_path, data, eval_with="teacher", tests=("em_test",)):
    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    cfg.merge_from_list(["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "SEMI.EVAL_WITH", eval_with,
                         "DATASETS.TEST", tests])
    if "EVAL_BOTH" in cfg.SEMI:  # a switch that may turn off the second evaluation: both models here
        cfg.SEMI.EVAL_BOTH = True
    return cfg


def _model(cfg):
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    silence_teacher(model.teacher)
    return model


def silence_teacher(teacher):
    """Foreground logits of -1e4: every foreground score is exactly 0, below any threshold."""
    with torch.no_grad():
        teacher.roi_heads.box_predictor.cls_score.bias[:-1] = -1e4


def _check(metrics, n_images, teacher_name, student_name):
    assert metrics[teacher_name] == {"images": n_images, "dets": 0.0}
    assert metrics[student_name]["images"] == n_images and metrics[student_name]["dets"] > 0


@pytest.mark.parametrize("eval_with", ["teacher", "student"])
def test_one_test_set_holds_both_models_under_the_right_names(data, tmp_path, eval_with):
    cfg = _cfg(tmp_path, data, eval_with)
    model = _model(cfg)
    model.train()
    results = Trainer.test(cfg, model, [CountingEvaluator()])
    if eval_with == "teacher":
        assert list(results) == ["count", "count_student"]
        _check(results, 2.0, "count", "count_student")
    else:
        assert list(results) == ["count", "count_teacher"]
        _check(results, 2.0, "count_teacher", "count")
    assert model._eval_with == eval_with and model.student.training and not model.teacher.training


def test_several_test_sets_are_merged_per_data_set(data, tmp_path):
    cfg = _cfg(tmp_path, data, "teacher", ("em_test", "em_test_copy"))
    results = Trainer.test(cfg, _model(cfg), [CountingEvaluator(), CountingEvaluator()])
    assert list(results) == ["em_test", "em_test_copy"]
    assert list(results["em_test"]) == ["count", "count_student"]
    _check(results["em_test"], 2.0, "count", "count_student")
    _check(results["em_test_copy"], 1.0, "count", "count_student")


def test_eval_both_off_evaluates_only_the_reported_model(data, tmp_path):
    cfg = _cfg(tmp_path, data, "student")
    if "EVAL_BOTH" not in cfg.SEMI:
        pytest.skip("SEMI.EVAL_BOTH does not exist in this tree")
    cfg.SEMI.EVAL_BOTH = False
    results = Trainer.test(cfg, _model(cfg), [CountingEvaluator()])
    assert list(results) == ["count"] and results["count"]["dets"] > 0  # the student's


def _train_net():
    """The module tools/train_net.py runs."""
    import mmt_psm.train_net

    return mmt_psm.train_net


@pytest.mark.parametrize("tests", [("em_test",), ("em_test", "em_test_copy")])
def test_eval_only_command_line_merges_teacher_and_student(data, tmp_path, monkeypatch, tests):
    cfg = _cfg(tmp_path / "out", data, "teacher", tests)
    weights = str(tmp_path / "weights.pth")
    torch.save({"model": _model(cfg).state_dict()}, weights)  # a teacher-student checkpoint, teacher silenced
    config = str(tmp_path / "config.yaml")
    with open(config, "w") as f:
        f.write(cfg.dump())
    monkeypatch.setattr(Trainer, "build_evaluator", classmethod(lambda cls, cfg, name, output_folder=None:
                                                                 CountingEvaluator()))
    train_net = _train_net()
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", config, "--eval-only", "MODEL.WEIGHTS", weights])
    results = train_net.main(args)
    per_set = {tests[0]: results} if len(tests) == 1 else results
    assert list(per_set) == list(tests)
    for name, n in zip(tests, (2.0, 1.0)):
        assert list(per_set[name]) == ["count", "count_student"]
        _check(per_set[name], n, "count", "count_student")
    with open(os.path.join(cfg.OUTPUT_DIR, "eval_results.json")) as f:  # the flattened results, for scripts
        written = json.load(f)
    key = "count/dets" if len(tests) == 1 else f"{tests[0]}/count/dets"
    assert written[key] == per_set[tests[0]]["count"]["dets"] and len(written) == len(flatten_results_dict(results))
