#!/usr/bin/env python
"""Export the teacher of a teacher-student checkpoint as a plain Detectron2 model.

    python tools/export_teacher.py output/mmt_psm_R50                 # uses last_checkpoint + config.yaml
    python tools/export_teacher.py output/mmt_psm_R50/model_final.pth --config-file output/mmt_psm_R50/config.yaml

Writes ``<output>/model_teacher.pth`` (a GeneralizedRCNN / SemanticSegmentor state dict in Detectron2's
checkpoint format) and ``<output>/config_teacher.yaml`` (only Detectron2's own keys, META_ARCHITECTURE set to the
student architecture, MODEL.WEIGHTS pointing at the exported file). Both load in Detectron2's demo and
``DefaultPredictor`` without this package installed. ``--which student`` exports the student instead (default:
the run's reported model, ``SEMI.EVAL_WITH``; for mixed supervision the bottom head, as a plain
``SemanticSegmentor``). U-Net models also need the U-Net's registrations and keys in the loading process, and
nothing else of this package (as Detectron2's projects)::

    spec = importlib.util.spec_from_file_location("unet", "mmt_psm/networks/unet.py")
    unet = importlib.util.module_from_spec(spec); spec.loader.exec_module(unet)
    cfg = get_cfg(); unet.add_unet_config(cfg); cfg.merge_from_file("config_student.yaml")

A MobileNetV2 backbone (``build_mobilenet_v2_*``) needs mmt_psm/networks/mobilenet.py imported (its registration);
with ``MODEL.MOBILENET`` left at its defaults (every shipped config) the exported config merges into a plain
``get_cfg()``; with other values it takes the node along: call the module's ``add_mobilenet_config(cfg)`` before
the merge (and unet.py for the U-Net encoder's ``UNetHead``).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

import torch
from detectron2.config import CfgNode, get_cfg

from mmt_psm.config import add_mmt_psm_config
from mmt_psm.core.atomic import save_torch, write_text
from mmt_psm.core.cli import add_config_argument, add_output_argument
from mmt_psm.networks.mobilenet import add_mobilenet_config
from mmt_psm.networks.unet import add_unet_config

# teacher-student meta-architecture -> the config node naming the plain architecture of its teacher/student
STUDENT_ARCHITECTURE_NODE = {"MMTPSMRCNN": "MMT_PSM", "LCCMeanTeacherSegmentor": "LCC",
                             "MixedSupervisionSegmentor": "MIXED_SUP"}


def _non_default_mobilenet(cfg: CfgNode) -> bool:
    """Whether ``cfg.MODEL.MOBILENET`` differs from its defaults. Only then does the exported config carry the node
    (and need ``add_mobilenet_config`` in the loading process): with the defaults, Detectron2's plain ``get_cfg()``
    and ``demo/demo.py`` merge it, and the backbone builders fall back to the same defaults."""
    if not hasattr(cfg.MODEL, "MOBILENET"):
        return False
    defaults = CfgNode({"MODEL": CfgNode()})
    add_mobilenet_config(defaults)
    return dict(cfg.MODEL.MOBILENET) != dict(defaults.MODEL.MOBILENET)


def plain_config(cfg: CfgNode, weights: str) -> CfgNode:
    """Detectron2's default config updated with every key of ``cfg`` that Detectron2 itself knows (plus
    ``MODEL.UNET`` for the U-Net and ``MODEL.MOBILENET`` for the MobileNetV2 backbones, whose loaders call
    ``add_unet_config`` / ``add_mobilenet_config`` as Detectron2's projects do)."""
    plain = get_cfg()

    def copy_known(dst: CfgNode, src: CfgNode) -> None:
        for key, value in src.items():
            if key not in dst:
                continue
            if isinstance(value, CfgNode) and isinstance(dst[key], CfgNode):
                copy_known(dst[key], value)
            else:
                dst[key] = value

    if cfg.MODEL.BACKBONE.NAME == "build_unet_backbone":  # the U-Net's own keys travel with the config
        add_unet_config(plain)
    if cfg.MODEL.BACKBONE.NAME.startswith("build_mobilenet_v2_") and _non_default_mobilenet(cfg):
        add_mobilenet_config(plain)  # e.g. UNET_STEM_CHANNELS shapes the encoder; defaults need no node
    copy_known(plain, cfg)
    node = STUDENT_ARCHITECTURE_NODE.get(cfg.MODEL.META_ARCHITECTURE)
    if node is not None:
        plain.MODEL.META_ARCHITECTURE = cfg.MODEL[node].STUDENT_ARCHITECTURE
    fixed = tuple(cfg.INPUT.get("FIXED_SIZE", (0, 0)))
    if min(fixed) > 0:  # DefaultPredictor resizes by shortest edge: give it images already at FIXED_SIZE
        plain.INPUT.MIN_SIZE_TEST, plain.INPUT.MAX_SIZE_TEST = min(fixed), max(fixed)
    plain.MODEL.WEIGHTS = weights
    return plain


def extract_model(state: Dict[str, torch.Tensor], which: str = "teacher") -> Dict[str, torch.Tensor]:
    """The ``which.`` sub-state-dict (prefix removed); a state dict without that prefix is returned as is."""
    prefix = f"{which}."
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return sub if sub else dict(state)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="training OUTPUT_DIR or a checkpoint .pth")
    add_config_argument(ap, "config of the run (default: config.yaml beside the checkpoint)")
    add_output_argument(ap, "folder for model_<which>.pth and config_<which>.yaml (default: the checkpoint's "
                        "folder)", default="")
    ap.add_argument("--which", choices=["teacher", "student"], default=None,
                    help="model to export (default: the reported one, SEMI.EVAL_WITH of the run's config)")
    args = ap.parse_args(argv)

    if os.path.isdir(args.source):
        with open(os.path.join(args.source, "last_checkpoint")) as f:
            ckpt = os.path.join(args.source, f.read().strip())
    else:
        ckpt = args.source
    run_dir = os.path.dirname(os.path.abspath(ckpt))
    config = args.config_file or os.path.join(run_dir, "config.yaml")
    out_dir = args.output or run_dir
    for path in (ckpt, config):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist")

    cfg = get_cfg()
    add_mmt_psm_config(cfg)
    cfg.set_new_allowed(True)
    cfg.merge_from_file(config)
    args.which = args.which or cfg.SEMI.EVAL_WITH
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = extract_model(state["model"] if "model" in state else state, args.which)

    weights = os.path.join(out_dir, f"model_{args.which}.pth")
    save_torch(weights, {"model": model})
    plain = plain_config(cfg, os.path.abspath(weights))
    cfg_path = os.path.join(out_dir, f"config_{args.which}.yaml")
    write_text(cfg_path, plain.dump())
    print(f"wrote {weights} ({len(model)} tensors) and {cfg_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
