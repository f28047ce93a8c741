"""--resume continues exactly: a run interrupted after N iterations ends identical to an uninterrupted one."""
import os
import shutil

import torch
from common import tiny_cfg, tiny_synthetic

from mmt_psm.engine import Trainer


def _train(cfg, resume=False):
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


def test_resume_equals_uninterrupted_run(tmp_path):
    tiny_synthetic(str(tmp_path / "data"), prefix="res")
    full_dir, part_dir = str(tmp_path / "full"), str(tmp_path / "part")
    cfg = tiny_cfg(full_dir, "res", "MMTPSMRCNN")  # burn-in 2, EMA from 1, checkpoint every 3 of 6 iterations
    full = _train(cfg)

    # the interrupted run: its directory holds only what existed after iteration 3 (model_0000002.pth)
    os.makedirs(part_dir)
    shutil.copy(os.path.join(full_dir, "model_0000002.pth"), part_dir)
    with open(os.path.join(part_dir, "last_checkpoint"), "w") as f:
        f.write("model_0000002.pth")
    cfg_part = cfg.clone()
    cfg_part.OUTPUT_DIR = part_dir
    cfg_part.DATALOADER.STREAM_SEED = -1  # the data seed must come back from the checkpoint
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


def test_checkpoint_written_atomically(tmp_path):
    tiny_synthetic(str(tmp_path / "data"), prefix="atom")
    cfg = tiny_cfg(str(tmp_path / "out"), "atom")
    cfg.SOLVER.MAX_ITER = 3
    trainer = _train(cfg)
    files = sorted(os.listdir(cfg.OUTPUT_DIR))
    assert "model_final.pth" in files and "model_0000002.pth" in files
    assert not [f for f in files if f.endswith(".tmp")]
    state = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=True)
    assert state["trainer"]["iteration"] == 2 and "optimizer" in state["trainer"]["_trainer"]
    hooks = state["trainer"]["hooks"]
    assert hooks["TrainingStateHook"]["data_seed"] == trainer.data_seed == 7
