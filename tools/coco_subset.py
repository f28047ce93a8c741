#!/usr/bin/env python
"""Split a COCO instance file into a labeled subset (JSON) and a folder of the other images (unlabeled).

    python tools/coco_subset.py --json my_cells/all.json --image-root my_cells/images \\
        --count 3 --seed 1 --output my_cells/train_n3_seed1.json --unlabeled-dir my_cells/unlabeled_seed1
    python tools/coco_subset.py --json my_cells/all.json --image-root my_cells/images \\
        --names a.png b.png --output my_cells/train_ab.json

Writes exactly the layout of the README's "Your own data (no Python)" section:

* ``--output``: a COCO instance file with only the chosen images, their annotations and ALL categories of the
  input (so ``MODEL.ROI_HEADS.NUM_CLASSES`` does not change); other top-level keys (info, licenses) are kept.
  ``file_name`` stays relative to ``--image-root``: register it as ``"name:OUTPUT:IMAGE_ROOT"``.
* ``--unlabeled-dir`` (optional): one symlink per other image (a copy where links are not possible), flat, named
  by the image's base name (by its whole ``file_name`` with ``/`` -> ``__`` when base names collide): register
  it as ``"name:UNLABELED_DIR"``. Re-running with the same choice is a no-op; a folder holding anything else is
  an error (nothing is deleted).

The choice: ``--names`` (``file_name``s or base names) or ``--count N --seed S``, which draws
``random.Random(S).sample(sorted image ids, N)``, the rule of ``tools/make_splits.py`` (same ids for the same
seed and count), so it is the same on every machine. Any category ids, any number of classes. Standard library
only (mmt_psm/core/cli.py is loaded by its path: no torch / Detectron2 import).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import sys
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["SubsetError", "load_coco", "choose_images", "make_subset"]


class SubsetError(ValueError):
    """A user error (bad file, name, count, missing image); the message names the file concerned."""


def load_coco(json_file: str) -> Dict[str, Any]:
    """The COCO instance file as a dict; a SubsetError naming the file when it is missing or is not COCO."""
    if not os.path.isfile(json_file):
        raise SubsetError(f"COCO file {json_file} does not exist")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SubsetError(f"COCO file {json_file} cannot be read as JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SubsetError(f"COCO file {json_file} is not a COCO instance file (no 'images' list)")
    ids = [im.get("id") for im in data["images"]]
    if len(set(ids)) != len(ids):
        raise SubsetError(f"COCO file {json_file} has duplicate image ids")
    return data


def choose_images(data: Dict[str, Any], json_file: str, names: Optional[Sequence[str]] = None,
                  count: Optional[int] = None, seed: int = 0) -> List[Any]:
    """The chosen image ids, sorted: by ``names`` (``file_name`` or its base name) or ``count`` drawn with
    ``random.Random(seed)`` from the sorted ids. SubsetError (naming ``json_file``) on a bad name or count."""
    images = data["images"]
    if (names is None) == (count is None):
        raise SubsetError("give exactly one of names or count")
    if count is not None:
        if not 0 < count <= len(images):
            raise SubsetError(f"cannot choose {count} of the {len(images)} images of {json_file}")
        return sorted(random.Random(int(seed)).sample(sorted(im["id"] for im in images), int(count)))
    by_name: Dict[str, List[Any]] = {}
    for im in images:
        by_name.setdefault(im["file_name"], []).append(im["id"])
        base = os.path.basename(im["file_name"])
        if base != im["file_name"]:
            by_name.setdefault(base, []).append(im["id"])
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SubsetError(f"{len(missing)} name(s) not in {json_file}: {', '.join(missing)}")
    ambiguous = [n for n in names if len(by_name[n]) > 1]
    if ambiguous:
        raise SubsetError(f"name(s) matching several images of {json_file} (give the file_name): "
                          f"{', '.join(ambiguous)}")
    return sorted({by_name[n][0] for n in names})


def _link_names(file_names: Sequence[str]) -> List[str]:
    """Flat names in the unlabeled folder: base names, or whole paths with separators -> ``__`` on a clash."""
    bases = [os.path.basename(f) for f in file_names]
    if len(set(bases)) == len(bases):
        return bases
    return [f.replace("\\", "/").strip("/").replace("/", "__") for f in file_names]


def _write_folder(folder: str, sources: Sequence[str], names: Sequence[str]) -> str:
    """Symlink (else copy) ``sources`` into ``folder`` as ``names``; returns "symlinks" or "copies"."""
    os.makedirs(folder, exist_ok=True)
    wanted = dict(zip(names, sources))
    foreign = sorted(set(os.listdir(folder)) - set(wanted))
    if foreign:
        raise SubsetError(f"unlabeled folder {folder} holds files that are not this choice's unlabeled images "
                          f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}): use an empty folder")
    todo, how = {}, "symlinks"
    for name, src in wanted.items():  # check everything before writing anything
        dst = os.path.join(folder, name)
        if os.path.islink(dst):
            if os.readlink(dst) != src:
                raise SubsetError(f"unlabeled folder {folder}: {name} links to {os.readlink(dst)}, not {src}")
        elif os.path.exists(dst):
            if os.path.getsize(dst) != os.path.getsize(src):
                raise SubsetError(f"unlabeled folder {folder}: {name} exists and is not a copy of {src}")
            how = "copies"  # written by an earlier run where links were not possible
        else:
            todo[dst] = src
    for dst, src in todo.items():
        try:
            os.symlink(src, dst)
        except FileExistsError as err:  # another run preparing the same seed at the same time linked it first
            if not (os.path.islink(dst) and os.readlink(dst) == src):
                raise SubsetError(f"unlabeled folder {folder}: {os.path.basename(dst)} appeared while writing and "
                                  f"is not a link to {src}") from err
        except (OSError, NotImplementedError):
            shutil.copy2(src, dst)
            how = "copies"
    return how


def make_subset(json_file: str, image_root: str, out_json: str, names: Optional[Sequence[str]] = None,
                count: Optional[int] = None, seed: int = 0,
                unlabeled_dir: Optional[str] = None) -> Dict[str, Any]:
    """Write the labeled JSON (and the unlabeled folder); returns ``{"labeled": [file_name, ...], "unlabeled":
    [...], "categories": n, "annotations": n, "unlabeled_dir": how ("symlinks" | "copies" | None)}``.

    Every chosen image, and with ``unlabeled_dir`` every other one, must exist under ``image_root``: a
    SubsetError lists the missing files (nothing is written then)."""
    data = load_coco(json_file)
    chosen = set(choose_images(data, json_file, names, count, seed))
    labeled = [im for im in data["images"] if im["id"] in chosen]
    others = [im for im in data["images"] if im["id"] not in chosen]
    needed = labeled + (others if unlabeled_dir else [])
    missing = [im["file_name"] for im in needed if not os.path.isfile(os.path.join(image_root, im["file_name"]))]
    if missing:
        raise SubsetError(f"{len(missing)} image(s) of {json_file} missing under {image_root}: "
                          f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    anns = [a for a in data.get("annotations", []) if a.get("image_id") in chosen]
    subset = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    subset.update(images=labeled, annotations=anns)
    how = None
    if unlabeled_dir:
        sources = [os.path.abspath(os.path.join(image_root, im["file_name"])) for im in others]
        how = _write_folder(unlabeled_dir, sources, _link_names([im["file_name"] for im in others]))
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    tmp = f"{out_json}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(subset, f)
    os.replace(tmp, out_json)
    return {"labeled": [im["file_name"] for im in labeled], "unlabeled": [im["file_name"] for im in others],
            "categories": len(data.get("categories", [])), "annotations": len(anns), "unlabeled_dir": how}


def _cli():
    """mmt_psm/core/cli.py by its path (standard library only; importing ``mmt_psm`` would load torch)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mmt_psm", "core", "cli.py")
    spec = importlib.util.spec_from_file_location("mmt_psm_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse arguments, write the subset, print what was written."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="input COCO instance file")
    p.add_argument("--image-root", default=None, help="folder the file_names are relative to (default: the "
                   "JSON's folder)")
    choice = p.add_mutually_exclusive_group(required=True)
    choice.add_argument("--names", nargs="+", help="labeled images: file_names or base names")
    choice.add_argument("--count", type=int, help="labeled images: this many, drawn with --seed")
    p.add_argument("--seed", type=int, default=0, help="seed of the --count draw (default 0)")
    _cli().add_output_argument(p, "the labeled COCO file to write (the chosen images, their annotations, every "
                               "category)", required=True, metavar="FILE")
    p.add_argument("--unlabeled-dir", default=None,
                   help="also write this folder of symlinks (fallback: copies) to the other images")
    args = p.parse_args(argv)
    root = args.image_root if args.image_root is not None else os.path.dirname(os.path.abspath(args.json))
    try:
        res = make_subset(args.json, root, args.output, args.names, args.count, args.seed, args.unlabeled_dir)
    except SubsetError as e:
        p.error(str(e))
    print(f"wrote {args.output}: {len(res['labeled'])} labeled images, {res['annotations']} annotations, "
          f"{res['categories']} categories (register \"name:{args.output}:{root}\")")
    print("labeled:", ", ".join(res["labeled"]))
    if args.unlabeled_dir:
        print(f"wrote {args.unlabeled_dir}: {len(res['unlabeled'])} unlabeled images as {res['unlabeled_dir']} "
              f"(register \"name:{args.unlabeled_dir}\")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
