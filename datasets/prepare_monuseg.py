#!/usr/bin/env python
"""MoNuSeg 2018 (official XML polygons) -> uint16 instance maps + COCO JSON under ``--output``.

    python datasets/prepare_monuseg.py --source PATH/TO/monuseg --output datasets/nuclei/monuseg

``--source`` (required) holds ``train/`` and ``test/``, each with ``images/<id>.png`` and
``annotations_xml/<id>.xml`` (or ``.xml.gz``), the official polygons (datasets/README.md: where to get them and
how to lay them out). ``--output`` defaults to ``$DETECTRON2_DATASETS/nuclei/monuseg``, where importing
``mmt_psm`` registers ``monuseg_train`` (images only: PSM never sees their labels),
``monuseg_train_labels_for_eval`` and ``monuseg_test`` (instance labels).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List, Optional

from mmt_psm.core.cli import add_output_argument
from mmt_psm.nuclei.monuseg import convert_monuseg


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="folder with train/ and test/, each images/ + annotations_xml/ (required)")
    add_output_argument(p, "folder for <split>/images/<id>.png, <split>/labels/<id>.png (uint16 instance maps) "
                        "and <split>/instances_<split>.json (COCO)",
                        default=os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "nuclei", "monuseg"))
    args = p.parse_args(argv)
    if not args.source:
        p.error("--source is required: the folder holding train/ and test/, each with images/<id>.png and "
                "annotations_xml/<id>.xml (datasets/README.md, 'MoNuSeg', says where to get them)")
    print(json.dumps(convert_monuseg(args.source, args.output), indent=1))


if __name__ == "__main__":
    main()
