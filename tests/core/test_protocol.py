"""mmt_psm/core/protocol.py, shared by both protocol tools: a finished run is not redone, an unfinished one
trains with the seed's streams and the arm's overrides (extra options last), a failed training names its log."""
import argparse
import json
import math
import os
import sys

import pytest
from common import protocol_run_dir

import mmt_psm.core.protocol as protocol


def _args(**kw):
    return argparse.Namespace(**{"report_only": False, "threads": 1, "opts": ["SOLVER.MAX_ITER", "7"], **kw})


def _final(run_dir):
    return protocol.final_metrics(run_dir, lambda rec: "segm/AP" in rec)


def test_finished_run_is_collected_not_trained(tmp_path, monkeypatch):
    d = protocol_run_dir(tmp_path, [{"iteration": 9, "segm/AP": 30.0, "total_loss": 1.0}], max_iter=10)
    monkeypatch.setattr(protocol, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    res = protocol.run_arm("/repo", "arm", 3, d, "c.yaml", {}, _args(), _final, str)
    assert res == {"segm/AP": 30.0}


def test_unfinished_run_trains_with_seed_streams_and_overrides(tmp_path, monkeypatch):
    d = str(tmp_path / "arm_seed3")
    calls = []

    def fake_train(root, config, opts, run_dir, threads, what):
        calls.append((root, config, list(opts), run_dir, threads, what))
        os.makedirs(run_dir, exist_ok=True)
        open(os.path.join(run_dir, "config.yaml"), "w").write("SOLVER:\n  MAX_ITER: 10\n")
        open(os.path.join(run_dir, "metrics.json"), "w").write(json.dumps({"iteration": 9, "segm/AP": 1.5}) + "\n")

    monkeypatch.setattr(protocol, "train", fake_train)
    with pytest.raises(FileNotFoundError, match="arm seed 3 has no final results"):
        protocol.run_arm("/repo", "arm", 3, d, "c.yaml", {}, _args(report_only=True), _final, str)
    assert not calls
    res = protocol.run_arm("/repo", "arm", 3, d, "c.yaml", {"DATASETS.SPLIT_FILE": "split_s{s}.json"}, _args(),
                           _final, str)
    assert res == {"segm/AP": 1.5}
    assert calls == [("/repo", "c.yaml", ["OUTPUT_DIR", d, "SEED", "3", "DATALOADER.STREAM_SEED", "3",
                                          "DATASETS.SPLIT_FILE", "split_s3.json", "SOLVER.MAX_ITER", "7"],
                      d, 1, "arm seed 3")]


def test_failed_training_names_the_run_and_its_log(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "failing_train_net.py").write_text("import sys\nprint('boom')\nsys.exit(3)\n")
    monkeypatch.setattr(protocol, "TRAIN_COMMAND", [sys.executable, str(root / "failing_train_net.py")])
    run_dir = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match=r"arm seed 1 failed \(exit 3\); see .*run/stdout.txt"):
        protocol.train(str(root), "c.yaml", ["SEED", "1"], run_dir, 1, what="arm seed 1")
    log = open(os.path.join(run_dir, "stdout.txt")).read()
    assert log.startswith("$ ") and "--resume SEED 1" in log and "boom" in log


def test_summary_lists_a_model_only_when_every_seed_has_it_and_nan_for_a_missing_metric():
    results = {"a": {1: {"x": 1.0, "y": 2.0, "x_s": 5.0}, 2: {"x": 3.0}}}
    table = protocol.summarize(results, ["x", "y"], {"": lambda m: m, " (s)": lambda m: m + "_s"})
    assert list(table) == ["a"]
    assert table["a"]["x"] == [2.0, 1.0, 2]
    assert table["a"]["y"][2] == 2 and math.isnan(table["a"]["y"][0])  # seed 2 lacks y
    md = protocol.markdown(table, ["x"], lambda m: 2, "footer")
    assert md == "| arm | n | x |\n|---|---|---|\n| a | 2 | 2.00 +- 1.00 |\n\nfooter\n"


def _default_dist_url():
    from detectron2.engine import default_argument_parser

    return default_argument_parser().parse_args([]).dist_url


