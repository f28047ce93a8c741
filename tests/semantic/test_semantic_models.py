"""The semantic meta-architectures on tiny ACDC-like data: finite losses, the shared core reused, export."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from common import REPO
from detectron2.data import DatasetCatalog
from semantic_common import tiny_acdc, tiny_semantic_cfg

from mmt_psm.core import Trainer
from mmt_psm.core.ema import EMATeacherHook
from mmt_psm.core.ramps import unsup_weight
from mmt_psm.core.teacher_student import TeacherStudentMixin
from mmt_psm.semantic import LCCMeanTeacherSegmentor, MixedSupervisionSegmentor

UNET_FILE = os.path.join(REPO, "mmt_psm", "networks", "unet.py")


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    return tiny_acdc(str(tmp_path_factory.mktemp("acdc")), prefix="tinyacdc")


def _train(cfg):
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


def _history(trainer, key):
    return [v for v, _ in trainer.storage.history(key).values()]


@pytest.mark.parametrize("meta", ["SemanticSegmentor", "MixedSupervisionSegmentor", "LCCMeanTeacherSegmentor"])
def test_tiny_run_losses_finite(acdc_root, tmp_path, meta):
    cfg = tiny_semantic_cfg(str(tmp_path), meta)
    trainer = _train(cfg)
    losses = [k for k in trainer.storage.histories() if k.startswith("loss")]
    assert losses and all(math.isfinite(v) for k in losses for v in _history(trainer, k))
    if meta == "MixedSupervisionSegmentor":
        assert {"loss_partial_ce", "loss_kl", "loss_entropy", "loss_sem_seg_top"} <= set(losses)
        assert all(v > 0 for v in _history(trainer, "mixed/loss_entropy_raw"))
    if meta == "LCCMeanTeacherSegmentor":
        assert {"loss_consistency", "loss_separation"} <= set(losses)
        fractions = _history(trainer, "lcc/low_conf_fraction")
        assert fractions and all(0.0 <= f <= 1.0 for f in fractions)
        assert any(v > 0 for v in _history(trainer, "lcc/prototype_norm_3"))


def test_evaluation_reports_both_models_volume_metrics(acdc_root, tmp_path):
    cfg = tiny_semantic_cfg(str(tmp_path), "LCCMeanTeacherSegmentor")
    cfg.merge_from_list(["DATASETS.TEST", ("tinyacdc_test",)])
    trainer = _train(cfg)
    res = Trainer.test(cfg, trainer.model)
    for task in ("sem_seg_volume", "sem_seg_volume_student"):
        assert res[task]["num_volumes"] == 4  # 2 test patients x 2 frames
        assert 0.0 <= res[task]["Dice"] <= 1.0 and res[task]["HD95"] >= 0.0
    assert "mIoU" in res["sem_seg"]


def test_mixed_supervision_structure(acdc_root, tmp_path):
    model = Trainer.build_model(tiny_semantic_cfg(str(tmp_path), "MixedSupervisionSegmentor"))
    assert isinstance(model, MixedSupervisionSegmentor)
    assert model.student.backbone is model.teacher.backbone  # one shared encoder
    assert model.student.sem_seg_head is not model.teacher.sem_seg_head
    assert model.teacher_student_pairs() == []  # no EMA: the top head learns by gradient
    assert all(p.requires_grad for p in model.teacher.parameters())
    model.eval()
    d = DatasetCatalog.get("tinyacdc_test")[0]
    from mmt_psm.semantic.slice_mapper import SemanticSliceMapper

    inp = SemanticSliceMapper(tiny_semantic_cfg(str(tmp_path)), is_train=False)(d)
    with torch.no_grad():
        with model.evaluate_with("student"):
            bottom = model([inp])[0]["sem_seg"]
        with model.evaluate_with("teacher"):
            top = model([inp])[0]["sem_seg"]
    assert bottom.shape == (4, d["height"], d["width"]) and not torch.equal(bottom, top)


def test_lcc_reuses_ema_hook_and_ramps(acdc_root, tmp_path):
    cfg = tiny_semantic_cfg(str(tmp_path), "LCCMeanTeacherSegmentor")
    trainer = Trainer(cfg)
    assert any(isinstance(h, EMATeacherHook) for h in trainer._hooks)
    model = trainer.model
    assert type(model).loss_weight is TeacherStudentMixin.loss_weight
    for t in range(0, 5):
        assert model.loss_weight(t) == unsup_weight(t, 0, 2, 0, 3, 1.0)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    trainer.train()
    assert _history(trainer, "ema_decay")  # the shared hook ran


def test_lcc_switches_give_plain_mean_teacher(acdc_root, tmp_path):
    cfg = tiny_semantic_cfg(str(tmp_path), "LCCMeanTeacherSegmentor")
    cfg.merge_from_list(["MODEL.LCC.LOW_CONF_ONLY", False, "MODEL.LCC.SEPARATION", False])
    trainer = _train(cfg)
    assert all(v == 0.0 for v in _history(trainer, "loss_separation"))
    assert all(v == 1.0 for v in _history(trainer, "lcc/low_conf_fraction"))
    assert isinstance(trainer.model, LCCMeanTeacherSegmentor)
    assert not trainer.model.prototypes_initialized.any()


def test_export_loads_in_plain_default_predictor(acdc_root, tmp_path):
    """The mixed-supervision bottom head exports as a plain SemanticSegmentor; a subprocess that loads only
    unet.py (not mmt_psm) reproduces its predictions in DefaultPredictor."""
    cfg = tiny_semantic_cfg(str(tmp_path / "run"), "MixedSupervisionSegmentor")
    cfg.merge_from_list(["SEMI.EVAL_WITH", "student", "SOLVER.MAX_ITER", 2])
    trainer = _train(cfg)
    (tmp_path / "run" / "config.yaml").write_text(cfg.dump())  # as train_net's default_setup writes it
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_teacher.py"), str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert os.path.isfile(tmp_path / "run" / "model_student.pth")
    d = DatasetCatalog.get("tinyacdc_test")[0]
    model = trainer.model.eval()
    from mmt_psm.semantic.slice_mapper import SemanticSliceMapper

    inp = SemanticSliceMapper(cfg, is_train=False)(d)
    with torch.no_grad():
        expected = model([inp])[0]["sem_seg"].argmax(0).numpy()
    script = f"""
