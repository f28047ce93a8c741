"""Per-loss gradients of a teacher-student step: which loss term pulls which part of the student, how hard, and
whether it pulls with or against the supervised losses.

For one training batch, every loss term's gradient is taken separately (``torch.autograd.grad``) on named
parameter groups; reported per (term, group): the gradient's L2 norm and its cosine similarity with the summed
supervised gradient (and with the mask loss's) on the same group. A feature loss whose backbone gradient is as
large as the supervised one and near-orthogonal to it spends the backbone's updates on something the labeled
images do not ask for. Nothing is updated: the model's parameters and buffers are left as they were.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Sequence

import torch
from torch import nn

__all__ = ["parameter_groups", "loss_gradient_stats", "SUPERVISED"]

# the student detector's own (labeled-image) losses; every other ``loss_*`` key is unsupervised
SUPERVISED = ("loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc")


def parameter_groups(model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    """The student's trainable parameters in named groups: ``backbone`` (bottom-up + FPN), ``rpn``,
    ``roi_heads`` and, where the model has them, the MGD ``adaptors``."""
    student = model.student
    groups = {
        "backbone": list(student.backbone.parameters()),
        "rpn": list(student.proposal_generator.parameters()),
        "roi_heads": list(student.roi_heads.parameters()),
    }
    if hasattr(model, "adaptors_student"):
        groups["adaptors"] = list(model.adaptors_student.parameters())
    return {k: [p for p in v if p.requires_grad] for k, v in groups.items()}


def _flat_grad(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> torch.Tensor:
    """The gradient of ``loss`` w.r.t. ``params`` as one flat float64 vector (zeros where it does not reach;
    float64 so that cosines of million-entry vectors stay within [-1, 1])."""
    if not loss.requires_grad:
        return torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)])


def loss_gradient_stats(
    losses: Mapping[str, torch.Tensor], groups: Mapping[str, Sequence[nn.Parameter]],
    supervised: Iterable[str] = SUPERVISED, references: Sequence[str] = ("supervised", "loss_mask"),
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{term: {group: {"norm": |g|, "cos_<ref>": cos(g, g_ref), ...}}}`` for every ``loss*`` term of ``losses``
    (one forward's loss dict, graph kept) plus ``supervised`` (the sum of the ``supervised`` terms) and
    ``unsupervised`` (the sum of the others); one cosine per reference term present. A cosine is NaN where either
    gradient is zero. One backward pass per term over every group's parameters; the sums' gradients are the sums
    of the terms' gradients."""
    sup_keys = [k for k in losses if k in set(supervised)]
    unsup_keys = [k for k in losses if k.startswith("loss") and k not in sup_keys]
    if not sup_keys:
        raise ValueError(f"no supervised loss among {sorted(losses)}")
    groups = {g: list(p) for g, p in groups.items() if p}
    params = [p for ps in groups.values() for p in ps]
    grads = {k: _flat_grad(losses[k], params) for k in sup_keys + unsup_keys}
    grads["supervised"] = sum(grads[k] for k in sup_keys)
    if unsup_keys:
        grads["unsupervised"] = sum(grads[k] for k in unsup_keys)
    refs = [r for r in references if r in grads]
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    offset = 0
    for group, ps in groups.items():
        size = sum(p.numel() for p in ps)
        part = {name: g[offset: offset + size] for name, g in grads.items()}
        offset += size
        for name, g in part.items():
            norm = float(g.norm())
            row = {"norm": norm}
            for r in refs:
                ref_norm = float(part[r].norm())
                row[f"cos_{r}"] = float(g @ part[r]) / (norm * ref_norm) if norm > 0 and ref_norm > 0 else float("nan")
            out.setdefault(name, {})[group] = row
    return out
