"""``add_nuclei_config(cfg)``: the keys of PSM label-free nuclei segmentation (Chen et al., prior self-activation).

``MODEL.PSM`` configures the meta-architecture (stages 4 and 6); ``PSM.*`` the stage tools (1-3, 5) and the
instance post-processing; ``INPUT.PSM_CROP_SIZE`` the ``psm_nuclei`` mapper. Defaults follow the paper / the
authors' code (cpystan/PSM) where they say something; nothing here switches anything on for other models.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN


def add_nuclei_config(cfg: CN) -> None:
    """Add the PSM keys to ``cfg`` in place (idempotent)."""
    if hasattr(cfg, "PSM"):
        return
    cfg.MODEL.PSM = CN()
    # the inner network (a plain Detectron2 semantic model whose head has decode(), e.g. the U-Net)
    cfg.MODEL.PSM.SEGMENTOR_ARCHITECTURE = "SemanticSegmentor"
    # loss = PSEUDO_WEIGHT * CE(pseudo mask) + VORONOI_WEIGHT * CE(Voronoi labels) (paper: 1 and 1.5);
    # stage 4 (detection network) = VORONOI_WEIGHT 0
    cfg.MODEL.PSM.PSEUDO_WEIGHT = 1.0
    cfg.MODEL.PSM.VORONOI_WEIGHT = 1.5
    # psm_nuclei mapper: random square training crop (pixels; 0 = whole image) + random rot90/flips
    cfg.INPUT.PSM_CROP_SIZE = 256

    cfg.PSM = CN()
    # ---- stage 1: self-supervised scalar network, f(x) = f(rot180(x)) with L1, Adam, random crops
    cfg.PSM.SELF_SUP = CN()
    cfg.PSM.SELF_SUP.ITERS = 300
    cfg.PSM.SELF_SUP.CROP = 128
    cfg.PSM.SELF_SUP.BATCH = 8
    cfg.PSM.SELF_SUP.LR = 0.001
    cfg.PSM.SELF_SUP.CHANNELS = (16, 32, 64, 128)  # stem/layer1 width, then one block per deeper width
    # the network: "scratch" = the small CNN above, trained from scratch (CHANNELS); "mobilenet_v2" = the ImageNet
    # MobileNetV2 trunk of stages 4 and 6's U-Net encoder (build_mobilenet_v2_unet_backbone) to stride 16, loaded
    # from MODEL.WEIGHTS (pretrained/mobilenet_v2_imagenet.pth: python tools/prepare_pretrained.py), norm
    # MODEL.MOBILENET.UNET_NORM, frozen by MODEL.BACKBONE.FREEZE_AT, inputs normalised by ImageNet's statistics inside
    # the network (MODEL.PIXEL_MEAN/STD are stages 4 and 6's); Grad-CAM on its stride-2 stem
    # (mmt_psm/nuclei/self_supervised.py). CHANNELS is then unused
    cfg.PSM.SELF_SUP.ENCODER = "scratch"
    # ---- stage 2: Grad-CAM tile size (pixels) for large images (one min-max over the whole image)
    cfg.PSM.ACTIVATION_TILE = 1024
    # ---- stage 3: pseudo masks; the k-means keys (authors: K 3, image weight 1, holes < 64 px filled)
    cfg.PSM.PSEUDO_MASK = CN()
    cfg.PSM.PSEUDO_MASK.K = 3
    cfg.PSM.PSEUDO_MASK.BETA = 1.0  # features = JET(activation) + BETA * image
    # foreground cluster: "authors" (image R+G + JET G+B) or "darkness" (image R+G; see pseudo_masks.py)
    cfg.PSM.PSEUDO_MASK.PRIOR = "authors"
    cfg.PSM.PSEUDO_MASK.MIN_OBJECT_SIZE = 30  # px; the authors' call removed nothing (integer input)
    cfg.PSM.PSEUDO_MASK.MAX_HOLE_SIZE = 64
    # a tile whose nucleus cluster is not darker than its brightest cluster by this much (image R+G, 0..2) has
    # no foreground (blank / background-only tiles; not in the paper)
    cfg.PSM.PSEUDO_MASK.MIN_CONTRAST = 0.1
    cfg.PSM.PSEUDO_MASK.KMEANS_SAMPLE = 100000  # pixels used to fit k-means (all are assigned)
    # "kmeans" (the paper: the keys above) or "haematoxylin" (not in the paper: Otsu's threshold of the blurred
    # colour-deconvolved haematoxylin density + ACT_WEIGHT x activation; mmt_psm/nuclei/haematoxylin.py)
    cfg.PSM.PSEUDO_MASK.METHOD = "kmeans"
    cfg.PSM.PSEUDO_MASK.H_SIGMA = 2.0  # px, Gaussian blur of the scaled haematoxylin density
    cfg.PSM.PSEUDO_MASK.ACT_WEIGHT = 0.15  # weight of the self-activation map added before the threshold
    cfg.PSM.PSEUDO_MASK.MIN_H_RANGE = 0.03  # 1st-99th percentile stain range below which a tile has no nucleus
    # ---- stage 5: points = local maxima of the blurred foreground probability; Voronoi labels
    cfg.PSM.POINTS = CN()
    cfg.PSM.POINTS.SIGMA = 2.0
    cfg.PSM.POINTS.MIN_DISTANCE = 6  # px between two points (MoNuSeg nuclei: ~ 8-15 px radius at 40x)
    cfg.PSM.POINTS.THRESHOLD = 0.5
    cfg.PSM.POINTS.RADIUS = 2  # dilation of a point into the nucleus label (authors: disk(2))
    # ---- stage 5b (not in the paper): stage 6's pseudo-mask term learns the detection network's confident output
    # instead of the stage-3 mask: p >= FG nucleus, p <= BG background, between ignored (BENCHMARKS.md, PSM)
    cfg.PSM.REFINE = CN()
    cfg.PSM.REFINE.ENABLED = False
    cfg.PSM.REFINE.FG = 0.7
    cfg.PSM.REFINE.BG = 0.3
    # ---- instances from the final probability: connected components (paper) or watershed from the points
    cfg.PSM.INSTANCES = CN()
    cfg.PSM.INSTANCES.THRESHOLD = 0.5
    cfg.PSM.INSTANCES.MIN_SIZE = 30
    cfg.PSM.INSTANCES.WATERSHED = False
    # what the watershed floods: "probability" (-blurred probability, flat where the network saturates) or
    # "distance" (-distance to the background: touching nuclei split at their neck)
    cfg.PSM.INSTANCES.SURFACE = "probability"
    # ---- inference: average the foreground probability over the 8 rot90/flip views (not in the paper; 8x the
    # inference time); used wherever a PSM network's probability is computed (stage-5 points and predictions).
    # configs/psm/segmentation.yaml turns it on for the final prediction only
    cfg.PSM.TEST = CN()
    cfg.PSM.TEST.TTA = False
    # ---- evaluation: also score the paper's protocol (centre crop of this size, connected-component GT)
    cfg.PSM.PAPER_CROP = 512