def test_launch_flags_reach_the_training_command(tmp_path, monkeypatch):
    """Detectron2's launch flags of the protocol tool go to train_net before the KEY VALUE overrides (only those
    that differ from Detectron2's defaults); parallel multi-GPU runs get a free port each."""
    calls = []
    monkeypatch.setattr(protocol, "train", lambda root, config, opts, *a, **k: calls.append(list(opts)))
    args = _args(num_gpus=2, num_machines=1, machine_rank=0, dist_url=_default_dist_url(), jobs=2)
    with pytest.raises(RuntimeError, match="no final evaluation"):  # the stub trains nothing
        protocol.run_arm("/repo", "arm", 1, str(tmp_path / "r"), "c.yaml", {}, args, _final, str)
    assert calls[0][:5] == ["--num-gpus", "2", "--dist-url", "auto", "OUTPUT_DIR"]
    assert calls[0][-2:] == ["SOLVER.MAX_ITER", "7"]


def test_progress_counts_runs_and_estimates_the_time_left_from_trained_runs():
    now = [0.0]
    p = protocol.Progress(5, workers=2, clock=lambda: now[0])
    assert p.line() == "[progress] 0/5 runs done, elapsed 0s, time left unknown until one trains"
    now[0] = 5.0
    assert p.finish(0.1, trained=False).endswith("1/5 runs done, elapsed 5s, time left unknown until one trains")
    now[0] = 3600.0
    # one trained run of 30 min; 3 left on 2 workers = 2 rounds -> about 1 h
    assert p.finish(1800.0) == "[progress] 2/5 runs done, elapsed 1h00m, about 1h00m left (3 to go, mean 30m00s of 1)"
    for _ in range(3):
        line = p.finish(600.0)
    assert line == "[progress] 5/5 runs done, elapsed 1h00m"


def test_run_jobs_prints_each_runs_log_and_progress(tmp_path, monkeypatch, capsys):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "ok_train_net.py").write_text("print('trained')\n")
    monkeypatch.setattr(protocol, "TRAIN_COMMAND", [sys.executable, str(root / "ok_train_net.py")])
    done = protocol_run_dir(tmp_path, [{"iteration": 9, "segm/AP": 30.0}], max_iter=10)

    def run_one(arm, seed):
        if arm == "finished":
            return protocol.run_arm(str(root), arm, seed, done, "c.yaml", {}, _args(), _final, str)
        run_dir = str(tmp_path / f"{arm}_seed{seed}")
        protocol.train(str(root), "c.yaml", [], run_dir, 1, what=f"{arm} seed {seed}")
        return {"segm/AP": 1.0}

    results, failures = protocol.run_jobs([("finished", 1), ("new", 1)], run_one, workers=1)
    out = capsys.readouterr().out
    assert not failures and results["new"][1] == {"segm/AP": 1.0}
    assert f"[start] new seed 1, log {tmp_path}/new_seed1/stdout.txt" in out
    assert "[progress] 1/2 runs done" in out and "time left unknown until one trains" in out  # a skip is no run
    assert "[progress] 2/2 runs done" in out


def test_evaluation_trajectory_orders_evaluations_and_keeps_a_resumed_runs_last_record(tmp_path):
    """Iterations trained (EvalHook's k - 1 -> k, the final test capped at MAX_ITER), the value of the last record
    of an iteration a resumed run repeated, training-only records and a torn line ignored, no file: []."""
    key = "sem_seg_volume/Dice"
    d = protocol_run_dir(tmp_path, [{"iteration": 19, "total_loss": 1.0}, {"iteration": 599, key: 0.5},
                                    {"iteration": 299, key: 0.2}, {"iteration": 299, key: 0.3},
                                    {"iteration": 1200, key: 0.6}], max_iter=1200)
    with open(os.path.join(d, "metrics.json"), "a") as f:
        f.write('{"iteration": 1199, "sem_seg_vol')
    assert protocol.evaluation_trajectory(d, key) == [(300, 0.3), (600, 0.5), (1200, 0.6)]
    assert protocol.evaluation_trajectory(d, "segm/AP") == []
    assert protocol.evaluation_trajectory(str(tmp_path / "absent"), key) == []
