#!/usr/bin/env python
"""Write a seeded labeled/unlabeled split file of a registered data set (see mmt_psm/data/splits.py).

    python tools/make_splits.py --dataset isbi2015_train --count 2 --seed 1 \
        --out datasets/splits/isbi2015_train_n2_seed1.json
    python tools/make_splits.py --dataset synthetic_train --percent 25 --seed 3 --out split.json

The data set must be prepared (its image ids are read from its COCO file).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: Optional[List[str]] = None) -> None:
    """Parse arguments, choose the labeled ids and write the split file."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="registered data set name, e.g. isbi2015_train")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--count", type=int, help="number of labeled images")
    size.add_argument("--percent", type=float, help="percentage of labeled images (rounded half up, >= 1)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True, help="split file to write (.json)")
    args = p.parse_args(argv)

    from detectron2.data import DatasetCatalog

    import mmt_psm.data  # noqa: F401  (registers the built-in data sets)
    from mmt_psm.data.splits import make_split, split_names, write_split

    dicts = DatasetCatalog.get(args.dataset)
    split = make_split(args.dataset, [d["image_id"] for d in dicts], args.seed, args.count, args.percent)
    write_split(args.out, split)
    files = {d["image_id"]: os.path.basename(d["file_name"]) for d in dicts}
    print(f"wrote {args.out}: {args.dataset}, seed {args.seed}, "
          f"{len(split['labeled_ids'])} labeled / {len(split['unlabeled_ids'])} unlabeled")
    print("labeled:", ", ".join(f"{i} ({files[i]})" for i in split["labeled_ids"]))
    print("registers as:", ", ".join(split_names(split)))


if __name__ == "__main__":
    main()
