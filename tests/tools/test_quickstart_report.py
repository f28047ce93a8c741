"""tools/quickstart.py: the pseudo-label line averages the monitor's records per class, the verdict
says what the two runs' numbers say (no hard-coded claim), and the side-by-side trainings report progress
and failures."""
import json
import os
import runpy
import sys

import pytest
from common import REPO

TOOL = runpy.run_path(os.path.join(REPO, "tools", "quickstart.py"))


def _metrics(tmp_path, rows):
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(tmp_path)


def test_pseudo_label_line_averages_the_monitor_records(tmp_path):
    rows = [{"iteration": 9, "total_loss": 1.0},
            {"iteration": 109, "pseudo_quality/images": 2, "pseudo_quality/cytoplasm/precision@0.5": 0.5,
             "pseudo_quality/cytoplasm/recall@0.5": 0.2, "pseudo_quality/cytoplasm/precision": 0.1,
             "pseudo_quality/cytoplasm/recall": 0.4, "pseudo_quality/cytoplasm/matched_iou": 0.6},
            {"iteration": 119, "pseudo_quality/images": 2, "pseudo_quality/cytoplasm/precision@0.5": 0.7,
             "pseudo_quality/cytoplasm/recall@0.5": 0.4, "pseudo_quality/cytoplasm/precision": 0.3,
             "pseudo_quality/cytoplasm/recall": 0.6, "pseudo_quality/cytoplasm/matched_iou": 0.8}]
    line = TOOL["pseudo_label_line"](_metrics(tmp_path, rows))
    assert "mean of 2 checks" in line
    assert "cytoplasm precision 0.60 recall 0.30 (all scores: 0.20 / 0.50), matched IoU 0.70" in line


def test_pseudo_label_line_without_monitor_says_how_to_switch_it_on(tmp_path):
    assert "SEMI.PSEUDO_MONITOR_PERIOD" in TOOL["pseudo_label_line"](_metrics(tmp_path, [{"iteration": 1}]))


def test_verdict_follows_the_numbers():
    sup = {"segm/AP": 40.0, "cell/AJI-cytoplasm": 50.0}
    assert "teacher trails supervised training: segm AP -2.0, AJI-cytoplasm -1.0" in TOOL["verdict"](
        sup, {"segm/AP": 38.0, "cell/AJI-cytoplasm": 49.0})
    assert "teacher beats supervised" in TOOL["verdict"](sup, {"segm/AP": 41.0, "cell/AJI-cytoplasm": 50.5})
    assert "is mixed against" in TOOL["verdict"](sup, {"segm/AP": 41.0, "cell/AJI-cytoplasm": 49.0})


def test_last_iteration_reads_detectron2s_console_line(tmp_path):
    log = tmp_path / "run.log"
    assert TOOL["last_iteration"](str(log)) == "starting"
    log.write_text("[11/24 13:44:01 d2.engine.train_loop]: Starting training from iteration 0\n")
    assert TOOL["last_iteration"](str(log)) == "starting"
    log.write_text("[11/24 13:44:01 d2.utils.events]:  eta: 0:05:12  iter: 19  total_loss: 2.1\n"
                   "[11/24 13:44:31 d2.utils.events]:  eta: 0:04:40  iter: 39  total_loss: 1.8\n")
    assert TOOL["last_iteration"](str(log)) == "39"


