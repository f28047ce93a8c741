#!/usr/bin/env python
"""Run the ACDC label-efficiency protocol (every arm x seed), resumably, and write a mean +- std table.

    python tools/acdc_protocol.py --seeds 1 2 --jobs 2 --output output/acdc_protocol
    python tools/acdc_protocol.py --arms supervised_p3 lcc --seeds 1 2 3 --report-only

Arms (configs/acdc/*.yaml; seed S uses the patient split p3_seed<S>, SEED S and DATALOADER.STREAM_SEED S, so
every arm of a seed sees the same 3 labeled patients and the same labeled stream order):
supervised_p3 (3 labeled patients), supervised_all (15 patients, upper bound), scribble_only (scribbles of all 15),
mixed (3 full + 12 scribble patients), mean_teacher, lcc and lcc_plus (3 labeled + 12 unlabeled); the ablation
lcc_no_separation (low-confidence consistency alone), lcc_proj (separation on a projection head), lcc_late
(separation from iteration 600), mean_teacher_bn and lcc_plus_bn (BatchNorm running statistics from the labeled
slices only, ``MODEL.LCC.BN_STATS labeled``) run when named in --arms. A finished run (its
metrics.json holds the final evaluation) is not redone; an interrupted one continues from its last checkpoint
(``--resume``). Writes <output>/results.json and <output>/results.md (per structure Dice and HD95, mean +- std
over seeds, of the reported model and, for teacher-student arms, of the other one; with ``TEST.EVAL_PERIOD`` below
the schedule, each run's mean Dice at every evaluation, to see whether the final figure is where the run peaks).
lcc_no_separation_bn and mean_teacher_bn_w1 (consistency weight 1) add the BatchNorm switch to lcc_no_separation
and mean_teacher; lcc_plus_bn_all divides lcc_plus_bn's two terms by every pixel instead of the kept ones
(``MODEL.LCC.LOSS_NORM``).

``--largest-component`` trains nothing: it re-scores finished runs' final models keeping only each structure's
largest 3D connected component (``TEST.VOLUME_LARGEST_COMPONENT``) into <output>/largest_component/results.md.

Trailing ``KEY VALUE`` overrides and Detectron2's launch flags (``--num-gpus`` ...) go to every training run
(``python -m mmt_psm.train_net``); progress lines give runs done / total, the time elapsed and an estimate of the
time left, and each run's log (``<output>/<arm>_seed<S>/stdout.txt``) as it starts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

from mmt_psm.core.cli import add_launch_arguments, add_output_argument, launch_argv
from mmt_psm.core.protocol import evaluation_trajectory, final_metrics, run_arm, run_jobs, train, write_results
from mmt_psm.core.protocol import markdown as protocol_markdown
from mmt_psm.core.protocol import summarize as protocol_summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELED = {"DATASETS.TRAIN": "('acdc_p3_seed{s}_labeled',)"}
UNLABELED = {**LABELED, "DATASETS.TRAIN_UNLABELED": "('acdc_p3_seed{s}_unlabeled',)"}
ARMS = {
    "supervised_p3": ("supervised_p3.yaml", LABELED),
    "supervised_all": ("supervised_all.yaml", {}),
    "scribble_only": ("scribble_only.yaml", {}),
    "mixed": ("mixed_supervision.yaml", {**LABELED, "DATASETS.TRAIN_UNLABELED": "('acdc_p3_seed{s}_scribble',)"}),
    "mean_teacher": ("mean_teacher.yaml", UNLABELED),
    "lcc": ("lcc_mean_teacher.yaml", UNLABELED),
    # the separation on a projection, weight 0.1 (configs/acdc/lcc_plus.yaml), averaged over the kept pixels as
    # measured before lcc_plus.yaml took LOSS_NORM "all" (lcc_plus_bn_all is the config as shipped + BN_STATS)
    "lcc_plus": ("lcc_plus.yaml", {**UNLABELED, "MODEL.LCC.LOSS_NORM": "kept"}),
    # ablation: low-confidence consistency alone (no class separation)
    "lcc_no_separation": ("lcc_mean_teacher.yaml", {**UNLABELED, "MODEL.LCC.SEPARATION": "False"}),
    # beyond the paper: separation on a 32-wide projection of the decoder features / delayed to iteration 600
    "lcc_proj": ("lcc_mean_teacher.yaml", {**UNLABELED, "MODEL.LCC.PROJECTION_DIM": "32"}),
    "lcc_late": ("lcc_mean_teacher.yaml", {**UNLABELED, "MODEL.LCC.SEPARATION_START_ITER": "600"}),
    # BatchNorm running statistics (the test-time ones) from the labeled slices only
    "mean_teacher_bn": ("mean_teacher.yaml", {**UNLABELED, "MODEL.LCC.BN_STATS": "labeled"}),
    "lcc_plus_bn": ("lcc_plus.yaml", {**UNLABELED, "MODEL.LCC.BN_STATS": "labeled", "MODEL.LCC.LOSS_NORM": "kept"}),
    # which LCC term costs Dice at 256 px: low-confidence consistency alone, BatchNorm from the labeled slices
    "lcc_no_separation_bn": (
        "lcc_mean_teacher.yaml",
        {**UNLABELED, "MODEL.LCC.SEPARATION": "False", "MODEL.LCC.BN_STATS": "labeled"},
    ),
    # Mean Teacher with 10x SSL4MIS's consistency weight: at 0.1 the unlabeled slices barely enter the loss
    "mean_teacher_bn_w1": (
        "mean_teacher.yaml", {**UNLABELED, "MODEL.LCC.BN_STATS": "labeled", "SEMI.UNSUP_WEIGHT": "1.0"}
    ),
    # lcc_plus_bn with its two terms summed over every pixel (a kept pixel weighs what it weighs in Mean Teacher):
    # configs/acdc/lcc_plus.yaml as shipped, BN_STATS labeled
    "lcc_plus_bn_all": ("lcc_plus.yaml", {**UNLABELED, "MODEL.LCC.BN_STATS": "labeled", "MODEL.LCC.LOSS_NORM": "all"}),
}
ABLATIONS = (
    "lcc_no_separation", "lcc_proj", "lcc_late", "mean_teacher_bn", "lcc_plus_bn", "lcc_no_separation_bn",
    "mean_teacher_bn_w1", "lcc_plus_bn_all",
)
METRICS = ["Dice-RV", "Dice-Myo", "Dice-LV", "Dice", "HD95-RV", "HD95-Myo", "HD95-LV", "HD95"]
TASK = "sem_seg_volume"


def final_results(run_dir: str) -> Optional[Dict[str, float]]:
    """The volume metrics (flattened ``task/metric`` keys) of the evaluation at the run's LAST iteration, from
    ``metrics.json``; None while the run has not finished (an intermediate evaluation does not count)."""
    return final_metrics(run_dir, lambda rec: f"{TASK}/Dice" in rec)


def run_one(arm: str, seed: int, args: argparse.Namespace) -> Dict[str, float]:
    """Train + evaluate one arm/seed unless already finished; returns its final metrics."""
    config, overrides = ARMS[arm]
    return run_arm(ROOT, arm, seed, os.path.join(args.output, f"{arm}_seed{seed}"),
                   os.path.join(ROOT, "configs", "acdc", config), overrides, args, final_results,
                   lambda res: f"Dice {res[f'{TASK}/Dice']:.4f}")


def rescore_largest_component(arm: str, seed: int, args: argparse.Namespace) -> Dict[str, float]:
    """A finished run's final model re-evaluated with ``TEST.VOLUME_LARGEST_COMPONENT True`` (into
    ``<run>/largest_component``; done once); its flattened results, as ``final_results`` gives them."""
    run_dir = os.path.join(args.output, f"{arm}_seed{seed}")
    if final_results(run_dir) is None:
        raise FileNotFoundError(f"{arm} seed {seed} has no final results in {run_dir}: train it first")
    out_dir = os.path.join(run_dir, "largest_component")
    path = os.path.join(out_dir, "eval_results.json")
    if not os.path.isfile(path):
        opts = ["--eval-only", *launch_argv(args, getattr(args, "jobs", 1)), "MODEL.WEIGHTS",
                os.path.join(run_dir, "model_final.pth"), "OUTPUT_DIR", out_dir,
                "TEST.VOLUME_LARGEST_COMPONENT", "True"]
        train(ROOT, os.path.join(run_dir, "config.yaml"), opts, out_dir, args.threads,
              what=f"{arm} seed {seed} (largest component)")
    with open(path) as f:
        res = json.load(f)
    print(f"[rescored] {arm} seed {seed}: Dice {res[f'{TASK}/Dice']:.4f} with the largest component", flush=True)
    return res


def summarize(results: Dict[str, Dict[int, Dict[str, float]]]) -> Dict[str, Dict[str, List[float]]]:
    """``{arm[ (student)| (teacher)]: {metric: [mean, std, n]}}`` over seeds: the reported model, then the other."""
    models = {label: (lambda m, sfx=sfx: f"{TASK}{sfx}/{m}")
              for label, sfx in (("", ""), (" (student)", "_student"), (" (teacher)", "_teacher"))}
    return protocol_summarize(results, METRICS, models)


def markdown(table: Dict[str, Dict[str, List[float]]], seeds: List[int]) -> str:
    """A markdown table: Dice in [0, 1], HD95 in pixels; mean +- std over seeds (population std)."""
    return protocol_markdown(table, METRICS, lambda m: 3 if m.startswith("Dice") else 1,
                             f"seeds: {seeds}; reported model first, the other model in brackets.")


def trajectories(output: str, jobs: List[Tuple[str, int]]) -> str:
    """Markdown lines: each run's reported mean 3D Dice at every evaluation (``TEST.EVAL_PERIOD``), so a table's
    final figure can be checked against where the schedule peaks; empty when no run evaluated before its end."""
    lines = []
    for arm, seed in jobs:
        points = evaluation_trajectory(os.path.join(output, f"{arm}_seed{seed}"), f"{TASK}/Dice")
        if len(points) > 1:
            lines.append(f"- {arm} seed {seed}: " + ", ".join(f"it {it} {v:.3f}" for it, v in points))
    return "\nMean 3D Dice at each evaluation (reported model):\n\n" + "\n".join(lines) + "\n" if lines else ""


def main(argv: Optional[List[str]] = None) -> int:
    """Run (or collect) every arm x seed and write the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", nargs="+", default=[a for a in ARMS if a not in ABLATIONS], choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--single-seed-arms", nargs="*", default=["supervised_all", "scribble_only"],
                   help="arms run with the first seed only (they do not depend on the patient split)")
    add_output_argument(p, "folder of every run (<arm>_seed<S>/: train_net's OUTPUT_DIR with checkpoints, "
                        "metrics.json and the run's log stdout.txt) and the tables results.json and results.md",
                        default=os.path.join(ROOT, "output", "acdc_protocol"))
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--report-only", action="store_true", help="only collect finished runs")
    p.add_argument("--largest-component", action="store_true",
                   help="re-score finished runs, each structure's largest 3D component only "
                        "(<output>/largest_component)")
    add_launch_arguments(p, "every training run")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE overrides for every run")
    args = p.parse_args(argv)
    # seed-major order: every arm of the first seed finishes before the second seed starts
    jobs = [(a, s) for s in args.seeds for a in args.arms if s == args.seeds[0] or a not in args.single_seed_arms]
    print(f"{len(jobs)} runs: " + ", ".join(f"{a}/s{s}" for a, s in jobs), flush=True)
    one = rescore_largest_component if args.largest_component else run_one
    results, failures = run_jobs(jobs, lambda a, s: one(a, s, args), args.jobs)
    table = summarize(results)
    out = os.path.join(args.output, "largest_component") if args.largest_component else args.output
    text = markdown(table, args.seeds) + ("" if args.largest_component else trajectories(args.output, jobs))
    write_results(out, args.seeds, table, results, failures, text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
