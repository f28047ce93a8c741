"""tools/benchmark.py end to end on the CPU: one interleaved step per variant, a JSON object with finite ratios."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from common import REPO  # noqa: E402

# the quickstart MMT-PSM config, shrunk further so that the whole run takes seconds on 2 cores
SMALL = [
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "400", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64", "MODEL.MMT_PSM.PROPOSAL_BATCH_SIZE", "64",
    "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "128", "MODEL.MMT_PSM.MGD_ADAPTOR_DIM", "32",
    "TEST.DETECTIONS_PER_IMAGE", "20",
]


def _run_benchmark(*extra: str, env: dict = None) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "tools", "benchmark.py"), "--config-file",
           os.path.join(REPO, "configs", "quickstart", "mmt_psm.yaml"), "--device", "cpu", "--size", "128",
           "--iters", "1", "--warmup", "0", "--instances", "3", "--threads", "1", "--json", *extra, *SMALL]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout  # exactly one JSON object on stdout; the table goes to stderr
    assert "step time" in proc.stderr
    return json.loads(lines[0])


def _positive_finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_benchmark_json_cpu():
    r = _run_benchmark("--profile")
    for key in ("step_time_ratio_same_images", "step_time_ratio_same_labeled", "peak_mem_ratio_same_images",
                "peak_mem_ratio_same_labeled"):
        assert _positive_finite(r[key]), (key, r[key])
    assert set(r["variants"]) == {"A", "B", "C"}
    a, b, c = (r["variants"][k] for k in "ABC")
    assert (a["labeled_images"], a["unlabeled_images"]) == (2, 2)
    assert (b["labeled_images"], b["unlabeled_images"]) == (4, 0)
    assert (c["labeled_images"], c["unlabeled_images"]) == (2, 0)
    for v in (a, b, c):
        assert _positive_finite(v["median_step_s"]) and _positive_finite(v["peak_mem_bytes"])
        assert v["peak_mem_bytes"] >= v["persistent_state_bytes"] > 0
    # the teacher (a full copy) is part of MMT-PSM's persistent state
    assert a["persistent_state_bytes"] > b["persistent_state_bytes"] == c["persistent_state_bytes"]
    assert r["step_time_ratio_same_images"] == a["median_step_s"] / b["median_step_s"]
    # past burn-in: the unsupervised path ran, with a non-zero weight
    assert "mmt_psm/pseudo_labels_per_image" in r["mmt_psm_stats"]
    assert r["mmt_psm_stats"]["mmt_psm/unsup_weight"] > 0
    for key in ("device_name", "torch", "size", "iters", "labeled", "unlabeled", "amp"):
        assert key in r
    assert (r["device"], r["size"], r["iters"], r["amp"]) == ("cpu", 128, 1, False)
    parts = r["profile"]["A"]
    for part in ("sup_forward", "teacher_backbones", "teacher_detect", "student_unsup", "backward", "ema"):
        assert _positive_finite(parts[part]["median_s"]), part
    assert set(r["profile"]["B"]) == {"forward", "backward", "optimizer", "total"}


def test_benchmark_with_trained_weights_adds_variant_t(trained_mmt_psm):
    """--weights: T = MMT-PSM from the checkpoint (here a 6-iteration MMT-PSM run's), ratios for it and for the
    random-init A side by side; B and C take the checkpoint's student."""
    weights = os.path.join(trained_mmt_psm.output_dir, "model_final.pth")
    r = _run_benchmark("--weights", weights, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    assert set(r["variants"]) == {"A", "T", "B", "C"}
    t, b = r["variants"]["T"], r["variants"]["B"]
    assert r["step_time_ratio_same_images_trained"] == t["median_step_s"] / b["median_step_s"]
    assert _positive_finite(r["step_time_ratio_same_labeled_trained"])
    assert "mmt_psm/pseudo_labels_per_image" in r["mmt_psm_stats_trained"]
    assert r["weights"] == weights


def test_benchmark_missing_weights_is_an_error():
    cmd = [sys.executable, os.path.join(REPO, "tools", "benchmark.py"), "--config-file",
           os.path.join(REPO, "configs", "quickstart", "mmt_psm.yaml"), "--device", "cpu", "--size", "64",
           "--iters", "1", "--warmup", "0", "--weights", "/nonexistent/model.pth", *SMALL]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--weights /nonexistent/model.pth does not exist" in proc.stderr


def test_benchmark_on_a_data_set_times_its_mappers(tmp_path):
    """--dataset: the images come through the training mappers, and the time to map one step's L + U images is
    reported (data time per step, its share of a step if loading is not overlapped, loader workers to hide it)."""
    from mmt_psm.instance.synthetic import write_synthetic_dataset

    write_synthetic_dataset(str(tmp_path / "synthetic"), 2, 1, 2, size=128, seed=0)
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path)}  # the built-in synthetic_* names point there
    r = _run_benchmark("--dataset", "synthetic_train", env=env)
    assert r["dataset"] == "synthetic_train" and "mmt_psm/pseudo_labels_per_image" in r["mmt_psm_stats"]
    data, share = r["data_time_per_step_s"], r["data_time_share_serial"]
    assert _positive_finite(data) and 0 < share < 1
    assert share == data / (data + r["variants"]["A"]["median_step_s"])
    assert isinstance(r["loader_workers_to_hide_data_time"], int) and r["loader_workers_to_hide_data_time"] >= 1
    assert _run_benchmark()["data_time_per_step_s"] is None  # noise images: no data side to time
