#!/usr/bin/env python
"""Draw docs/framework.svg: the teacher-student core and this project's four meta-architectures.

    python tools/draw_framework.py                       # rewrites docs/framework.svg
    python tools/draw_framework.py --output /tmp/f.svg

Drawn from the code, not by hand: the meta-architectures are the entries of Detectron2's ``META_ARCH_REGISTRY``
that ``mmt_psm`` registers, the core's keys are ``cfg.SEMI`` and each method's switches are the boolean and
string keys of its config node with their defaults (``add_mmt_psm_config``). A meta-architecture registered
without an entry in ``METHODS`` below is an error, so the figure cannot silently miss one
(tests/tools/test_docs.py checks that the committed file equals this script's output). Plain SVG text, no
plotting library; the same code gives the same bytes.
"""
from __future__ import annotations

import argparse
import os
import sys
from html import escape
from typing import Dict, List, Sequence, Tuple

from mmt_psm.core.cli import add_output_argument

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO, "docs", "framework.svg")

# meta-architecture -> (method, paper, task, unlabeled stream, config nodes, exported as)
METHODS: Dict[str, Tuple[str, str, str, str, Tuple[str, ...], str]] = {
    "MMTPSMRCNN": ("MMT-PSM", "Zhou et al., MICCAI 2020", "cells: instances (mmt_psm/instance)",
                   "unlabeled images, 2K teacher views", ("MODEL.MMT_PSM",), "GeneralizedRCNN (teacher)"),
    "MixedSupervisionSegmentor": ("mixed supervision", "Dolz et al., IPMI 2021", "cardiac MRI (mmt_psm/semantic)",
                                  "scribbled (or unlabeled) slices", ("MODEL.MIXED_SUP",),
                                  "SemanticSegmentor (bottom head)"),
    "LCCMeanTeacherSegmentor": ("LCC mean teacher", "Gao & Yu, ISBP 2023", "cardiac MRI (mmt_psm/semantic)",
                                "unlabeled slices", ("MODEL.LCC",), "SemanticSegmentor (teacher)"),
    "PSMNucleiSegmentor": ("PSM", "Chen et al., MICCAI 2023", "nuclei, no labels (mmt_psm/nuclei)",
                           "none (labels of PSM stages 1-5)", ("MODEL.PSM", "PSM"),
                           "SemanticSegmentor"),
}
FONT = "font-family:DejaVu Sans,Arial,Helvetica,sans-serif"


