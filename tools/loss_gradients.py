#!/usr/bin/env python
"""Per-loss gradient norms of a teacher-student checkpoint on its own training batches, and their cosine with the
supervised gradient: which unsupervised loss pulls the student's backbone / heads, how hard, and which way.

    python tools/loss_gradients.py --config-file output/isbi_protocol/mmt_psm_seed1/config.yaml \\
        --weights output/isbi_protocol/mmt_psm_seed1/model_0000149.pth --batches 4

Batches come from the config's own training loader (labeled split, unlabeled stream, mappers), the model from
``--weights`` (student and teacher); the unsupervised weight is that of ``--iteration`` (default: the end of
the ramp-up, full weight). Nothing is trained. Prints a table (median norm over batches, mean cosine) and, with
``--json``, writes every batch's numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.events import EventStorage

from mmt_psm.config import load_config
from mmt_psm.core import Trainer
from mmt_psm.core.atomic import write_json
from mmt_psm.core.cli import add_config_argument
from mmt_psm.instance.loss_gradients import loss_gradient_stats, parameter_groups


def measure(args: argparse.Namespace) -> Dict:
    """Every batch's ``loss_gradient_stats`` plus the median / mean summary."""
    if not os.path.isfile(args.weights):
        raise FileNotFoundError(f"--weights {args.weights} does not exist")
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu" if not torch.cuda.is_available() else cfg.MODEL.DEVICE
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(args.weights)
    model.train()
    groups = parameter_groups(model)
    it = args.iteration if args.iteration >= 0 else cfg.SEMI.BURN_IN_ITERS + cfg.SEMI.RAMP_UP_ITERS
    loader = iter(Trainer.build_train_loader(cfg))
    per_batch: List[Dict] = []
    with EventStorage(start_iter=it):
        weight = float(model.loss_weight(it))
        for b in range(args.batches):
            losses = model(next(loader))
            stats = loss_gradient_stats(losses, groups)
            per_batch.append({"losses": {k: float(v.detach()) for k, v in losses.items()}, "grads": stats})
            print(f"[batch {b + 1}/{args.batches}] " + ", ".join(
                f"{k} |g_backbone| {v['backbone']['norm']:.3g}" for k, v in stats.items()
                if k in ("supervised", "unsupervised")), file=sys.stderr, flush=True)
    summary: Dict[str, Dict[str, Dict[str, float]]] = {}
    for term, by_group in per_batch[0]["grads"].items():
        for group, first in by_group.items():
            vals = [pb["grads"][term][group] for pb in per_batch if term in pb["grads"]]
            row = {"norm_median": statistics.median(v["norm"] for v in vals)}
            for key in (k for k in first if k.startswith("cos_")):
                finite = [v[key] for v in vals if v[key] == v[key]]
                row[f"{key}_mean"] = statistics.fmean(finite) if finite else float("nan")
            summary.setdefault(term, {})[group] = row
    return {"config": args.config_file, "weights": args.weights, "iteration": it, "unsup_weight": weight,
            "batches": args.batches, "summary": summary, "per_batch": per_batch}


def table(r: Dict, groups=("backbone", "roi_heads", "adaptors")) -> str:
    """Markdown: one row per loss term; per group the median gradient norm and the mean cosines with the summed
    supervised gradient and with the mask loss's."""
    first = next(iter(r["summary"].values()))
    groups = [g for g in groups if g in first]
    cos_names = {"cos_supervised_mean": "cos sup", "cos_loss_mask_mean": "cos mask"}
    cols = [(g, "norm_median", f"|g| {g}") for g in groups]
    cols += [(g, k, f"{name} {g}") for g in groups for k, name in cos_names.items() if k in first[g]]
    head = "| term | " + " | ".join(c[2] for c in cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    rows = []
    for term, by_group in r["summary"].items():
        cells = [f"{by_group[g][k]:.3g}" if k == "norm_median" else f"{by_group[g][k]:+.2f}" for g, k, _ in cols]
        rows.append(f"| {term} | " + " | ".join(cells) + " |")
    return (head + "\n".join(rows) + f"\n\niteration {r['iteration']} (unsupervised weight {r['unsup_weight']:g}), "
            f"{r['batches']} batches; |g| = median L2 norm of the term's gradient on the group, cos = mean cosine "
            "with the summed supervised gradient (sup) and with loss_mask's (mask).\n")


def main(argv: Optional[List[str]] = None) -> Dict:
    """Command line entry point; returns the results dict."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_argument(p, "a teacher-student run's config (e.g. its config.yaml)", required=True)
    p.add_argument("--weights", required=True, help="checkpoint of that run (student and teacher)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--iteration", type=int, default=-1, help="sets the unsupervised weight (-1: end of ramp-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default="", help="also write every batch's numbers to this JSON file")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = p.parse_args(argv)
    if args.batches < 1:
        p.error("--batches must be >= 1")
    r = measure(args)
    print(table(r))
    if args.json:
        write_json(args.json, r)
    return r


if __name__ == "__main__":
    main()
