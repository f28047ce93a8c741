#!/usr/bin/env python
"""Label-efficiency protocol on YOUR OWN COCO data, run through the README's own-data command, resumably.

    python tools/own_data_protocol.py \\
        --images-json data/train/instances_train.json --image-root data/train/images \\
        --test-json data/test/instances_test.json --test-root data/test/images \\
        --labeled-count 3 --seeds 1 2 3 --jobs 2 --threads 1 --output output/own_data_protocol [KEY VALUE ...]

Per seed S, ``tools/coco_subset.py``'s :func:`make_subset` draws ``--labeled-count`` images of ``--images-json``
(``random.Random(S)``, the rule of ``tools/make_splits.py``) into ``<output>/data/seed<S>/labeled.json`` and
links the others into the folder ``<output>/data/seed<S>/unlabeled/``. Every arm then runs exactly the README's
"Your own data (no Python)" command, ``tools/train_net.py --config-file <arm config> DATASETS.REGISTER
'("own_labeled_seedS:labeled.json:IMAGE_ROOT", "own_test:TEST_JSON:TEST_ROOT", "own_unlabeled_seedS:FOLDER")'
DATASETS.TRAIN DATASETS.TEST DATASETS.TRAIN_UNLABELED DATASETS.SPLIT_FILE '""' MODEL.ROI_HEADS.NUM_CLASSES n``
(n = the JSON's categories), with ``SEED`` and ``DATALOADER.STREAM_SEED`` = S (every arm of a seed sees the
same labeled tiles in the same order). Arms (``ARMS``), all from the ImageNet MobileNetV2-FPN
(``pretrained/mobilenet_v2_imagenet.pth``; python tools/prepare_pretrained.py writes it):

* ``supervised``: configs/pretrained/supervised_mobilenet_v2.yaml, the labeled images only (no unlabeled keys);
* ``mmt_psm``: configs/pretrained/mmt_psm_mobilenet_v2.yaml, the paper's setting;
* ``mmt_psm_plus``: configs/pretrained/mmt_psm_plus_mobilenet_v2.yaml.

Protocol defaults (``PROTOCOL``, before your trailing ``KEY VALUE`` opts, which win), sized for H&E nuclei
(MoNuSeg: 1000 px tiles at 40x, nuclei 13-36 px, p5-p95 of sqrt(area)) on 2 CPU cores, one run per core:
random 256 px crops at native scale, whole tiles at test (1000 px); anchors 8-128 (``tools/dataset_stats.py``
on the MoNuSeg train JSON: p5 object size 12.6 px); ``TEST.DETECTIONS_PER_IMAGE 1000`` (up to 818 nuclei in a
test tile) with 2000 test proposals; 2 labeled (+ 2 unlabeled) crops per step, 128 sampled RoIs per image
(the R50 configs' 512 makes the mask head, on up to 128 positives a crop, the cost of a CPU step);
the schedule of configs/cpu/protocol.yaml: 200 iterations, LR 0.01 (10-iteration warm-up, x0.1 at 170),
supervised burn-in 50, EMA from 40 with decay 0.95, ramps of 25; a checkpoint every 50 iterations.

Cost on MoNuSeg (3 labeled + 10 unlabeled tiles, 14 test tiles; 1 thread, one run per core of 2): a supervised
step ~2.2 s, a teacher-student step ~8.6 s (mmt_psm) / ~7.6 s (mmt_psm_plus: no feature loss), the teacher's
~250 pseudo-labels per 256 crop at the paper's score 0.05 being most of it; testing 13-20 s per tile and model
(3-4 s of it the cell metrics; teacher and student are both tested). 15-25 min per supervised run, 27-48 min per
teacher-student run: the 9 runs of 3 seeds take ~2.5 h with ``--jobs 2``. Checkpoints: ~1 GB per
teacher-student run, 0.7 GB supervised.

A finished run (its metrics.json holds the evaluation at the LAST iteration) is not redone; an interrupted one
resumes from its last checkpoint. Writes <output>/results.json and <output>/results.md: segm AP, cell AJI and F1
(``cell/AJI`` = mean per-image AJI) mean +- std over seeds, of the teacher and the student of the
teacher-student arms, and per-seed paired differences to ``supervised`` (same seed = same labeled images).
``--dry-run`` prints every command and writes nothing. Trailing ``KEY VALUE`` overrides and Detectron2's launch
flags (``--num-gpus`` ...) go to every training run; progress lines give runs done / total, the time elapsed and
an estimate of the time left, and each run's log (``<output>/<arm>_seed<S>/stdout.txt``) as it starts.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

import mmt_psm.core.protocol as protocol
from mmt_psm.core.cli import add_launch_arguments, add_output_argument, launch_argv
from mmt_psm.core.protocol import final_metrics, run_arm, run_jobs, write_results
from mmt_psm.core.protocol import markdown as protocol_markdown
from mmt_psm.core.protocol import summarize as protocol_summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("coco_subset", os.path.join(ROOT, "tools", "coco_subset.py"))
coco_subset = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coco_subset)  # tools/ is no package: load tools/coco_subset.py by path

ARMS = {
    "supervised": "configs/pretrained/supervised_mobilenet_v2.yaml",
    "mmt_psm": "configs/pretrained/mmt_psm_mobilenet_v2.yaml",
    "mmt_psm_plus": "configs/pretrained/mmt_psm_plus_mobilenet_v2.yaml",
}
SUPERVISED = ("supervised",)  # arms without an unlabeled stream (one model: no teacher / student rows)
WEIGHTS = "pretrained/mobilenet_v2_imagenet.pth"
PROTOCOL: Dict[str, str] = {
    "INPUT.CROP.ENABLED": "True", "INPUT.CROP.TYPE": "absolute", "INPUT.CROP.SIZE": "[256, 256]",
    "INPUT.MIN_SIZE_TRAIN": "(256,)", "INPUT.MAX_SIZE_TRAIN": "1000",
    "INPUT.MIN_SIZE_TEST": "1000", "INPUT.MAX_SIZE_TEST": "1000",
    "MODEL.ANCHOR_GENERATOR.SIZES": "[[8], [16], [32], [64], [128]]",
    "TEST.DETECTIONS_PER_IMAGE": "1000",
    "MODEL.RPN.PRE_NMS_TOPK_TEST": "2000", "MODEL.RPN.POST_NMS_TOPK_TEST": "2000",
    "SOLVER.IMS_PER_BATCH": "2", "SEMI.IMS_PER_BATCH_LABELED": "2",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "128", "MODEL.MMT_PSM.PROPOSAL_BATCH_SIZE": "128",
    # the schedule of configs/cpu/protocol.yaml
    "SOLVER.BASE_LR": "0.01", "SOLVER.WARMUP_ITERS": "10", "SOLVER.MAX_ITER": "200", "SOLVER.STEPS": "(170,)",
    "SOLVER.CHECKPOINT_PERIOD": "50",
    "SEMI.BURN_IN_ITERS": "50", "SEMI.EMA_START_ITER": "40", "SEMI.EMA_DECAY": "0.95",
    "SEMI.RAMP_UP_ITERS": "25", "SEMI.RAMP_DOWN_ITERS": "25", "SEMI.VIS_PERIOD": "0",
    "DATALOADER.NUM_WORKERS": "0",
}
METRICS = ["segm/AP", "cell/AJI", "cell/F1"]


def data_paths(out: str, seed: int) -> Dict[str, str]:
    """Where seed ``seed``'s labeled JSON and unlabeled folder go."""
    d = os.path.join(os.path.abspath(out), "data", f"seed{seed}")
    return {"labeled_json": os.path.join(d, "labeled.json"), "unlabeled_dir": os.path.join(d, "unlabeled")}