import importlib.util, json, sys, cv2, numpy as np
spec = importlib.util.spec_from_file_location("unet", {UNET_FILE!r})
unet = importlib.util.module_from_spec(spec); spec.loader.exec_module(unet)
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor
cfg = get_cfg(); unet.add_unet_config(cfg); cfg.merge_from_file({str(tmp_path / "run" / "config_student.yaml")!r})
assert cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor", cfg.MODEL.META_ARCHITECTURE
img = cv2.imread({d["file_name"]!r}, cv2.IMREAD_UNCHANGED).astype(np.float32) * (255.0 / 65535.0)
img = cv2.resize(img, (32, 32), interpolation=cv2.INTER_LINEAR)[:, :, None]  # the exported FIXED_SIZE
logits = DefaultPredictor(cfg)(img)["sem_seg"]  # at the 32 x 32 input; back to the original size:
import torch.nn.functional as F
pred = F.interpolate(logits[None], size=({d["height"]}, {d["width"]}), mode="bilinear", align_corners=False)[0]
print(json.dumps({{"mmt_psm_loaded": any(m.startswith("mmt_psm") for m in sys.modules),
                  "pred": pred.argmax(0).tolist()}}))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["mmt_psm_loaded"] is False
    np.testing.assert_array_equal(np.array(got["pred"]), expected)


def test_lcc_projection_and_delayed_separation(acdc_root, tmp_path):
    """PROJECTION_DIM puts prototypes in the projector's space (trained, not exported); before
    SEPARATION_START_ITER the separation term is exactly zero while consistency runs, after it non-zero."""
    cfg = tiny_semantic_cfg(str(tmp_path), "LCCMeanTeacherSegmentor")
    cfg.merge_from_list(["MODEL.LCC.PROJECTION_DIM", 5, "MODEL.LCC.SEPARATION_START_ITER", 3, "SOLVER.MAX_ITER", 6,
                         "MODEL.LCC.TAU", 1.01])  # every pixel low-confidence: the term has pixels once on
    model = Trainer.build_model(cfg)
    assert model.prototypes.shape == (4, 5) and model.projector is not None
    before = [p.detach().clone() for p in model.projector.parameters()]
    trainer = _train(cfg)
    sep = trainer.storage.history("lcc/loss_separation_raw").values()
    by_iter = {it: v for v, it in sep}
    assert all(by_iter[it] == 0.0 for it in by_iter if it < 3)
    assert any(by_iter[it] > 0.0 for it in by_iter if it >= 3)
    after = list(trainer.model.projector.parameters())
    assert any(not torch.equal(a.detach(), b) for a, b in zip(after, before))  # in the optimizer, learned
    assert not any(k.startswith("projector") for k in trainer.model.student.state_dict())


def test_lcc_projection_unused_without_separation_is_not_built(acdc_root, tmp_path):
    """No separation term, no projector: nothing untrained sits in the optimizer or the checkpoint."""
    cfg = tiny_semantic_cfg(str(tmp_path), "LCCMeanTeacherSegmentor")
    cfg.merge_from_list(["MODEL.LCC.PROJECTION_DIM", 5, "MODEL.LCC.SEPARATION", False])
    model = Trainer.build_model(cfg)
    assert model.projector is None
    assert not any(k.startswith("projector") for k in model.state_dict())


