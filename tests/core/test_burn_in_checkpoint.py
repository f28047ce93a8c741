"""SEMI.BURN_IN_CHECKPOINT: the teacher-student phase continues a supervised run instead of re-training its burn-in."""
import os

import pytest
import torch
from common import tiny_cfg, tiny_synthetic

from mmt_psm.core import Trainer


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory):
    """4 supervised iterations, one labeled image per step (MMT-PSM's labeled stream in tiny_cfg), linear warm-up
    over all of them (so the learning rate differs per iteration), a checkpoint after iteration 1."""
    root = tmp_path_factory.mktemp("burn_in")
    tiny_synthetic(str(root / "data"), prefix="burnin")
    cfg = tiny_cfg(str(root / "supervised"), "burnin")
    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", 1, "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2,
                         "SOLVER.WARMUP_ITERS", 4])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return root, cfg, trainer


def _mmt_cfg(root, checkpoint: str, burn_in: int = 2):
    cfg = tiny_cfg(str(root / f"mmt_{burn_in}"), "burnin", "MMTPSMRCNN")
    cfg.merge_from_list(["SOLVER.MAX_ITER", 4, "SOLVER.WARMUP_ITERS", 4, "SEMI.BURN_IN_ITERS", burn_in,
                         "SEMI.BURN_IN_CHECKPOINT", checkpoint, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    return cfg


def test_starts_at_burn_in_with_the_checkpoints_weights_lr_and_labeled_stream(supervised_run):
    root, sup_cfg, sup = supervised_run
    ckpt = os.path.join(sup_cfg.OUTPUT_DIR, "model_0000001.pth")
    mmt = Trainer(_mmt_cfg(root, ckpt))
    mmt.resume_or_load(resume=False)
    assert mmt.start_iter == 2

    weights = torch.load(ckpt, weights_only=True)["model"]
    state = mmt.model.state_dict()
    for part in ("student", "teacher"):  # both: the teacher is the copy burn-in would end with
        assert all(torch.equal(state[f"{part}.{k}"], v) for k, v in weights.items()), part

    lr = dict((it, v) for v, it in sup.storage.history("lr").values())  # the rate each iteration trained with
    assert lr[2] != lr[0]
    assert all(g["lr"] == pytest.approx(lr[2], rel=1e-9) for g in mmt.optimizer.param_groups)

    # the labeled images of its first step are the supervised run's third batch (stream position 2)
    sup_batches = iter(Trainer.build_train_loader(sup_cfg))
    third = [next(sup_batches) for _ in range(3)][-1]
    first = next(iter(mmt._trainer.data_loader))
    assert [d["file_name"] for d in first if d.get("labeled", True) and "instances" in d] == \
        [d["file_name"] for d in third]
    assert [d["image"].sum().item() for d in first[:1]] == [d["image"].sum().item() for d in third]

    mmt.train()  # the two teacher-student iterations run, with the unsupervised losses on from the first
    assert mmt.iter == 4  # Detectron2 leaves iter at MAX_ITER after the last one
    assert [it for _, it in mmt.storage.history("loss_psm").values()] == [2, 3]


def test_a_checkpoint_from_another_iteration_is_refused(supervised_run):
    root, sup_cfg, _ = supervised_run
    ckpt = os.path.join(sup_cfg.OUTPUT_DIR, "model_0000001.pth")
    with pytest.raises(ValueError, match=r"model_0000001\.pth was written after iteration 1, but "
                                         r"SEMI\.BURN_IN_ITERS=3 needs the checkpoint after iteration 2"):
        Trainer(_mmt_cfg(root, ckpt, burn_in=3)).resume_or_load(resume=False)
    weights_only = str(root / "weights_only.pth")
    torch.save({"model": torch.load(ckpt, weights_only=True)["model"]}, weights_only)
    with pytest.raises(ValueError, match=r"weights_only\.pth holds no training iteration"):
        Trainer(_mmt_cfg(root, weights_only)).resume_or_load(resume=False)


def test_missing_checkpoint_and_a_model_without_teacher_are_named(supervised_run):
    root, sup_cfg, _ = supervised_run
    missing = str(root / "nowhere" / "model_0000001.pth")
    with pytest.raises(FileNotFoundError, match=r"nowhere/model_0000001\.pth does not exist .*after iteration 1"):
        Trainer(_mmt_cfg(root, missing)).resume_or_load(resume=False)
    cfg = sup_cfg.clone()
    cfg.merge_from_list(["SEMI.BURN_IN_CHECKPOINT", missing, "OUTPUT_DIR", str(root / "sup2")])
    with pytest.raises(ValueError, match="GeneralizedRCNN has no teacher; use MODEL.WEIGHTS"):
        Trainer(cfg).resume_or_load(resume=False)


def test_resume_prefers_the_runs_own_checkpoint(trained_mmt_psm):
    cfg = trained_mmt_psm.cfg.clone()
    cfg.defrost()
    cfg.SEMI.BURN_IN_CHECKPOINT = "/nonexistent/model_0000001.pth"  # never read: the run has its own checkpoint
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 6  # after model_final (iteration 5), not BURN_IN_ITERS (2)


def test_a_teacher_student_burn_in_is_the_supervised_runs_first_iterations_bit_for_bit(supervised_run):
    """Same SEED, labeled stream and solver: building the teacher and the unlabeled stream draws random numbers,
    yet the burn-in samples the same proposals and dropout masks (every RNG re-seeded when training starts)."""
    from detectron2.utils.env import seed_all_rng

    root = supervised_run[0]

    def student_after_burn_in(name, unlabeled):
        cfg = tiny_cfg(str(root / name), "burnin", "MMTPSMRCNN")
        cfg.merge_from_list(["SOLVER.MAX_ITER", 3, "SEMI.BURN_IN_ITERS", 10, "MODEL.MMT_PSM.STUDENT_BOX_DROPOUT", 0.5])
        if not unlabeled:
            cfg.merge_from_list(["DATASETS.TRAIN_UNLABELED", (), "SEMI.IMS_PER_BATCH_UNLABELED", 0])
        seed_all_rng(cfg.SEED)  # what default_setup does before the model is built
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        losses = [v for v, _ in trainer.storage.history("loss_cls").values()]
        return losses, {k: v for k, v in trainer.model.state_dict().items() if k.startswith("student.")}

    sup_losses, sup = student_after_burn_in("bit_sup", unlabeled=False)
    ts_losses, ts = student_after_burn_in("bit_ts", unlabeled=True)
    assert len(sup_losses) == 3 and sup_losses == ts_losses
    assert sup.keys() == ts.keys() and all(torch.equal(sup[k], ts[k]) for k in sup)
