"""CUDA-only checks (``-m cuda``; skipped without a GPU, run by tools/gpu_check.sh): the EMA teacher stays fp32 and
finite under AMP, one MMT-PSM step (paper and plus switches) and the semantic U-Net models under fp16 autocast
give finite losses, PSM stage 1 trains on the GPU."""
import math
import os

import numpy as np
import pytest
import torch
from common import tiny_cfg, tiny_synthetic
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

# tools/gpu_check.sh sets MMT_PSM_REQUIRE_CUDA=1: there a missing GPU fails these tests instead of skipping them
REQUIRE_CUDA = os.environ.get("MMT_PSM_REQUIRE_CUDA") == "1"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not REQUIRE_CUDA and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False); tools/gpu_check.sh runs these"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tiny_synthetic(str(tmp_path_factory.mktemp("tiny")), prefix="cuda")
    return "cuda"


def _float_tensors(module):
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


def test_ema_teacher_stays_fp32_and_finite_under_amp(data, tmp_path):
    """Detectron2's AMPTrainer (fp16 autocast + GradScaler) with the EMA hook: the teacher's weights and buffers
    stay float32 and finite, on the GPU, and the EMA moved them."""
    from mmt_psm.core import Trainer

    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    cfg.merge_from_list(["MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", True, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
                         "SOLVER.MAX_ITER", 5, "SOLVER.CHECKPOINT_PERIOD", 1000])
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    before = {k: v.clone() for k, v in _float_tensors(model.teacher).items()}
    trainer.train()
    after = _float_tensors(model.teacher)
    assert all(v.dtype == torch.float32 and v.is_cuda for v in after.values())
    bad = [k for k, v in after.items() if not torch.isfinite(v).all()]
    assert not bad, bad[:5]
    assert any(not torch.equal(before[k], v) for k, v in after.items())  # the EMA updated the teacher
    assert all(p.dtype == torch.float32 for p in model.student.parameters())
    pseudo = [v for v, _ in trainer.storage.history("mmt_psm/pseudo_labels_per_image").values()]
    assert pseudo and all(math.isfinite(v) for v in pseudo)  # the unsupervised path ran after burn-in


@pytest.mark.parametrize("switches", [[], ["MODEL.MMT_PSM.FUSE_ALL_VIEWS", True, "MODEL.MMT_PSM.MASK_DISTILL", True,
                                           "MODEL.MMT_PSM.MGD_LOSS", False]], ids=["paper", "plus"])
def test_mmt_psm_step_under_fp16_autocast(data, tmp_path, switches):
    """One MMT-PSM training step (labeled + unlabeled, past burn-in) under fp16 autocast: every loss finite,
    the unsupervised ones positive, gradients finite."""
    from mmt_psm.instance.mapper import CellDatasetMapper
    from mmt_psm.instance.view_mapper import MMTPSMViewMapper

    cfg = tiny_cfg(str(tmp_path), data, "MMTPSMRCNN")
    cfg.merge_from_list(["MODEL.DEVICE", "cuda", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, *switches])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    np.random.seed(0)
    lab = CellDatasetMapper(cfg, True)(DatasetCatalog.get(f"{data}_train")[0])
    unl = [MMTPSMViewMapper(cfg)(d) for d in DatasetCatalog.get(f"{data}_unlabeled")[:2]]
    batch = [dict(lab, labeled=True)] + [dict(d, labeled=False) for d in unl]
    with EventStorage(start_iter=10), torch.autocast("cuda", dtype=torch.float16):
        losses = model(batch)
    sum(losses.values()).backward()
    values = {k: float(v) for k, v in losses.items()}
    assert all(math.isfinite(v) for v in values.values()), values
    assert values["loss_psm"] > 0 and (values["loss_mgd"] > 0 if not switches else values["loss_mask_distill"] > 0)
    grads = [p.grad for p in model.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("meta", ["SemanticSegmentor", "MixedSupervisionSegmentor", "LCCMeanTeacherSegmentor"])
def test_semantic_unet_steps_under_autocast(tmp_path, meta):
    """The U-Net models (supervised, mixed supervision, LCC mean teacher) train 3 steps with AMPTrainer on the GPU:
    every logged loss finite; a teacher stays float32."""
    from semantic_common import tiny_acdc, tiny_semantic_cfg

    from mmt_psm.core import Trainer

    tiny_acdc(str(tmp_path / "acdc"), prefix="cudaacdc")
    cfg = tiny_semantic_cfg(str(tmp_path / "run"), meta, prefix="cudaacdc")
    cfg.merge_from_list(["MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", True])
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    losses = {k: [v for v, _ in h.values()] for k, h in trainer.storage.histories().items() if k.startswith("loss")}
    assert losses and all(math.isfinite(v) for vals in losses.values() for v in vals), losses
    teacher = getattr(trainer.model, "teacher", None)
    if teacher is not None:
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in _float_tensors(teacher).values())


def test_psm_stage1_trains_on_the_gpu():
    """train_self_supervised(device="cuda") runs its steps on the GPU and hands back a finite CPU network."""
    from psm_common import he_tile

    from mmt_psm.nuclei.self_supervised import train_self_supervised

    img, _ = he_tile((64, 64))
    torch.cuda.reset_peak_memory_stats()
    net = train_self_supervised([img], iters=20, crop=32, batch=4, lr=1e-2, channels=(4, 8), seed=1, device="cuda")
    assert torch.cuda.max_memory_allocated() > 0
    assert not net.training and all(p.device.type == "cpu" and torch.isfinite(p).all() for p in net.parameters())
