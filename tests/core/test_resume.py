"""--resume continues exactly: a run interrupted after N iterations ends identical to an uninterrupted one."""
import os
import shutil

import torch

from mmt_psm.core import Trainer


def _train(cfg, resume=False):
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


def test_resume_equals_uninterrupted_run(trained_mmt_psm, tmp_path):
    full = trained_mmt_psm.trainer  # burn-in 2, EMA from 1, checkpoint every 3 of 6 iterations
    # the interrupted run: its directory holds only what existed after iteration 3 (model_0000002.pth)
    part_dir = str(tmp_path / "part")
    os.makedirs(part_dir)
    shutil.copy(os.path.join(trained_mmt_psm.output_dir, "model_0000002.pth"), part_dir)
    with open(os.path.join(part_dir, "last_checkpoint"), "w") as f:
        f.write("model_0000002.pth")
    cfg_part = trained_mmt_psm.cfg.clone()
    cfg_part.defrost()
    cfg_part.OUTPUT_DIR = part_dir
    cfg_part.DATALOADER.STREAM_SEED = -1  # the data seed must come back from the checkpoint
    # bit-exact only at the same thread count (CPU reductions are split per thread)
    torch.set_num_threads(trained_mmt_psm.threads)
    resumed = _train(cfg_part, resume=True)
    assert resumed.start_iter == 3 and resumed.iter == full.iter == 6

    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, mismatched[:5]
    assert any(k.startswith("teacher.") for k in a)
    sa, sb = full._trainer.optimizer.state_dict(), resumed._trainer.optimizer.state_dict()
    for pid in sa["state"]:
        assert torch.equal(sa["state"][pid]["momentum_buffer"], sb["state"][pid]["momentum_buffer"])


def test_checkpoint_written_atomically(trained_mmt_psm):
    files = sorted(os.listdir(trained_mmt_psm.output_dir))
    assert {"model_final.pth", "model_0000002.pth", "last_checkpoint"} <= set(files)
    assert not [f for f in files if f.startswith(".") or ".tmp" in f]  # no temp file left behind
    with open(os.path.join(trained_mmt_psm.output_dir, "last_checkpoint")) as f:
        assert f.read() == "model_final.pth"
    state = torch.load(os.path.join(trained_mmt_psm.output_dir, "model_final.pth"), weights_only=True)
    assert state["trainer"]["iteration"] == 5 and "optimizer" in state["trainer"]["_trainer"]
    hooks = state["trainer"]["hooks"]
    assert hooks["TrainingStateHook"]["data_seed"] == trained_mmt_psm.trainer.data_seed == 7
