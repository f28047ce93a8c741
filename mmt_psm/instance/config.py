"""``add_instance_config(cfg)``: the keys of cell instance segmentation (MMT-PSM, labeled augmentation, your
own COCO data, cell metrics). MMT-PSM numbers are the defaults of the authors' maskrcnn-benchmark code; the
switches beyond the paper are off.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN

__all__ = ["add_instance_config"]


def add_instance_config(cfg: CN) -> None:
    """Add the cell-instance keys to ``cfg`` in place (idempotent)."""
    _C = cfg
    if hasattr(_C.MODEL, "MMT_PSM"):
        return
    # ---------------------------------------------------------------- labeled augmentation
    # Intensity augmentation of labeled images (multiplicative factors sampled uniformly in [1-x, 1+x]).
    _C.INPUT.BRIGHTNESS = 0.0
    _C.INPUT.CONTRAST = 0.0
    # The authors' labeled augmentation adds hue jitter U(-x, x) turns and random erasing (attempts kept with
    # probability ERASE_PROB, patch geometry MODEL.MMT_PSM.ERASE_*): their values are 0.05 and 0.7; 0 = off.
    _C.INPUT.HUE = 0.0
    _C.INPUT.ERASE_PROB = 0.0

    # ---------------------------------------------------------------- MMT-PSM
    _C.MODEL.MMT_PSM = CN()
    # The detector wrapped by the semi-supervised meta-architecture.
    _C.MODEL.MMT_PSM.STUDENT_ARCHITECTURE = "GeneralizedRCNN"
    # Views of an unlabeled image: K colour copies for the teacher, each also h-flipped when TEACHER_FLIP.
    _C.MODEL.MMT_PSM.NUM_TEACHER_COPIES = 2
    _C.MODEL.MMT_PSM.TEACHER_FLIP = True
    # Teacher views per backbone / box-head / mask-head pass: 0 = all 2K views of a batch in one pass (fewer
    # kernel launches and syncs on a GPU); 1 = one view at a time (no gain on a CPU, and a lower peak: with
    # FUSE_ALL_VIEWS the detection pass holds every view's RoI features at once). Same losses either way.
    _C.MODEL.MMT_PSM.TEACHER_VIEWS_PER_PASS = 0
    _C.MODEL.MMT_PSM.BRIGHTNESS = 0.15
    _C.MODEL.MMT_PSM.CONTRAST = 0.15
    _C.MODEL.MMT_PSM.HUE = 0.05
    _C.MODEL.MMT_PSM.ERASE_PROB = 0.9
    _C.MODEL.MMT_PSM.ERASE_MAX_PATCHES = 10
    _C.MODEL.MMT_PSM.ERASE_AREA = (0.001, 0.004)
    _C.MODEL.MMT_PSM.ERASE_ASPECT = (0.2, 5.0)
    # Pseudo-labels: the teacher's post-processed detections on view 0; masks > MASK_THRESHOLD form M.
    _C.MODEL.MMT_PSM.PSEUDO_SCORE_THRESH = 0.05
    _C.MODEL.MMT_PSM.MASK_THRESHOLD = 0.5
    # Switches beyond the paper (off = the paper's method; see mmt_psm/instance/view_ensemble.py):
    # one threshold per class instead of PSEUDO_SCORE_THRESH (empty = not used);
    _C.MODEL.MMT_PSM.PSEUDO_SCORE_THRESH_PER_CLASS = ()
    # foreground map M = "union" of the pseudo masks, or their "sum" (the authors' integral_mask);
    _C.MODEL.MMT_PSM.FG_MAP = "union"
    # pseudo-labels fused over every teacher view (weighted box fusion at FUSE_IOU) instead of view 0 alone;
    _C.MODEL.MMT_PSM.FUSE_ALL_VIEWS = False
    _C.MODEL.MMT_PSM.FUSE_IOU = 0.55
    # the student's mask head learns the teacher's view-ensembled masks on the PSM positives (soft BCE).
    _C.MODEL.MMT_PSM.MASK_DISTILL = False
    _C.MODEL.MMT_PSM.MASK_DISTILL_WEIGHT = 1.0
    # at most this many positives per image (a random subset) get mask distillation; 0 = all. The teacher's
    # mask head on every positive in every view is the largest cost of MASK_DISTILL (BENCHMARKS.md).
    _C.MODEL.MMT_PSM.MASK_DISTILL_MAX_POSITIVES = 0
    # Proposals sampled per unlabeled image and their positive fraction; IoU to a pseudo box for foreground.
    _C.MODEL.MMT_PSM.PROPOSAL_BATCH_SIZE = 512
    _C.MODEL.MMT_PSM.PROPOSAL_POSITIVE_FRACTION = 0.25
    _C.MODEL.MMT_PSM.PROPOSAL_IOU = 0.5
    # Perturbation-sensitive mining: keep all positives + floor(|P| * ratio) most sensitive negatives.
    _C.MODEL.MMT_PSM.MINING = True
    _C.MODEL.MMT_PSM.NEGATIVE_RATIO = 0.5
    _C.MODEL.MMT_PSM.NEGATIVE_WEIGHT = 1.5
    # Semantic distillation loss_psm (sharpened teacher mean vs student), and its weight.
    _C.MODEL.MMT_PSM.PSM_LOSS = True
    _C.MODEL.MMT_PSM.PSM_WEIGHT = 0.2
    _C.MODEL.MMT_PSM.SHARPEN_T = 0.5
    # Dropout after fc7 of the student's box head (teacher: none).
    _C.MODEL.MMT_PSM.STUDENT_BOX_DROPOUT = 0.5
    # Mask-guided feature distillation loss_mgd on these FPN levels through 1x1 adaptors.
    _C.MODEL.MMT_PSM.MGD_LOSS = True
    _C.MODEL.MMT_PSM.MGD_WEIGHT = 1.0
    _C.MODEL.MMT_PSM.MGD_IN_FEATURES = ("p2", "p3", "p4", "p5", "p6")
    _C.MODEL.MMT_PSM.MGD_ADAPTOR_DIM = 128
    # False = mean-teacher feature consistency over the whole image (no mask guidance).
    _C.MODEL.MMT_PSM.MGD_USE_MASK = True

    # ---------------------------------------------------------------- your own data, evaluation, flips
    # Data sets registered from the config / command line (mmt_psm.instance.user_datasets), before the Trainer:
    #   "name:path/instances.json:path/image_root"  COCO instance JSON (image_root default: the JSON's folder)
    #   "name:path/instances.json"                  (also: a JSON with no categories/annotations = unlabeled)
    #   "name:path/folder" or "name:path/*.png"     a folder or glob of unlabeled images, no JSON
    _C.DATASETS.REGISTER = ()
    # Every image of a registered data set is decoded once when the set is first loaded. A corrupt/unreadable
    # one (or one whose size differs from its JSON record): "error" = fail then, listing every bad file;
    # "skip" = drop it with a counted warning.
    _C.DATASETS.BAD_IMAGES = "error"
    # INPUT.RANDOM_FLIP keeps Detectron2's meaning (one random flip: "horizontal" | "vertical" | "none");
    # VERTICAL_FLIP adds an independent random vertical flip (p=0.5) of labeled images (cells have no up).
    _C.INPUT.VERTICAL_FLIP = False
    # Score threshold of the cell metrics (AJI, F1, Dice, IoU); COCO AP uses every detection.
    _C.TEST.CELL_SCORE_THRESH = 0.5
