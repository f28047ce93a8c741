"""``add_semantic_config(cfg)``: the keys of cardiac MRI segmentation (slices, volume evaluation, mixed
supervision, the LCC mean teacher); the U-Net's own keys are ``mmt_psm.networks.unet.add_unet_config``.

Defaults follow SSL4MIS/WSL4MIS where the papers are silent; nothing is switched on by them.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN


def add_semantic_config(cfg: CN) -> None:
    """Add the semantic keys to ``cfg`` in place (idempotent)."""
    if hasattr(cfg.MODEL, "LCC"):
        return
    # semantic_slice: resize every image to (H, W) for the network ((0, 0) keeps its size); predictions are
    # resized back to the original size for evaluation (SSL4MIS's zoom to 256 x 256)
    cfg.INPUT.FIXED_SIZE = (0, 0)
    # semantic_slice training: SSL4MIS's RandomGenerator (rot90 + flip with p 0.5, else rotation in +-ANGLE)
    cfg.INPUT.SLICE_AUGMENT = True
    cfg.INPUT.ROTATION_ANGLE = 20.0
    # volume evaluation (3D Dice / HD95): keep only each structure's largest 3D connected component per volume
    # before scoring (a common cardiac post-processing; SSL4MIS does not, hence off)
    cfg.TEST.VOLUME_LARGEST_COMPONENT = False

    # ---------------------------------------------------------------- mixed supervision (Dolz / Liu et al.)
    cfg.MODEL.MIXED_SUP = CN()
    cfg.MODEL.MIXED_SUP.STUDENT_ARCHITECTURE = "SemanticSegmentor"
    # KL(top || bottom) and bottom-head entropy on weak images (times SEMI's unsupervised weight w(t))
    cfg.MODEL.MIXED_SUP.KL_WEIGHT = 1.0
    cfg.MODEL.MIXED_SUP.ENTROPY_WEIGHT = 1.0
    # also train the bottom head with CE on the fully labeled images (beyond the paper)
    cfg.MODEL.MIXED_SUP.BOTTOM_FULL_LABELS = False

    # ---------------------------------------------------------------- LCC mean teacher (Gao & Yu)
    cfg.MODEL.LCC = CN()
    cfg.MODEL.LCC.STUDENT_ARCHITECTURE = "SemanticSegmentor"
    # low-confidence set: teacher max softmax < TAU; False = consistency on every pixel (plain Mean Teacher)
    cfg.MODEL.LCC.TAU = 0.9
    cfg.MODEL.LCC.LOW_CONF_ONLY = True
    # class separation: CE over cosine similarity to class prototypes / TEMPERATURE
    cfg.MODEL.LCC.SEPARATION = True
    cfg.MODEL.LCC.SEPARATION_WEIGHT = 1.0
    cfg.MODEL.LCC.TEMPERATURE = 0.1
    cfg.MODEL.LCC.PROTO_MOMENTUM = 0.99
    # beyond the paper, both off by default: 0 = separation (and prototypes) on the decoder's last features, as
    # described; > 0 = on a 1x1-conv projection (conv-ReLU-conv) of them to this width, so the separation
    # gradient does not reshape the classifier's input directly (the projection is training-only, not exported)
    cfg.MODEL.LCC.PROJECTION_DIM = 0
    # the separation term starts at this iteration (0 = with the consistency term), e.g. once the teacher's
    # pseudo-classes mean something; prototypes are tracked from the start either way
    cfg.MODEL.LCC.SEPARATION_START_ITER = 0
    # BatchNorm statistics of the student: "joint" = labeled + unlabeled images in one forward (SSL4MIS, the
    # paper); "labeled" = two forwards, the running statistics used at test time come from labeled images only
    cfg.MODEL.LCC.BN_STATS = "joint"
    # normaliser of the two unsupervised terms: "kept" = mean over the kept (low-confidence) pixels, as described
    # (with ~1-5 % of the pixels kept, each weighs 20-100x what it weighs in Mean Teacher's all-pixel mean);
    # "all" = their sum over every pixel of the image, so a kept pixel weighs what it does in Mean Teacher
    cfg.MODEL.LCC.LOSS_NORM = "kept"
    # teacher input noise (SSL4MIS): clamp(TEACHER_NOISE * N(0, 1), -NOISE_CLIP, NOISE_CLIP) in [0, 1] intensity units
    cfg.MODEL.LCC.TEACHER_NOISE = 0.1
    cfg.MODEL.LCC.NOISE_CLIP = 0.2
