"""SEMI.IMS_PER_BATCH_LABELED/_UNLABELED are per GPU, Detectron2's SOLVER.IMS_PER_BATCH is the total: the Trainer
says so at start-up, with per-GPU and total images per step."""
from __future__ import annotations

import logging

import pytest
from common import tiny_cfg
from detectron2.utils import comm

from mmt_psm.core import Trainer
from mmt_psm.core import trainer as trainer_module


class Built(Exception):
    pass


@pytest.fixture
def trainer_log(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("mmt_psm"), "propagate", True)
    caplog.set_level(logging.INFO, logger="mmt_psm.core.trainer")

    def stop(cls, cfg):  # the start-up is what is tested: stop before the model is built
        raise Built

    monkeypatch.setattr(Trainer, "build_model", classmethod(stop))
    return caplog


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Images per step")]


@pytest.mark.parametrize("world", [1, 4])
def test_trainer_logs_per_gpu_and_total_images_of_a_semi_supervised_step(tmp_path, trainer_log, monkeypatch, world):
    monkeypatch.setattr(comm, "get_world_size", lambda: world)
    monkeypatch.setattr(trainer_module.comm, "get_world_size", lambda: world)
    cfg = tiny_cfg(str(tmp_path), "ips", "MMTPSMRCNN")  # 1 labeled + 1 unlabeled per GPU
    cfg.SEMI.IMS_PER_BATCH_UNLABELED = 3
    with pytest.raises(Built):
        Trainer(cfg)
    assert _lines(trainer_log) == [
        f"Images per step: 1 labeled + 3 unlabeled per GPU x {world} GPU(s) = {world} labeled + {3 * world} "
        "unlabeled in total (from SEMI.IMS_PER_BATCH_LABELED/_UNLABELED, per GPU)"]


def test_supervised_step_divides_the_solver_total(tmp_path, trainer_log, monkeypatch):
    monkeypatch.setattr(trainer_module.comm, "get_world_size", lambda: 2)
    cfg = tiny_cfg(str(tmp_path), "ips")
    cfg.SOLVER.IMS_PER_BATCH = 8
    with pytest.raises(Built):
        Trainer(cfg)
    assert _lines(trainer_log) == ["Images per step: 4 labeled + 0 unlabeled per GPU x 2 GPU(s) = 8 labeled + 0 "
                                   "unlabeled in total (from SOLVER.IMS_PER_BATCH, the total)"]
