#!/usr/bin/env python
"""Write the embedded synthetic overlapping-cell data set (no download needed).

    python datasets/prepare_synthetic.py [--output DIR] [--num-train 8 --num-test 8 --num-unlabeled 32]
                                         [--size 256 --seed 0] [--force]

DIR defaults to ``$DETECTRON2_DATASETS/synthetic`` (or ``./datasets/synthetic`` when that variable is unset).
Idempotent: the parameters are stored in ``DIR/synthetic_stamp.json`` and a second run with the same
parameters does nothing. See ``mmt_psm/instance/synthetic.py`` for the layout and what the images imitate.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Any, Dict, List, Optional

from mmt_psm.core.cli import add_output_argument
from mmt_psm.instance.synthetic import write_synthetic_dataset

STAMP_NAME = "synthetic_stamp.json"
# Bump when the generator changes in a way that changes its output, so stale data sets are rewritten.
GENERATOR_VERSION = 2  # 2: + unlabeled_gt.json (held-back labels of the unlabeled images)


def default_out_dir() -> str:
    """``$DETECTRON2_DATASETS/synthetic``, or ``./datasets/synthetic`` (Detectron2's own default root)."""
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "synthetic")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    add_output_argument(parser, "folder for {train,test,unlabeled,unlabeled_gt}.json, images/ and "
                        "synthetic_stamp.json", default=default_out_dir())
    parser.add_argument("--num-train", type=int, default=8, help="labeled training images")
    parser.add_argument("--num-test", type=int, default=8, help="labeled test images")
    parser.add_argument("--num-unlabeled", type=int, default=32, help="unlabeled images (no annotations)")
    parser.add_argument("--size", type=int, default=256, help="image height and width in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator")
    parser.add_argument("--force", action="store_true", help="rewrite even if the stamp matches")
    return parser.parse_args(argv)


def _is_up_to_date(out_dir: str, params: Dict[str, Any]) -> bool:
    """True when ``out_dir`` holds a complete data set written with exactly ``params``."""
    stamp = os.path.join(out_dir, STAMP_NAME)
    if not os.path.isfile(stamp):
        return False
    try:
        with open(stamp) as f:
            if json.load(f) != params:
                return False
    except (OSError, ValueError):
        return False
    splits = ("train", "test", "unlabeled", "unlabeled_gt")
    return all(os.path.isfile(os.path.join(out_dir, f"{s}.json")) for s in splits)


def prepare_synthetic(
    out_dir: str,
    num_train: int = 8,
    num_test: int = 8,
    num_unlabeled: int = 32,
    size: int = 256,
    seed: int = 0,
    force: bool = False,
) -> bool:
    """Write the data set unless it is already there with the same parameters; True if it was written."""
    params = {
        "generator_version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_test": num_test,
        "num_unlabeled": num_unlabeled,
        "size": size,
        "seed": seed,
    }
    if not force and _is_up_to_date(out_dir, params):
        return False
    os.makedirs(out_dir, exist_ok=True)
    stamp = os.path.join(out_dir, STAMP_NAME)
    if os.path.exists(stamp):
        os.unlink(stamp)  # an interrupted rewrite must not look complete
    for split in ("train", "test", "unlabeled"):  # images of an earlier, larger run would linger unreferenced
        for old in glob.glob(os.path.join(out_dir, "images", f"{split}_*.png")):
            os.unlink(old)
    write_synthetic_dataset(out_dir, num_train, num_test, num_unlabeled, size=size, seed=seed)
    with open(stamp, "w") as f:
        json.dump(params, f, indent=1)
    return True


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    written = prepare_synthetic(
        args.output, args.num_train, args.num_test, args.num_unlabeled, args.size, args.seed, args.force
    )
    state = "wrote" if written else "up to date, skipped"
    print(
        f"synthetic cells ({state}): {args.output} "
        f"[train {args.num_train}, test {args.num_test}, unlabeled {args.num_unlabeled}, {args.size}px]"
    )


if __name__ == "__main__":
    main()
