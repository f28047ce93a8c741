"""Session fixtures shared by several test files."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from common import tiny_cfg, tiny_synthetic


@pytest.fixture(scope="session")
def trained_mmt_psm(tmp_path_factory) -> SimpleNamespace:
    """One small MMT-PSM run, trained once per session and read (never modified) by the export, resume and
    checkpoint tests: data sets ``shared_{train,test,unlabeled}``, 6 iterations (burn-in 2, EMA from 1),
    checkpoints after iterations 3 and 6 (``model_0000002.pth``, ``model_final.pth``), ``config.yaml`` as
    train_net writes it. Returns ``cfg``, ``trainer``, ``output_dir`` and ``data_root``."""
    import torch

    from mmt_psm.core import Trainer

    root = tmp_path_factory.mktemp("trained_mmt_psm")
    data_root = str(root / "data")
    tiny_synthetic(data_root, prefix="shared")
    cfg = tiny_cfg(str(root / "run"), "shared", "MMTPSMRCNN")
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # an untrained teacher's low scores still give pseudo-labels
    cfg.freeze()
    threads = torch.get_num_threads()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    return SimpleNamespace(cfg=cfg, trainer=trainer, output_dir=cfg.OUTPUT_DIR, data_root=data_root, threads=threads)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """CLI mains called in-process (tools/psm_*.py) set torch's thread count; give it back after each test, so a
    later test runs with the session's count (float results, e.g. resume == uninterrupted, depend on it)."""
    import torch

    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
