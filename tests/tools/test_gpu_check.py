"""tools/gpu_check.sh without a GPU: the dry run lists every check and validates every command (parsed, not run);
with every check replaced by `true`/`false` stubs the PASS/FAIL/SKIP lines, the exit code, the dependencies, the
time budget and the JSON summary's schema are right."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from common import REPO, SHARED_DATA

SCRIPT = os.path.join(REPO, "tools", "gpu_check.sh")
SEQ_FIRST = ["setup", "data_synthetic", "cuda_ema_amp", "cuda_mmt_psm_fp16", "cuda_semantic_amp", "cuda_psm_stage1",
             "bench_paper_fp32", "bench_paper_amp", "bench_plus_fp32", "bench_plus_amp", "data_acdc"]
BG = ["acdc_supervised_p3", "acdc_supervised_all", "acdc_scribble_only", "acdc_mixed_supervision", "acdc_mean_teacher",
      "acdc_lcc_mean_teacher", "acdc_lcc_plus", "psm_stage1_cuda"]  # in the background beside the checks after them
SEQ_LAST = ["e2e_train_50", "e2e_resume_60", "e2e_eval_only", "e2e_export_predictor", "ddp_gloo_2proc"]
CHECKS = SEQ_FIRST + BG + SEQ_LAST  # the plan's order
REPORTED = SEQ_FIRST + SEQ_LAST + BG  # the order of the PASS lines: background checks are reported at the end
CHECK_KEYS = {"name", "status", "rc", "seconds", "reason", "detail", "log", "command", "metrics"}
SUMMARY_KEYS = {"schema", "mode", "started", "finished", "wall_s", "budget_s", "ok", "passed", "failed", "skipped",
                "env", "benchmark", "checks"}


def _run(tmp_path, *args, timeout=240, **env):
    full = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "out"),
            "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=full)


def _lines(proc):
    return [ln for ln in proc.stdout.splitlines() if ln.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]


def test_dry_run_lists_every_check_and_validates_every_command(tmp_path):
    proc = _run(tmp_path, "--dry-run", GPU_CHECK_DATA=SHARED_DATA)  # the real data: its paths are validated
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    listed = [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("CHECK ")]
    assert listed == CHECKS
    assert "of 24 checks: 0 problem(s)" in proc.stdout and "INVALID" not in proc.stdout
    n = int(proc.stdout.split("validated ")[1].split()[0])
    assert n >= 40  # every simple command of every check (two python steps in some), not only the first
    with open(tmp_path / "out" / "plan.tsv") as f:
        assert [ln.split("\t")[0] for ln in f] == CHECKS
    assert not (tmp_path / "out" / "results.tsv").exists() and not _lines(proc)  # nothing ran
    assert _run(tmp_path, GPU_CHECK_DRY_RUN="1", GPU_CHECK_ONLY="setup,e2e_eval_only").stdout.count("CHECK ") == 2


def test_validator_reports_what_would_not_run(tmp_path):
    plan = tmp_path / "plan.tsv"
    rows = [
        ("bad_flag", "$PY tools/benchmark.py --config-file configs/mmt_psm_R50.yaml --no-such-flag 3"),
        ("bad_key", "$PY tools/train_net.py --config-file configs/mmt_psm_R50.yaml SOLVER.NO_SUCH_KEY 3"),
        ("bad_value", "$PY tools/train_net.py --config-file configs/mmt_psm_R50.yaml SOLVER.MAX_ITER abc"),
        ("bad_script", "$PY tools/no_such_tool.py"),
        ("bad_test", "$PY -m pytest -q -m cuda tests/core/test_cuda.py::test_not_there"),
        ("bad_path", "true && $PY tools/export_teacher.py output/x --config-file configs/nope.yaml"),
        ("bad_prog", "frobnicate --now"),
        ("good", "$PY tools/benchmark.py --config-file configs/mmt_psm_R50.yaml --amp --json SOLVER.MAX_ITER 7"),
    ]
    plan.write_text("".join(f"{name}\t10\tseq\t\t{cmd}\n" for name, cmd in rows))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_check_steps.py"), "validate", "--plan",
                           str(plan)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PY": sys.executable, "PYTHONPATH": REPO})
    assert proc.returncode == 1
    bad = {ln.split()[1].rstrip(":") for ln in proc.stdout.splitlines() if ln.startswith("INVALID")}
    assert bad == {name for name, _ in rows} - {"good"}, proc.stdout
    for text in ("has no option --no-such-flag", "Non-existent key: SOLVER.NO_SUCH_KEY", "SOLVER.MAX_ITER",
                 "tools/no_such_tool.py does not exist", "has no test test_not_there",
                 "configs/nope.yaml does not exist", "unknown program 'frobnicate'"):
        assert text in proc.stdout, text


def _summary(tmp_path):
    with open(tmp_path / "out" / "summary.json") as f:
        return json.load(f)


def test_stub_checks_give_one_line_each_and_the_summary_schema(tmp_path):
    proc = _run(tmp_path, GPU_CHECK_STUB="true")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _lines(proc) == [f"PASS {name}" for name in REPORTED]
    s = _summary(tmp_path)
    assert set(s) == SUMMARY_KEYS and s["schema"] == "mmt_psm.gpu_check/1" and s["mode"] == "stub-true"
    assert (s["ok"], s["passed"], s["failed"], s["skipped"], s["budget_s"]) == (True, len(CHECKS), 0, 0, 480)
    assert [c["name"] for c in s["checks"]] == REPORTED
    for c in s["checks"]:
        assert set(c) == CHECK_KEYS and c["status"] == "pass" and c["rc"] == 0 and c["reason"] is None
        assert isinstance(c["seconds"], float) and c["log"].endswith(f"logs/{c['name']}.log") and c["command"]

    # some fail: the script goes on, the checks that need them are skipped, the exit code is 1
    failing = {"bench_paper_amp", "e2e_train_50", "data_acdc"}
    proc = _run(tmp_path, GPU_CHECK_STUB="true", GPU_CHECK_STUB_FAIL=",".join(sorted(failing)))
    assert proc.returncode == 1
    status = {ln.split()[1]: ln.split()[0] for ln in _lines(proc)}
    assert sorted(status) == sorted(CHECKS) and len(_lines(proc)) == len(CHECKS)
    assert {n for n, st in status.items() if st == "FAIL"} == failing
    skipped = {n for n, st in status.items() if st == "SKIP"}
    assert skipped == {"e2e_resume_60", "e2e_eval_only", "e2e_export_predictor"} | {
        n for n in CHECKS if n.startswith("acdc_")}
    s = _summary(tmp_path)
    assert (s["ok"], s["failed"], s["skipped"]) == (False, 3, len(skipped))
    by_name = {c["name"]: c for c in s["checks"]}
    assert by_name["e2e_train_50"]["rc"] == 1 and by_name["e2e_train_50"]["reason"] == "exit 1"
    assert by_name["e2e_resume_60"]["reason"] == "needs e2e_train_50, which did not pass"

    proc = _run(tmp_path, GPU_CHECK_STUB="false", GPU_CHECK_ONLY="setup,data_acdc,acdc_lcc_plus,psm_stage1_cuda")
    assert proc.returncode == 1
    assert _lines(proc) == ["FAIL setup (exit 1)", "FAIL data_acdc (exit 1)",
                            "SKIP acdc_lcc_plus (needs data_acdc, which did not pass)", "FAIL psm_stage1_cuda (exit 1)"]


def test_time_budget_and_timeouts(tmp_path):
    # a check that runs past what is left of the budget is stopped; the next one is not started
    proc = _run(tmp_path, GPU_CHECK_STUB="sleep 30", GPU_CHECK_BUDGET_S="6", GPU_CHECK_ONLY="setup,data_synthetic",
                timeout=60)
    assert proc.returncode == 1
    assert _lines(proc) == ["FAIL setup (timeout after 6 s)",
                            "FAIL data_synthetic (not started: the 6 s budget is spent)"]
    s = _summary(tmp_path)
    assert s["budget_s"] == 6 and s["wall_s"] < 20 and [c["rc"] for c in s["checks"]] == [124, 124]


def test_summary_keeps_the_benchmark_numbers_and_the_amp_speedup(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    for prec, a in (("fp32", 0.6), ("amp", 0.4)):
        r = {"step_time_ratio_same_images": a / 0.2, "step_time_ratio_same_labeled": a / 0.1,
             "peak_mem_ratio_same_images": 1.5, "peak_mem_ratio_same_labeled": 2.0, "data_time_per_step_s": 0.05,
             "data_time_share_serial": 0.05 / 0.65, "loader_workers_to_hide_data_time": 1, "amp": prec == "amp",
             "device_name": "GPU", "config_file": "configs/mmt_psm_R50.yaml",
             "variants": {"A": {"median_step_s": a, "peak_mem_bytes": 2**31}, "B": {"median_step_s": 0.2,
                                                                                   "peak_mem_bytes": 2**30}},
             "profile": {"A": {"total": {"share": 1.0}, "teacher_backbones": {"share": 0.25}}}}
        (bench / f"bench_paper_{prec}.json").write_text(json.dumps(r) + "\n")
    results = tmp_path / "results.tsv"
    results.write_text("bench_paper_fp32\tpass\t0\t31.5\t\tlog1\tcmd1\nbench_paper_amp\tpass\t0\t20\t\tlog2\tcmd2\n"
                       "bench_plus_fp32\tfail\t1\t3\texit 1: boom\tlog3\tcmd3\n")
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_check_steps.py"), "summary", "--results",
                           str(results), "--output", str(out), "--bench-dir", str(bench)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(out.read_text())
    paper = s["benchmark"]["paper"]
    assert set(paper) == {"fp32", "amp", "amp_speedup"} and "plus" not in s["benchmark"]
    assert paper["amp_speedup"]["A"] == 0.6 / 0.4 and paper["amp_speedup"]["B"] == 1.0
    assert paper["fp32"]["peak_mem_gib"] == {"A": 2.0, "B": 1.0} and paper["fp32"]["profile_A_share"] == {
        "teacher_backbones": 0.25}
    assert paper["amp"]["data_time_share_serial"] == 0.05 / 0.65
    checks = {c["name"]: c for c in s["checks"]}
    assert checks["bench_paper_fp32"]["metrics"] == paper["fp32"] and checks["bench_plus_fp32"]["metrics"] is None
    assert checks["bench_plus_fp32"]["reason"] == "exit 1: boom" and (s["ok"], s["failed"]) == (False, 1)
    assert "AMP speed-up of the MMT-PSM step 1.50x" in proc.stdout


def test_background_checks_run_beside_the_later_checks(tmp_path):
    only = "acdc_lcc_plus,psm_stage1_cuda,e2e_train_50"  # two bg checks, then a seq one: 3 x 3 s in ~3 s
    proc = _run(tmp_path, GPU_CHECK_STUB="sleep 3", GPU_CHECK_ONLY=only, timeout=60)
    assert proc.returncode == 0, proc.stdout
    assert _lines(proc) == ["PASS e2e_train_50", "PASS acdc_lcc_plus", "PASS psm_stage1_cuda"]
    s = _summary(tmp_path)
    assert all(c["seconds"] >= 3 for c in s["checks"]) and s["wall_s"] < 8  # one after the other would be 9 s
