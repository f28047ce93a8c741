"""The part every protocol tool (tools/acdc_protocol.py, tools/isbi_protocol.py) shares: find a run's final
evaluation, train one arm x seed through mmt_psm.train_net (resumable; Detectron2's launch flags passed on),
run the jobs in a thread pool with progress lines, summarize mean +- std over seeds, and write results.json /
results.md atomically.

What a protocol run prints: ``[start] <what>, log <run_dir>/stdout.txt`` when a training starts, ``[skip]``
for a run that finished earlier, ``[done]`` / ``[fail]`` when one ends, then ``[progress] 3/10 runs done,
elapsed 1h02m, about 2h05m left`` (the mean time of the runs that trained in this invocation x the runs left /
the parallel jobs)."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mmt_psm.core.atomic import write_json, write_text
from mmt_psm.core.cli import launch_argv

__all__ = ["final_metrics", "evaluation_trajectory", "train", "run_arm", "run_jobs", "Progress", "summarize",
           "markdown", "write_results"]

Metrics = Dict[str, float]


def final_metrics(run_dir: str, is_evaluation: Callable[[Dict], bool]) -> Optional[Metrics]:
    """The ``task/metric`` values of every evaluation record (``is_evaluation(record)``) at the run's LAST
    iteration (``SOLVER.MAX_ITER - 1`` of its config.yaml), merged, from ``metrics.json``; None while the run has
    not finished: an intermediate evaluation does not count, a torn last line is skipped."""
    path, max_iter = os.path.join(run_dir, "metrics.json"), _max_iter(run_dir)
    if not (os.path.isfile(path) and max_iter):
        return None
    found: Metrics = {}
    for rec in _records(path):
        if rec.get("iteration", -1) >= max_iter - 1 and is_evaluation(rec):
            found.update({k: v for k, v in rec.items() if "/" in k})
    return found or None


def evaluation_trajectory(run_dir: str, key: str) -> List[Tuple[int, float]]:
    """``[(iteration + 1, value)]`` of ``key`` at every evaluation in ``run_dir/metrics.json``, in iteration order
    (a resumed run's repeated record: the last one written; a torn line skipped; no file: ``[]``). Shows whether a
    run's final figure is where its schedule peaks or an accident of where it stops (``TEST.EVAL_PERIOD``)."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    found = {int(rec["iteration"]): float(rec[key]) for rec in _records(path) if key in rec and "iteration" in rec}
    # iterations trained: EvalHook records a period's evaluation at iteration k - 1, the final test at MAX_ITER or
    # MAX_ITER - 1; capped at the run's MAX_ITER (config.yaml) where it is known
    cap = _max_iter(run_dir)
    return sorted((min(it + 1, cap) if cap else it + 1, v) for it, v in found.items())


def _records(path: str) -> Iterator[Dict]:
    """The JSON records of a metrics.json, in file order; a torn line (a run stopped mid-write) is skipped."""
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def _max_iter(run_dir: str) -> Optional[int]:
    """``SOLVER.MAX_ITER`` of ``run_dir/config.yaml``; None without one."""
    config = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config):
        return None
    import yaml

    with open(config) as f:
        return int(yaml.safe_load(f)["SOLVER"]["MAX_ITER"])


# the training command (Detectron2's command line); a test swaps it for a stub
TRAIN_COMMAND = [sys.executable, "-m", "mmt_psm.train_net"]


