"""PSM stages 1-3, 5 and the instance step on hand-made inputs with known answers."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from common import REPO
from psm_common import SCRATCH, he_tile

from mmt_psm.nuclei.instances import instances_from_probability
from mmt_psm.nuclei.pipeline.stages import refined_mask
from mmt_psm.nuclei.pseudo_masks import pseudo_mask
from mmt_psm.nuclei.self_activation import self_activation_map
from mmt_psm.nuclei.self_supervised import SelfSupervisedNet, rot180_l1_loss, train_self_supervised
from mmt_psm.nuclei.voronoi import detect_points, voronoi_labels


def _symmetric_net(seed: int = 0) -> SelfSupervisedNet:
    """A random net whose kernels are 180-degree symmetric: exactly rot180-equivariant (max-pool, no strides)."""
    torch.manual_seed(seed)
    net = SelfSupervisedNet((4, 8), blocks=2)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_((m.weight + torch.rot90(m.weight, 2, dims=(2, 3))) / 2)
    return net.eval()


def test_activation_map_shape_range_and_rot180():
    img, _ = he_tile((48, 64))
    net = _symmetric_net()
    act = self_activation_map(net, img)
    assert act.shape == (48, 64) and act.dtype == np.float32
    assert act.min() == pytest.approx(0.0) and act.max() == pytest.approx(1.0)
    # the scalar is rot180-invariant, so the map of the rotated image is the rotated map
    with torch.no_grad():
        assert float(rot180_l1_loss(net, torch.from_numpy(img).permute(2, 0, 1)[None].float())) < 1e-4
    rot = self_activation_map(net, np.ascontiguousarray(img[::-1, ::-1]))
    np.testing.assert_allclose(rot, act[::-1, ::-1], atol=1e-4)


def test_activation_map_tiling_and_odd_sizes():
    img, _ = he_tile((45, 37))
    act = self_activation_map(_symmetric_net(), img, tile=16)
    assert act.shape == (45, 37) and 0.0 <= act.min() and act.max() <= 1.0


def test_self_supervised_training_lowers_rot180_loss():
    img, _ = he_tile((64, 64))
    torch.manual_seed(1)
    crops = torch.from_numpy(np.stack([img, img[:, ::-1].copy()])).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        before = float(rot180_l1_loss(SelfSupervisedNet((4, 8)).eval(), crops))
    net = train_self_supervised([img], iters=30, crop=32, batch=4, lr=1e-2, channels=(4, 8), seed=1)
    assert not net.training
    with torch.no_grad():
        assert float(rot180_l1_loss(net, crops)) < max(before, 1e-3)


def test_pseudo_mask_finds_known_blobs():
    centres = ((20, 20), (20, 70), (70, 45))
    img, inst = he_tile((96, 96), centres, radius=9)
    yy, xx = np.mgrid[:96, :96]
    act = np.zeros((96, 96), np.float32)
    for cy, cx in centres:  # activation peaks on the nuclei, as a trained map would
        act = np.maximum(act, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 150.0))
    mask = pseudo_mask(img, act, min_object_size=20)
    assert np.array_equal(mask, pseudo_mask(img, act, min_object_size=20, beta=3.0, prior="darkness"))
    gt = inst > 0
    inter = (mask.astype(bool) & gt).sum()
    assert inter / gt.sum() > 0.9 and inter / mask.sum() > 0.9  # recall and precision
    small = img.copy()
    small[50:52, 5:7] = (80, 45, 135)  # a 4-pixel dark speck is removed as a small object
    assert pseudo_mask(small, act, min_object_size=20)[50:52, 5:7].sum() == 0


def test_pseudo_mask_of_blank_tile_is_empty():
    blank = np.full((32, 32, 3), 230, np.uint8)
    assert pseudo_mask(blank, np.zeros((32, 32), np.float32)).sum() == 0
    with pytest.raises(ValueError, match="differ in size"):
        pseudo_mask(blank, np.zeros((16, 32), np.float32))


def test_voronoi_labels_on_hand_placed_points():
    points = np.array([[10, 10], [10, 30]])
    lab = voronoi_labels(points, (21, 41), point_radius=2)
    assert set(np.unique(lab)) == {0, 1, 255}
    # the bisector x = 20 lies in a 2-pixel background band (the inner border of both Voronoi cells)
    assert ((lab[:, 19:22] == 0).sum(axis=1) == 2).all()
    assert lab[10, 10] == 1 and lab[10, 30] == 1 and lab[10, 12] == 1 and lab[12, 10] == 1  # dilated points
    assert lab[10, 13] == 255 and lab[0, 0] == 255  # the rest is ignored
    bg_cols = np.unique(np.nonzero(lab == 0)[1])
    assert set(bg_cols) <= {19, 20, 21}
    assert (voronoi_labels(np.zeros((0, 2)), (5, 5)) == 255).all()
    assert ((voronoi_labels(np.array([[2, 2]]), (5, 5)) == 0).sum()) == 0  # one point: no edges


def test_detect_points_and_instances():
    _, inst = he_tile((80, 80), ((20, 20), (20, 52), (60, 40)), radius=8)
    prob = (inst > 0).astype(np.float32)
    pts = detect_points(prob, sigma=2.0, min_distance=6, threshold=0.5)
    assert len(pts) == 3 and all(inst[r, c] > 0 for r, c in pts)
    assert sorted(inst[r, c] for r, c in pts) == [1, 2, 3]
    lab = instances_from_probability(prob, 0.5, min_size=10)
    assert lab.max() == 3
    # two touching disks: one component, split by the watershed from the points
    _, two = he_tile((60, 80), ((30, 28), (30, 44)), radius=9)
    p2 = (two > 0).astype(np.float32)
    assert instances_from_probability(p2, 0.5, 10).max() == 1
    ws = instances_from_probability(p2, 0.5, 10, watershed=True, points=np.array([[30, 28], [30, 44]]))
    assert ws.max() == 2 and ws[30, 28] != ws[30, 44]
    assert instances_from_probability(np.zeros((10, 10), np.float32)).max() == 0


def test_watershed_on_the_distance_surface_splits_touching_nuclei_at_their_neck():
    # two saturated touching disks (r 12, centres 22 px apart); one marker off-centre, as a blurred-probability
    # peak can be: flooding the flat probability lets the central marker take both disks, flooding the distance
    # to the background stops each marker's basin at the neck, so each disk's own pixels keep its marker's id
    yy, xx = np.mgrid[:60, :90]
    a = (yy - 30) ** 2 + (xx - 28) ** 2 <= 144
    b = (yy - 30) ** 2 + (xx - 50) ** 2 <= 144
    prob = (a | b).astype(np.float32)
    markers = np.array([[24, 28], [30, 50]])
    dist = instances_from_probability(prob, 0.5, 10, watershed=True, points=markers, sigma=4, surface="distance")
    assert dist.max() == 2
    assert np.all(dist[a & ~b] == dist[24, 28]) and np.all(dist[b & ~a] == dist[30, 50])
    assert dist[24, 28] != dist[30, 50]
    flat = instances_from_probability(prob, 0.5, 10, watershed=True, points=markers, sigma=4)
    assert flat.max() == 1
    with pytest.raises(ValueError, match="surface 'height'"):
        instances_from_probability(prob, 0.5, 10, watershed=True, points=markers, surface="height")


def test_refined_mask_bands_the_probability():
    prob = np.array([[0.1, 0.3, 0.5], [0.7, 0.9, 0.31]], np.float32)
    assert refined_mask(prob, 0.7, 0.3).tolist() == [[0, 0, 255], [1, 1, 255]]
    assert refined_mask(prob, 0.5, 0.49, ignore_value=9).tolist() == [[0, 0, 1], [1, 1, 0]]
    with pytest.raises(ValueError, match="need 0 <= BG < FG <= 1, got BG 0.6, FG 0.4"):
        refined_mask(prob, 0.4, 0.6)


def _stage1_cfg(iters: int = 2):


    from mmt_psm.config import load_config

    return load_config(os.path.join(REPO, "configs", "psm", "Base-PSM-UNet.yaml"),
                       SCRATCH + ["PSM.SELF_SUP.ITERS", iters, "PSM.SELF_SUP.CROP", 32, "PSM.SELF_SUP.BATCH", 2,
                                  "PSM.SELF_SUP.CHANNELS", (4, 8)])


def test_stage1_trains_and_loads_on_the_configured_device(tmp_path):
    """Stage 1 uses cfg.MODEL.DEVICE (resolved by load_config: the CPU here), trained or loaded, and stage 2's
    maps are computed with the network where it is."""
    from psm_common import write_tiles

    from mmt_psm.nuclei.pipeline.label_files import resolve_images
    from mmt_psm.nuclei.pipeline.stages import run_activation, run_self_supervised

    write_tiles(str(tmp_path / "tiles"), n=1, size=(48, 48))
    images = resolve_images(str(tmp_path / "tiles"))
    cfg = _stage1_cfg()
    device = torch.device(cfg.MODEL.DEVICE)
    folder = str(tmp_path / "labels")
    trained = run_self_supervised(images, folder, cfg, log=lambda m: None)
    assert {p.device for p in trained.parameters()} == {device}
    loaded = run_self_supervised(images, folder, cfg, log=lambda m: None)  # self_sup.pth exists now
    assert {p.device for p in loaded.parameters()} == {device}
    run_activation(images, folder, cfg, log=lambda m: None)
    assert (tmp_path / "labels" / "activation" / "tile0.png").is_file()


def test_stage1_honours_another_device(tmp_path, monkeypatch):
    """A device other than the CPU ('meta': no data, so the step is intercepted) is where the network and the crops
    of the training loop go, and where a saved network is loaded to."""
    from psm_common import write_tiles

    import mmt_psm.nuclei.self_supervised as self_supervised
    from mmt_psm.nuclei.pipeline.label_files import resolve_images
    from mmt_psm.nuclei.pipeline.stages import run_self_supervised

    write_tiles(str(tmp_path / "tiles"), n=1, size=(48, 48))
    images = resolve_images(str(tmp_path / "tiles"))
    cfg = _stage1_cfg()
    cfg.MODEL.DEVICE = "meta"
    seen = {}

    class Stop(Exception):
        pass

    def first_step(net, crops):
        seen.update(net={p.device for p in net.parameters()}, crops=crops.device)
        raise Stop

    monkeypatch.setattr(self_supervised, "rot180_l1_loss", first_step)
    with pytest.raises(Stop):
        run_self_supervised(images, str(tmp_path / "a"), cfg, log=lambda m: None)
    assert seen == {"net": {torch.device("meta")}, "crops": torch.device("meta")}

    monkeypatch.undo()
    cpu_cfg = _stage1_cfg()
    run_self_supervised(images, str(tmp_path / "b"), cpu_cfg, log=lambda m: None)  # writes b/self_sup.pth
    loaded = run_self_supervised(images, str(tmp_path / "b"), cfg, log=lambda m: None)
    assert {p.device for p in loaded.parameters()} == {torch.device("meta")}
