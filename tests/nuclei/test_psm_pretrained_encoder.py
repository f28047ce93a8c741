"""PSM stages 1, 4 and 6 on the ImageNet MobileNetV2 encoder by overrides only (configs/psm/Base-PSM-UNet.yaml
lists them): weights load (nothing of the encoder missing), one training step on tiny tiles, stage 6 still starts
from stage 4 when MODEL.WEIGHTS is among the pipeline's overrides, stage 1's pretrained trunk and its Grad-CAM."""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from common import REPO
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from mobilenet_common import ENCODER, IMAGENET_MEAN, IMAGENET_STD, REAL, unet_unused, write_checkpoint
from psm_common import SCRATCH, he_tile, write_tiles
from torch import nn

import mmt_psm.nuclei  # noqa: F401  (registers PSMNucleiSegmentor)
from mmt_psm.config import load_config
from mmt_psm.core.checkpoint import AtomicCheckpointer
from mmt_psm.networks.mobilenet import MobileNetV2UNetEncoder
from mmt_psm.networks.unet import UNetEncoder
from mmt_psm.nuclei.pipeline.label_files import resolve_images
from mmt_psm.nuclei.pipeline.stages import run_activation, run_self_supervised
from mmt_psm.nuclei.self_activation import grad_cam_raw, self_activation_map
from mmt_psm.nuclei.self_supervised import MobileNetV2SelfSupervisedNet, SelfSupervisedNet, build_self_supervised_net

PSM = os.path.join(REPO, "configs", "psm")
STAGE1 = ["PSM.SELF_SUP.ENCODER", "mobilenet_v2", "PSM.SELF_SUP.ITERS", 2, "PSM.SELF_SUP.CROP", 32,
          "PSM.SELF_SUP.BATCH", 2]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """The real ImageNet checkpoint when it was written, else a stand-in with its keys (tests/mobilenet_common.py)."""
    if os.path.isfile(REAL):
        return REAL
    path = str(tmp_path_factory.mktemp("weights") / "mobilenet_v2_imagenet.pth")
    write_checkpoint(path)
    return path


def overrides(weights: str) -> list:
    """What the Base-PSM-UNet.yaml comment tells users to pass (ImageNet statistics included)."""
    return ["MODEL.BACKBONE.NAME", ENCODER, "MODEL.WEIGHTS", weights, "MODEL.PIXEL_MEAN", IMAGENET_MEAN,
            "MODEL.PIXEL_STD", IMAGENET_STD]


def _trunk(weights: str) -> dict:
    state = torch.load(weights, weights_only=True)["model"]
    return {k: v for k, v in state.items() if k not in unet_unused(state)}


def _batch(n: int = 2, size: int = 32):
    """Tiles as the psm_nuclei mapper gives them: RGB 0-255, pseudo mask and Voronoi labels."""
    out = []
    for i in range(n):
        img, inst = he_tile((size, size), ((10, 10), (22, 20)), radius=5, seed=i)
        vor = torch.full((size, size), 255, dtype=torch.long)
        vor[10, 10], vor[22, 20], vor[:, 16] = 1, 1, 0
        out.append({"image": torch.as_tensor(img).permute(2, 0, 1).float(),
                    "sem_seg": torch.as_tensor(inst > 0, dtype=torch.long), "voronoi": vor})
    return out


