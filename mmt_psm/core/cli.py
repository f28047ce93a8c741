"""The command line every tool shares, spelled as Detectron2 spells it.

* ``--config-file FILE``: the config a tool reads (``add_config_argument``);
* ``--output PATH``: where a tool writes (``add_output_argument``); its help says which files appear there;
* trailing ``KEY VALUE`` config overrides (``opts``, as ``detectron2.engine.default_argument_parser``);
* ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url`` on tools that train
  (``add_launch_arguments``: Detectron2's names, defaults and help), handed on to ``python -m mmt_psm.train_net``
  by ``launch_argv``.

Old spellings keep working for one release: ``--out`` (for ``--output``) and ``--config`` (for ``--config-file``)
set the same value and warn once (a ``FutureWarning`` on stderr naming the new flag); ``--help`` lists only the
new flags. This module imports only the standard library at import time, so a script that runs before torch and
Detectron2 are installed can load it by its file path (``tools/gpu_check_steps.py`` does).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any, List

__all__ = ["OUTPUT_FLAG", "OUTPUT_ALIAS", "CONFIG_FLAG", "CONFIG_ALIAS", "LAUNCH_FLAGS", "HELPER_FLAGS",
           "add_aliased_argument", "add_output_argument", "add_config_argument", "add_launch_arguments",
           "launch_argv"]

OUTPUT_FLAG, OUTPUT_ALIAS = "--output", "--out"
CONFIG_FLAG, CONFIG_ALIAS = "--config-file", "--config"
LAUNCH_FLAGS = ("--num-gpus", "--num-machines", "--machine-rank", "--dist-url")
# the option strings each helper adds (tools/gpu_check_steps.py's dry run reads a script's options from its source)
HELPER_FLAGS = {"add_output_argument": (OUTPUT_FLAG, OUTPUT_ALIAS), "add_config_argument": (CONFIG_FLAG, CONFIG_ALIAS),
                "add_launch_arguments": LAUNCH_FLAGS}


class _DeprecatedAlias(argparse.Action):
    """Stores its value under the new flag's ``dest`` and warns that the old spelling goes away."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        # attributed to the tool's parse_args line (the first caller outside argparse and this module)
        level, frame = 1, sys._getframe(0)
        while frame is not None and frame.f_code.co_filename in (argparse.__file__, __file__):
            level, frame = level + 1, frame.f_back
        warnings.warn(f"{option_string} is deprecated and will be removed in the next release; use {self.new} "
                      f"(same meaning)", FutureWarning, stacklevel=level)
        setattr(namespace, self.dest, values)


def add_aliased_argument(parser: argparse.ArgumentParser, flag: str, alias: str, *, required: bool = False,
                         **kwargs: Any) -> argparse.Action:
    """``parser.add_argument(flag, **kwargs)`` plus ``alias``, hidden from ``--help``, setting the same ``dest``
    with a FutureWarning naming ``flag``. ``required``: one of the two must be given (argparse's error names
    ``flag``). Returns ``flag``'s action."""
    dest = kwargs.pop("dest", flag.lstrip("-").replace("-", "_"))
    target = parser.add_mutually_exclusive_group(required=True) if required else parser
    action = target.add_argument(flag, dest=dest, **kwargs)
    target.add_argument(alias, dest=dest, action=_DeprecatedAlias, new=flag, default=argparse.SUPPRESS,
                        type=kwargs.get("type"), metavar=kwargs.get("metavar"), help=argparse.SUPPRESS)
    return action


def add_output_argument(parser: argparse.ArgumentParser, help: str, *, default: Any = None, required: bool = False,
                        metavar: str = "DIR") -> argparse.Action:
    """``--output`` (``args.output``; old spelling ``--out``). ``help`` says which files appear there."""
    if default not in (None, ""):
        help = f"{help} (default: %(default)s)"
    return add_aliased_argument(parser, OUTPUT_FLAG, OUTPUT_ALIAS, required=required, default=default,
                                metavar=metavar, help=help)


def add_config_argument(parser: argparse.ArgumentParser, help: str = "path to config file", *, default: Any = "",
                        required: bool = False) -> argparse.Action:
    """``--config-file FILE`` (``args.config_file``, as Detectron2's; old spelling ``--config``)."""
    if default not in (None, ""):
        help = f"{help} (default: %(default)s)"
    return add_aliased_argument(parser, CONFIG_FLAG, CONFIG_ALIAS, required=required, default=default,
                                metavar="FILE", help=help)


def _detectron2_launch_actions() -> List[argparse.Action]:
    from detectron2.engine import default_argument_parser  # needs torch: imported only by the tools that train

    by_flag = {a.option_strings[0]: a for a in default_argument_parser()._actions if a.option_strings}
    return [by_flag[f] for f in LAUNCH_FLAGS]


def add_launch_arguments(parser: argparse.ArgumentParser, what: str = "every training run") -> None:
    """Detectron2's launch flags (``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``: the names,
    types, defaults and help of ``default_argument_parser``) in a group of their own; ``what`` receives them."""
    group = parser.add_argument_group(f"distributed training (Detectron2's launch flags, passed to {what})")
    for a in _detectron2_launch_actions():
        group.add_argument(a.option_strings[0], dest=a.dest, type=a.type, default=a.default, help=a.help)


def launch_argv(args: argparse.Namespace, parallel_jobs: int = 1) -> List[str]:
    """The launch flags of ``args`` that differ from Detectron2's defaults, as ``train_net`` arguments (none for a
    namespace without them). With ``parallel_jobs`` > 1 runs of several processes each on one machine, and the
    default ``--dist-url``, each run gets ``--dist-url auto`` (a free port of its own: the default port is one per
    user, and two runs on it would collide)."""
    dests = [f[2:].replace("-", "_") for f in LAUNCH_FLAGS]
    if not any(hasattr(args, d) for d in dests):
        return []
    actions = _detectron2_launch_actions()
    argv: List[str] = []
    for a in actions:
        value = getattr(args, a.dest, a.default)
        if value != a.default:
            argv += [a.option_strings[0], str(value)]
    default_url = actions[-1].default
    if (parallel_jobs > 1 and getattr(args, "num_gpus", 1) > 1 and getattr(args, "num_machines", 1) == 1
            and getattr(args, "dist_url", default_url) == default_url):
        argv += ["--dist-url", "auto"]
    return argv
