#!/usr/bin/env python
"""Convert ACDC slice HDF5 files (``image``, ``label``, ``scribble``) into per-slice PNGs + an index.

    python datasets/prepare_acdc.py --source PATH/TO/ACDC_training_slices            # -> datasets/cardiac/acdc
    python datasets/prepare_acdc.py --source PATH/TO/ACDC_training_slices --output /data/d2/cardiac/acdc

Works on any folder of ``<patient>_frame<FF>_slice_<S>.h5`` files (any patients, slice counts and sizes; the
2D slices of the SSL4MIS repository's ``data/ACDC``, each with ``image``, ``label`` and ``scribble``; where to get
them: datasets/README.md). Writes
``images/`` (uint16), ``labels/``, ``scribbles/`` (unannotated = 255), ``index.json`` and the default patient
splits ``splits/p3_seed{1,2,3}.json`` (test patients 004/024/044/064/084 where present). Registered on
``import mmt_psm`` as ``acdc_test``, ``acdc_train``, ``acdc_train_scribble``, ``acdc_p3_seed<S>_{labeled,scribble,
unlabeled}`` (see mmt_psm/semantic/acdc_datasets.py). Bad input stops with an error naming the file; nothing is written.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from typing import List, Optional

from mmt_psm.core.cli import add_output_argument
from mmt_psm.semantic.acdc import convert_acdc


def main(argv: Optional[List[str]] = None) -> int:
    """Parse arguments, convert, print a summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", help="folder of ACDC slice .h5 files, searched recursively (required)")
    default_out = os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "cardiac", "acdc")
    add_output_argument(p, "folder for images/, labels/, scribbles/ (PNG per slice), index.json and the patient "
                        "splits splits/p<N>_seed<S>.json", default=default_out)
    p.add_argument("--num-labeled", type=int, default=3, help="fully labeled patients in the default splits")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the default splits")
    args = p.parse_args(argv)
    if not args.source:
        p.error("--source is required: the folder of ACDC slice files <patient>_frame<FF>_slice_<S>.h5 "
                "(datasets/README.md, 'ACDC', says where to get them)")
    index = convert_acdc(args.source, args.output, seeds=args.seeds, num_labeled=args.num_labeled)
    slices = index["slices"]
    patients = Counter(s["patient"] for s in slices)
    volumes = {s["volume"] for s in slices}
    empty = [s["stem"] for s in slices if s["scribble_pixels"] == 0]
    print(f"wrote {args.output}: {len(slices)} slices, {len(volumes)} volumes, {len(patients)} patients")
    if empty:
        print(f"note: {len(empty)} slices have no scribble pixel (kept; they get only the unsupervised terms): "
              + ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
