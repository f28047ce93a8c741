"""Registration of ACDC slice data sets (``datasets/prepare_acdc.py`` output) in Detectron2's catalogs.

Under ``<DETECTRON2_DATASETS>/cardiac/acdc`` (Detectron2's convention; default ``./datasets``):

    acdc_test                    test patients (of the split ``p3_seed1``: 004/024/044/064/084), full labels
    acdc_train                   every training patient, full labels (upper bound)
    acdc_train_scribble          every training patient, scribbles only (unannotated = ignore)
    acdc_p3_seed<S>_labeled      the split's 3 fully labeled patients         (S = 1, 2, 3)
    acdc_p3_seed<S>_scribble     the other training patients, scribbles only (mixed supervision)
    acdc_p3_seed<S>_unlabeled    the other training patients, no labels      (mean-teacher methods)

``register_acdc_split(split_file)`` registers the same trio for any split written by
``tools/make_splits.py --patients``. Each dict has ``file_name``, ``sem_seg_file_name`` (absent when unlabeled),
``height``, ``width``, ``image_id``, ``volume_id`` (``<patient>_frame<FF>``), ``slice_index`` and ``patient``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

from mmt_psm.semantic.acdc import ACDC_CLASSES, IGNORE_VALUE, read_patient_split

# the command a missing file's error names (datasets/README.md says where to get the ACDC slices)
PREPARE_ACDC = "python datasets/prepare_acdc.py --source PATH/TO/ACDC_training_slices"
ROLES = {"labeled": ("labeled_patients", "label"), "scribble": ("weak_patients", "scribble"),
         "unlabeled": ("weak_patients", None)}


def _missing(path: str, root: str) -> FileNotFoundError:
    """The error for a missing file of the prepared folder ``root`` (what prepare_acdc.py's --output names)."""
    return FileNotFoundError(f"ACDC file not found: {path}. Prepare the data set with: {PREPARE_ACDC} --output "
                             f"{root} (datasets/README.md: where to get the slices)")


def load_acdc_slices(root: str, patients: Optional[List[str]], annotation: Optional[str]) -> List[Dict[str, Any]]:
    """Detectron2 dicts of the slices of ``patients`` (all when None); ``annotation``: "label", "scribble" or
    None (unlabeled). Slices with an empty scribble map are kept (they still get the unsupervised terms)."""
    index_file = os.path.join(root, "index.json")
    if not os.path.isfile(index_file):
        raise _missing(index_file, root)
    with open(index_file) as f:
        index = json.load(f)
    wanted = None if patients is None else set(patients)
    dicts = []
    for i, rec in enumerate(index["slices"]):
        if wanted is not None and rec["patient"] not in wanted:
            continue
        d = {"file_name": os.path.join(root, rec["image"]), "height": rec["height"], "width": rec["width"],
             "image_id": i, "volume_id": rec["volume"], "slice_index": rec["slice"], "patient": rec["patient"]}
        if annotation is not None:
            d["sem_seg_file_name"] = os.path.join(root, rec[annotation])
        if "spacing" in rec:
            d["spacing"] = rec["spacing"]
        for key in ("file_name", "sem_seg_file_name"):
            if key in d and not os.path.isfile(d[key]):
                raise _missing(d[key], root)
        dicts.append(d)
    if wanted is not None:
        absent = sorted(wanted - {d["patient"] for d in dicts})
        if absent:
            raise ValueError(f"{index_file}: patients {absent} of the split have no slices")
    return dicts


def _register(name: str, loader, **meta: Any) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(
        stuff_classes=list(ACDC_CLASSES), ignore_label=IGNORE_VALUE, evaluator_type="sem_seg_volume",
        volume_classes=list(ACDC_CLASSES[1:]), **meta,
    )


def _split_patients(root: str, split_file: str, key: str) -> List[str]:
    if not os.path.isfile(split_file):
        raise _missing(split_file, root)
    return list(read_patient_split(split_file)[key])


def register_acdc_split(split_file: str, root: Optional[str] = None, prefix: Optional[str] = None) -> List[str]:
    """Register ``<prefix>_{labeled,scribble,unlabeled}`` for a patient split file; returns the names.

    ``prefix`` defaults to ``acdc_<split file stem>``; ``root`` to ``<DETECTRON2_DATASETS>/cardiac/acdc``.
    """
    root = root or default_root()
    prefix = prefix or "acdc_" + os.path.splitext(os.path.basename(split_file))[0]
    names = []
    for role, (key, annotation) in ROLES.items():
        name = f"{prefix}_{role}"
        _register(name, lambda k=key, a=annotation: load_acdc_slices(root, _split_patients(root, split_file, k), a),
                  split_file=split_file)
        names.append(name)
    return names


def default_root() -> str:
    """``<DETECTRON2_DATASETS>/cardiac/acdc`` (``DETECTRON2_DATASETS`` defaults to ``datasets``)."""
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "cardiac", "acdc")


def register_all_acdc(root: Optional[str] = None, prefix: str = "acdc") -> List[str]:
    """Register the built-in ACDC data sets (``<prefix>_test``, ...) under ``root``; needs no files."""
    root = root or default_root()
    ref = os.path.join(root, "splits", "p3_seed1.json")
    names = []

    def train_patients() -> List[str]:
        split = read_patient_split(ref) if os.path.isfile(ref) else None
        if split is None:
            raise _missing(ref, root)
        return split["labeled_patients"] + split["weak_patients"]

    _register(f"{prefix}_test", lambda: load_acdc_slices(root, _split_patients(root, ref, "test_patients"), "label"))
    _register(f"{prefix}_train", lambda: load_acdc_slices(root, train_patients(), "label"))
    _register(f"{prefix}_train_scribble", lambda: load_acdc_slices(root, train_patients(), "scribble"))
    names += [f"{prefix}_test", f"{prefix}_train", f"{prefix}_train_scribble"]
    for seed in (1, 2, 3):
        split = os.path.join(root, "splits", f"p3_seed{seed}.json")
        names += register_acdc_split(split, root, prefix=f"{prefix}_p3_seed{seed}")
    return names
