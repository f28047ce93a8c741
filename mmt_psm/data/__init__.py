"""Data: converters' shared code, dataset registration, split files, mappers and loaders.

Importing this package registers the built-in data sets (isbi2015_*, isbi2014_synth45, synthetic_*, acdc_*) with
Detectron2 under ``$DETECTRON2_DATASETS`` (see :mod:`mmt_psm.data.datasets`). Without Detectron2 installed the
converters (``coco_io``, ``cervical``, ``synthetic``) still import; registration is then skipped.
"""
try:
    import detectron2  # noqa: F401
except ImportError:  # converters work without Detectron2
    _HAS_DETECTRON2 = False
else:
    _HAS_DETECTRON2 = True

if _HAS_DETECTRON2:
    from .acdc_datasets import register_acdc_split, register_all_acdc
    from .datasets import register_all, register_all_cervical, register_all_synthetic, register_cell_coco
    from .psm_datasets import register_all_psm

    register_all()
    register_all_acdc()
    register_all_psm()

    __all__ = [
        "register_acdc_split", "register_all_acdc", "register_all", "register_all_cervical", "register_all_synthetic",
        "register_cell_coco",
    ]
