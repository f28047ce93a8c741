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
    # Every task's packages are installed by default. The last four are each needed by one task only and are
    # imported where that task uses them (mmt_psm.core.optional): without them `import mmt_psm` and the other
    # tasks still work, and the task that needs one raises an ImportError naming it. Per task (extras below):
    #   instance (cells, Mask R-CNN, MMT-PSM): nothing beyond the core list
    #   semantic (ACDC, mixed supervision, LCC): h5py (the ACDC HDF5 slices), medpy (3D Dice / HD95)
    #   nuclei (PSM):                            scikit-image (morphology, watershed, metrics), scikit-learn (KMeans)
    install_requires=[
        "torch>=1.10",
        "torchvision",
        "numpy",
        "scipy",
        "opencv-python-headless",
        "pycocotools>=2.0.2",
        "fvcore>=0.1.5,<0.1.6",
        "h5py",  # semantic: reading ACDC's HDF5 slices (datasets/prepare_acdc.py)
        "scikit-image",  # nuclei: pseudo-mask morphology, Voronoi labels, watershed instances, nucleus metrics
        "scikit-learn",  # nuclei: KMeans for PSM pseudo-masks
        "medpy",  # semantic: 3D Dice / HD95 the way SSL4MIS computes them (medpy.metric.binary)
    ],
    extras_require={
        "dev": ["pytest", "ruff"],
        "semantic": ["h5py", "medpy"],
        "nuclei": ["scikit-image", "scikit-learn"],
    },
)
