"""Registration of the project's COCO-format cell data sets in Detectron2's DatasetCatalog/MetadataCatalog.

Registration only records names and paths; files are read when a data set is first loaded, and a missing file
then raises ``FileNotFoundError`` naming the file and the command that prepares it. Paths are resolved under
``$DETECTRON2_DATASETS`` (default ``datasets``, relative to the working directory, as in Detectron2):

    <base>/cervical/isbi2015/{train,test,unlabeled}.json -> isbi2015_{train,test,unlabeled}
    <base>/cervical/isbi2014_synth45/train.json          -> isbi2014_synth45
    <base>/synthetic/{train,test,unlabeled}.json         -> synthetic_{train,test,unlabeled}
                                                            (images in <base>/synthetic/images)
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

CELL_CLASSES = ["cytoplasm", "nucleus"]
# the commands a missing file's error names (datasets/README.md says where to get the cervical data)
PREPARE_CERVICAL = "python datasets/prepare_cervical.py --source PATH/TO/cervical"
PREPARE_SYNTHETIC = "python datasets/prepare_synthetic.py"


def datasets_base() -> str:
    """``$DETECTRON2_DATASETS`` or ``datasets`` (Detectron2's convention)."""
    return os.environ.get("DETECTRON2_DATASETS", "datasets")


def _missing(what: str, path: str, prepare_cmd: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found: {path}. Prepare the data set with: {prepare_cmd}")


def load_cell_coco(
    json_file: str, image_root: str, name: Optional[str], prepare_cmd: str, strip_annotations: bool = False
) -> List[Dict[str, Any]]:
    """Detectron2 dicts of a cell COCO file, after checking that the file and every image exist.

    ``strip_annotations`` removes the ``annotations`` key (unlabeled data sets).
    """
    if not os.path.isfile(json_file):
        raise _missing("annotation file", json_file, prepare_cmd)
    dicts = load_coco_json(json_file, image_root, name)
    for d in dicts:
        if not os.path.isfile(d["file_name"]):
            raise _missing(f"image of {json_file}", d["file_name"], prepare_cmd)
        if strip_annotations:
            d.pop("annotations", None)
    return dicts


def register_cell_coco(
    name: str, json_file: str, image_root: str, prepare_cmd: str, strip_annotations: bool = False
) -> None:
    """Register a cell COCO data set (classes cytoplasm, nucleus; evaluator_type "cell") under ``name``.

    Needs no files. Registering an existing name again replaces it (so tests can point it elsewhere).
    """
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(
        name, lambda: load_cell_coco(json_file, image_root, name, prepare_cmd, strip_annotations)
    )
    MetadataCatalog.get(name).set(
        thing_classes=list(CELL_CLASSES),
        thing_dataset_id_to_contiguous_id={1: 0, 2: 1},
        evaluator_type="cell",
        json_file=json_file,
        image_root=image_root,
        prepare_cmd=prepare_cmd,
    )


def register_all_cervical(root: Optional[str] = None) -> List[str]:
    """Register isbi2015_{train,test,unlabeled} and isbi2014_synth45 under ``root`` (default
    ``<DETECTRON2_DATASETS>/cervical``); returns the names."""
    root = root if root is not None else os.path.join(datasets_base(), "cervical")
    isbi15 = os.path.join(root, "isbi2015")
    prepare = f"{PREPARE_CERVICAL} --output {root} (datasets/README.md: where to get the data)"
    names = []
    for split in ("train", "test", "unlabeled"):
        name = f"isbi2015_{split}"
        register_cell_coco(name, os.path.join(isbi15, f"{split}.json"), isbi15, prepare,
                           strip_annotations=split == "unlabeled")
        names.append(name)
    synth = os.path.join(root, "isbi2014_synth45")
    register_cell_coco("isbi2014_synth45", os.path.join(synth, "train.json"), synth, prepare)
    return names + ["isbi2014_synth45"]


def register_all_synthetic(root: Optional[str] = None) -> List[str]:
    """Register synthetic_{train,test,unlabeled,unlabeled_gt} under ``root`` (default
    ``<DETECTRON2_DATASETS>/synthetic``, the output of ``datasets/prepare_synthetic.py``); returns the names."""
    root = root if root is not None else os.path.join(datasets_base(), "synthetic")
    names = []
    for split in ("train", "test", "unlabeled"):
        name = f"synthetic_{split}"
        register_cell_coco(name, os.path.join(root, f"{split}.json"), os.path.join(root, "images"),
                           f"{PREPARE_SYNTHETIC} --output {root}", strip_annotations=split == "unlabeled")
        names.append(name)
    # the unlabeled images' labels, held back for the pseudo-label monitor (DATASETS.UNLABELED_GT) only
    register_cell_coco("synthetic_unlabeled_gt", os.path.join(root, "unlabeled_gt.json"), os.path.join(root, "images"),
                       f"{PREPARE_SYNTHETIC} --output {root}")
    return names + ["synthetic_unlabeled_gt"]


def register_all(base: Optional[str] = None) -> List[str]:
    """Register every built-in data set under ``base`` (default ``$DETECTRON2_DATASETS`` or ``datasets``)."""
    base = base if base is not None else datasets_base()
    return register_all_cervical(os.path.join(base, "cervical")) + register_all_synthetic(
        os.path.join(base, "synthetic")
    )

