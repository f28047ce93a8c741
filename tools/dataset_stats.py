#!/usr/bin/env python
"""Pixel mean/std, image sizes and object-size percentiles of a data set, with config lines to copy.

    python tools/dataset_stats.py --register "cells:data/train.json:data/images"
    python tools/dataset_stats.py --register "cells:data/train.json" --min-size-train 512 --json stats.json
    python tools/dataset_stats.py --dataset isbi2015_train

``--register`` takes the entries of ``DATASETS.REGISTER`` ("name:instances.json[:image_root]",
"name:folder-or-glob"); ``--dataset`` names already registered data sets (the built-in ones). Statistics of
several data sets are pooled. ``--min-size-train`` (your INPUT.MIN_SIZE_TRAIN) scales object sizes for the
anchor suggestion; ``--format`` is your INPUT.FORMAT.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import mmt_psm  # noqa: F401  (registers the built-in data sets)
from mmt_psm.instance.stats import dataset_stats, format_stats
from mmt_psm.instance.user_datasets import register_user_dataset


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--register", action="append", default=[], help="a DATASETS.REGISTER entry (repeatable)")
    p.add_argument("--dataset", action="append", default=[], help="a registered data set name (repeatable)")
    p.add_argument("--format", default="BGR", choices=["BGR", "RGB"], help="INPUT.FORMAT (channel order)")
    p.add_argument("--max-images", type=int, default=None, help="images read for pixel statistics (default all)")
    p.add_argument("--min-size-train", type=int, default=None, help="INPUT.MIN_SIZE_TRAIN, for anchor sizes")
    p.add_argument("--bad-images", default="error", choices=["error", "skip"], help="DATASETS.BAD_IMAGES")
    p.add_argument("--json", default=None, help="also write the statistics to this JSON file")
    args = p.parse_args(argv)
    names = [register_user_dataset(e, args.bad_images) for e in args.register] + list(args.dataset)
    if not names:
        p.error("give --register and/or --dataset")
    stats = dataset_stats(names, args.format, args.max_images, args.min_size_train)
    print(format_stats(stats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(stats, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