def project_meta_architectures() -> List[str]:
    """Names of the META_ARCH_REGISTRY entries defined in ``mmt_psm`` (registration order)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    import mmt_psm  # noqa: F401  (registers everything)

    return [name for name, obj in META_ARCH_REGISTRY if getattr(obj, "__module__", "").startswith("mmt_psm.")]


def switches(node, prefix: str) -> List[str]:
    """``KEY default`` of every boolean or string key under ``node`` (recursively), architecture names left out."""
    from detectron2.config import CfgNode

    out = []
    for key in sorted(node.keys()):
        value = node[key]
        if isinstance(value, CfgNode):
            out += switches(value, f"{prefix}.{key}")
        elif isinstance(value, (bool, str)) and not key.endswith("ARCHITECTURE"):
            out.append(f"{prefix}.{key} {value}")
    return out


def method_boxes() -> List[dict]:
    """One dict per project meta-architecture: name, method, paper, task, stream, exported, switch lines."""
    from detectron2.config import get_cfg

    from mmt_psm.config import add_mmt_psm_config

    cfg = get_cfg()
    add_mmt_psm_config(cfg)
    names = project_meta_architectures()
    if sorted(names) != sorted(METHODS):
        raise KeyError(f"tools/draw_framework.py METHODS {sorted(METHODS)} do not match the meta-architectures "
                       f"mmt_psm registers: {sorted(names)}")
    boxes = []
    for name in METHODS:
        method, paper, task, stream, nodes, exported = METHODS[name]
        lines = []
        for path in nodes:
            node = cfg
            for part in path.split("."):
                node = node[part]
            lines += switches(node, path)
        boxes.append({"name": name, "method": method, "paper": paper, "task": task, "stream": stream,
                      "exported": exported, "switches": lines})
    return boxes


def core_keys() -> List[str]:
    from detectron2.config import get_cfg

    from mmt_psm.config import add_mmt_psm_config

    cfg = get_cfg()
    add_mmt_psm_config(cfg)
    return sorted(cfg.SEMI.keys())


def _text(x: float, y: float, s: str, size: int = 12, weight: str = "normal", anchor: str = "start",
          fill: str = "#222") -> str:
    return (f'<text x="{x:.0f}" y="{y:.0f}" font-size="{size}" font-weight="{weight}" text-anchor="{anchor}" '
            f'fill="{fill}" style="{FONT}">{escape(s)}</text>')


def _rect(x: float, y: float, w: float, h: float, fill: str, stroke: str = "#555") -> str:
    return (f'<rect x="{x:.0f}" y="{y:.0f}" width="{w:.0f}" height="{h:.0f}" rx="6" fill="{fill}" '
            f'stroke="{stroke}"/>')


def _arrow(x1: float, y1: float, x2: float, y2: float, label: str = "") -> List[str]:
    out = [f'<line x1="{x1:.0f}" y1="{y1:.0f}" x2="{x2:.0f}" y2="{y2:.0f}" stroke="#333" stroke-width="1.5" '
           'marker-end="url(#arrow)"/>']
    if label:
        out.append(_text((x1 + x2) / 2, (y1 + y2) / 2 - 5, label, 11, anchor="middle", fill="#333"))
    return out


def _wrap(words: Sequence[str], width: int) -> List[str]:
    """Join ``words`` with spaces into lines of at most ``width`` characters."""
    lines, cur = [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + ([cur] if cur else [])


def render(boxes: List[dict], semi_keys: List[str]) -> str:
    """The SVG document."""
    box_w, gap, margin = 300, 16, 20
    width = margin * 2 + len(boxes) * box_w + (len(boxes) - 1) * gap
    switch_rows = max(len(b["switches"]) for b in boxes)
    box_h = 134 + 15 * switch_rows
    key_lines = _wrap([f"SEMI.{k}" for k in semi_keys], 150)
    core_y, core_h = 86, 150 + 15 * len(key_lines)
    boxes_y = core_y + core_h + 40
    height = boxes_y + box_h + margin
    s: List[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#333"/></marker></defs>',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
    ]
    # Detectron2
    s.append(_rect(margin, margin, width - 2 * margin, 46, "#eef2f7"))
    s.append(_text(width / 2, margin + 20, "Detectron2 (unchanged)", 14, "bold", "middle"))
    s.append(_text(width / 2, margin + 37, "DefaultTrainer / AMPTrainer, yacs config + trailing KEY VALUE, "
                   "launch (--num-gpus, --num-machines), checkpointer, evaluators, DefaultPredictor, demo.py",
                   12, anchor="middle"))
    # the teacher-student core
    s.append(_rect(margin, core_y, width - 2 * margin, core_h, "#f4f9f1"))
    s.append(_text(margin + 12, core_y + 20, "teacher-student core (mmt_psm/core): one loader, two seeded streams, "
                   "EMA teacher hook, ramps w(t), teacher + student evaluation, export", 14, "bold"))
    x0, y0 = margin + 30, core_y + 40
    s.append(_rect(x0, y0, 190, 30, "white"))
    s.append(_text(x0 + 95, y0 + 20, "labeled images", anchor="middle"))
    s.append(_rect(x0, y0 + 50, 190, 30, "white"))
    s.append(_text(x0 + 95, y0 + 70, "unlabeled / weak images", anchor="middle"))
    sx, tx = x0 + 330, x0 + 330
    s.append(_rect(sx, y0, 170, 30, "#fff7e6"))
    s.append(_text(sx + 85, y0 + 20, "student (trained)", anchor="middle"))
    s.append(_rect(tx, y0 + 50, 170, 30, "#e8f0fe"))
    s.append(_text(tx + 85, y0 + 70, "teacher (EMA, eval mode)", anchor="middle"))
    s += _arrow(x0 + 190, y0 + 15, sx, y0 + 15)
    s += _arrow(x0 + 190, y0 + 65, tx, y0 + 65)
    s += _arrow(x0 + 190, y0 + 65, sx, y0 + 22)
    lx = sx + 330
    s.append(_rect(lx, y0, 300, 30, "white"))
    s.append(_text(lx + 150, y0 + 20, "L = L_sup + w(t) * L_unsup", anchor="middle"))
    s += _arrow(sx + 170, y0 + 15, lx, y0 + 15)
    s += _arrow(tx + 170, y0 + 65, lx + 20, y0 + 30)
    s.append(_text(tx + 250, y0 + 72, "targets (pseudo-labels, soft labels, features)", 11, fill="#333"))
    s.append(f'<path d="M {sx + 40} {y0 + 30} C {sx + 20} {y0 + 38}, {sx + 20} {y0 + 42}, {sx + 40} {y0 + 50}" '
             'fill="none" stroke="#333" stroke-width="1.5" marker-end="url(#arrow)"/>')
    s.append(_text(sx + 48, y0 + 44, "EMA after each step", 11, fill="#333"))
    for i, line in enumerate(key_lines):
        s.append(_text(margin + 12, y0 + 112 + 15 * i, line, 11, fill="#444"))
    # one box per meta-architecture
    for i, b in enumerate(boxes):
        x = margin + i * (box_w + gap)
        s += _arrow(x + box_w / 2, core_y + core_h, x + box_w / 2, boxes_y)
        s.append(_rect(x, boxes_y, box_w, box_h, "#fbfbfb"))
        s.append(_text(x + 10, boxes_y + 20, b["method"], 14, "bold"))
        s.append(_text(x + 10, boxes_y + 37, b["paper"], 11, fill="#444"))
        s.append(_text(x + 10, boxes_y + 55, f"META_ARCHITECTURE {b['name']}", 11, fill="#444"))
        s.append(_text(x + 10, boxes_y + 72, b["task"], 11))
        s.append(_text(x + 10, boxes_y + 88, f"second stream: {b['stream']}", 11))
        s.append(_text(x + 10, boxes_y + 104, f"exports as: {b['exported']}", 11))
        s.append(_text(x + 10, boxes_y + 124, "switches (defaults):", 11, "bold"))
        for j, line in enumerate(b["switches"]):
            s.append(_text(x + 14, boxes_y + 140 + 15 * j, line, 10, fill="#444"))
    s.append("</svg>")
    return "\n".join(s) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_argument(p, "the SVG file to write", default=DEFAULT_OUTPUT, metavar="FILE")
    args = p.parse_args(argv)
    svg = render(method_boxes(), core_keys())
    with open(args.output, "w") as f:
        f.write(svg)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
