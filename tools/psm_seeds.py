#!/usr/bin/env python
"""Summarize finished PSM pipeline runs (one per seed): per-run figures and mean +- std over the runs, for one or
more prediction folders of each run (e.g. ``predictions`` and ``predictions_tta``), plus the paired difference of
every folder against the first.

    python tools/psm_seeds.py output/psm_h_seed1 output/psm_h_seed2 ... --predictions predictions predictions_tta

Reads ``<run>/<predictions>/metrics.json`` as ``tools/psm_stage.py predict`` / ``tools/psm_pipeline.py`` write it
(``full_image`` and ``paper_protocol`` blocks). Population std, as the protocol tools report.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from mmt_psm.core.cli import add_output_argument
from mmt_psm.core.protocol import markdown, summarize

METRICS = ["AJI", "AJI_pooled", "F1", "Dice", "IoU", "AP50", "paper AJI", "paper F1", "paper Dice"]


def load_metrics(run: str, predictions: str) -> Dict[str, float]:
    """``{metric: value}`` of one run's prediction folder, keys as in ``METRICS``."""
    path = os.path.join(run, predictions, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: run tools/psm_stage.py predict --output "
                                f"{os.path.join(run, predictions)} first")
    with open(path) as f:
        res = json.load(f)
    if "full_image" not in res:
        raise ValueError(f"{path} has no 'full_image' block (was it written by tools/psm_stage.py predict --gt?)")
    out = {m: float(res["full_image"][m]) for m in METRICS if m in res["full_image"]}
    for m, v in res.get("paper_protocol", {}).items():
        if f"paper {m}" in METRICS:
            out[f"paper {m}"] = float(v)
    return out


def report(runs: Sequence[str], predictions: Sequence[str]) -> str:
    """The markdown: per-run AJI, the mean +- std table, and paired differences against ``predictions[0]``."""
    results = {p: {i: load_metrics(r, p) for i, r in enumerate(runs)} for p in predictions}
    table = summarize(results, METRICS, {"": lambda m: m})
    text = markdown(table, METRICS, lambda m: 1 if m.startswith("AP") else 3,
                    f"runs: {', '.join(os.path.basename(os.path.normpath(r)) for r in runs)}; mean +- std over runs "
                    "(population std); AP50 in %; 'paper' = 512 centre crop, connected-component GT.")
    lines = ["| run | " + " | ".join(f"AJI {p}" for p in predictions) + " |", "|---|" + "---|" * len(predictions)]
    for i, r in enumerate(runs):
        lines.append(f"| {os.path.basename(os.path.normpath(r))} | "
                     + " | ".join(f"{results[p][i]['AJI']:.4f}" for p in predictions) + " |")
    text += "\n" + "\n".join(lines) + "\n"
    base = predictions[0]
    for p in predictions[1:]:
        d = np.array([results[p][i]["AJI"] - results[base][i]["AJI"] for i in range(len(runs))])
        text += (f"\nAJI {p} - {base}, paired: {d.mean():+.4f} +- {d.std():.4f} "
                 f"(higher on {(d > 0).sum()} of {len(d)} runs)\n")
    return text


def main(argv: Optional[List[str]] = None) -> int:
    """Print (and with ``--output`` write) the summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="PSM pipeline output folders, one per seed")
    p.add_argument("--predictions", nargs="+", default=["predictions"], help="prediction sub-folders to compare")
    add_output_argument(p, "also write the summary (markdown) to this file", metavar="FILE")
    args = p.parse_args(argv)
    text = report(args.runs, args.predictions)
    print(text)
    if args.output:
        from mmt_psm.core.atomic import write_text

        write_text(args.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