def train(root: str, config: str, opts: Sequence[str], run_dir: str, threads: int, what: str) -> None:
    """``python -m mmt_psm.train_net --config-file config --resume *opts`` (what ``tools/train_net.py`` runs) in
    ``root`` with ``threads`` torch threads, its output appended to ``run_dir/stdout.txt`` (printed as the run's
    log when it starts); a RuntimeError naming ``what`` and that file when it fails. ``opts`` may begin with
    train_net flags (``--eval-only``, the launch flags of :func:`mmt_psm.core.cli.launch_argv`)."""
    cmd = [*TRAIN_COMMAND, "--config-file", config, "--resume", *opts]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    os.makedirs(run_dir, exist_ok=True)
    print(f"[start] {what}, log {os.path.join(run_dir, 'stdout.txt')}", flush=True)
    with open(os.path.join(run_dir, "stdout.txt"), "a") as log:
        log.write("$ " + " ".join(cmd[1:]) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    if rc != 0:
        raise RuntimeError(f"{what} failed (exit {rc}); see {run_dir}/stdout.txt")


def run_arm(root: str, arm: str, seed: int, run_dir: str, config: str, overrides: Mapping[str, str],
            args: argparse.Namespace,
            final: Callable[[str], Optional[Metrics]], describe: Callable[[Metrics], str]) -> Metrics:
    """Train + evaluate one arm / seed unless ``final(run_dir)`` says it finished; returns its final metrics.

    ``overrides`` values may hold ``{s}`` (the seed); every run gets ``SEED`` and ``DATALOADER.STREAM_SEED`` = the
    seed (identical labeled streams across arms) and ``args.opts`` last. ``args``: ``report_only``, ``threads``,
    ``opts``, and where present Detectron2's launch flags (``num_gpus`` ..., passed on to train_net) and ``jobs``.
    With ``report_only`` an unfinished run is a FileNotFoundError."""
    done = final(run_dir)
    if done is not None:
        print(f"[skip] {arm} seed {seed}: finished earlier ({run_dir})", flush=True)
        _JOB.skipped = True
        return done
    if args.report_only:
        raise FileNotFoundError(f"{arm} seed {seed} has no final results in {run_dir}")
    opts = ["OUTPUT_DIR", run_dir, "SEED", str(seed), "DATALOADER.STREAM_SEED", str(seed)]
    for k, v in overrides.items():
        opts += [k, v.format(s=seed)]
    t0 = time.time()
    launch = launch_argv(args, getattr(args, "jobs", 1))
    train(root, config, [*launch, *opts, *args.opts], run_dir, args.threads, what=f"{arm} seed {seed}")
    res = final(run_dir)
    if res is None:
        raise RuntimeError(f"{arm} seed {seed}: no final evaluation in {run_dir}/metrics.json")
    print(f"[done] {arm} seed {seed} in {time.time() - t0:.0f} s: {describe(res)}", flush=True)
    return res


# per worker thread: whether the job it runs now was collected (finished earlier) rather than trained
_JOB = threading.local()


def _duration(seconds: float) -> str:
    """``42s``, ``17m05s``, ``3h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Runs done of ``total``, time elapsed since it was made and the time left: the mean duration of the runs that
    trained here (not those collected from an earlier invocation, nor failures) x the rounds of ``workers``
    parallel runs still to go. Thread-safe; ``finish`` returns the ``[progress]`` line."""

    def __init__(self, total: int, workers: int = 1, unit: str = "runs", clock: Callable[[], float] = time.time):
        self.total, self.workers, self.unit, self.clock = total, max(1, workers), unit, clock
        self.start, self.done = clock(), 0
        self.trained: List[float] = []
        self._lock = threading.Lock()

    def finish(self, seconds: float, trained: bool = True) -> str:
        """Count one run that ended after ``seconds`` (``trained``: it counts towards the mean)."""
        with self._lock:
            self.done += 1
            if trained:
                self.trained.append(seconds)
            return self.line()

    def line(self) -> str:
        left = self.total - self.done
        head = f"[progress] {self.done}/{self.total} {self.unit} done, elapsed {_duration(self.clock() - self.start)}"
        if left <= 0:
            return head
        if not self.trained:
            return head + ", time left unknown until one trains"
        mean = sum(self.trained) / len(self.trained)
        eta = mean * math.ceil(left / self.workers)
        return head + f", about {_duration(eta)} left ({left} to go, mean {_duration(mean)} of {len(self.trained)})"


def run_jobs(
    jobs: Sequence[Tuple[str, int]], run_one: Callable[[str, int], Metrics], workers: int
) -> Tuple[Dict[str, Dict[int, Metrics]], List[str]]:
    """``run_one(arm, seed)`` for every job, ``workers`` at a time; returns ({arm: {seed: metrics}}, failures).
    A job raising RuntimeError / FileNotFoundError is a failure (printed), the others go on. Each job that ends
    prints a :class:`Progress` line."""
    results: Dict[str, Dict[int, Metrics]] = {}
    failures: List[str] = []
    progress = Progress(len(jobs), workers)

    def timed(arm: str, seed: int) -> Metrics:
        _JOB.skipped, t0, ok = False, time.time(), False
        try:
            res = run_one(arm, seed)
            ok = True
            return res
        finally:
            print(progress.finish(time.time() - t0, trained=ok and not _JOB.skipped), flush=True)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {(a, s): pool.submit(timed, a, s) for a, s in jobs}
        for (a, s), fut in futures.items():
            try:
                results.setdefault(a, {})[s] = fut.result()
            except (RuntimeError, FileNotFoundError) as e:
                failures.append(str(e))
                print(f"[fail] {e}", flush=True)
    return results, failures


def summarize(results: Mapping[str, Mapping[int, Metrics]], metrics: Sequence[str],
              models: Mapping[str, Callable[[str], str]]) -> Dict[str, Dict[str, List[float]]]:
    """``{arm + label: {metric: [mean, std, n]}}`` over the seeds that finished (population std).

    ``models`` maps a row label suffix (e.g. ``" (student)"``) to the function giving a metric's key in a run's
    results; a model is listed only when every seed has its first metric. A missing other metric is NaN."""
    table = {}
    for arm, by_seed in results.items():
        for label, key in models.items():
            if not by_seed or not all(key(metrics[0]) in r for r in by_seed.values()):
                continue
            row = {}
            for m in metrics:
                vals = np.array([r.get(key(m), np.nan) for r in by_seed.values()], dtype=float)
                row[m] = [float(vals.mean()), float(vals.std()), int(vals.size)]
            table[arm + label] = row
    return table


def markdown(table: Mapping[str, Mapping[str, List[float]]], metrics: Sequence[str],
             digits: Callable[[str], int], footer: str) -> str:
    """A markdown table: one row per ``table`` entry, ``mean +- std`` with ``digits(metric)`` decimals."""
    head = "| arm | n | " + " | ".join(metrics) + " |\n|---|---|" + "---|" * len(metrics) + "\n"
    rows = []
    for arm, row in table.items():
        cells = [f"{row[m][0]:.{digits(m)}f} +- {row[m][1]:.{digits(m)}f}" for m in metrics]
        rows.append(f"| {arm} | {row[metrics[0]][2]} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + f"\n\n{footer}\n"


def write_results(out: str, seeds: Sequence[int], table: Dict, results: Dict, failures: List[str], text: str,
                  extra: Optional[Mapping] = None) -> None:
    """``<out>/results.json`` (seeds, table, runs, failures, then the ``extra`` keys) and ``<out>/results.md``;
    prints the markdown."""
    write_json(os.path.join(out, "results.json"),
               {"seeds": list(seeds), "table": table, "runs": results, "failures": failures, **(extra or {})})
    write_text(os.path.join(out, "results.md"), text)
    print(text)