def test_the_configs_default_is_the_encoder_and_the_documented_overrides_restore_the_scratch_networks():
    """configs/psm/ trains the ImageNet MobileNetV2 in stages 1, 4 and 6 by default; the overrides its comment
    states (tests/psm_common.py SCRATCH) give the from-scratch U-Net and stage-1 ResNet back."""
    base = os.path.join(PSM, "Base-PSM-UNet.yaml")
    for name in ("Base-PSM-UNet", "detection", "segmentation"):
        cfg = load_config(os.path.join(PSM, f"{name}.yaml"))
        assert cfg.MODEL.BACKBONE.NAME == ENCODER and cfg.MODEL.WEIGHTS == "pretrained/mobilenet_v2_imagenet.pth"
        assert list(cfg.MODEL.PIXEL_MEAN) == pytest.approx(IMAGENET_MEAN) and cfg.PSM.SELF_SUP.ENCODER == "mobilenet_v2"
    text = " ".join(open(base).read().replace("#", " ").split())  # the comment, as one line
    assert " ".join(f'"{v}"' if v == "" or v.startswith("[") else v for v in SCRATCH) in text
    scratch = load_config(base, SCRATCH + ["PSM.SELF_SUP.CHANNELS", (4, 8)])
    assert isinstance(build_self_supervised_net(scratch), SelfSupervisedNet)
    model = build_model(load_config(base, SCRATCH + ["MODEL.UNET.CHANNELS", (4, 8, 16), "MODEL.UNET.DROPOUT",
                                                     (0.0, 0.0, 0.0), "MODEL.SEM_SEG_HEAD.IN_FEATURES",
                                                     ["res1", "res2", "res3"]]))
    assert isinstance(model.segmentor.backbone, UNetEncoder)
    assert model.segmentor.pixel_mean.flatten().tolist() == pytest.approx([170.0, 120.0, 165.0])


@pytest.mark.parametrize("stage", ["detection", "segmentation"])
def test_stages_4_and_6_load_and_train_the_pretrained_encoder(stage, weights):
    cfg = load_config(os.path.join(PSM, f"{stage}.yaml"), overrides(weights))
    torch.manual_seed(0)
    model = build_model(cfg)
    seg = model.segmentor
    assert isinstance(seg.backbone, MobileNetV2UNetEncoder) and seg.backbone.body.in_channels == 3
    assert seg.pixel_mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    ckpt = AtomicCheckpointer(model)  # train_net's checkpointer, MODEL.WEIGHTS as it loads them
    inc = ckpt._load_model(ckpt._load_file(weights))
    assert not [k for k in inc.missing_keys if k.startswith("segmentor.backbone.body.")], inc.missing_keys
    loaded = seg.backbone.body.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in _trunk(weights).items())
    with EventStorage():
        losses = model.train()(_batch())
    assert set(losses) == ({"loss_pseudo"} if stage == "detection" else {"loss_pseudo", "loss_voronoi"})
    assert all(math.isfinite(v.item()) and v.item() > 0 for v in losses.values())
    sum(losses.values()).backward()
    convs = [m.weight for m in seg.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.requires_grad and bool(w.grad.abs().sum() > 0) for w in convs)  # Base-PSM-UNet: FREEZE_AT 0


