"""tools/coco_subset.py: a labeled COCO subset + a folder of the other images, from COCO data it has never seen
(category ids 3 and 11, non-contiguous image ids), deterministic per seed, with errors that name the file."""
import json
import os
import runpy

import pytest
from common import REPO

TOOL = runpy.run_path(os.path.join(REPO, "tools", "coco_subset.py"))
SubsetError = TOOL["SubsetError"]


def _coco(root, file_names=None, write_images=True):
    """A COCO file of 6 images (ids 11..16), 2 annotations each, categories 3 and 11; returns (json, image_root)."""
    file_names = file_names or [f"img{k}.png" for k in range(6)]
    images, anns = [], []
    for k, fn in enumerate(file_names):
        images.append({"id": 11 + k, "file_name": fn, "height": 8, "width": 8})
        for j in range(2):
            anns.append({"id": 100 + 2 * k + j, "image_id": 11 + k, "category_id": (3, 11)[j], "bbox": [0, 0, 2, 2],
                         "area": 4, "iscrowd": 0, "segmentation": [[0, 0, 2, 0, 2, 2]]})
        if write_images:
            path = os.path.join(root, "images", fn)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(b"png" * (k + 1))
    path = os.path.join(root, "all.json")
    with open(path, "w") as f:
        json.dump({"info": {"v": 1}, "images": images, "annotations": anns,
                   "categories": [{"id": 3, "name": "a"}, {"id": 11, "name": "b"}]}, f)
    return path, os.path.join(root, "images")


def test_count_and_seed_choose_deterministically_and_keep_every_category(tmp_path):
    js, root = _coco(str(tmp_path))
    res = TOOL["make_subset"](js, root, str(tmp_path / "l.json"), count=2, seed=5)
    again = TOOL["make_subset"](js, root, str(tmp_path / "l2.json"), count=2, seed=5)
    assert res == again and len(res["labeled"]) == 2 and len(res["unlabeled"]) == 4
    assert (tmp_path / "l.json").read_bytes() == (tmp_path / "l2.json").read_bytes()
    out = json.loads((tmp_path / "l.json").read_text())
    ids = {im["id"] for im in out["images"]}
    assert [im["file_name"] for im in out["images"]] == res["labeled"]
    assert {a["image_id"] for a in out["annotations"]} == ids and len(out["annotations"]) == 4
    assert [c["id"] for c in out["categories"]] == [3, 11] and out["info"] == {"v": 1}
    # the rule of tools/make_splits.py: the same seed and count label the same image ids
    from mmt_psm.core.splits import make_split

    assert sorted(ids) == make_split("x", list(range(11, 17)), 5, count=2)["labeled_ids"]
    choices = {tuple(TOOL["choose_images"](json.load(open(js)), js, count=2, seed=s)) for s in range(1, 6)}
    assert len(choices) > 1  # the seed matters


def test_unlabeled_folder_links_exactly_the_other_images_and_a_rerun_is_a_no_op(tmp_path):
    js, root = _coco(str(tmp_path))
    unl = tmp_path / "unl"
    res = TOOL["make_subset"](js, root, str(tmp_path / "l.json"), names=["img1.png", "img4.png"],
                              unlabeled_dir=str(unl))
    assert res["labeled"] == ["img1.png", "img4.png"] and res["unlabeled_dir"] == "symlinks"
    assert sorted(os.listdir(unl)) == ["img0.png", "img2.png", "img3.png", "img5.png"]
    for name in os.listdir(unl):
        assert os.path.islink(unl / name) and os.readlink(unl / name) == os.path.abspath(os.path.join(root, name))
    TOOL["make_subset"](js, root, str(tmp_path / "l.json"), names=["img1.png", "img4.png"], unlabeled_dir=str(unl))
    assert sorted(os.listdir(unl)) == ["img0.png", "img2.png", "img3.png", "img5.png"]
    # another choice into the same folder: an error naming it, nothing deleted
    with pytest.raises(SubsetError, match=f"unlabeled folder {unl} holds files .*\\(img0.png\\)"):
        TOOL["make_subset"](js, root, str(tmp_path / "l.json"), names=["img0.png"], unlabeled_dir=str(unl))
    assert len(os.listdir(unl)) == 4


def test_copies_where_links_are_not_possible(tmp_path, monkeypatch):
    js, root = _coco(str(tmp_path))

    def no_links(src, dst):
        raise OSError("symlinks not permitted")

    monkeypatch.setattr(os, "symlink", no_links)
    unl = tmp_path / "unl"
    res = TOOL["make_subset"](js, root, str(tmp_path / "l.json"), count=5, seed=1, unlabeled_dir=str(unl))
    (name,) = os.listdir(unl)
    assert res["unlabeled_dir"] == "copies" and res["unlabeled"] == [name] and not os.path.islink(unl / name)
    assert (unl / name).read_bytes() == open(os.path.join(root, name), "rb").read()


