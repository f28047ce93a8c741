"""Faults: a checkpoint save that fails half-way changes nothing on disk; a training run killed mid-way and resumed
from the command line (tools/train_net.py --resume) ends exactly like an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from common import REPO, tiny_synthetic
from torch import nn

from mmt_psm.core.checkpoint import AtomicCheckpointer


def _snapshot(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_save_failing_inside_torch_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, error):
    model = nn.Linear(3, 2)
    ckpt = AtomicCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000004", iteration=4)
    before = _snapshot(tmp_path)
    assert set(before) == {"model_0000004.pth", "last_checkpoint"}
    assert before["last_checkpoint"] == b"model_0000004.pth"

    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)  # some bytes reach the file, then the save dies
        raise error

    monkeypatch.setattr(torch, "save", half_then_fail)
    with torch.no_grad():
        model.weight.add_(1.0)
    for name in ("model_0000004", "model_0000009"):  # overwriting the same file, and a new one
        with pytest.raises(type(error)):
            ckpt.save(name, iteration=9)
        assert _snapshot(tmp_path) == before  # same files, same bytes: no partial or temp file, same pointer
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000004.pth")
    state = AtomicCheckpointer(nn.Linear(3, 2), save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert state["iteration"] == 4


def test_failing_pointer_update_keeps_the_previous_pointer(tmp_path, monkeypatch):
    ckpt = AtomicCheckpointer(nn.Linear(3, 2), save_dir=str(tmp_path))
    ckpt.save("model_0000004")
    real_replace = os.replace

    def fail_for_pointer(src, dst):
        if os.path.basename(dst) == "last_checkpoint":
            raise OSError("interrupted")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_for_pointer)
    with pytest.raises(OSError, match="interrupted"):
        ckpt.save("model_0000009")
    files = sorted(os.listdir(tmp_path))
    assert files == ["last_checkpoint", "model_0000004.pth", "model_0000009.pth"]  # no temp file left
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"  # resume takes a complete file


# ---------------------------------------------------------------- kill + --resume through tools/train_net.py
OVERRIDES = [
    "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()",
    "SEMI.BURN_IN_ITERS", "1", "SEMI.EMA_START_ITER", "0", "SEMI.RAMP_UP_ITERS", "2", "SEMI.RAMP_DOWN_ITERS", "0",
    "SEMI.IMS_PER_BATCH_LABELED", "1", "SEMI.IMS_PER_BATCH_UNLABELED", "1", "SEMI.VIS_PERIOD", "0",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "128", "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "128",
    "MODEL.MMT_PSM.MGD_ADAPTOR_DIM", "32", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "400", "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "200", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64", "MODEL.MMT_PSM.PROPOSAL_BATCH_SIZE", "64",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
]


def _command(out_dir, resume=False):
    return ([sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
             os.path.join(REPO, "configs", "quickstart", "mmt_psm.yaml")] + (["--resume"] if resume else [])
            + OVERRIDES + ["OUTPUT_DIR", out_dir])


def _final_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        last = [json.loads(line) for line in f if line.strip()][-1]
    return {k: v for k, v in last.items() if k.split("/")[0].startswith(("bbox", "segm", "cell"))}


def test_killed_run_resumed_from_the_command_line_equals_an_uninterrupted_run(tmp_path):
    tiny_synthetic(str(tmp_path / "synthetic"), prefix="cli", n_train=2, n_test=1, n_unlabeled=2)
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path), OMP_NUM_THREADS="1")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    r = subprocess.run(_command(full), capture_output=True, text=True, env=env, cwd=REPO, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]

    # the same run, killed (SIGKILL) once the iteration-2 checkpoint is on disk
    proc = subprocess.Popen(_command(part), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    pointer, deadline = os.path.join(part, "last_checkpoint"), time.time() + 300
    try:
        while not (os.path.exists(pointer) and open(pointer).read() == "model_0000001.pth"):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(part, "model_final.pth"))

    r = subprocess.run(_command(part, resume=True), capture_output=True, text=True, env=env, cwd=REPO, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Starting training from iteration 2" in r.stdout + r.stderr

    a, b = (torch.load(os.path.join(d, "model_final.pth"), weights_only=True) for d in (full, part))
    assert a["iteration"] == b["iteration"] == 3
    assert a["model"].keys() == b["model"].keys() and any(k.startswith("teacher.") for k in a["model"])
    assert [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])] == []
    sa, sb = a["trainer"]["_trainer"]["optimizer"]["state"], b["trainer"]["_trainer"]["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)
    metrics = _final_metrics(full)
    assert "segm/AP" in metrics and "cell/AJI" in metrics and "segm_student/AP" in metrics
    assert _final_metrics(part) == metrics
