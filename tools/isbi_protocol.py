#!/usr/bin/env python
"""Run the ISBI 2015 label-efficiency protocol (every arm x seed), resumably, and write a mean +- std table.

    python tools/isbi_protocol.py --seeds 1 2 12 --jobs 2                # every default arm
    python tools/isbi_protocol.py --arms supervised_n2 mmt_psm --seeds 1 --report-only

Every arm starts from the same weights (``--weights``, default: the shared pre-training on the 45 ISBI 2014
synthetic images, ``configs/cpu/pretrain_synth45.yaml``, trained first if missing) and uses the SAME
meta-architecture (``MMTPSMRCNN``), schedule, labeled stream (``SEED``/``DATALOADER.STREAM_SEED`` = the seed)
and student box-head dropout; they differ only in what the protocol compares:

* ``supervised_n2``: the seed's 2 labeled frames (``datasets/splits/isbi2015_train_n2_seed<S>.json``), no
  unlabeled stream (``supervised_n1``: 1 frame; ``--scarce supervised_n1`` gives the teacher-student arms its
  split and burn-in instead). Its student is plain supervised training; its teacher is the student's EMA (the control
  that separates "EMA weights" from "unlabeled data").
* ``mean_teacher``: + the other 4 train frames and the 4 EDF images unlabeled, plain Mean Teacher switches.
* ``mmt_psm``: the paper's method (``configs/mmt_psm_R50.yaml`` switches).
* ``mmt_psm_plus_cap16``: the switches of ``configs/mmt_psm_plus_R50.yaml`` (``PLUS_CONFIG`` below) at the
  paper's unsupervised weight 5 (the config ships 1: arm ``mmt_psm_plus_w1``): the paper's method +
  view fusion + mask distillation on a random 16 positives per image, without the feature loss (it lowers
  cytoplasm AP here, BENCHMARKS.md). ``mmt_psm_plus`` (``PLUS``, run when named) is the same without the cap:
  the plus config until 2026-11-25 (called ``mmt_psm_plus_no_mgd`` before 2026-11-24).
* ``supervised_n6``: all 6 labeled frames (upper bound), no unlabeled stream.
* ablations (run when named): ``mmt_psm_mask_distill``, ``mmt_psm_fuse``, ``mmt_psm_fg_sum``,
  ``mmt_psm_thr07``, ``mmt_psm_labeled_aug`` (the paper's method + one switch each), ``mmt_psm_w0`` (control:
  unsupervised losses weighted 0), ``mmt_psm_no_mgd`` / ``mmt_psm_no_psm`` (the paper's method without one of
  its two unsupervised losses), ``mmt_psm_fuse_distill`` (plus WITH the feature loss: the plus config until
  2026-11-24, then called ``mmt_psm_plus``), ``mmt_psm_plus_mgd02`` (plus with the feature loss at weight 0.2),
  ``mmt_psm_plus_thr05`` (plus with pseudo-labels >= 0.5), ``mmt_psm_plus`` (plus without the cap, above),
  ``mmt_psm_plus_w1`` (plus with ``SEMI.UNSUP_WEIGHT 1`` instead of 5).

With ``--share-burn-in`` the teacher-student arms do not train their own burn-in: they start at iteration
``SEMI.BURN_IN_ITERS`` from supervised_n2's checkpoint after iteration ``BURN_IN_ITERS - 1`` of the same seed
(``SEMI.BURN_IN_CHECKPOINT``), i.e. from literally the same model, and wait for that file while supervised_n2
trains. Their runs differ from runs without the flag: give them their own ``--output``.

A finished run (its metrics.json holds the evaluation at the last iteration) is not redone; an interrupted one
continues from its last checkpoint (``--resume``). Writes <output>/results.json and <output>/results.md: COCO
segm AP (all, per class) and cell AJI / F1 / Dice per class, mean +- std over seeds, of the teacher and the student.
Trailing ``KEY VALUE`` overrides and Detectron2's launch flags (``--num-gpus`` ...) go to every training run
(``python -m mmt_psm.train_net``); progress lines give runs done / total, the time elapsed and an estimate of the
time left, and each run's log (``<output>/<arm>_seed<S>/stdout.txt``) as it starts.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

from mmt_psm.core.cli import add_launch_arguments, add_output_argument, launch_argv
from mmt_psm.core.protocol import final_metrics, run_arm, run_jobs, train, write_results
from mmt_psm.core.protocol import markdown as protocol_markdown
from mmt_psm.core.protocol import summarize as protocol_summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "cpu", "protocol.yaml")
PRETRAIN = os.path.join(ROOT, "configs", "cpu", "pretrain_synth45.yaml")
SPLIT = "datasets/splits/isbi2015_train_n2_seed{s}.json"
SPLIT_N1 = "datasets/splits/isbi2015_train_n1_seed{s}.json"
UNLABELED = {"DATASETS.TRAIN_UNLABELED": "('isbi2015_unlabeled',)", "SEMI.IMS_PER_BATCH_UNLABELED": "2"}
SUPERVISED = {"DATASETS.TRAIN_UNLABELED": "()", "SEMI.IMS_PER_BATCH_UNLABELED": "0"}
MEAN_TEACHER = {"MODEL.MMT_PSM.NUM_TEACHER_COPIES": "1", "MODEL.MMT_PSM.TEACHER_FLIP": "False",
                "MODEL.MMT_PSM.MINING": "False", "MODEL.MMT_PSM.MGD_USE_MASK": "False"}
PLUS = {"MODEL.MMT_PSM.MASK_DISTILL": "True", "MODEL.MMT_PSM.FUSE_ALL_VIEWS": "True", "MODEL.MMT_PSM.MGD_LOSS": "False"}
# the plus config's switches: PLUS + the cap (arm mmt_psm_plus_cap16; + SEMI.UNSUP_WEIGHT 1: mmt_psm_plus_w1)
PLUS_CONFIG = {**PLUS, "MODEL.MMT_PSM.MASK_DISTILL_MAX_POSITIVES": "16"}
ARMS: Dict[str, Dict[str, str]] = {
    "supervised_n1": {"DATASETS.SPLIT_FILE": SPLIT_N1, **SUPERVISED},
    "supervised_n2": {"DATASETS.SPLIT_FILE": SPLIT, **SUPERVISED},
    "mean_teacher": {"DATASETS.SPLIT_FILE": SPLIT, **UNLABELED, **MEAN_TEACHER},
    "mmt_psm": {"DATASETS.SPLIT_FILE": SPLIT, **UNLABELED},
    "mmt_psm_plus": {"DATASETS.SPLIT_FILE": SPLIT, **UNLABELED, **PLUS},
    "supervised_n6": {"DATASETS.SPLIT_FILE": "''", **SUPERVISED},
    # ablations: the paper's method + one switch
    "mmt_psm_mask_distill": {"DATASETS.SPLIT_FILE": SPLIT, **UNLABELED, "MODEL.MMT_PSM.MASK_DISTILL": "True"},
    "mmt_psm_fuse": {"DATASETS.SPLIT_FILE": SPLIT, **UNLABELED, "MODEL.MMT_PSM.FUSE_ALL_VIEWS": "True"},
    "mmt_psm_fg_sum": {"DATASETS.SPLIT_FILE": SPLIT, **UNLABELED, "MODEL.MMT_PSM.FG_MAP": "sum"},
    # pseudo-labels from detections scoring >= 0.7 instead of the paper's 0.05 (tools/pseudo_label_quality.py:
    # at 0.05 the 2-frame teacher gives ~40 cytoplasm pseudo-labels per 256 crop holding 4 cells, precision < 0.1)
    "mmt_psm_thr07": {"DATASETS.SPLIT_FILE": SPLIT, **UNLABELED, "MODEL.MMT_PSM.PSEUDO_SCORE_THRESH": "0.7"},
    "mmt_psm_labeled_aug": {"DATASETS.SPLIT_FILE": SPLIT, **UNLABELED, "INPUT.HUE": "0.05",
                            "INPUT.ERASE_PROB": "0.7", "INPUT.BRIGHTNESS": "0.15", "INPUT.CONTRAST": "0.15"},
    # control: the paper's method with its unsupervised losses weighted 0 (same streams, teacher, EMA, copy at
    # burn-in): separates "the unsupervised losses" from everything else a teacher-student run does differently
    "mmt_psm_w0": {"DATASETS.SPLIT_FILE": SPLIT, **UNLABELED, "SEMI.UNSUP_WEIGHT": "0.0"},
    # which unsupervised loss moves cytoplasm AP: the paper's method without one of its two losses
    "mmt_psm_no_mgd": {"DATASETS.SPLIT_FILE": SPLIT, **UNLABELED, "MODEL.MMT_PSM.MGD_LOSS": "False"},
    "mmt_psm_no_psm": {"DATASETS.SPLIT_FILE": SPLIT, **UNLABELED, "MODEL.MMT_PSM.PSM_LOSS": "False"},
    # plus with the paper's feature loss kept (the plus config until 2026-11-24)
    "mmt_psm_fuse_distill": {"DATASETS.SPLIT_FILE": SPLIT, **UNLABELED, **PLUS, "MODEL.MMT_PSM.MGD_LOSS": "True"},
    # plus with the feature loss at a fifth of the paper's weight (its backbone pull ~ the mask loss's, not 2x)
    "mmt_psm_plus_mgd02": {"DATASETS.SPLIT_FILE": SPLIT, **UNLABELED, **PLUS, "MODEL.MMT_PSM.MGD_LOSS": "True",
                           "MODEL.MMT_PSM.MGD_WEIGHT": "0.2"},
    # plus with pseudo-labels from detections >= 0.5 (cytoplasm pseudo-label precision ~0.45 instead of < 0.1)
    "mmt_psm_plus_thr05": {"DATASETS.SPLIT_FILE": SPLIT, **UNLABELED, **PLUS,
                           "MODEL.MMT_PSM.PSEUDO_SCORE_THRESH": "0.5"},
    # plus with mask distillation on a random 16 of each image's positives (~32 with a trained teacher): half
    # the teacher's mask-head inputs, its largest plus-only cost
    "mmt_psm_plus_cap16": {"DATASETS.SPLIT_FILE": SPLIT, **UNLABELED, **PLUS_CONFIG},
    # the plus config with the unsupervised weight at 1 instead of the paper's 5: on the pretrained 1-frame protocol
    # the weighted mask distillation is ~6x the supervised mask loss at the ramp's peak
    "mmt_psm_plus_w1": {"DATASETS.SPLIT_FILE": SPLIT, **UNLABELED, **PLUS_CONFIG, "SEMI.UNSUP_WEIGHT": "1.0"},
}
POLL_S = 10.0  # how often a teacher-student run waiting for the shared burn-in looks for it
DEFAULT_ARMS = ["supervised_n2", "mean_teacher", "mmt_psm", "mmt_psm_plus_cap16", "supervised_n6"]
METRICS = ["segm/AP", "segm/AP-cytoplasm", "segm/AP-nucleus", "cell/AJI-cytoplasm", "cell/AJI-nucleus",
           "cell/F1-cytoplasm", "cell/F1-nucleus", "cell/Dice-cytoplasm", "cell/Dice-nucleus"]


def final_results(run_dir: str) -> Optional[Dict[str, float]]:
    """Metrics (``task/metric`` keys, teacher and ``*_student``) of the evaluation at the run's LAST iteration,
    from ``metrics.json``; None while the run has not finished (an intermediate evaluation does not count)."""
    return final_metrics(run_dir, lambda rec: any(k.startswith("segm") for k in rec))


def ensure_pretrained(args: argparse.Namespace) -> str:
    """The shared start's weights; trains ``configs/cpu/pretrain_synth45.yaml`` first when they are missing."""
    if args.weights:
        if not os.path.isfile(args.weights):
            raise FileNotFoundError(f"--weights {args.weights} does not exist")
        return args.weights
    run_dir = os.path.join(args.output, "pretrain_synth45")
    weights = os.path.join(run_dir, "model_final.pth")
    if not os.path.isfile(weights):
        train(ROOT, PRETRAIN, [*launch_argv(args), "OUTPUT_DIR", run_dir, *args.opts], run_dir, args.threads,
              what="shared pre-training")
    return weights