def prepare_seed(args: argparse.Namespace, seed: int) -> Dict:
    """Write seed ``seed``'s labeled JSON and unlabeled folder (idempotent); returns make_subset's summary."""
    paths = data_paths(args.output, seed)
    return coco_subset.make_subset(args.images_json, args.image_root, paths["labeled_json"],
                                   count=args.labeled_count, seed=seed, unlabeled_dir=paths["unlabeled_dir"])


def dataset_overrides(arm: str, seed: int, args: argparse.Namespace, num_classes: int) -> Dict[str, str]:
    """The README command's data keys for ``arm`` / ``seed`` (absolute paths; the supervised arm registers and
    trains on no unlabeled folder)."""
    paths = data_paths(args.output, seed)
    labeled, test, unlabeled = f"own_labeled_seed{seed}", "own_test", f"own_unlabeled_seed{seed}"
    entries = [f"{labeled}:{paths['labeled_json']}:{os.path.abspath(args.image_root)}",
               f"{test}:{os.path.abspath(args.test_json)}:{os.path.abspath(args.test_root)}"]
    out = {"DATASETS.TRAIN": _tuple([labeled]), "DATASETS.TEST": _tuple([test])}
    if arm not in SUPERVISED:
        entries.append(f"{unlabeled}:{paths['unlabeled_dir']}")
        out["DATASETS.TRAIN_UNLABELED"] = _tuple([unlabeled])
    return {"DATASETS.REGISTER": _tuple(entries), **out, "DATASETS.SPLIT_FILE": '""',
            "MODEL.ROI_HEADS.NUM_CLASSES": str(num_classes)}


