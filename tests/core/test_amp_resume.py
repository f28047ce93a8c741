"""Resuming across an AMP switch: a checkpoint written without AMP resumes an AMP run (fresh gradient scaler) and
the reverse, each with a warning; an AMP checkpoint restores its scaler. Through ``Trainer.load_state_dict`` (what
the checkpointer calls on --resume) with Detectron2's own SimpleTrainer / AMPTrainer (a CPU-enabled GradScaler:
v0.6's AMPTrainer asserts CUDA only in run_step)."""
from __future__ import annotations

import io
import logging

import pytest
import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.engine.train_loop import TrainerBase

from mmt_psm.core import Trainer


def _step_trainer(amp: bool, scale: float = 2.0**16, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()  # momentum buffers: optimizer state worth restoring
    if not amp:
        return SimpleTrainer(model, [None], opt)
    return AMPTrainer(model, [None], opt, grad_scaler=torch.amp.GradScaler("cpu", init_scale=scale))


def _trainer_around(step_trainer):
    """A Trainer holding ``step_trainer`` (DefaultTrainer's state methods need nothing else)."""
    t = Trainer.__new__(Trainer)
    TrainerBase.__init__(t)
    t._trainer = step_trainer
    return t


def _checkpoint(step_trainer):
    """The trainer state as a checkpoint holds it (saved and read back like one)."""
    state = _trainer_around(step_trainer).state_dict()
    state["iteration"] = 41
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.fixture
def warnings_log(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("mmt_psm"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="mmt_psm.core.trainer")
    return caplog


def _momentum(step_trainer):
    return [s["momentum_buffer"] for s in step_trainer.optimizer.state_dict()["state"].values()]


def test_fp32_checkpoint_resumes_an_amp_run_with_a_fresh_scaler(warnings_log):
    saved = _checkpoint(_step_trainer(amp=False))
    assert "grad_scaler" not in saved["_trainer"]
    fresh = _step_trainer(amp=True, scale=8.0, seed=1)
    expected = _momentum(_step_trainer(amp=False))
    assert not all(torch.equal(a, b) for a, b in zip(_momentum(fresh), expected))
    trainer = _trainer_around(fresh)
    trainer.load_state_dict(saved)  # Detectron2's AMPTrainer.load_state_dict alone: KeyError 'grad_scaler'
    assert trainer.iter == 41
    assert all(torch.equal(a, b) for a, b in zip(_momentum(fresh), expected))
    assert fresh.grad_scaler.get_scale() == 8.0  # its own initial scale
    assert "written without it" in warnings_log.text


def test_amp_checkpoint_resumes_an_fp32_run_and_an_amp_run(warnings_log):
    saved = _checkpoint(_step_trainer(amp=True, scale=1024.0))
    assert saved["_trainer"]["grad_scaler"]["scale"] == 1024.0
    plain = _step_trainer(amp=False)
    _trainer_around(plain).load_state_dict(saved)
    assert "its grad_scaler state is not used" in warnings_log.text
    warnings_log.clear()
    amp = _step_trainer(amp=True, scale=8.0)
    _trainer_around(amp).load_state_dict(saved)
    assert amp.grad_scaler.get_scale() == 1024.0 and not warnings_log.records


def test_empty_scaler_state_of_a_disabled_scaler_counts_as_none(warnings_log):
    saved = _checkpoint(_step_trainer(amp=False))
    saved["_trainer"]["grad_scaler"] = {}  # what a disabled GradScaler (AMP on a CUDA-less machine) saves
    amp = _step_trainer(amp=True, scale=8.0)
    _trainer_around(amp).load_state_dict(saved)  # GradScaler.load_state_dict({}) alone: RuntimeError
    assert amp.grad_scaler.get_scale() == 8.0 and "written without it" in warnings_log.text
