#!/usr/bin/env python
"""Convert the overlapping cervical cytology data (ISBI 2015 / ISBI 2014 synthetic) into COCO instance JSON.

Reads ``--source`` (required: the layout datasets/README.md describes, one folder per subset with
``images/``, ``cyto_masks/`` and ``nuclei/``) and writes a self-contained copy (images copied, never symlinked)
under ``--output``:

    <out>/isbi2015/{train,test,unlabeled}.json, images/frameXXX.png, unlabeled/EDF00X.png
    <out>/isbi2014_synth45/train.json, images/train_XX.png

Split of isbi2015 = the official one in ``frames.tsv`` (6 train, 6 test); ``unlabeled.json`` lists the
``unlabeled/*.png`` images with no annotations. Image ids are the 1-based rank of the image's path relative to
the subset directory in sorted order (isbi2015: frames 1-12, EDF000-003 13-16), so they are unique per subset.
``--from-mat`` builds isbi2014_synth45 from the challenge's own ``isbi_train_GT.mat`` instead of the npz
stacks (the two give identical masks). Running it again rewrites the same files (idempotent).

Usage: python datasets/prepare_cervical.py --source DIR [--output DIR] [--from-mat]
"""
from __future__ import annotations

import argparse
import filecmp
import glob
import os
import shutil
import sys
from typing import Dict, Iterable, List, Tuple

import numpy as np

from mmt_psm.core.cli import add_output_argument
from mmt_psm.instance import cervical
from mmt_psm.instance.coco_io import image_record, write_coco_json

STAGED = "staged cyto_masks/*.npz + nuclei/*_nuclei.png"
Sample = Tuple[str, np.ndarray, np.ndarray]  # (file name relative to the subset dir, cyto, nuclei)


def copy_file(src: str, dst: str) -> bool:
    """Copy ``src`` to ``dst`` unless an identical file is already there; True if it copied."""
    if os.path.isfile(dst) and not os.path.islink(dst) and filecmp.cmp(src, dst, shallow=False):
        return False
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.lexists(dst):
        os.unlink(dst)
    shutil.copyfile(src, dst)
    return True


def write_split(
    json_path: str, samples: Iterable[Sample], ids: Dict[str, int], src_dir: str, out_dir: str, info: dict
) -> Tuple[int, int]:
    """Write one COCO file (and copy its images); returns (number of images, number of annotations)."""
    images: List[dict] = []
    anns: List[dict] = []
    for file_name, cyto, nuclei in samples:
        img = cervical.read_gray(os.path.join(src_dir, file_name))
        if img.shape[:2] != cyto.shape[1:]:
            raise ValueError(f"{file_name}: image {img.shape[:2]} vs masks {cyto.shape[1:]}")
        rec, a = cervical.coco_records(file_name, ids[file_name], cyto, nuclei, first_ann_id=len(anns) + 1)
        images.append(rec)
        anns += a
        copy_file(os.path.join(src_dir, file_name), os.path.join(out_dir, file_name))
    write_coco_json(json_path, images, anns, info=info)
    return len(images), len(anns)


def prepare_isbi2015(src: str, out: str) -> None:
    """isbi2015/{train,test,unlabeled}.json from the staged npz/png layout, checked against frames.tsv."""
    rows = cervical.read_frames_tsv(os.path.join(src, "frames.tsv"))
    unlabeled = sorted(os.path.relpath(p, src) for p in glob.glob(os.path.join(src, "unlabeled", "*.png")))
    ids = cervical.assign_image_ids([f"images/{r['frame']}.png" for r in rows] + unlabeled)
    info = {"description": "ISBI 2015 overlapping cervical cytology (official split)", "source": STAGED,
            "nucleus_instances": f"{cervical.NUCLEUS_CONNECTIVITY}-connected components"}

    def labeled(split: str) -> Iterable[Sample]:
        for r in sorted(rows, key=lambda r: r["frame"]):
            if r["split"] != split:
                continue
            cyto, nuclei = cervical.read_staged(src, r["frame"])
            want = (int(r["n_cytoplasm"]), int(r["n_nuclei_cc"]))
            if (len(cyto), len(nuclei)) != want:
                got = (len(cyto), len(nuclei))
                raise ValueError(f"{r['frame']}: (cytoplasm, nuclei) = {got}, frames.tsv says {want}")
            yield f"images/{r['frame']}.png", cyto, nuclei

    for split in ("train", "test"):
        path = os.path.join(out, f"{split}.json")
        n_img, n_ann = write_split(path, labeled(split), ids, src, out, dict(info, split=split))
        print(f"wrote {path}: {n_img} images, {n_ann} annotations")

    images = []
    for fn in unlabeled:
        h, w = cervical.read_gray(os.path.join(src, fn)).shape[:2]
        images.append(image_record(ids[fn], fn, h, w))
        copy_file(os.path.join(src, fn), os.path.join(out, fn))
    path = os.path.join(out, "unlabeled.json")
    write_coco_json(path, images, [], info=dict(info, split="unlabeled"))
    print(f"wrote {path}: {len(images)} images, 0 annotations")


def prepare_synth45(src: str, out: str, from_mat: bool) -> None:
    """isbi2014_synth45/train.json from the npz stacks or (``from_mat``) the official isbi_train_GT.mat."""
    pngs = glob.glob(os.path.join(src, "images", "*.png"))
    names = sorted(os.path.splitext(os.path.basename(p))[0] for p in pngs)
    ids = cervical.assign_image_ids([f"images/{n}.png" for n in names])
    if from_mat:
        samples: Iterable[Sample] = (
            (f"images/{name}.png", cyto, nuclei)
            for name, cyto, nuclei in cervical.read_official_mat(os.path.join(src, "isbi_train_GT.mat"))
        )
    else:
        samples = ((f"images/{n}.png", *cervical.read_staged(src, n)) for n in names)
    info = {"description": "ISBI 2014 overlapping cervical cytology, 45 synthetic training images",
            "source": "isbi_train_GT.mat" if from_mat else STAGED,
            "nucleus_instances": f"{cervical.NUCLEUS_CONNECTIVITY}-connected components"}
    path = os.path.join(out, "train.json")
    n_img, n_ann = write_split(path, samples, ids, src, out, info)
    print(f"wrote {path}: {n_img} images, {n_ann} annotations")


def main(argv: List[str] = None) -> None:
    """Parse arguments and convert both subsets."""
    default_out = os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "cervical")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", help="folder holding isbi2015/ and isbi2014_synth45/ in the layout of "
                   "datasets/README.md (required)")
    add_output_argument(p, "root for isbi2015/{train,test,unlabeled}.json, images/, unlabeled/ and "
                        "isbi2014_synth45/train.json, images/", default=default_out)
    p.add_argument("--from-mat", action="store_true", help="isbi2014_synth45 from the official .mat file")
    args = p.parse_args(argv)
    if not args.source:
        p.error("--source is required: the folder holding isbi2015/ and isbi2014_synth45/ (datasets/README.md, "
                "'Overlapping cervical cytology', gives the layout and where to get the data)")
    if not os.path.isdir(args.source):
        sys.exit(f"source directory not found: {args.source}")
    prepare_isbi2015(os.path.join(args.source, "isbi2015"), os.path.join(args.output, "isbi2015"))
    prepare_synth45(os.path.join(args.source, "isbi2014_synth45"), os.path.join(args.output, "isbi2014_synth45"),
                    args.from_mat)


if __name__ == "__main__":
    main()
