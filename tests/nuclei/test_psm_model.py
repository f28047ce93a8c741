"""PSMNucleiSegmentor: the combined loss against its formula, stage 4 (Voronoi weight 0), errors, inference."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from common import REPO
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from psm_common import SCRATCH

from mmt_psm.config import load_config
from mmt_psm.core.object_metrics import aji_counts, object_f1
from mmt_psm.nuclei.label_quality import mask_counts, pooled_quality, voronoi_counts
from mmt_psm.nuclei.metrics import (
    coco_mask_ap,
    image_scores,
    label_map_counts,
    paper_protocol_scores,
    summarize_scores,
)
from mmt_psm.nuclei.segmentor import PSMNucleiSegmentor


def tiny_psm_cfg(voronoi_weight: float = 1.5):
    cfg = load_config(os.path.join(REPO, "configs", "psm", "Base-PSM-UNet.yaml"))  # device resolved (CPU here)
    cfg.merge_from_list(SCRATCH + ["MODEL.UNET.CHANNELS", (4, 8, 16), "MODEL.UNET.DROPOUT", (0.0, 0.0, 0.0),
                         "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["res1", "res2", "res3"],
                         "MODEL.PSM.VORONOI_WEIGHT", voronoi_weight])
    return cfg


def _batch(n=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        sem = torch.randint(0, 2, (size, size), generator=g)
        sem[0] = 255
        vor = torch.full((size, size), 255, dtype=torch.long)
        vor[4:6, 4:6], vor[:, 10] = 1, 0
        out.append({"image": torch.rand(3, size, size, generator=g) * 255, "sem_seg": sem, "voronoi": vor})
    return out


def test_combined_loss_matches_formula():
    torch.manual_seed(0)
    model = build_model(tiny_psm_cfg())
    assert isinstance(model, PSMNucleiSegmentor)
    batch = _batch()
    with EventStorage():
        losses = model(batch)
    inner = model.segmentor
    x = torch.stack([(d["image"] - inner.pixel_mean) / inner.pixel_std for d in batch])
    logits = inner.sem_seg_head.decode(inner.backbone(x))[1]
    sem = torch.stack([d["sem_seg"] for d in batch])
    vor = torch.stack([d["voronoi"] for d in batch])
    ce = F.cross_entropy(logits, sem, ignore_index=255, reduction="none")
    expected_pseudo = ce[sem != 255].mean()
    ce_v = F.cross_entropy(logits, vor, ignore_index=255, reduction="none")
    expected_vor = 1.5 * ce_v[vor != 255].mean()
    torch.testing.assert_close(losses["loss_pseudo"], expected_pseudo, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["loss_voronoi"], expected_vor, rtol=1e-4, atol=1e-5)
    sum(losses.values()).backward()
    assert model.segmentor.sem_seg_head.predictor.weight.grad is not None


def test_stage4_needs_no_voronoi_and_stage6_requires_it():
    batch = _batch()
    for d in batch:
        del d["voronoi"]
    with EventStorage():
        losses = build_model(tiny_psm_cfg(0.0))(batch)
        assert set(losses) == {"loss_pseudo"}
        with pytest.raises(ValueError, match="no Voronoi labels"):
            build_model(tiny_psm_cfg(1.5))(batch)


def test_inference_returns_full_size_logits():
    model = build_model(tiny_psm_cfg()).eval()
    with torch.no_grad():
        (out,) = model([{"image": torch.rand(3, 21, 30) * 255, "height": 21, "width": 30}])
    assert out["sem_seg"].shape == (2, 21, 30)


def _random_maps(seed, size=40, n=6):
    rng = np.random.default_rng(seed)
    lab = np.zeros((size, size), np.int32)
    for i in range(1, n + 1):
        y, x = rng.integers(0, size - 8, 2)
        lab[y: y + rng.integers(3, 9), x: x + rng.integers(3, 9)] = i
    return lab


def test_label_map_metrics_equal_cell_metrics():
    for seed in range(5):
        gt, pred = _random_maps(seed), _random_maps(seed + 100)
        gm = [gt == v for v in np.unique(gt[gt > 0])]
        pm = [pred == v for v in np.unique(pred[pred > 0])]
        s = image_scores(gt, pred)
        assert (s["aji_c"], s["aji_u"]) == aji_counts(np.stack(gm), np.stack(pm))
        assert s["tp"] == object_f1(np.stack(gm), np.stack(pm)).tp
    inter, ga, pa = label_map_counts(np.array([[0, 1, 1], [2, 2, 0]]), np.array([[5, 5, 0], [0, 5, 9]]))
    assert inter.tolist() == [[1, 0], [1, 0]] and ga.tolist() == [2, 2] and pa.tolist() == [3, 1]


def test_summaries_paper_protocol_and_ap():
    gt = _random_maps(1, size=64)
    s = summarize_scores([image_scores(gt, gt), image_scores(gt, np.zeros_like(gt))])
    assert s["AJI"] == pytest.approx(0.5) and s["AJI_pooled"] == pytest.approx(0.5) and s["F1"] == 0.5
    two = np.zeros((20, 20), np.int32)
    two[2:6, 2:6], two[2:6, 6:10] = 1, 2  # touching GT nuclei: one connected component under the paper protocol
    merged = (two > 0).astype(np.int32)
    assert paper_protocol_scores(two, merged, size=20)["AJI"] == pytest.approx(1.0)
    assert image_scores(two, merged)["AJI"] < 1.0
    ids = np.unique(gt[gt > 0])
    assert coco_mask_ap([gt], [gt], [[1.0] * len(ids)])["AP"] == pytest.approx(100.0)


def test_label_quality_counts():
    gt = np.zeros((10, 10), np.uint16)
    gt[2:5, 2:5] = 1
    mask = np.zeros((10, 10), np.uint8)
    mask[2:5, 2:8] = 1
    q = pooled_quality([mask_counts(mask, gt)])
    assert q["precision"] == pytest.approx(0.5) and q["recall"] == pytest.approx(1.0)
    vor = np.full((10, 10), 255, np.uint8)
    vor[3, 3], vor[3, 7], vor[:, 9] = 1, 1, 0
    v = pooled_quality([voronoi_counts(vor, gt, np.array([[3, 3], [3, 7]]))])
    assert v["nucleus_label_precision"] == 0.5 and v["background_label_precision"] == 1.0
    assert v["point_precision"] == 0.5 and v["point_recall"] == 1.0


def test_score_labels_counts_only_the_nucleus_label_of_a_pseudo_mask(tmp_path):
    import cv2

    from mmt_psm.nuclei.pipeline.predict import score_labels

    gt = np.zeros((10, 10), np.uint16)
    gt[2:5, 2:5] = 1
    cv2.imwrite(str(tmp_path / "gt.png"), gt)
    mask = np.zeros((10, 10), np.uint8)
    mask[2:5, 2:8] = 1  # 9 px in the nucleus, 9 outside
    mask[7:9, :] = 255  # ignored pixels: neither nucleus nor background
    (tmp_path / "pseudo").mkdir()
    cv2.imwrite(str(tmp_path / "pseudo" / "a.png"), mask)
    q = score_labels([{"stem": "a", "instance_file_name": str(tmp_path / "gt.png")}], str(tmp_path), log=lambda m: None)
    assert q["pseudo_mask"]["precision"] == pytest.approx(0.5) and q["pseudo_mask"]["recall"] == pytest.approx(1.0)
