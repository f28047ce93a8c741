#!/usr/bin/env python
"""MoNuSeg 2018 (official XML polygons) -> uint16 instance maps + COCO JSON under ``--out``.

    python datasets/prepare_monuseg.py --source ../shared/data/nuclei/monuseg --out datasets/nuclei/monuseg

``--out`` defaults to ``$DETECTRON2_DATASETS/nuclei/monuseg``, where importing ``mmt_psm`` registers
``monuseg_train`` (images only: PSM never sees their labels) and ``monuseg_test`` (instance labels).
"""
from __future__ import annotations

import argparse
import json
import os

from mmt_psm.nuclei.monuseg import convert_monuseg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=os.path.join("..", "shared", "data", "nuclei", "monuseg"))
    p.add_argument("--out", default=os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "nuclei",
                                                 "monuseg"))
    args = p.parse_args()
    print(json.dumps(convert_monuseg(args.source, args.out), indent=1))


if __name__ == "__main__":
    main()
