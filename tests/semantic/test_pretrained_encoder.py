"""Every configs/acdc/*.yaml with the ImageNet MobileNetV2 U-Net encoder by two overrides (MODEL.BACKBONE.NAME,
MODEL.WEIGHTS): the weights load through the project's checkpointer into every encoder (student and teacher),
one training step on tiny slices has finite losses and trains the encoder, BN_STATS labeled and the class
separation work on it, and the reported model exports to a plain SemanticSegmentor."""
from __future__ import annotations

import copy
import glob
import json
import math
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from common import REPO
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage
from mobilenet_common import ENCODER, PREDICT, REAL, needs_real, unet_unused, write_checkpoint
from semantic_common import heart_slice
from torch import nn

import mmt_psm.semantic  # noqa: F401  (registers the meta-architectures)
from mmt_psm.config import load_config
from mmt_psm.core.checkpoint import AtomicCheckpointer
from mmt_psm.networks.mobilenet import MobileNetV2UNetEncoder
from mmt_psm.networks.unet import channels_last_on_cpu
from mmt_psm.semantic.common import segment, segment_split

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "acdc", "*.yaml")))
LCC = os.path.join(REPO, "configs", "acdc", "lcc_mean_teacher.yaml")
SIZE = 32


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """The real ImageNet checkpoint when it was written, else a stand-in with its keys (tests/mobilenet_common.py):
    ``test_real_checkpoint_fills_every_encoder`` says which, by being skipped or not."""
    if os.path.isfile(REAL):
        return REAL
    path = str(tmp_path_factory.mktemp("weights") / "mobilenet_v2_imagenet.pth")
    write_checkpoint(path)
    return path


def _cfg(config: str, weights: str, *opts):
    return load_config(config, ["MODEL.BACKBONE.NAME", ENCODER, "MODEL.WEIGHTS", weights, *opts])


def _load(model: nn.Module, path: str):
    """``MODEL.WEIGHTS`` through the project's checkpointer, as train_net loads it (``resume_or_load`` ->
    ``load``); the incompatible keys."""
    ckpt = AtomicCheckpointer(model)
    return ckpt._load_model(ckpt._load_file(path))


def _encoders(model: nn.Module):
    """{state-dict prefix: U-Net encoder} of every segmentor in the model."""
    if hasattr(model, "teacher_student_pairs"):
        return {"student.": model.student.backbone, "teacher.": model.teacher.backbone}
    return {"": model.backbone}