def test_run_parallel_shares_the_cpus_between_the_jobs_and_names_a_failed_log(tmp_path):
    from mmt_psm.core.threads import usable_cpus
    code = "import os; print('threads', os.environ['OMP_NUM_THREADS'])"
    logs = {n: str(tmp_path / f"{n}.log") for n in ("a", "b")}
    TOOL["run_parallel"]({n: [sys.executable, "-c", code] for n in logs}, logs, poll_s=0.05)
    share = max(1, usable_cpus() // 2) if TOOL["THREAD_SIGNAL"] is not None else 1  # 1 each on 2 cores
    assert all(open(p).read().strip() == f"threads {share}" for p in logs.values())
    jobs = {"a": [sys.executable, "-c", "import time; time.sleep(30)"],
            "b": [sys.executable, "-c", "raise SystemExit(3)"]}
    with pytest.raises(RuntimeError, match=r"training 'b' failed \(exit 3\); see .*b\.log"):
        TOOL["run_parallel"](jobs, logs, poll_s=0.05)


# a stand-in training: installs the SIGUSR1 handler, prints Detectron2's iteration line, then waits for the
# signal (up to 60 s) and prints its thread count
_WAITER = ("import sys, time, torch; sys.path.insert(0, {repo!r}); "
           "from mmt_psm.core.threads import install_thread_signal; install_thread_signal(); "
           "print(' iter: 0', flush=True); t = time.time()\n"
           "while torch.get_num_threads() == 1 and time.time() - t < 60: time.sleep(0.05)\n"
           "print('threads', torch.get_num_threads())")


@pytest.mark.skipif(TOOL["THREAD_SIGNAL"] is None, reason="no SIGUSR1 on this platform")
def test_sigusr1_adds_one_thread_up_to_the_usable_cpus(tmp_path):
    import subprocess

    from mmt_psm.core.threads import usable_cpus
    code = (f"import os, signal, sys, torch; sys.path.insert(0, {REPO!r}); "
            "from mmt_psm.core.threads import install_thread_signal, usable_cpus; "
            "assert install_thread_signal(); torch.set_num_threads(1)\n"
            "counts = []\n"
            "for _ in range(usable_cpus() + 1):\n"
            "    os.kill(os.getpid(), signal.SIGUSR1); counts.append(torch.get_num_threads())\n"
            "print(*counts)")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    n = usable_cpus()  # one more thread per signal, never more than the CPUs
    assert [int(c) for c in out.stdout.split()] == [min(i + 2, n) for i in range(n + 1)]


def test_give_back_thread_drops_one_never_below_one():
    import torch

    from mmt_psm.core.threads import give_back_thread
    torch.set_num_threads(2)  # the autouse fixture restores the session's count
    assert [give_back_thread(), give_back_thread()] == [1, 1]


@pytest.mark.skipif(TOOL["GIVE_BACK_SIGNAL"] is None, reason="no SIGUSR1/SIGUSR2 on this platform")
def test_a_thread_signal_after_the_exit_handlers_does_not_kill_the_process():
    import subprocess
    # Python's finalisation resets handled signals to their default action (end the process): a signal the
    # quickstart sends to a run that is just exiting must find them ignored instead
    code = (f"import atexit, os, signal, sys; sys.path.insert(0, {REPO!r}); "
            "from mmt_psm.core.threads import install_thread_signal; assert install_thread_signal(); "
            "atexit._run_exitfuncs(); os.kill(os.getpid(), signal.SIGUSR1); os.kill(os.getpid(), signal.SIGUSR2); "
            "print(signal.getsignal(signal.SIGUSR1) == signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout.strip()) == (0, "True"), out.stderr


@pytest.mark.skipif(TOOL["THREAD_SIGNAL"] is None, reason="no SIGUSR1 on this platform")
def test_run_parallel_gives_the_freed_core_to_the_run_still_training(tmp_path, capsys):
    from mmt_psm.core.threads import usable_cpus
    if usable_cpus() < 2:
        pytest.skip("one usable CPU: there is no second thread to take")
    logs = {n: str(tmp_path / f"{n}.log") for n in ("short", "long")}
    # the short run ends once the long one is training (its handler installed)
    short = ("import time; t = time.time()\n"
             "while ' iter: ' not in open({log!r}).read() and time.time() - t < 120: time.sleep(0.05)")
    jobs = {"short": [sys.executable, "-c", short.format(log=logs["long"])],
            "long": [sys.executable, "-c", _WAITER.format(repo=REPO)]}
    TOOL["run_parallel"](jobs, logs, poll_s=0.05)
    assert open(logs["long"]).read().split()[-2:] == ["threads", "2"]
    assert "long takes the freed core (one more torch thread)" in capsys.readouterr().out


@pytest.mark.skipif(TOOL["GIVE_BACK_SIGNAL"] is None, reason="no SIGUSR2 on this platform")
def test_a_job_waiting_for_a_file_starts_when_it_appears_and_the_running_one_gives_a_core_back(tmp_path, capsys):
    from mmt_psm.core.threads import usable_cpus
    if usable_cpus() != 2:
        pytest.skip("the thread counts below are those of 2 usable CPUs")
    logs = {n: str(tmp_path / f"{n}.log") for n in ("first", "second")}
    flag = tmp_path / "model_0000099.pth"
    # alone, the first job trains on both cores; it writes the file (atomically), then waits for SIGUSR2
    first = (f"import os, sys, time, torch; sys.path.insert(0, {REPO!r}); "
             "from mmt_psm.core.threads import install_thread_signal; install_thread_signal(); "
             "print('alone', torch.get_num_threads()); print(' iter: 99', flush=True)\n"
             f"open({str(flag) + '.tmp'!r}, 'w').close(); os.replace({str(flag) + '.tmp'!r}, {str(flag)!r})\n"
             "t = time.time()\n"
             "while torch.get_num_threads() == 2 and time.time() - t < 60: time.sleep(0.05)\n"
             "print('shared', torch.get_num_threads())")
    second = f"import os; print('exists', os.path.exists({str(flag)!r}), 'threads', os.environ['OMP_NUM_THREADS'])"
    TOOL["run_parallel"]({"first": [sys.executable, "-c", first], "second": [sys.executable, "-c", second]},
                         logs, poll_s=0.05, after={"second": str(flag)})
    printed = [ln.split() for ln in open(logs["first"]) if ln.split()[:1] in (["alone"], ["iter:"], ["shared"])]
    assert printed == [["alone", "2"], ["iter:", "99"], ["shared", "1"]]  # (the log also holds import warnings)
    assert open(logs["second"]).read().split() == ["exists", "True", "threads", "1"]
    assert "first gives a core to second" in capsys.readouterr().out


def test_a_job_waiting_for_a_file_nobody_writes_is_an_error(tmp_path):
    logs = {n: str(tmp_path / f"{n}.log") for n in ("first", "second")}
    jobs = {n: [sys.executable, "-c", "pass"] for n in logs}
    with pytest.raises(RuntimeError, match=r"'second' waits for .*never\.pth, which no run wrote"):
        TOOL["run_parallel"](jobs, logs, poll_s=0.05, after={"second": str(tmp_path / "never.pth")})
    assert not os.path.exists(logs["second"])  # never started


def test_load_cfg_reads_the_file_with_its_bases(tmp_path):
    """The quickstart names MMT-PSM's burn-in checkpoint from SEMI.BURN_IN_ITERS as load_cfg reads it."""
    child = tmp_path / "child.yaml"
    child.write_text(f"_BASE_: {os.path.join(REPO, TOOL['MMT_CONFIG'])}\nSEMI:\n  BURN_IN_ITERS: 37\n")
    cfg = TOOL["load_cfg"](str(child))
    assert cfg.SEMI.BURN_IN_ITERS == 37  # the file's own value ...
    assert cfg.MODEL.META_ARCHITECTURE == "MMTPSMRCNN" and cfg.MODEL.RESNETS.DEPTH == 18  # ... over its bases'
    assert TOOL["load_cfg"](TOOL["MMT_CONFIG"]).SEMI.BURN_IN_ITERS == 100  # relative to the repository


def test_hand_over_core_leaves_a_run_that_is_still_starting_alone(tmp_path):
    import subprocess
    log = tmp_path / "starting.log"
    log.write_text("[11/24 13:44:01 d2.engine.train_loop]: Starting training from iteration 0\n")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:  # SIGUSR1's default action would end it: it must not be sent
        assert TOOL["hand_over_core"]({"starting": proc}, {"starting": str(log)}) == []
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
