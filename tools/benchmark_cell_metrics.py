#!/usr/bin/env python
"""Cost of scoring one dense tile with the cell metrics: four separate calls vs the evaluator's one pass.

    python tools/benchmark_cell_metrics.py [--size 1000 --gt 700 --pred 900 --repeats 3]

Builds a synthetic H&E-like tile (``--gt`` disc nuclei of radius 6-15 px on a ``--size`` square; predictions are
the GT discs shifted by up to 3 px, a tenth of them dropped, plus random extra discs up to ``--pred``), then
times :func:`aji_counts` + :func:`object_f1` + :func:`dice` + :func:`pixel_iou` (the evaluator's former path)
against :func:`class_counts` (its path now), checks that both give the same numbers, and prints the best time of
``--repeats`` for each and their ratio. Absolute times depend on the machine; the ratio is the result.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Optional, Sequence

import numpy as np

from mmt_psm.core.object_metrics import aji_counts, class_counts, dice, object_f1, pixel_iou


def discs(centres: np.ndarray, radii: np.ndarray, size: int) -> np.ndarray:
    """(N, size, size) bool stack of filled discs."""
    out = np.zeros((len(centres), size, size), dtype=bool)
    for k, ((cy, cx), r) in enumerate(zip(centres, radii)):
        y0, y1 = int(max(cy - r, 0)), int(min(cy + r + 1, size))
        x0, x1 = int(max(cx - r, 0)), int(min(cx + r + 1, size))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        out[k, y0:y1, x0:x1] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return out


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1000, help="tile side in pixels (MoNuSeg: 1000)")
    p.add_argument("--gt", type=int, default=700, help="GT nuclei per tile (MoNuSeg test: up to 818)")
    p.add_argument("--pred", type=int, default=900, help="predicted nuclei per tile (<= 1000 detections)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    centres = rng.uniform(0, args.size, (args.gt, 2))
    radii = rng.uniform(6, 15, args.gt)
    kept = rng.random(args.gt) > 0.1
    extra = max(args.pred - int(kept.sum()), 0)
    pred_centres = np.concatenate([centres[kept] + rng.uniform(-3, 3, (int(kept.sum()), 2)),
                                   rng.uniform(0, args.size, (extra, 2))])
    pred_radii = np.concatenate([radii[kept], rng.uniform(6, 15, extra)])
    gt, pred = discs(centres, radii, args.size), discs(pred_centres, pred_radii, args.size)

    def four_calls() -> tuple:
        f1 = object_f1(gt, pred)
        return (*aji_counts(gt, pred), f1.tp, f1.fp, f1.fn, dice(gt, pred), pixel_iou(gt, pred))

    separate, joint = four_calls(), tuple(class_counts(gt, pred))
    if separate != joint:
        raise SystemExit(f"class_counts {joint} differs from the four calls {separate}")
    t_sep = best_time(four_calls, args.repeats)
    t_joint = best_time(lambda: class_counts(gt, pred), args.repeats)
    print(f"tile {args.size}x{args.size}, {len(gt)} GT / {len(pred)} predicted masks; identical results {joint}")
    print(f"four calls {t_sep:.2f} s, class_counts {t_joint:.2f} s (best of {args.repeats}): "
          f"{t_sep / t_joint:.2f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
