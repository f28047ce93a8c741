#!/usr/bin/env python
"""Install the ``mmt_psm`` package: label-efficient cell and organ segmentation for Detectron2.

Detectron2 itself is not listed in ``install_requires`` because it is not on PyPI; install it first with
``python tools/install_detectron2.py`` (``make setup`` does this).
"""
from setuptools import find_packages, setup

setup(
    name="mmt_psm",
    version="0.1.0",
    description="Semi-supervised (MMT-PSM) and weakly supervised cell/organ segmentation on Detectron2",
    license="Apache-2.0",
    packages=find_packages(include=("mmt_psm", "mmt_psm.*")),
    python_requires=">=3.9",
    install_requires=[
        "torch>=1.10",
        "torchvision",
        "numpy",
        "scipy",
        "opencv-python-headless",
        "pycocotools>=2.0.2",
        "fvcore>=0.1.5,<0.1.6",
        "h5py",
        "scikit-image",
        "scikit-learn",  # KMeans for PSM pseudo-masks
        "medpy",  # 3D Dice / HD95 the way SSL4MIS computes them (medpy.metric.binary)
    ],
    extras_require={"dev": ["pytest", "ruff"]},
)
