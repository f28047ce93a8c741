#!/usr/bin/env python
r"""How far apart two checkpoints' weights are: per-tensor max |a - b| and ||a - b|| / ||a||, summarised.

    python tools/compare_checkpoints.py output/isbi_protocol/supervised_n2_seed1/model_0000049.pth \
        output/isbi_protocol/mmt_psm_plus_seed1/model_0000049.pth --prefix student.
    python tools/compare_checkpoints.py output/isbi_protocol/pretrain_synth45/model_final.pth \
        output/isbi_protocol/supervised_n2_seed1/model_0000049.pth --b-prefix student.    # how far training moved

Used to check whether two runs that should start alike do (e.g. a teacher-student arm's burn-in against the
supervised arm's first iterations). Only floating-point tensors present in both (after ``--prefix``) count.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from typing import Dict, List, Optional

import torch


def load_weights(path: str) -> Dict[str, torch.Tensor]:
    """The ``model`` state dict of a Detectron2 checkpoint (or a bare state dict)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise SystemExit(f"{path}: not a readable checkpoint ({e})") from e
    return obj.get("model", obj) if isinstance(obj, dict) else obj


def compare(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], prefix: str = "",
            b_prefix: Optional[str] = None) -> Dict[str, float]:
    """``tensors`` compared, how many are ``identical``, the largest ``max_abs`` difference and the
    ``mean_rel`` / ``max_rel`` of ||a - b|| / ||a|| over the float tensors ``prefix + name`` of ``a`` and
    ``b_prefix + name`` of ``b`` (``b_prefix`` defaults to ``prefix``; e.g. ``""`` for a plain model's file
    against ``"student."`` of a teacher-student one)."""
    b_prefix = prefix if b_prefix is None else b_prefix
    names = [k[len(prefix):] for k in a if k.startswith(prefix) and a[k].is_floating_point()]
    pairs = [(a[prefix + n], b[b_prefix + n]) for n in names
             if b_prefix + n in b and b[b_prefix + n].shape == a[prefix + n].shape]
    if not pairs:
        raise ValueError(f"no floating-point tensor named '{prefix}...' in a and '{b_prefix}...' in b")
    diff = [x.double() - y.double() for x, y in pairs]
    rel = [(d.norm() / x.double().norm().clamp_min(1e-12)).item() for d, (x, _) in zip(diff, pairs)]
    return {"tensors": len(pairs), "identical": sum(bool(torch.equal(x, y)) for x, y in pairs),
            "max_abs": max(d.abs().max().item() for d in diff),
            "mean_rel": sum(rel) / len(rel), "max_rel": max(rel)}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--prefix", default="", help="compare only tensors whose names start with this")
    p.add_argument("--b-prefix", default=None, help="the same tensors' prefix in b (default: --prefix)")
    args = p.parse_args(argv)
    print(json.dumps(compare(load_weights(args.a), load_weights(args.b), args.prefix, args.b_prefix), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