def test_a_run_preparing_the_same_folder_at_the_same_time_is_no_error(tmp_path, monkeypatch):
    """Two protocol runs of one seed started together both write the unlabeled folder: a link that another
    process created between the check and the write is accepted when it points at the same image."""
    js, root = _coco(str(tmp_path))
    real = os.symlink

    def raced(src, dst):
        real(src, dst)  # the other process wins the race
        raise FileExistsError(dst)

    monkeypatch.setattr(os, "symlink", raced)
    unl = tmp_path / "unl"
    res = TOOL["make_subset"](js, root, str(tmp_path / "l.json"), count=2, seed=3, unlabeled_dir=str(unl))
    assert res["unlabeled_dir"] == "symlinks" and sorted(os.listdir(unl)) == sorted(res["unlabeled"])
    assert all(os.path.islink(unl / n) for n in os.listdir(unl))

    def raced_elsewhere(src, dst):
        real(os.path.join(root, "img0.png"), dst)
        raise FileExistsError(dst)

    monkeypatch.setattr(os, "symlink", raced_elsewhere)
    with pytest.raises(SubsetError, match=r"u2: (img[1-5]).png appeared while writing and is not a link to .*\1.png"):
        TOOL["make_subset"](js, root, str(tmp_path / "l2.json"), count=2, seed=3, unlabeled_dir=str(tmp_path / "u2"))


def test_base_names_clash_then_the_folder_uses_flattened_paths_and_names_match_base_or_file_name(tmp_path):
    js, root = _coco(str(tmp_path), ["a/x.png", "b/x.png", "c/y.png", "z.png", "d/w.png", "v.png"])
    unl = tmp_path / "unl"
    TOOL["make_subset"](js, root, str(tmp_path / "l.json"), names=["y.png", "d/w.png"], unlabeled_dir=str(unl))
    assert sorted(os.listdir(unl)) == ["a__x.png", "b__x.png", "v.png", "z.png"]
    with pytest.raises(SubsetError, match=f"matching several images of {js}.*x.png"):
        TOOL["make_subset"](js, root, str(tmp_path / "l2.json"), names=["x.png"])


@pytest.mark.parametrize("case", ["missing_json", "unknown_name", "count", "missing_image"])
def test_errors_name_the_file(tmp_path, case):
    js, root = _coco(str(tmp_path))
    kw = {"count": 2, "seed": 1}
    if case == "missing_json":
        js, expect = str(tmp_path / "nope.json"), f"COCO file {tmp_path / 'nope.json'} does not exist"
    elif case == "unknown_name":
        kw, expect = {"names": ["img1.png", "ghost.png"]}, f"1 name\\(s\\) not in {js}: ghost.png"
    elif case == "count":
        kw, expect = {"count": 7, "seed": 1}, f"cannot choose 7 of the 6 images of {js}"
    else:
        os.remove(os.path.join(root, "img3.png"))
        expect = f"1 image\\(s\\) of {js} missing under {root}: img3.png"
        kw["unlabeled_dir"] = str(tmp_path / "unl")
    with pytest.raises(SubsetError, match=expect):
        TOOL["make_subset"](js, root, str(tmp_path / "l.json"), **kw)
    assert not (tmp_path / "l.json").exists() and not (tmp_path / "unl").exists()


def test_cli_writes_the_layout_and_reports_errors_and_help(tmp_path, capsys):
    js, root = _coco(str(tmp_path))
    os.replace(js, os.path.join(root, "all.json"))  # the JSON beside its images: --image-root's default
    js, out, unl = os.path.join(root, "all.json"), str(tmp_path / "l.json"), str(tmp_path / "unl")
    assert TOOL["main"](["--json", js, "--count", "2", "--seed", "3", "--output", out, "--unlabeled-dir", unl]) == 0
    printed = capsys.readouterr().out
    assert f'register "name:{out}:{root}"' in printed
    assert len(os.listdir(unl)) == 4 and f'register "name:{unl}"' in printed
    with pytest.raises(SystemExit) as e:
        TOOL["main"](["--json", js, "--image-root", root, "--count", "9", "--output", out])
    assert e.value.code == 2 and f"cannot choose 9 of the 6 images of {js}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        TOOL["main"](["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "a COCO instance file with only the chosen images" in help_text
    assert "one symlink per other image (a copy where links are not possible)" in help_text