def _describe(res: Dict[str, float]) -> str:
    nan = float("nan")
    return f"segm AP {res.get('segm/AP', nan):.1f}, AP-cytoplasm {res.get('segm/AP-cytoplasm', nan):.1f}"


def is_teacher_student(arm: str) -> bool:
    """Whether the arm trains on the unlabeled stream (its burn-in is supervised_n2's first iterations)."""
    return ARMS[arm]["DATASETS.TRAIN_UNLABELED"] != SUPERVISED["DATASETS.TRAIN_UNLABELED"]


def burn_in_checkpoint(out: str, seed: int, opts: List[str], base: str = BASE,
                      scarce: str = "supervised_n2") -> str:
    """The scarce arm's (supervised_n2 by default) checkpoint after iteration ``SEMI.BURN_IN_ITERS - 1`` (the
    protocol config + ``opts``); a ValueError when no periodic checkpoint falls on that iteration."""
    from mmt_psm.config import load_config

    cfg = load_config(base, opts)
    burn_in, period = cfg.SEMI.BURN_IN_ITERS, cfg.SOLVER.CHECKPOINT_PERIOD
    if burn_in <= 0 or burn_in % period:
        raise ValueError(f"--share-burn-in needs a checkpoint after iteration SEMI.BURN_IN_ITERS - 1: "
                         f"BURN_IN_ITERS {burn_in} must be a positive multiple of SOLVER.CHECKPOINT_PERIOD {period}")
    return os.path.join(out, f"{scarce}_seed{seed}", f"model_{burn_in - 1:07d}.pth")