def _batch(n_lab: int, n_weak: int, weak_labels: bool, seed: int = 0):
    """Slices as the semantic_slice mapper gives them (1 x SIZE x SIZE in 0-255); weak ones with their scribbles
    (mixed supervision) or without any map (mean teachers)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_lab + n_weak):
        s = heart_slice(SIZE, SIZE, rng)
        d = {"image": torch.as_tensor(s["image"] * 255.0)[None], "labeled": i < n_lab, "height": SIZE,
             "width": SIZE}
        if i < n_lab:
            d["sem_seg"] = torch.as_tensor(s["label"], dtype=torch.long)
        elif weak_labels:
            d["sem_seg"] = torch.as_tensor(np.where(s["scribble"] == 4, 255, s["scribble"]), dtype=torch.long)
        out.append(d)
    return out


def _step(model: nn.Module, cfg):
    """One training forward at the end of the ramp-up (unsupervised terms at full weight): the losses."""
    meta = cfg.MODEL.META_ARCHITECTURE
    semi = meta != "SemanticSegmentor"
    batch = _batch(2, 2 if semi else 0, meta == "MixedSupervisionSegmentor")
    with EventStorage(max(cfg.SEMI.RAMP_UP_ITERS, cfg.SEMI.BURN_IN_ITERS)):
        return model.train()(batch)


def _check_loaded(model: nn.Module, inc, state) -> None:
    used = {k: v for k, v in state.items() if k not in unet_unused(state)}
    for prefix, enc in _encoders(model).items():
        assert isinstance(enc, MobileNetV2UNetEncoder), type(enc)
        assert not [k for k in inc.missing_keys if k.startswith(f"{prefix}backbone.body.")], inc.missing_keys
        loaded = enc.body.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in used.items()), prefix


@pytest.mark.parametrize("config, freeze_at", [(c, 0) for c in CONFIGS] + [(LCC, 2)],
                         ids=[os.path.basename(c)[:-5] for c in CONFIGS] + ["lcc_mean_teacher-freeze2"])
def test_acdc_config_loads_and_trains_the_pretrained_encoder(config, freeze_at, weights):
    """Weights in every encoder (student AND teacher), finite losses, gradients in every trainable encoder
    parameter (FREEZE_AT 2: none in features 0-3, which are not trainable), none in an EMA teacher; LCC's
    separation term has prototypes and reaches the encoder through the decoder features."""
    cfg = _cfg(config, weights, "MODEL.BACKBONE.FREEZE_AT", freeze_at)
    torch.manual_seed(0)
    model = build_model(cfg)
    _check_loaded(model, _load(model, weights), torch.load(weights, weights_only=True)["model"])
    losses = _step(model, cfg)
    assert losses and all(math.isfinite(v.item()) for v in losses.values()), losses
    encoders = _encoders(model)
    encoder = encoders["student."] if "student." in encoders else encoders[""]
    if cfg.MODEL.META_ARCHITECTURE == "MixedSupervisionSegmentor":
        assert model.teacher.backbone is model.student.backbone  # both heads train one encoder
    convs = [m.weight for m in encoder.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
    if cfg.MODEL.META_ARCHITECTURE == "LCCMeanTeacherSegmentor" and cfg.MODEL.LCC.SEPARATION:
        assert losses["loss_separation"].item() > 0 and model.prototypes_initialized.any()
        grads = torch.autograd.grad(losses["loss_separation"], convs, retain_graph=True, allow_unused=True)
        assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(convs) // 2
    elif cfg.MODEL.META_ARCHITECTURE == "LCCMeanTeacherSegmentor":  # mean_teacher.yaml: no separation term
        assert losses["loss_separation"].item() == 0.0 and losses["loss_consistency"].item() > 0
    sum(losses.values()).backward()
    frozen = {f"body.features.{i}." for i in range(4)} if freeze_at == 2 else set()
    for name, p in encoder.named_parameters():
        is_frozen = any(name.startswith(f) for f in frozen)
        assert p.requires_grad != is_frozen, name
        assert (p.grad is None) == is_frozen, name
    assert all(bool(w.grad.abs().sum() > 0) for w in convs)
    if hasattr(model, "teacher_student_pairs") and model.teacher_student_pairs():
        assert all(p.grad is None for p in model.teacher.parameters())


@needs_real
def test_real_checkpoint_fills_every_encoder():
    """The file tools/prepare_pretrained.py writes (not a stand-in) into the mean teacher: nothing of the encoder
    missing in student or teacher."""
    cfg = _cfg(LCC, REAL)
    model = build_model(cfg)
    _check_loaded(model, _load(model, REAL), torch.load(REAL, weights_only=True)["model"])


def _running(m: nn.Module):
    return [t.clone() for n, t in m.state_dict().items() if "running_" in n or "num_batches_tracked" in n]


def test_bn_stats_labeled_with_the_pretrained_encoder(weights):
    """BN_STATS labeled on the MobileNetV2 encoder: the labeled half's outputs and every BatchNorm's running
    statistics (encoder included) equal a forward of the labeled slices alone; "joint" mixes both kinds."""
    cfg = _cfg(LCC, weights, "MODEL.LCC.BN_STATS", "labeled")
    model = build_model(cfg)
    _load(model, weights)
    assert model.bn_stats == "labeled"
    student = model.student.train()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in student.backbone.body.modules()) > 30
    torch.manual_seed(0)
    x = torch.randn(4, 1, SIZE, SIZE)
    x[2:] = x[2:] * 3.0 + 2.0  # the "unlabeled" half has other statistics
    images = ImageList(x, [(SIZE, SIZE)] * 4)
    ref, joint = copy.deepcopy(student), copy.deepcopy(student)
    feats, logits = segment_split(student, images, 2, "labeled")
    ref_feats, ref_logits = segment(ref, ImageList(x[:2], [(SIZE, SIZE)] * 2))
    _, unl_logits = segment(copy.deepcopy(student), ImageList(x[2:], [(SIZE, SIZE)] * 2))
    assert torch.allclose(logits[:2], ref_logits, atol=1e-5) and torch.allclose(feats[:2], ref_feats, atol=1e-5)
    assert torch.allclose(logits[2:], unl_logits, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(_running(student), _running(ref)))
    segment_split(joint, images, 2, "joint")
    assert not all(torch.allclose(a, b) for a, b in zip(_running(joint), _running(ref)))
    assert all(m.momentum == 0.1 for m in student.modules() if isinstance(m, nn.BatchNorm2d))
    losses = _step(model, cfg)
    assert all(math.isfinite(v.item()) for v in losses.values()) and losses["loss_separation"].item() > 0




def test_mean_teacher_with_the_encoder_exports_to_a_plain_segmentor(weights, tmp_path):
    """tools/export_teacher.py on an LCC run with the encoder (a non-default MODEL.MOBILENET.UNET_STEM_CHANNELS,
    which the exported config must carry): Detectron2's DefaultPredictor, in a process that loads mobilenet.py and
    unet.py only, gives the teacher's logits."""
    cfg = _cfg(LCC, weights, "MODEL.MOBILENET.UNET_STEM_CHANNELS", 8, "INPUT.FIXED_SIZE", (SIZE, SIZE),
               "OUTPUT_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = build_model(cfg)
    _load(model, weights)
    _step(model, cfg)  # the student's BatchNorm statistics move; the teacher keeps the loaded weights
    with torch.no_grad():
        for t, s in zip(model.teacher.parameters(), model.student.parameters()):
            t.copy_(0.5 * t + 0.5 * s)  # a teacher that is neither the checkpoint nor the student
    torch.save({"model": model.state_dict()}, str(tmp_path / "model_final.pth"))
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    (tmp_path / "config.yaml").write_text(cfg.dump())
    assert runpy.run_path(os.path.join(REPO, "tools", "export_teacher.py"))["main"]([str(tmp_path)]) == 0
    image = torch.as_tensor(_batch(1, 0, False, seed=3)[0]["image"])
    with torch.no_grad():
        expected = model.eval()([{"image": image, "height": SIZE, "width": SIZE}])[0]["sem_seg"]
    np.save(tmp_path / "image.npy", image.numpy().transpose(1, 2, 0))
    net = os.path.join(REPO, "mmt_psm", "networks")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", PREDICT, os.path.join(net, "mobilenet.py"), os.path.join(net, "unet.py"),
                        str(tmp_path / "config_teacher.yaml"), str(tmp_path / "image.npy")],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["mmt_psm"] is False
    np.testing.assert_allclose(np.array(got["logits"]), expected.numpy(), atol=1e-4)


