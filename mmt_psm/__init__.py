"""Label-efficient cell and organ segmentation on Detectron2 (MMT-PSM and semantic siblings).

Importing this package registers its datasets, meta-architectures and evaluators with Detectron2.
"""
__version__ = "0.1.0"
