"""The device is the machine's, not the config's: no shipped config pins MODEL.DEVICE; a CUDA device without CUDA
falls back to the CPU with one warning (load_config and the Trainer), unless CUDA was asked for on the command
line (an error); AMP is switched off off CUDA."""
from __future__ import annotations

import glob
import logging
import os

import pytest
import torch
import yaml
from common import REPO

from mmt_psm.config import load_config
from mmt_psm.core.device import requested_device, resolve_device

QUICKSTART = os.path.join(REPO, "configs", "quickstart", "supervised.yaml")


@pytest.fixture
def device_log(caplog, monkeypatch):
    """The device module's records ('mmt_psm' stops propagating once train_net's setup_logger ran)."""
    monkeypatch.setattr(logging.getLogger("mmt_psm"), "propagate", True)
    caplog.set_level(logging.INFO, logger="mmt_psm.core.device")
    return caplog


def test_no_shipped_config_pins_the_device():
    files = glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
    assert len(files) > 20
    pinned = [f for f in files if "DEVICE" in ((yaml.safe_load(open(f)) or {}).get("MODEL") or {})]
    assert not pinned, pinned


def test_load_config_falls_back_to_cpu_with_one_warning(monkeypatch, device_log):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(QUICKSTART, ["SOLVER.AMP.ENABLED", "True"])
    assert cfg.MODEL.DEVICE == "cpu" and not cfg.SOLVER.AMP.ENABLED
    msgs = [r.getMessage() for r in device_log.records]
    assert sum("no CUDA device is available: running on the CPU" in m for m in msgs) == 1, msgs
    assert sum("SOLVER.AMP.ENABLED needs CUDA" in m for m in msgs) == 1, msgs
    device_log.clear()
    resolve_device(cfg)  # idempotent: a config resolved once (e.g. by load_config, then the Trainer) logs nothing
    assert cfg.MODEL.DEVICE == "cpu" and not device_log.records


def test_cuda_asked_for_on_the_command_line_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert requested_device(["MODEL.DEVICE", "cuda:1", "SEED", "3"]) == "cuda:1"
    with pytest.raises(RuntimeError, match="MODEL.DEVICE 'cuda:1' was asked for on the command line"):
        load_config(QUICKSTART, ["MODEL.DEVICE", "cuda:1"])
    assert load_config(QUICKSTART, ["MODEL.DEVICE", "cpu"]).MODEL.DEVICE == "cpu"


def test_cuda_kept_where_there_is_cuda(monkeypatch, device_log):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_config(QUICKSTART, ["SOLVER.AMP.ENABLED", "True"])
    assert cfg.MODEL.DEVICE == "cuda" and cfg.SOLVER.AMP.ENABLED and not device_log.records


def test_trainer_resolves_configs_built_without_load_config(monkeypatch, tmp_path):
    """get_cfg() + merge_from_file (no load_config): the Trainer falls back itself."""
    from detectron2.config import get_cfg

    from mmt_psm.config import add_mmt_psm_config
    from mmt_psm.core import Trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    built = {}
    monkeypatch.setattr(Trainer, "build_model", classmethod(lambda cls, cfg: built.setdefault("cfg", cfg) and 1 / 0))
    cfg = get_cfg()
    add_mmt_psm_config(cfg)
    cfg.merge_from_file(QUICKSTART)
    cfg.OUTPUT_DIR = str(tmp_path)
    assert cfg.MODEL.DEVICE == "cuda"  # Detectron2's default: the config says nothing
    with pytest.raises(ZeroDivisionError):
        Trainer(cfg)
    assert built["cfg"].MODEL.DEVICE == "cpu"