def _tuple(items: Sequence[str]) -> str:
    """A tuple literal in the README's spelling, ``("a", "b")`` / ``("a",)`` (JSON strings are Python ones)."""
    return "(" + ", ".join(json.dumps(x) for x in items) + ("," if len(items) == 1 else "") + ")"


def overrides(arm: str, seed: int, args: argparse.Namespace, num_classes: int) -> Dict[str, str]:
    """The data keys (the README command's), then the protocol defaults; braces escaped (run_arm formats
    ``{s}`` in every value)."""
    merged = {**dataset_overrides(arm, seed, args, num_classes), **PROTOCOL}
    return {k: v.replace("{", "{{").replace("}", "}}") for k, v in merged.items()}


def command(arm: str, seed: int, args: argparse.Namespace, num_classes: int) -> List[str]:
    """The full command line run_arm runs for ``arm`` / ``seed`` (for --dry-run and the log)."""
    opts = [*launch_argv(args, args.jobs), "OUTPUT_DIR", run_dir(args, arm, seed), "SEED", str(seed),
            "DATALOADER.STREAM_SEED", str(seed)]
    for k, v in {**dataset_overrides(arm, seed, args, num_classes), **PROTOCOL}.items():
        opts += [k, v]
    return [*protocol.TRAIN_COMMAND, "--config-file", os.path.join(ROOT, ARMS[arm]), "--resume", *opts, *args.opts]


def run_dir(args: argparse.Namespace, arm: str, seed: int) -> str:
    """``<output>/<arm>_seed<seed>``."""
    return os.path.join(os.path.abspath(args.output), f"{arm}_seed{seed}")


def final_results(run_dir: str) -> Optional[Dict[str, float]]:
    """segm / cell metrics (teacher and ``*_student``) of the evaluation at the run's LAST iteration; None while
    the run has not finished."""
    return final_metrics(run_dir, lambda rec: any(k.startswith(("segm", "cell")) for k in rec))


def _describe(res: Mapping[str, float]) -> str:
    return ", ".join(f"{m} {res.get(m, float('nan')):.1f}" for m in METRICS)


def _student(metric: str) -> str:
    return metric.replace("/", "_student/", 1)


def summarize(results: Mapping[str, Mapping[int, Mapping[str, float]]]) -> Dict[str, Dict[str, List[float]]]:
    """``{row: {metric: [mean, std, n]}}``: ``supervised``, then ``<arm> (teacher)`` / ``<arm> (student)``."""
    table: Dict[str, Dict[str, List[float]]] = {}
    for arm, by_seed in results.items():
        models = {"": lambda m: m} if arm in SUPERVISED else {" (teacher)": lambda m: m, " (student)": _student}
        table.update(protocol_summarize({arm: by_seed}, METRICS, models))
    return table


def paired(results: Mapping[str, Mapping[int, Mapping[str, float]]],
           baseline: str = "supervised") -> Dict[str, Dict[str, Dict]]:
    """Per-seed differences to ``baseline`` on the seeds both finished: ``{row: {metric: {"mean", "std",
    "per_seed": {seed: diff}}}}`` for every teacher / student of the other arms."""
    base = results.get(baseline, {})
    out: Dict[str, Dict[str, Dict]] = {}
    for arm, by_seed in results.items():
        if arm in SUPERVISED:
            continue
        for label, key in ((" (teacher)", lambda m: m), (" (student)", _student)):
            seeds = [s for s in by_seed if s in base and key(METRICS[0]) in by_seed[s]]
            if not seeds:
                continue
            row = {}
            for m in METRICS:
                diffs = {s: by_seed[s].get(key(m), np.nan) - base[s].get(m, np.nan) for s in seeds}
                vals = np.array(list(diffs.values()), dtype=float)
                row[m] = {"mean": float(vals.mean()), "std": float(vals.std()),
                          "per_seed": {int(s): float(v) for s, v in diffs.items()}}
            out[f"{arm}{label} - {baseline}"] = row
    return out


