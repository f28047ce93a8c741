"""MMT-PSM meta-architecture: losses on a real step, zero pseudo-labels, teacher mode, switches, NaN stop."""
import math
import os

import pytest
import torch
from common import REPO, tiny_cfg, tiny_synthetic
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from mmt_psm.core import Trainer
from mmt_psm.instance.mapper import CellDatasetMapper
from mmt_psm.instance.view_mapper import MMTPSMViewMapper


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tiny_synthetic(str(tmp_path_factory.mktemp("tiny")), prefix="mdl")
    return "mdl"


def _batch(cfg):
    lab = CellDatasetMapper(cfg, True)(DatasetCatalog.get("mdl_train")[0])
    unl = MMTPSMViewMapper(cfg)(DatasetCatalog.get("mdl_unlabeled")[0])
    lab["labeled"], unl["labeled"] = True, False
    return [lab, unl]


def _model(cfg, **overrides):
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    torch.manual_seed(0)
    return build_model(cfg)


def test_step_after_burn_in_gives_finite_distillation_losses(data, tmp_path):
    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random teacher: keep its (low-score) detections as pseudo-labels
    model = _model(cfg)
    with EventStorage(start_iter=10) as storage:
        losses = model(_batch(cfg))
        sum(losses.values()).backward()
    assert {"loss_cls", "loss_mask", "loss_rpn_cls", "loss_psm", "loss_mgd"} <= set(losses)
    assert all(math.isfinite(float(v)) for v in losses.values())
    assert float(losses["loss_psm"]) > 0 and float(losses["loss_mgd"]) > 0
    assert storage.latest()["mmt_psm/pseudo_labels_per_image"][0] > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.adaptors_student.adaptors["p2"].weight.grad.abs().sum() > 0


def test_teacher_that_predicts_nothing_gives_zero_losses_and_training_goes_on(data, tmp_path):
    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 1.01  # no detection can pass
    model = _model(cfg)
    with EventStorage(start_iter=10) as storage:
        losses = model(_batch(cfg))
        sum(losses.values()).backward()
    assert float(losses["loss_psm"]) == 0.0 and float(losses["loss_mgd"]) == 0.0
    assert math.isfinite(float(sum(losses.values())))
    assert storage.latest()["mmt_psm/pseudo_labels_per_image"][0] == 0
    assert storage.latest()["mmt_psm/mined_negatives_per_image"][0] == 0
    # the adaptors took part in the graph (same parameters on every DDP rank), with zero gradient
    assert torch.count_nonzero(model.adaptors_student.adaptors["p2"].weight.grad) == 0


def test_burn_in_is_supervised_only(data, tmp_path):
    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    model = _model(cfg)
    with EventStorage(start_iter=0) as storage:
        losses = model(_batch(cfg))
    assert float(losses["loss_psm"]) == 0.0 and float(losses["loss_mgd"]) == 0.0
    assert storage.latest()["mmt_psm/unsup_weight"][0] == 0.0
    assert "mmt_psm/pseudo_labels_per_image" not in storage.latest()


def test_teacher_stays_in_eval_mode_and_only_the_student_has_dropout(data, tmp_path):
    model = _model(tiny_cfg(str(tmp_path), data, "MMTPSMRCNN"))
    model.train()
    assert model.student.training and not model.teacher.training and not model.adaptors_teacher.training
    assert isinstance(model.student.roi_heads.box_head.student_dropout, torch.nn.Dropout)
    assert not hasattr(model.teacher.roi_heads.box_head, "student_dropout")
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_plain_detector_weights_load_into_student_and_teacher(data, tmp_path):
    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    model = _model(cfg)
    plain = _model(tiny_cfg(str(tmp_path), data, "GeneralizedRCNN")).state_dict()
    result = model.load_state_dict(plain, strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith("adaptors_") for k in result.missing_keys)
    key = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(model.student.state_dict()[key], plain[key])
    assert torch.equal(model.teacher.state_dict()[key], plain[key])


