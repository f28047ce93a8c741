"""ACDC converter, patient splits, registration and bad inputs."""
import glob
import json
import os
import shutil

import cv2
import h5py
import numpy as np
import pytest
from common import (
    REPO,  # noqa: E402
    SHARED_DATA,
)
from detectron2.data import DatasetCatalog, MetadataCatalog
from semantic_common import tiny_acdc, write_h5_slices

from mmt_psm.semantic.acdc import IGNORE_VALUE, convert_acdc, make_patient_split, read_patient_split

ACDC = os.path.join(SHARED_DATA, "cardiac", "acdc_slices")


@pytest.mark.skipif(not os.path.isdir(ACDC), reason=f"real ACDC slices not found at {ACDC}")
def test_convert_real_slices_renamed_patient(tmp_path):
    """A few real slices, under a patient number the converter never saw: counts, values, ignore, volumes."""
    src = tmp_path / "src"
    src.mkdir()
    files = sorted(glob.glob(os.path.join(ACDC, "patient001_frame01_slice_*.h5")))[:3]
    files += sorted(glob.glob(os.path.join(ACDC, "patient001_frame12_slice_*.h5")))[:2]
    for f in files:
        shutil.copy(f, src / os.path.basename(f).replace("patient001", "patient777"))
    index = convert_acdc(str(src), str(tmp_path / "out"), seeds=(), num_labeled=1)
    slices = index["slices"]
    assert len(slices) == 5
    assert {s["volume"] for s in slices} == {"patient777_frame01", "patient777_frame12"}
    assert [s["slice"] for s in slices if s["volume"] == "patient777_frame01"] == [0, 1, 2]
    for s, f in zip(slices, sorted(files, key=lambda p: ("frame12" in p, p))):
        with h5py.File(f) as h:
            label, scribble, image = h["label"][()], h["scribble"][()], h["image"][()]
        out_label = cv2.imread(str(tmp_path / "out" / s["label"]), cv2.IMREAD_UNCHANGED)
        out_scr = cv2.imread(str(tmp_path / "out" / s["scribble"]), cv2.IMREAD_UNCHANGED)
        out_img = cv2.imread(str(tmp_path / "out" / s["image"]), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(out_label, label)
        assert set(np.unique(out_label)) <= {0, 1, 2, 3}
        np.testing.assert_array_equal(out_scr == IGNORE_VALUE, scribble == 4)
        np.testing.assert_array_equal(out_scr[scribble != 4], scribble[scribble != 4])
        assert out_img.dtype == np.uint16
        assert np.abs(out_img / 65535.0 - image).max() < 1e-4
        assert s["scribble_pixels"] == int((scribble != 4).sum()) > 0


def test_patient_split_seeded_and_fixed_test_patients():
    patients = [f"patient{i:03d}" for i in (1, 2, 3, 4, 21, 22, 23, 24, 41, 42, 43, 44, 61, 62, 63, 64, 81, 82, 83, 84)]
    a, b = make_patient_split(patients, 3, seed=1), make_patient_split(patients, 3, seed=1)
    assert a == b
    assert a["test_patients"] == ["patient004", "patient024", "patient044", "patient064", "patient084"]
    assert len(a["labeled_patients"]) == 3 and len(a["weak_patients"]) == 12
    assert not set(a["labeled_patients"]) & set(a["test_patients"])
    assert make_patient_split(patients, 3, seed=2)["labeled_patients"] != a["labeled_patients"]
    with pytest.raises(ValueError, match="cannot label 16 of 15"):
        make_patient_split(patients, 16, seed=1)


def test_registration_roles_and_metadata(tmp_path):
    out = tiny_acdc(str(tmp_path), prefix="regacdc")
    split = read_patient_split(os.path.join(out, "splits", "p3_seed1.json"))
    assert split["test_patients"] == ["patient103", "patient107"]
    lab = DatasetCatalog.get("regacdc_p3_seed1_labeled")
    scr = DatasetCatalog.get("regacdc_p3_seed1_scribble")
    unl = DatasetCatalog.get("regacdc_p3_seed1_unlabeled")
    test = DatasetCatalog.get("regacdc_test")
    assert {d["patient"] for d in lab} == set(split["labeled_patients"]) and len(lab) == 3 * 6
    assert {d["patient"] for d in scr} == set(split["weak_patients"])
    assert all("scribbles" in d["sem_seg_file_name"] for d in scr)
    assert all("sem_seg_file_name" not in d for d in unl) and len(unl) == len(scr)
    assert {d["patient"] for d in test} == {"patient103", "patient107"}
    assert len(DatasetCatalog.get("regacdc_train")) == 6 * 6
    meta = MetadataCatalog.get("regacdc_test")
    assert meta.evaluator_type == "sem_seg_volume" and meta.ignore_label == 255
    assert meta.stuff_classes == ["background", "RV", "Myo", "LV"]


def test_missing_prepared_data_names_the_prepare_command(tmp_path):
    from mmt_psm.semantic.acdc_datasets import register_all_acdc

    register_all_acdc(str(tmp_path / "nowhere"), prefix="missingacdc")
    with pytest.raises(FileNotFoundError, match="prepare_acdc.py"):
        DatasetCatalog.get("missingacdc_test")


def _one_bad(tmp_path, mutate):
    src = tmp_path / "bad"
    write_h5_slices(str(src), ["patient201"], slices=2)
    mutate(src)
    return src


def test_missing_key_names_file_and_key(tmp_path):
    def drop(src):
        with h5py.File(src / "patient201_frame01_slice_1.h5", "a") as f:
            del f["scribble"]
    src = _one_bad(tmp_path, drop)
    with pytest.raises(ValueError, match=r"patient201_frame01_slice_1\.h5: missing HDF5 key\(s\) \['scribble'\]"):
        convert_acdc(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing written for a bad input set


def test_label_out_of_range_and_shape_mismatch(tmp_path):
    def bad_label(src):
        with h5py.File(src / "patient201_frame10_slice_0.h5", "a") as f:
            lab = f["label"][()]
            lab[0, 0] = 7
            f["label"][...] = lab
    with pytest.raises(ValueError, match=r"frame10_slice_0\.h5: label values \[7\] outside 0\.\.3"):
        convert_acdc(str(_one_bad(tmp_path / "a", bad_label)), str(tmp_path / "out"))

    def bad_shape(src):
        with h5py.File(src / "patient201_frame01_slice_0.h5", "a") as f:
            del f["label"]
            f.create_dataset("label", data=np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="must be 2D of one shape"):
        convert_acdc(str(_one_bad(tmp_path / "b", bad_shape)), str(tmp_path / "out"))


def test_patient_with_slices_of_different_sizes(tmp_path):
    src = tmp_path / "sizes"
    write_h5_slices(str(src), ["patient301"], slices=1, size=(40, 48))
    write_h5_slices(str(tmp_path / "other"), ["patient301"], slices=2, size=(44, 48))
    shutil.copy(tmp_path / "other" / "patient301_frame01_slice_1.h5", src / "patient301_frame01_slice_1.h5")
    with pytest.raises(ValueError, match="patient patient301 has slices of different sizes: 40x48 .*44x48"):
        convert_acdc(str(src), str(tmp_path / "out"))


def test_empty_scribble_is_kept_and_counted(tmp_path):
    def empty(src):
        with h5py.File(src / "patient201_frame01_slice_0.h5", "a") as f:
            f["scribble"][...] = 4
    index = convert_acdc(str(_one_bad(tmp_path, empty)), str(tmp_path / "out"), seeds=(), num_labeled=1)
    rec = next(s for s in index["slices"] if s["stem"] == "patient201_frame01_slice_0")
    assert rec["scribble_pixels"] == 0
    scr = cv2.imread(str(tmp_path / "out" / rec["scribble"]), cv2.IMREAD_UNCHANGED)
    assert (scr == IGNORE_VALUE).all()
    assert len(index["slices"]) == 4


def test_bad_split_file(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"labeled_patients": ["a"], "weak_patients": ["a"], "test_patients": []}))
    with pytest.raises(ValueError, match="patient a is in both labeled_patients and weak_patients"):
        read_patient_split(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_patient_split(str(path))


def test_make_splits_patient_mode_matches_prepared_split(tmp_path):
    import runpy

    out = tiny_acdc(str(tmp_path), prefix="splitacdc")
    tool = runpy.run_path(os.path.join(REPO, "tools", "make_splits.py"))
    target = str(tmp_path / "p3_seed2.json")
    tool["main"](["--patients", out, "--count", "3", "--seed", "2", "--output", target])
    assert read_patient_split(target) == read_patient_split(os.path.join(out, "splits", "p3_seed2.json"))
    tool["main"](["--patients", out, "--count", "2", "--seed", "5", "--test-patients", "patient100",
                  "--output", target])
    split = read_patient_split(target)
    assert split["test_patients"] == ["patient100"] and len(split["labeled_patients"]) == 2
    assert len(split["weak_patients"]) == 5
