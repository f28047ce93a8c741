"""The package's layering, read from its imports (ast): arrows point tools -> a task -> core, never back.

- ``mmt_psm.core`` imports no task package, no shared network and not the top-level config;
- ``mmt_psm.networks`` imports nothing else of ``mmt_psm`` (an exported model's predictor loads it alone);
- a task (``instance``, ``semantic``, ``nuclei``) imports core and networks, never another task, nor the
  top-level package / config that imports every task;
- nothing in ``mmt_psm`` imports ``tools``;
- data-reading modules import no model or evaluation code;
- the Trainer names no method's keys.
"""
from __future__ import annotations

import ast
import os
import re
from typing import Dict, List, Set

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(REPO, "mmt_psm")
TASKS = ("instance", "semantic", "nuclei")

# modules that read data (files, data sets, streams) and the model / evaluation code they must not import
DATA_MODULES = {
    "mmt_psm.core.loader", "mmt_psm.core.splits", "mmt_psm.core.image_io",
    "mmt_psm.instance.mapper", "mmt_psm.instance.view_mapper", "mmt_psm.instance.cervical",
    "mmt_psm.instance.synthetic", "mmt_psm.instance.coco_io", "mmt_psm.instance.datasets",
    "mmt_psm.instance.user_datasets", "mmt_psm.instance.stats", "mmt_psm.instance.views",
    "mmt_psm.instance.augment",
    "mmt_psm.semantic.slice_mapper", "mmt_psm.semantic.acdc", "mmt_psm.semantic.acdc_datasets",
    "mmt_psm.nuclei.mapper", "mmt_psm.nuclei.tile_io", "mmt_psm.nuclei.datasets", "mmt_psm.nuclei.monuseg",
}
MODEL_OR_EVALUATION = re.compile(
    r"^mmt_psm\.(networks(\..*)?|core\.(teacher_student|ema|object_metrics)"
    r"|instance\.(mmt_psm_rcnn|distillation|sensitivity_mining|pseudo_labels|view_ensemble|cell_evaluator|coco_ap)"
    r"|semantic\.(mixed_supervision|lcc_mean_teacher|losses|common|volume_evaluator|volume_metrics)"
    r"|nuclei\.(segmentor|self_supervised|self_activation|evaluator|metrics|label_quality))$"
)


def module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def package_imports() -> Dict[str, Set[str]]:
    """module -> every module it imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    out: Dict[str, Set[str]] = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            name = module_name(path)
            found: Set[str] = set()
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.Import):
                    found.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    if node.level:  # relative: resolve against this module's package
                        base = name.split(".")[: -node.level] if not path.endswith("__init__.py") else (
                            name.split(".")[: len(name.split(".")) - node.level + 1])
                        mod = ".".join(base + ([node.module] if node.module else []))
                    else:
                        mod = node.module or ""
                    found.add(mod)
                    found.update(f"{mod}.{a.name}" for a in node.names)
            out[name] = found
    return out


IMPORTS = package_imports()


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "mmt_psm":
        return "external"
    return parts[1] if len(parts) > 1 else "top"


def violations(rule) -> List[str]:
    return sorted(f"{m} imports {i}" for m, imps in IMPORTS.items() for i in imps if rule(m, i))


def test_the_package_is_laid_out_per_task():
    layers = {layer(m) for m in IMPORTS}
    assert {"core", "networks", *TASKS} <= layers
    assert layers <= {"core", "networks", "config", "train_net", "top", *TASKS}, layers


def test_core_imports_no_task_and_no_network():
    bad = violations(lambda m, i: layer(m) == "core" and layer(i) in (*TASKS, "networks", "config", "top"))
    assert not bad, bad


def test_networks_import_nothing_else_of_the_package():
    bad = violations(lambda m, i: layer(m) == "networks" and layer(i) not in ("networks", "external"))
    assert not bad, bad


@pytest.mark.parametrize("task", TASKS)
def test_a_task_never_imports_another_task(task):
    bad = violations(lambda m, i: layer(m) == task and layer(i) in ({*TASKS} - {task}) | {"config", "top"})
    assert not bad, bad


def test_nothing_in_the_package_imports_tools():
    bad = violations(lambda m, i: i == "tools" or i.startswith("tools."))
    assert not bad, bad


def test_data_modules_import_no_model_or_evaluation_code():
    assert DATA_MODULES <= set(IMPORTS), DATA_MODULES - set(IMPORTS)  # the list names real modules
    bad = violations(lambda m, i: m in DATA_MODULES and MODEL_OR_EVALUATION.match(i) is not None)
    assert not bad, bad


def test_the_trainer_names_no_method_key():
    src = open(os.path.join(PACKAGE, "core", "trainer.py")).read()
    for key in ("MMT_PSM", "MIXED_SUP", "LCC", "MODEL.PSM", "PSM.", "UNET", "CELL_SCORE_THRESH",
                "VOLUME_LARGEST_COMPONENT"):
        assert key not in src, key


def test_the_rules_catch_a_violation(tmp_path, monkeypatch):
    """The checker itself: a core module importing a task is reported."""
    IMPORTS["mmt_psm.core.fake"] = {"mmt_psm.instance.mapper"}
    try:
        bad = violations(lambda m, i: layer(m) == "core" and layer(i) in TASKS)
        assert bad == ["mmt_psm.core.fake imports mmt_psm.instance.mapper"]
    finally:
        del IMPORTS["mmt_psm.core.fake"]