def wait_for(path: str, gave_up: threading.Event, what: str) -> None:
    """Block until ``path`` exists; a RuntimeError naming ``what`` once ``gave_up`` is set without it."""
    while not os.path.isfile(path):
        if gave_up.is_set():
            raise RuntimeError(f"{what}: {path} was not written (see that run's stdout.txt)")
        time.sleep(POLL_S)


def order_jobs(arms: List[str], seeds: List[int], share_burn_in: bool,
               scarce: str = "supervised_n2") -> List[Tuple[str, int]]:
    """Seed-major (a whole seed before the next); with ``share_burn_in`` the scarce arm first in every seed, so a
    teacher-student run never waits on a run queued behind it."""
    if share_burn_in:
        arms = sorted(arms, key=lambda a: a != scarce)
    return [(a, s) for s in seeds for a in arms]


def run_one(arm: str, seed: int, weights: str, args: argparse.Namespace,
            sup_ended: Dict[int, threading.Event]) -> Dict[str, float]:
    """Train + evaluate one arm/seed unless already finished; returns its final metrics. With
    ``args.share_burn_in`` a teacher-student arm starts from supervised_n2's burn-in checkpoint, waiting for it
    until ``sup_ended[seed]`` is set, which supervised_n2 does when it ends."""
    run_dir = os.path.join(args.output, f"{arm}_seed{seed}")
    base, scarce = getattr(args, "base", BASE), getattr(args, "scarce", "supervised_n2")
    overrides = {"MODEL.WEIGHTS": weights, **ARMS[arm]}
    if is_teacher_student(arm):  # the scarce arm's labeled frames
        overrides["DATASETS.SPLIT_FILE"] = ARMS[scarce]["DATASETS.SPLIT_FILE"]
    if args.share_burn_in and is_teacher_student(arm):
        shared = burn_in_checkpoint(args.output, seed, args.opts, base, scarce)
        overrides["SEMI.BURN_IN_CHECKPOINT"] = shared
        if final_results(run_dir) is None and not args.report_only:
            wait_for(shared, sup_ended[seed], f"{arm} seed {seed}")
    try:
        return run_arm(ROOT, arm, seed, run_dir, base, overrides, args, final_results, _describe)
    finally:
        if arm == scarce:
            sup_ended[seed].set()