def test_lcc_bn_stats_labeled_keeps_running_statistics_of_labeled_images(acdc_root, tmp_path):
    """BN_STATS labeled: the labeled half's outputs and BatchNorm's running statistics equal a forward of the
    labeled images alone; the unlabeled half is normalised by its own batch; "joint" mixes both in the stats."""
    from detectron2.structures import ImageList

    from mmt_psm.semantic.common import segment, segment_split

    cfg = tiny_semantic_cfg(str(tmp_path), "LCCMeanTeacherSegmentor")
    cfg.merge_from_list(["MODEL.LCC.BN_STATS", "labeled", "MODEL.UNET.DROPOUT", (0.0, 0.0, 0.0)])
    model = Trainer.build_model(cfg)
    assert model.bn_stats == "labeled"
    student = model.student.train()
    torch.manual_seed(0)
    x = torch.randn(4, 1, 32, 32)
    x[2:] = x[2:] * 3.0 + 2.0  # the "unlabeled" half has other statistics
    images = ImageList(x, [(32, 32)] * 4)

    def running(m):
        return [t.clone() for n, t in m.state_dict().items() if "running_" in n or "num_batches_tracked" in n]

    import copy

    ref, joint = copy.deepcopy(student), copy.deepcopy(student)
    feats, logits = segment_split(student, images, 2, "labeled")
    ref_feats, ref_logits = segment(ref, ImageList(x[:2], [(32, 32)] * 2))
    _, unl_logits = segment(copy.deepcopy(student), ImageList(x[2:], [(32, 32)] * 2))
    assert torch.allclose(logits[:2], ref_logits, atol=1e-6) and torch.allclose(feats[:2], ref_feats, atol=1e-6)
    assert torch.allclose(logits[2:], unl_logits, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(running(student), running(ref)))
    segment_split(joint, images, 2, "joint")
    assert not all(torch.allclose(a, b) for a, b in zip(running(joint), running(ref)))
    # momentum restored after the frozen pass
    assert all(m.momentum == 0.1 for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with pytest.raises(ValueError, match="BN_STATS"):
        cfg.merge_from_list(["MODEL.LCC.BN_STATS", "labelled"])
        Trainer.build_model(cfg)
    cfg.merge_from_list(["MODEL.LCC.BN_STATS", "labeled"])
    trainer = _train(cfg)
    assert all(math.isfinite(v) for v in _history(trainer, "loss_consistency"))


def test_lcc_loss_norm_all_weighs_kept_pixels_as_mean_teacher_does(acdc_root, tmp_path, monkeypatch):
    """LOSS_NORM "all": the same batch, weights and teacher noise give the "kept" consistency times the kept
    fraction (the kept pixels' sum over every image pixel); the separation term shrinks likewise."""
    import copy

    from detectron2.utils.events import EventStorage

    import mmt_psm.semantic.lcc_mean_teacher as lcc

    original = lcc.low_confidence_mask

    def left_half(probs, tau):  # an untrained teacher is unsure everywhere: keep the left half only
        low, pseudo = original(probs, tau)
        low[..., low.shape[-1] // 2:] = False
        return low, pseudo

    monkeypatch.setattr(lcc, "low_confidence_mask", left_half)
    cfg = tiny_semantic_cfg(str(tmp_path), "LCCMeanTeacherSegmentor")
    cfg.merge_from_list(["MODEL.UNET.DROPOUT", (0.0, 0.0, 0.0)])
    kept_model = Trainer.build_model(cfg)
    assert kept_model.loss_norm == "kept"
    all_model = copy.deepcopy(kept_model)
    all_model.loss_norm = "all"
    batch = next(iter(Trainer.build_train_loader(cfg)))
    out = {}
    for name, model in (("kept", kept_model), ("all", all_model)):
        with EventStorage(start_iter=5) as storage:  # after the ramp: weight 1
            torch.manual_seed(0)  # the teacher's input noise
            out[name] = model.train()(batch)
            frac = storage.latest()["lcc/low_conf_fraction"][0]
    assert 0.3 < frac < 0.6  # about the left half of the (unpadded) pixels
    assert out["all"]["loss_consistency"].item() == pytest.approx(out["kept"]["loss_consistency"].item() * frac,
                                                                   rel=1e-4)
    assert 0.0 < out["all"]["loss_separation"].item() < out["kept"]["loss_separation"].item()
    cfg.merge_from_list(["MODEL.LCC.LOSS_NORM", "pixels"])
    with pytest.raises(ValueError, match="LOSS_NORM must be 'kept' or 'all'"):
        Trainer.build_model(cfg)
