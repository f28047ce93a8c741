#!/usr/bin/env python
"""`make quickstart`: the main job end to end on the embedded synthetic data, on CPU, in minutes.

1. generates the synthetic overlapping-cell data set (8 labeled, 32 unlabeled, 8 test images of 256 x 256);
2. trains a supervised Mask R-CNN (ImageNet MobileNetV2-FPN, written by ``make setup``) on the 8 labeled images;
3. trains MMT-PSM on labeled + unlabeled images with the same labeled stream and schedule: its supervised
   burn-in (the first half) IS the supervised run's first half (``SEMI.BURN_IN_CHECKPOINT``: the supervised
   run's checkpoint there), then teacher-student training beside the supervised run's second half;
4. evaluates (COCO AP + AJI / F1 / Dice), draws predictions beside the ground truth as PNGs, prints a table,
   the sentence that is true of it (does MMT-PSM beat supervised here?) and the teacher's pseudo-label quality
   on the unlabeled images (their labels are held back: read by the monitor only, never trained on).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

from mmt_psm.core.cli import add_output_argument
from mmt_psm.core.threads import GIVE_BACK_SIGNAL, THREAD_SIGNAL, usable_cpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SUP_CONFIG = "configs/quickstart/supervised_mobilenet_v2.yaml"
MMT_CONFIG = "configs/quickstart/mmt_psm_mobilenet_v2.yaml"


def load_cfg(config_file: str):
    """A config file (relative to the repository or absolute, with its bases) on Detectron2's + this project's keys."""
    from mmt_psm.config import load_config

    return load_config(os.path.join(REPO, config_file))


def run(cmd: List[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def last_iteration(log: str) -> str:
    """The newest ``iter: N`` Detectron2's console writer printed to ``log`` ('starting' before the first)."""
    try:
        with open(log, errors="replace") as f:
            lines = [ln for ln in f if " iter: " in ln]
    except OSError:
        return "starting"
    return lines[-1].split(" iter: ")[1].split()[0] if lines else "starting"


def hand_over_core(procs: Dict[str, subprocess.Popen], logs: Dict[str, str], sig: Optional[int] = THREAD_SIGNAL
                   ) -> List[str]:
    """Signals every run that is already training (its log shows an ``iter:`` line) to take one more torch thread
    (``sig`` = SIGUSR1; SIGUSR2: give one back; ``mmt_psm.core.threads``, handled by ``tools/train_net.py``);
    returns their names. A run still starting is left alone: before its handler is installed the signal's default
    action would end it."""
    if sig is None:
        return []
    told = [n for n, p in procs.items() if p.poll() is None and last_iteration(logs[n]) != "starting"]
    for name in told:
        procs[name].send_signal(sig)
    return told