def test_stage6_starts_from_stage4_when_the_overrides_hold_model_weights(tmp_path, monkeypatch):
    """tools/psm_pipeline.py passes its overrides to stages 4 and 6: the ImageNet MODEL.WEIGHTS among them
    initialises stage 4, while stage 6 still loads stage 4's network (--seg-from-scratch: ImageNet)."""
    spec = importlib.util.spec_from_file_location("psm_pipeline", os.path.join(REPO, "tools", "psm_pipeline.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    seen = []
    monkeypatch.setattr(tool, "launch", lambda main, n, **kw: seen.append(kw["args"][0]))
    opts = [str(o) for o in overrides("pretrained/mobilenet_v2_imagenet.pth")]
    det = str(tmp_path / "detection" / "model_final.pth")
    tool.train(os.path.join(PSM, "detection.yaml"), str(tmp_path / "detection"), str(tmp_path), 2, opts)
    tool.train(os.path.join(PSM, "segmentation.yaml"), str(tmp_path / "seg"), str(tmp_path), 2, opts, init=det)
    tool.train(os.path.join(PSM, "segmentation.yaml"), str(tmp_path / "seg2"), str(tmp_path), 2, opts)
    got = [load_config(a.config_file, a.opts) for a in seen]
    assert [c.MODEL.WEIGHTS for c in got] == ["pretrained/mobilenet_v2_imagenet.pth", det,
                                              "pretrained/mobilenet_v2_imagenet.pth"]
    assert all(c.MODEL.BACKBONE.NAME == ENCODER for c in got)


def test_stage1_trains_loads_and_maps_with_the_pretrained_trunk(tmp_path, weights):
    """PSM.SELF_SUP.ENCODER mobilenet_v2: the trunk comes from MODEL.WEIGHTS (only the scalar head is new), stage 1
    trains it and saves it, a rerun loads the same network, stage 2 writes activation maps with it."""
    cfg = load_config(os.path.join(PSM, "Base-PSM-UNet.yaml"), overrides(weights) + STAGE1)
    net = build_self_supervised_net(cfg)
    assert isinstance(net, MobileNetV2SelfSupervisedNet)
    loaded = net.body.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in _trunk(weights).items())  # features 0-13
    assert net.pixel_mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    write_tiles(str(tmp_path / "tiles"), n=1, size=(48, 48))
    images = resolve_images(str(tmp_path / "tiles"))
    folder = str(tmp_path / "labels")
    trained = run_self_supervised(images, folder, cfg, log=lambda m: None)
    assert isinstance(trained, MobileNetV2SelfSupervisedNet) and not trained.training
    again = run_self_supervised(images, folder, cfg, log=lambda m: None)  # self_sup.pth exists now
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), again.state_dict().values()))
    run_activation(images, folder, cfg, log=lambda m: None)
    assert (tmp_path / "labels" / "activation" / "tile0.png").is_file()
    scratch = load_config(os.path.join(PSM, "Base-PSM-UNet.yaml"), overrides(weights) + ["PSM.SELF_SUP.ENCODER",
                                                                                      "scratch"])
    with pytest.raises(ValueError, match="another stage-1 network than PSM.SELF_SUP.ENCODER 'scratch'"):
        run_self_supervised(images, folder, scratch, log=lambda m: None)


@pytest.mark.parametrize("freeze_at", [0, 1])
def test_stage1_grad_cam_on_the_pretrained_stem(weights, freeze_at):
    """Grad-CAM on features 0-1 (stride 2): an un-constant map in [0, 1] of the input size, also where
    MODEL.BACKBONE.FREEZE_AT freezes those layers (their activations need no parameter gradient)."""
    cfg = load_config(os.path.join(PSM, "Base-PSM-UNet.yaml"),
                      overrides(weights) + STAGE1 + ["MODEL.BACKBONE.FREEZE_AT", freeze_at])
    net = build_self_supervised_net(cfg).eval()
    assert all(p.requires_grad != (freeze_at == 1) for m in net.cam_layers() for p in m.parameters())
    img, _ = he_tile((40, 56))
    raw = grad_cam_raw(net, torch.from_numpy(img).permute(2, 0, 1).float())
    assert raw.shape == (40, 56) and bool(raw.max() > 0)
    act = self_activation_map(net, img, tile=32)
    assert act.shape == (40, 56) and act.min() == pytest.approx(0.0) and act.max() == pytest.approx(1.0)


def test_stage1_encoder_errors(tmp_path, weights):
    base = os.path.join(PSM, "Base-PSM-UNet.yaml")
    with pytest.raises(ValueError, match="PSM.SELF_SUP.ENCODER must be one of"):
        build_self_supervised_net(load_config(base, ["PSM.SELF_SUP.ENCODER", "resnet"]))
    with pytest.raises(ValueError, match="MODEL.WEIGHTS, which is empty"):
        build_self_supervised_net(load_config(base, STAGE1 + ["MODEL.WEIGHTS", ""]))
    other = tmp_path / "other.pth"  # a checkpoint without the trunk (e.g. another network's)
    torch.save({"model": {"fc.weight": torch.zeros(1, 96)}}, str(other))
    with pytest.raises(ValueError, match=r"lacks \d+ MobileNetV2 trunk tensors"):
        build_self_supervised_net(load_config(base, STAGE1 + ["MODEL.WEIGHTS", str(other)]))
    with pytest.raises(FileNotFoundError, match="prepare_pretrained"):
        build_self_supervised_net(load_config(base, STAGE1 + ["MODEL.WEIGHTS", str(tmp_path / "none.pth")]))
