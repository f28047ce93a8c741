"""Every rank's RNG state in the checkpoint: after a resume each rank continues its own stream (rank 0's and rank
1's differ, each equals its uninterrupted stream); another world size or an old one-state checkpoint re-seeds
each rank with SEED + rank, with a warning. A fake 2-rank world (comm monkeypatched) around the real hook."""
from __future__ import annotations

import io
import logging
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from mmt_psm.core.checkpoint import TrainingStateHook, capture_rng_state, restore_rng_state

SEED = 3


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def _world(monkeypatch, size, rank, gathered=None):
    monkeypatch.setattr(comm, "get_world_size", lambda: size)
    monkeypatch.setattr(comm, "get_rank", lambda: rank)
    monkeypatch.setattr(comm, "all_gather", lambda data: [data if r == rank else gathered[r] for r in range(size)])


def _hook(it=5, max_iter=20, period=3):
    hook = TrainingStateHook()
    hook.trainer = SimpleNamespace(iter=it, max_iter=max_iter, data_seed=7,
                                   cfg=SimpleNamespace(SEED=SEED, SOLVER=SimpleNamespace(CHECKPOINT_PERIOD=period)))
    return hook


def _as_saved(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _rank_streams():
    """(state, continuation) of 'rank' 0 and 1: each rank's RNGs after some draws of its own."""
    out = []
    for rank in (0, 1):
        seed_all_rng(SEED + rank)
        _draws()
        state = capture_rng_state()
        out.append((state, _draws()))
    return out


@pytest.fixture
def warnings_log(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("mmt_psm"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="mmt_psm.core.checkpoint")
    return caplog


def _resume(monkeypatch, saved, size, rank):
    _world(monkeypatch, size, rank)
    hook = _hook()
    hook.load_state_dict(saved)
    seed_all_rng(999)  # whatever the process drew before training starts
    hook.before_train()
    return _draws()


def test_each_rank_resumes_its_own_stream(monkeypatch, warnings_log):
    (s0, c0), (s1, c1) = _rank_streams()
    assert c0 != c1
    restore_rng_state(s0)  # rank 0, at the end of iteration 5 (a checkpoint is due: (5 + 1) % 3 == 0)
    _world(monkeypatch, 2, 0, gathered=[None, s1])
    hook = _hook(it=5)
    hook.gather()
    saved = _as_saved(hook.state_dict())
    assert saved["world_size"] == 2 and len(saved["rng_states"]) == 2 and saved["data_seed"] == 7
    assert _resume(monkeypatch, saved, 2, 0) == c0
    assert _resume(monkeypatch, saved, 2, 1) == c1
    assert not warnings_log.records


def test_other_world_size_or_old_checkpoint_reseeds_with_seed_plus_rank(monkeypatch, warnings_log):
    (s0, c0), (s1, _) = _rank_streams()
    restore_rng_state(s0)
    _world(monkeypatch, 2, 0, gathered=[None, s1])
    hook = _hook(it=5)
    hook.gather()
    saved = _as_saved(hook.state_dict())

    def seeded(rank):
        seed_all_rng(SEED + rank)
        return _draws()

    assert _resume(monkeypatch, saved, 3, 2) == seeded(2)  # 3 ranks now
    assert "RNG states of 2 rank(s) and this run has 3" in warnings_log.text
    warnings_log.clear()
    old = {"data_seed": 7, **s0}  # the format before per-rank states: rank 0's state at the top level
    assert _resume(monkeypatch, _as_saved(old), 2, 1) == seeded(1)
    assert "RNG states of 1 rank(s) and this run has 2" in warnings_log.text
    warnings_log.clear()
    assert _resume(monkeypatch, _as_saved(old), 1, 0) == c0  # one process: the old state is exact
    assert not warnings_log.records


def test_save_outside_the_schedule_holds_one_state(monkeypatch, warnings_log):
    (s0, _), (s1, _) = _rank_streams()
    _world(monkeypatch, 2, 0, gathered=[None, s1])
    hook = _hook(it=4)  # (4 + 1) % 3 != 0: no checkpoint due, nothing gathered
    hook.gather()
    assert hook._gathered is None
    saved = hook.state_dict()
    assert len(saved["rng_states"]) == 1 and "outside SOLVER.CHECKPOINT_PERIOD" in warnings_log.text


def test_gather_runs_right_before_the_checkpointer(tmp_path):
    from common import tiny_cfg, tiny_synthetic

    from mmt_psm.core import Trainer

    tiny_synthetic(str(tmp_path / "data"), prefix="rngh", n_train=2, n_test=1, n_unlabeled=1)
    trainer = Trainer(tiny_cfg(str(tmp_path / "out"), "rngh"))
    names = [type(h).__name__ for h in trainer._hooks]
    at = names.index("PeriodicCheckpointer")
    assert names[at - 1] == "_GatherRNGStates" and names.index("TrainingStateHook") < at - 1