def run_parallel(jobs: Dict[str, List[str]], logs: Dict[str, str], poll_s: float = 30.0,
                 after: Optional[Dict[str, str]] = None) -> None:
    """Runs the trainings side by side, the usable CPUs shared between those started (on 2 cores: one torch
    thread each, as two per run would oversubscribe them); when one finishes, the runs still training take its
    core (one more thread each).

    ``after[name]`` is a file another job writes (atomically; e.g. its checkpoint): that job starts once the
    file exists. Until then the jobs already running share its core (CPUs // running jobs threads each), and
    when it starts they give one thread back. Each job writes its console to ``logs[name]``; progress every
    ``poll_s`` seconds. A failure stops the others and raises, naming the failed run's log."""
    after = dict(after or {})
    waiting = [n for n in jobs if n in after]
    first = [n for n in jobs if n not in after]
    share = max(1, usable_cpus() // max(1, len(first))) if THREAD_SIGNAL is not None else 1
    procs: Dict[str, subprocess.Popen] = {}

    def launch(name: str, threads: int) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        os.makedirs(os.path.dirname(logs[name]) or ".", exist_ok=True)
        print("+", " ".join(jobs[name]), ">", logs[name], flush=True)
        with open(logs[name], "w") as out:
            procs[name] = subprocess.Popen(jobs[name], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    for name in first:
        launch(name, share)
    start = last_report = time.time()
    while procs or waiting:
        time.sleep(min(poll_s, 1.0))
        for name in [n for n in waiting if os.path.exists(after[n])]:
            waiting.remove(name)
            if share > 1:  # the running jobs had its core
                for other in hand_over_core(procs, logs, GIVE_BACK_SIGNAL):
                    print(f"[{time.time() - start:.0f} s] {other} gives a core to {name}", flush=True)
            launch(name, 1)
        for name, proc in list(procs.items()):
            if proc.poll() is None:
                continue
            del procs[name]
            if proc.returncode != 0:
                for other in procs.values():
                    other.terminate()
                    other.wait()
                raise RuntimeError(f"quickstart: training '{name}' failed (exit {proc.returncode}); "
                                   f"see {logs[name]}")
            print(f"[{time.time() - start:.0f} s] {name} finished", flush=True)
            for other in hand_over_core(procs, logs):
                print(f"[{time.time() - start:.0f} s] {other} takes the freed core (one more torch thread)",
                      flush=True)
        if waiting and not procs:
            raise RuntimeError("quickstart: " + ", ".join(f"'{n}' waits for {after[n]}" for n in waiting)
                               + ", which no run wrote")
        if procs and time.time() - last_report >= poll_s:
            last_report = time.time()
            state = ", ".join([f"{n} iter {last_iteration(logs[n])}" for n in procs]
                              + [f"{n} waits for {os.path.basename(after[n])}" for n in waiting])
            print(f"[{time.time() - start:.0f} s] {state}", flush=True)


def final_metrics(output_dir: str) -> Dict[str, float]:
    """The last evaluation written by Detectron2's EvalHook to metrics.json."""
    last: Dict[str, float] = {}
    with open(os.path.join(output_dir, "metrics.json")) as f:
        for line in f:
            row = json.loads(line)
            if any(k.startswith("segm") for k in row):
                last = row
    return last


def pseudo_label_line(output_dir: str) -> str:
    """The pseudo-label monitor's averages over the teacher-student phase, per class, from metrics.json."""
    sums: Dict[str, List[float]] = {}
    with open(os.path.join(output_dir, "metrics.json")) as f:
        for line in f:
            for k, v in json.loads(line).items():
                if k.startswith("pseudo_quality/") and k.count("/") == 2:
                    sums.setdefault(k, []).append(v)
    if not sums:
        return "pseudo-labels: no monitor records (DATASETS.UNLABELED_GT / SEMI.PSEUDO_MONITOR_PERIOD unset)"
    mean = {k: sum(v) / len(v) for k, v in sums.items()}
    classes = sorted({k.split("/")[1] for k in mean})
    parts = []
    for c in classes:
        p, r, p_all, r_all, iou = (mean.get(f"pseudo_quality/{c}/{m}", float("nan")) for m in
                                   ("precision@0.5", "recall@0.5", "precision", "recall", "matched_iou"))
        parts.append(f"{c} precision {p:.2f} recall {r:.2f} (all scores: {p_all:.2f} / {r_all:.2f}), "
                     f"matched IoU {iou:.2f}")
    n = len(next(iter(sums.values())))
    head = f"teacher pseudo-labels vs held-back labels (score >= 0.5, IoU > 0.5; mean of {n} checks): "
    return head + "; ".join(parts)


def verdict(sup: Dict[str, float], mmt: Dict[str, float]) -> str:
    """One sentence: the MMT-PSM teacher against supervised on segm AP and cytoplasm AJI, as measured here."""
    d_ap = mmt.get("segm/AP", float("nan")) - sup.get("segm/AP", float("nan"))
    d_aji = mmt.get("cell/AJI-cytoplasm", float("nan")) - sup.get("cell/AJI-cytoplasm", float("nan"))
    word = "beats" if d_ap > 0 and d_aji > 0 else ("trails" if d_ap < 0 and d_aji < 0 else "is mixed against")
    return (f"At this scale (one seed, 100 teacher-student iterations) the MMT-PSM teacher {word} supervised "
            f"training: segm AP {d_ap:+.1f}, AJI-cytoplasm {d_aji:+.1f} points. Seeded comparisons on real data: "
            "BENCHMARKS.md, 'ISBI 2015 protocol'.")


def table(rows: Dict[str, Dict[str, float]], suffixes: Dict[str, str]) -> str:
    keys = ["segm/AP", "segm/AP50", "segm/AP-cytoplasm", "segm/AP-nucleus", "cell/AJI-cytoplasm",
            "cell/AJI-nucleus", "cell/F1", "cell/Dice"]
    lines = ["| model | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name, metrics in rows.items():
        sfx = suffixes.get(name, "")
        vals = []
        for k in keys:
            task, metric = k.split("/")
            v = metrics.get(f"{task}{sfx}/{metric}")
            vals.append("n/a" if v is None else f"{v:.1f}")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_argument(ap, "folder of the two runs: supervised/ and mmt_psm/ (train_net output: checkpoints, "
                        "metrics.json, config.yaml; predictions/ PNGs), their console logs *.console.log",
                        default="output_quickstart")
    args = ap.parse_args(argv)
    py = sys.executable
    start = time.time()
    run([py, "datasets/prepare_synthetic.py"])
    sup_dir, mmt_dir = os.path.join(args.output, "supervised"), os.path.join(args.output, "mmt_psm")
    burn_in = load_cfg(MMT_CONFIG).SEMI.BURN_IN_ITERS
    shared = os.path.join(sup_dir, f"model_{burn_in - 1:07d}.pth")  # the supervised run after burn_in iterations
    if os.path.exists(shared):
        os.remove(shared)  # a previous quickstart's: MMT-PSM must wait for this run's
    run_parallel(
        {"supervised": [py, "tools/train_net.py", "--config-file", SUP_CONFIG, "OUTPUT_DIR", sup_dir,
                        "SOLVER.CHECKPOINT_PERIOD", str(burn_in)],
         "mmt_psm": [py, "tools/train_net.py", "--config-file", MMT_CONFIG, "OUTPUT_DIR", mmt_dir,
                     "SEMI.BURN_IN_CHECKPOINT", shared]},
        {"supervised": os.path.join(args.output, "supervised.console.log"),
         "mmt_psm": os.path.join(args.output, "mmt_psm.console.log")},
        after={"mmt_psm": shared})

    from detectron2.checkpoint import DetectionCheckpointer

    from mmt_psm.core import Trainer
    from mmt_psm.instance.visualize import draw_dataset_predictions

    pngs = []
    for run_dir in (sup_dir, mmt_dir):
        cfg = load_cfg(os.path.join(run_dir, "config.yaml"))
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model).load(os.path.join(run_dir, "model_final.pth"))
        pngs += draw_dataset_predictions(cfg, model, "synthetic_test", os.path.join(run_dir, "predictions"), 4)

    rows = {"supervised (8 labeled)": final_metrics(sup_dir)}
    mmt = final_metrics(mmt_dir)
    rows["MMT-PSM teacher (8 labeled + 32 unlabeled)"] = mmt
    rows["MMT-PSM student"] = mmt
    print("\nsynthetic_test, 8 images (metrics in %):")
    print(table(rows, {"MMT-PSM student": "_student"}))
    print("\n" + pseudo_label_line(mmt_dir))
    print(verdict(rows["supervised (8 labeled)"], mmt))
    print(f"\nprediction PNGs (ground truth | prediction): {os.path.dirname(pngs[0])}, {os.path.dirname(pngs[-1])}")
    print(f"quickstart finished in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