def test_mean_teacher_switches_run(data, tmp_path):
    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    cfg.merge_from_list(["MODEL.MMT_PSM.NUM_TEACHER_COPIES", 1, "MODEL.MMT_PSM.TEACHER_FLIP", False,
                         "MODEL.MMT_PSM.MINING", False, "MODEL.MMT_PSM.MGD_USE_MASK", False,
                         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    model = _model(cfg)
    batch = _batch(cfg)
    assert len(batch[1]["teacher_views"]) == 1
    with EventStorage(start_iter=10) as storage:
        losses = model(batch)
    # no mining: every sampled proposal is kept, so no "mined" negatives are counted as such
    assert float(losses["loss_psm"]) > 0 and float(losses["loss_mgd"]) > 0
    assert storage.latest()["mmt_psm/mined_negatives_per_image"][0] > 0


def test_nan_loss_stops_with_iteration_and_loss_terms(data, tmp_path):
    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    cfg.merge_from_list(["SOLVER.MAX_ITER", 2])
    trainer = Trainer(cfg)
    with torch.no_grad():
        trainer.model.student.roi_heads.box_predictor.cls_score.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"iteration=0(.|\n)*loss_cls"):
        trainer.train()


def test_step_under_autocast_reduced_precision(data, tmp_path):
    """AMP stand-in on CPU (bfloat16 autocast): the unsupervised path has no dtype mismatches, losses finite."""
    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    model = _model(cfg)
    with EventStorage(start_iter=10), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(_batch(cfg))
    sum(losses.values()).backward()
    assert all(math.isfinite(float(v)) for v in losses.values())
    assert float(losses["loss_mgd"]) > 0


@pytest.mark.parametrize("psm,mgd", [(True, False), (False, True)])
def test_each_component_alone(data, tmp_path, psm, mgd):
    """Ablation switches: the disabled loss is an exact zero, the enabled one is positive."""
    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    cfg.merge_from_list(["MODEL.MMT_PSM.PSM_LOSS", psm, "MODEL.MMT_PSM.MGD_LOSS", mgd,
                         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    model = _model(cfg)
    with EventStorage(start_iter=10):
        losses = model(_batch(cfg))
        sum(losses.values()).backward()
    assert (float(losses["loss_psm"]) > 0) == psm and (float(losses["loss_mgd"]) > 0) == mgd
    assert model.adaptors_student.adaptors["p3"].weight.grad is not None  # same parameters used either way


def test_ablation_configs_load(tmp_path):
    from detectron2.config import get_cfg

    from mmt_psm.config import add_mmt_psm_config

    for name, key, value in [("psm_only", "MGD_LOSS", False), ("mgd_only", "PSM_LOSS", False),
                             ("no_mining", "MINING", False)]:
        cfg = get_cfg()
        add_mmt_psm_config(cfg)
        cfg.merge_from_file(os.path.join(REPO, "configs", "ablations", f"mmt_psm_R50_{name}.yaml"))
        assert cfg.MODEL.MMT_PSM[key] is value and cfg.MODEL.META_ARCHITECTURE == "MMTPSMRCNN"


def test_checkpointer_loads_plain_weights_into_student_and_teacher(data, tmp_path):
    """MODEL.WEIGHTS from a plain detector with another class count (COCO-like), and a backbone file loaded
    with Detectron2's name-matching heuristics (.pyth), both fill student and teacher."""
    from mmt_psm.core.checkpoint import AtomicCheckpointer

    plain_cfg = tiny_cfg(str(tmp_path), data, "GeneralizedRCNN")
    plain_cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5  # another head: its predictor weights must be skipped, not crash
    plain = _model(plain_cfg).state_dict()
    torch.save({"model": plain}, str(tmp_path / "coco_like.pth"))
    model = _model(tiny_cfg(str(tmp_path), data, "MMTPSMRCNN"))
    own_cls = model.student.roi_heads.box_predictor.cls_score.weight.clone()
    AtomicCheckpointer(model).load(str(tmp_path / "coco_like.pth"))
    key = "backbone.fpn_lateral2.weight"
    assert torch.equal(model.student.state_dict()[key], plain[key])
    assert torch.equal(model.teacher.state_dict()[key], plain[key])
    assert torch.equal(model.student.roi_heads.box_predictor.cls_score.weight, own_cls)  # shape mismatch skipped

    backbone = {k[len("backbone.bottom_up."):]: v for k, v in plain.items() if k.startswith("backbone.bottom_up.")}
    torch.save({"model_state": backbone}, str(tmp_path / "imagenet.pyth"))
    model = _model(tiny_cfg(str(tmp_path), data, "MMTPSMRCNN"))
    AtomicCheckpointer(model).load(str(tmp_path / "imagenet.pyth"))
    key = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(model.student.state_dict()[key], plain[key])
    assert torch.equal(model.teacher.state_dict()[key], plain[key])


def test_pseudo_labels_are_kept_only_when_recording(data, tmp_path):
    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    model = _model(cfg)
    with EventStorage(start_iter=10):
        model(_batch(cfg))
        assert model._last_pseudo is None  # no batch kept alive between steps by default
        model.record_pseudo_labels = True
        model(_batch(cfg))
    unlabeled, detections = model._last_pseudo
    assert len(unlabeled) == 1 and len(detections) == 1 and len(detections[0]) > 0
