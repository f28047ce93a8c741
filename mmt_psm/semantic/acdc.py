"""ACDC slice converter and patient splits (no Detectron2 needed).

Input: any folder of ACDC slice HDF5 files named ``<patient>_frame<FF>_slice_<S>.h5`` (SSL4MIS/WSL4MIS layout),
each with ``image`` (float, [0, 1]), ``label`` (0 background, 1 RV, 2 Myo, 3 LV) and ``scribble`` (0-3 as label,
4 = unannotated). Output under ``out``::

    images/<stem>.png      uint16 PNG, image * 65535
    labels/<stem>.png      uint8 label map
    scribbles/<stem>.png   uint8 scribble map, unannotated = IGNORE_VALUE (255)
    index.json             classes, ignore value, and one record per slice (patient, frame, slice, volume, size,
                           scribble pixel count) so slices stack back into volumes
    splits/p<N>_seed<S>.json  default patient splits (see ``make_patient_split``)

Bad input raises ``ValueError`` naming the file and the problem; nothing is written for a bad input set.
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
from collections import defaultdict
from typing import Any, Dict, Optional, Sequence

import cv2
import numpy as np

from mmt_psm.core.atomic import write_json
from mmt_psm.core.optional import optional_import

ACDC_CLASSES = ["background", "RV", "Myo", "LV"]
IGNORE_VALUE = 255
SCRIBBLE_UNANNOTATED = 4
DEFAULT_TEST_PATIENTS = ("patient004", "patient024", "patient044", "patient064", "patient084")
SLICE_RE = re.compile(r"^(?P<patient>.+?)_frame(?P<frame>\d+)_slice_(?P<slice>\d+)\.h5$")
REQUIRED_KEYS = ("image", "label", "scribble")


def parse_slice_name(path: str) -> Dict[str, Any]:
    """``patient``, ``frame``, ``slice``, ``volume`` and ``stem`` of a slice file name."""
    m = SLICE_RE.match(os.path.basename(path))
    if m is None:
        raise ValueError(f"{path}: not an ACDC slice file name (expected <patient>_frame<FF>_slice_<S>.h5)")
    stem = os.path.basename(path)[: -len(".h5")]
    patient, frame = m["patient"], int(m["frame"])
    return {"patient": patient, "frame": frame, "slice": int(m["slice"]), "stem": stem,
            "volume": f"{patient}_frame{m['frame']}"}


def read_slice(path: str, num_classes: int = len(ACDC_CLASSES)) -> Dict[str, np.ndarray]:
    """Read and validate one slice file: keys present, same shapes, label/scribble values in range."""
    h5py = optional_import("h5py", "h5py", "reading ACDC's HDF5 slices (semantic task, datasets/prepare_acdc.py)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: unreadable HDF5 file ({e})") from e
    with f:
        missing = [k for k in REQUIRED_KEYS if k not in f]
        if missing:
            raise ValueError(f"{path}: missing HDF5 key(s) {missing} (has {sorted(f.keys())})")
        out = {k: np.asarray(f[k][()]) for k in REQUIRED_KEYS}
        spacing = f.attrs.get("spacing", None)
    shapes = {k: v.shape for k, v in out.items()}
    if len(set(shapes.values())) != 1 or out["image"].ndim != 2:
        raise ValueError(f"{path}: image/label/scribble must be 2D of one shape, got {shapes}")
    image = out["image"].astype(np.float64)
    if not np.isfinite(image).all():
        raise ValueError(f"{path}: image has NaN or infinite values")
    for key, top in (("label", num_classes - 1), ("scribble", SCRIBBLE_UNANNOTATED)):
        values = np.unique(out[key])
        bad = values[(values < 0) | (values > top) | (values != np.round(values))]
        if bad.size:
            raise ValueError(f"{path}: {key} values {bad[:10].tolist()} outside 0..{top}")
    lo, hi = float(image.min()), float(image.max())
    if lo < 0.0 or hi > 1.0:  # not normalised like SSL4MIS's slices: min-max this slice
        image = (image - lo) / max(hi - lo, 1e-12)
    scribble = out["scribble"].astype(np.int64)
    scribble = np.where(scribble == SCRIBBLE_UNANNOTATED, IGNORE_VALUE, scribble).astype(np.uint8)
    result = {"image": image, "label": out["label"].astype(np.uint8), "scribble": scribble}
    if spacing is not None:
        result["spacing"] = np.asarray(spacing, dtype=np.float64)
    return result


def _write_png(path: str, array: np.ndarray) -> None:
    if not cv2.imwrite(path, array):
        raise OSError(f"could not write {path}")


def convert_acdc(source: str, out: str, seeds: Sequence[int] = (1, 2, 3), num_labeled: int = 3) -> Dict[str, Any]:
    """Convert every ``*.h5`` slice under ``source`` (recursively) into ``out``; returns the index.

    All files are read and validated before anything is written. Slices of one patient must share one size.
    Also writes the default patient splits ``splits/p<num_labeled>_seed<s>.json`` for ``seeds``.
    """
    files = sorted(glob.glob(os.path.join(source, "**", "*.h5"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no ACDC slice files (*.h5) under {source}")
    records, arrays, sizes = [], [], defaultdict(dict)
    for path in files:
        meta = parse_slice_name(path)
        data = read_slice(path)
        h, w = data["label"].shape
        sizes[meta["patient"]][(h, w)] = path
        rec = dict(meta, height=int(h), width=int(w), scribble_pixels=int((data["scribble"] != IGNORE_VALUE).sum()),
                   image=f"images/{meta['stem']}.png", label=f"labels/{meta['stem']}.png",
                   scribble=f"scribbles/{meta['stem']}.png")
        if "spacing" in data:
            rec["spacing"] = data["spacing"].tolist()
        records.append(rec)
        arrays.append(data)
    for patient, by_size in sizes.items():
        if len(by_size) > 1:
            detail = ", ".join(f"{h}x{w} ({os.path.basename(p)})" for (h, w), p in sorted(by_size.items()))
            raise ValueError(f"patient {patient} has slices of different sizes: {detail}")
    stems = [r["stem"] for r in records]
    if len(set(stems)) != len(stems):
        raise ValueError(f"{source}: duplicate slice names in sub-folders")
    for sub in ("images", "labels", "scribbles", "splits"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    for rec, data in zip(records, arrays):
        _write_png(os.path.join(out, rec["image"]), np.round(data["image"] * 65535.0).astype(np.uint16))
        _write_png(os.path.join(out, rec["label"]), data["label"])
        _write_png(os.path.join(out, rec["scribble"]), data["scribble"])
    records.sort(key=lambda r: (r["patient"], r["frame"], r["slice"]))
    index = {"classes": ACDC_CLASSES, "ignore_value": IGNORE_VALUE, "source": os.path.abspath(source),
             "slices": records}
    write_json(os.path.join(out, "index.json"), index)
    patients = sorted({r["patient"] for r in records})
    for seed in seeds:
        split = make_patient_split(patients, num_labeled, seed)
        write_json(os.path.join(out, "splits", f"p{num_labeled}_seed{seed}.json"), split)
    return index


def make_patient_split(
    patients: Sequence[str], num_labeled: int, seed: int, test_patients: Optional[Sequence[str]] = None
) -> Dict[str, Any]:
    """A seeded PATIENT split: fixed test patients, ``num_labeled`` fully labeled training patients, the rest weak.

    Test patients: ``test_patients``, else those of the project's ACDC protocol (004, 024, 044, 064, 084) that exist,
    else every 4th patient. Labeled: ``random.Random(seed).sample(sorted training patients, num_labeled)``.
    """
    patients = sorted(set(patients))
    if test_patients is None:
        test_patients = [p for p in DEFAULT_TEST_PATIENTS if p in patients] or patients[3::4]
    unknown = sorted(set(test_patients) - set(patients))
    if unknown:
        raise ValueError(f"test patients {unknown} are not in the data set")
    train = [p for p in patients if p not in set(test_patients)]
    if not 0 < num_labeled <= len(train):
        raise ValueError(f"cannot label {num_labeled} of {len(train)} training patients")
    labeled = sorted(random.Random(int(seed)).sample(train, num_labeled))
    return {"dataset": "acdc", "kind": "patients", "seed": int(seed), "count": int(num_labeled),
            "labeled_patients": labeled, "weak_patients": [p for p in train if p not in labeled],
            "test_patients": sorted(test_patients)}


def read_patient_split(path: str) -> Dict[str, Any]:
    """Load and check a patient split file (keys present, no patient in two roles)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"patient split file not found: {path}")
    with open(path) as f:
        try:
            split = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    keys = ("labeled_patients", "weak_patients", "test_patients")
    missing = [k for k in keys if k not in split]
    if missing:
        raise ValueError(f"{path}: not a patient split file, missing {missing}")
    seen: Dict[str, str] = {}
    for key in keys:
        for p in split[key]:
            if p in seen:
                raise ValueError(f"{path}: patient {p} is in both {seen[p]} and {key}")
            seen[p] = key
    return split