@pytest.mark.parametrize("backbone", ["build_unet_backbone", ENCODER])
def test_unet_parameters_are_channels_last_on_the_cpu(backbone):
    """On the CPU both U-Net encoders and the UNetHead hold NHWC parameters (faster oneDNN kernels: see
    channels_last_on_cpu), with the logits and losses of the default layout up to float rounding; elsewhere the
    layout is left alone."""
    cfg = load_config(os.path.join(REPO, "configs", "acdc", "mixed_supervision.yaml"),
                      ["MODEL.BACKBONE.NAME", backbone, "MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg)
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)  # the 3x3 kernels are NHWC, not NCHW
    nchw = copy.deepcopy(model)
    for p in nchw.parameters():
        p.data = p.data.contiguous()
    batch = _batch(2, 2, True)
    with EventStorage(cfg.SEMI.RAMP_UP_ITERS):
        got, ref = model.train()(batch), nchw.train()(batch)
    assert all(got[k].item() == pytest.approx(ref[k].item(), rel=1e-4, abs=1e-6) for k in ref)
    with torch.no_grad():
        a, b = (m.eval()([{"image": batch[0]["image"], "height": SIZE, "width": SIZE}])[0]["sem_seg"]
                for m in (model, nchw))
    assert torch.allclose(a, b, atol=1e-4)
    head = copy.deepcopy(nchw.student.sem_seg_head)
    assert channels_last_on_cpu(head, "cuda") is head and all(p.is_contiguous() for p in head.parameters())