def summarize(results: Dict[str, Dict[int, Dict[str, float]]]) -> Dict[str, Dict[str, List[float]]]:
    """``{arm (teacher|student): {metric: [mean, std, n]}}`` over the seeds that finished."""
    return protocol_summarize(results, METRICS, {" (teacher)": lambda m: m,
                                                  " (student)": lambda m: m.replace("/", "_student/", 1)})


def markdown(table: Dict[str, Dict[str, List[float]]], seeds: List[int]) -> str:
    """A markdown table in %: mean +- std over seeds (population std)."""
    return protocol_markdown(table, METRICS, lambda m: 1, f"seeds: {seeds}; all values in %.")


def main(argv: Optional[List[str]] = None) -> int:
    """Run (or collect) every arm x seed and write the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 12])
    p.add_argument("--weights", default="", help="shared start of every arm (default: pre-train on synth45)")
    p.add_argument("--base", default=BASE, help="the arms' config (default configs/cpu/protocol.yaml; "
                   "configs/cpu/pretrained_protocol.yaml starts from ImageNet MobileNetV2 with --weights)")
    add_output_argument(p, "folder of every run (<arm>_seed<S>/: train_net's OUTPUT_DIR with checkpoints, "
                        "metrics.json and the run's log stdout.txt; pretrain_synth45/ for the shared start) and the "
                        "tables results.json and results.md", default=os.path.join(ROOT, "output", "isbi_protocol"))
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--report-only", action="store_true", help="only collect finished runs")
    p.add_argument("--scarce", default="supervised_n2", choices=["supervised_n2", "supervised_n1"],
                   help="the scarce-label arm: the teacher-student arms train on its labeled frames (and, with "
                        "--share-burn-in, start from its burn-in checkpoint)")
    p.add_argument("--share-burn-in", action="store_true",
                   help="teacher-student arms start from supervised_n2's burn-in checkpoint of the same seed")
    add_launch_arguments(p, "every training run")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE overrides for every run")
    args = p.parse_args(argv)
    splits = {ARMS[a]["DATASETS.SPLIT_FILE"] for a in args.arms} - {"''"}
    for s in args.seeds:
        for split in sorted(splits):
            if not os.path.isfile(os.path.join(ROOT, split.format(s=s))):
                count = 1 if split == SPLIT_N1 else 2
                p.error(f"no split file {split.format(s=s)}: python tools/make_splits.py --dataset isbi2015_train "
                        f"--count {count} --seed {s} --output {split.format(s=s)}")
    if args.share_burn_in:
        try:
            shared = {s: burn_in_checkpoint(args.output, s, args.opts, args.base, args.scarce) for s in args.seeds}
        except ValueError as e:
            p.error(str(e))
        missing = [s for s in args.seeds if not os.path.isfile(shared[s])]
        if missing and args.scarce not in args.arms and not args.report_only:
            p.error(f"--share-burn-in: no burn-in checkpoint of {args.scarce} for seed(s) {missing} "
                    f"({shared[missing[0]]}); add {args.scarce} to --arms")
    weights = "" if args.report_only else ensure_pretrained(args)
    jobs = order_jobs(args.arms, args.seeds, args.share_burn_in, args.scarce)
    print(f"{len(jobs)} runs: " + ", ".join(f"{a}/s{s}" for a, s in jobs), flush=True)
    sup_ended = {s: threading.Event() for s in args.seeds}
    if args.share_burn_in and args.scarce not in args.arms:
        for event in sup_ended.values():
            event.set()  # its checkpoints exist (checked above); nothing will write them
    results, failures = run_jobs(jobs, lambda a, s: run_one(a, s, weights, args, sup_ended), args.jobs)
    table = summarize(results)
    write_results(args.output, args.seeds, table, results, failures, markdown(table, args.seeds))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
