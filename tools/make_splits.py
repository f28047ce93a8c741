#!/usr/bin/env python
r"""Write a seeded labeled/unlabeled split file of a registered data set (see mmt_psm/core/splits.py).

    python tools/make_splits.py --dataset isbi2015_train --count 2 --seed 1 \
        --output datasets/splits/isbi2015_train_n2_seed1.json
    python tools/make_splits.py --dataset synthetic_train --percent 25 --seed 3 --output split.json
    python tools/make_splits.py --register "cells:my_cells/train.json:my_cells/images" --dataset cells \
        --count 10 --seed 1 --output my_cells/split_n10_seed1.json   # your own data (DATASETS.REGISTER entry)

The data set must be prepared (its image ids are read from its COCO file).

Patient mode (ACDC and other volume data sets: whole patients are labeled, weak or test, never split):

    python tools/make_splits.py --patients datasets/cardiac/acdc --count 7 --seed 4 \
        --output datasets/cardiac/acdc/splits/p7_seed4.json   # registered as acdc_p7_seed4_* by
                                                               # mmt_psm.semantic.acdc_datasets.register_acdc_split(out)
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

from mmt_psm.core.cli import add_output_argument


def main(argv: Optional[List[str]] = None) -> None:
    """Parse arguments, choose the labeled ids and write the split file."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", help="registered data set name, e.g. isbi2015_train")
    p.add_argument("--patients", metavar="PREPARED_DIR",
                   help="patient split of a prepared ACDC folder (its index.json) instead of an image split")
    p.add_argument("--test-patients", nargs="*", default=None,
                   help="patient mode: test patients (default: 004/024/044/064/084 where present)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--count", type=int, help="number of labeled images")
    size.add_argument("--percent", type=float, help="percentage of labeled images (rounded half up, >= 1)")
    p.add_argument("--seed", type=int, required=True)
    add_output_argument(p, "split file to write (.json: labeled and unlabeled image ids, or in patient mode the "
                        "labeled / weak / test patients)", required=True, metavar="FILE")
    p.add_argument("--register", action="append", default=[],
                   help="a DATASETS.REGISTER entry to register first, e.g. name:train.json:image_root (repeatable)")
    args = p.parse_args(argv)
    if args.patients:
        return patient_split(args)
    if not args.dataset:
        p.error("--dataset is required (or --patients for a patient split)")

    from detectron2.data import DatasetCatalog

    import mmt_psm  # noqa: F401  (registers the built-in data sets)
    from mmt_psm.core.splits import make_split, split_names, write_split
    from mmt_psm.instance.user_datasets import register_user_dataset

    for entry in args.register:
        register_user_dataset(entry)
    dicts = DatasetCatalog.get(args.dataset)
    split = make_split(args.dataset, [d["image_id"] for d in dicts], args.seed, args.count, args.percent)
    write_split(args.output, split)
    files = {d["image_id"]: os.path.basename(d["file_name"]) for d in dicts}
    print(f"wrote {args.output}: {args.dataset}, seed {args.seed}, "
          f"{len(split['labeled_ids'])} labeled / {len(split['unlabeled_ids'])} unlabeled")
    print("labeled:", ", ".join(f"{i} ({files[i]})" for i in split["labeled_ids"]))
    print("registers as:", ", ".join(split_names(split)))


def patient_split(args: argparse.Namespace) -> None:
    """Write a seeded patient split of the prepared folder ``args.patients``."""
    import json

    from mmt_psm.core.atomic import write_json
    from mmt_psm.semantic.acdc import make_patient_split

    index_file = os.path.join(args.patients, "index.json")
    if not os.path.isfile(index_file):
        raise SystemExit(f"{index_file} not found: prepare the data with datasets/prepare_acdc.py first")
    with open(index_file) as f:
        patients = sorted({s["patient"] for s in json.load(f)["slices"]})
    if args.count is None:
        raise SystemExit("patient mode needs --count (number of fully labeled patients)")
    split = make_patient_split(patients, args.count, args.seed, args.test_patients)
    write_json(args.output, split)
    print(f"wrote {args.output}: {len(split['labeled_patients'])} labeled / {len(split['weak_patients'])} weak / "
          f"{len(split['test_patients'])} test patients; labeled: {', '.join(split['labeled_patients'])}")


if __name__ == "__main__":
    main()