def markdown(table: Mapping, diffs: Mapping, seeds: Sequence[int]) -> str:
    """The mean +- std table, then the paired differences (mean +- std and each seed's value)."""
    text = protocol_markdown(table, METRICS, lambda m: 1,
                             f"seeds: {list(seeds)}; all values in %; mean +- std over seeds (population std).")
    if not diffs:
        return text
    head = "| difference | n | " + " | ".join(METRICS) + " |\n|---|---|" + "---|" * len(METRICS) + "\n"
    rows = []
    for name, row in diffs.items():
        cells = [f"{row[m]['mean']:+.1f} +- {row[m]['std']:.1f} ("
                 + ", ".join(f"s{s} {v:+.1f}" for s, v in row[m]["per_seed"].items()) + ")" for m in METRICS]
        rows.append(f"| {name} | {len(row[METRICS[0]]['per_seed'])} | " + " | ".join(cells) + " |")
    return (text + "\nPaired differences (same seed: same labeled images and labeled stream):\n\n" + head
            + "\n".join(rows) + "\n")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line; a parser error for missing inputs or paths holding ':'."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images-json", required=True, help="COCO file of the training pool (labeled + unlabeled)")
    p.add_argument("--image-root", required=True, help="folder its file_names are relative to")
    p.add_argument("--test-json", required=True, help="COCO file of the test set")
    p.add_argument("--test-root", required=True, help="folder the test file_names are relative to")
    p.add_argument("--labeled-count", type=int, default=3, help="labeled images per seed (default 3)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    add_output_argument(p, "folder of every run (<arm>_seed<S>/: train_net's OUTPUT_DIR with checkpoints, "
                        "metrics.json and the run's log stdout.txt), of each seed's data (data/seed<S>/labeled.json "
                        "and unlabeled/) and the tables results.json and results.md",
                        default=os.path.join(ROOT, "output", "own_data_protocol"))
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--report-only", action="store_true", help="only collect finished runs")
    p.add_argument("--dry-run", action="store_true", help="print every command, write nothing")
    add_launch_arguments(p, "every training run")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE overrides for every run (last)")
    args = p.parse_args(argv)
    paths = (args.images_json, args.image_root, args.test_json, args.test_root, args.output)
    bad = [x for x in paths if ":" in os.path.abspath(x)]
    if bad:
        p.error(f"DATASETS.REGISTER paths may not contain ':': {', '.join(bad)}")
    if not args.report_only:
        for x in (args.images_json, args.test_json):
            if not os.path.isfile(x):
                p.error(f"COCO file {x} does not exist")
        if not args.dry_run and "MODEL.WEIGHTS" not in args.opts[::2] and not os.path.isfile(
                os.path.join(ROOT, WEIGHTS)):
            p.error(f"{WEIGHTS} is missing: python tools/prepare_pretrained.py (make setup runs it)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build every seed's subset, run (or collect) every arm x seed, write the tables."""
    args = parse_args(argv)
    num_classes = len(coco_subset.load_coco(args.images_json).get("categories", [])) if not args.report_only else 0
    jobs = [(a, s) for s in args.seeds for a in args.arms]  # seed-major: a whole seed before the next
    if args.dry_run:
        for a, s in jobs:
            print(shlex.join(command(a, s, args, num_classes)))
        return 0
    if not args.report_only:
        for s in args.seeds:
            try:
                res = prepare_seed(args, s)
            except coco_subset.SubsetError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            print(f"seed {s}: labeled {', '.join(res['labeled'])}; {len(res['unlabeled'])} unlabeled", flush=True)
    print(f"{len(jobs)} runs: " + ", ".join(f"{a}/s{s}" for a, s in jobs), flush=True)

    def one(arm: str, seed: int) -> Dict[str, float]:
        return run_arm(ROOT, arm, seed, run_dir(args, arm, seed), os.path.join(ROOT, ARMS[arm]),
                       overrides(arm, seed, args, num_classes), args, final_results, _describe)

    results, failures = run_jobs(jobs, one, args.jobs)
    table, diffs = summarize(results), paired(results)
    write_results(args.output, args.seeds, table, results, failures, markdown(table, diffs, args.seeds),
                  extra={"paired": diffs, "protocol": PROTOCOL})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
