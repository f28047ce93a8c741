#!/usr/bin/env python
"""Dry-run validator of tools/gpu_check.sh: every planned command parsed and checked, none run.

    python tools/gpu_check_validate.py --plan TSV [--produced PATH ...]   # = gpu_check_steps.py validate

Checks scripts, options, pytest ids, config files and overrides, and input paths (those under ``--produced`` are
written by earlier checks). Imports only the standard library at start (config checks read configs through
``mmt_psm`` when it imports). Writes nothing; prints one INVALID line per problem and a count.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import shlex
import sys
from typing import List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Detectron2's default_argument_parser (tools/train_net.py), when detectron2 cannot be imported to ask it
D2_TRAIN_FLAGS = {"--config-file", "--resume", "--eval-only", "--num-gpus", "--num-machines", "--machine-rank",
                  "--dist-url", "-h", "--help"}


def _load_cli():
    """mmt_psm/core/cli.py (the flags every tool shares) by its path: importing ``mmt_psm`` needs torch and
    Detectron2, which ``setup`` may not have installed yet; that module needs only the standard library."""
    spec = importlib.util.spec_from_file_location("mmt_psm_cli", os.path.join(REPO, "mmt_psm", "core", "cli.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = _load_cli()


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    """The validator's options (also those of ``gpu_check_steps.py validate``)."""
    p.add_argument("--plan", required=True, help="the check plan: name, timeout, mode, deps, command per line")
    p.add_argument("--produced", nargs="*", default=[])
    p.add_argument("--python-names", nargs="*", default=["python", "python3"])


def _script_flags(path: str) -> Tuple[Optional[set], set]:
    """(option strings a script accepts, those that take no value): Detectron2's default_argument_parser for
    scripts built on it, else the ``add_argument("--x", ...)`` calls of the script and the flags of the
    mmt_psm/core/cli.py helpers it calls (None: not an argparse script we can read)."""
    with open(path) as f:
        src = f.read()
    if re.search(r"^from (detectron2\.engine import .*default_argument_parser|mmt_psm\.train_net import)", src, re.M):
        try:
            from detectron2.engine import default_argument_parser

            actions = default_argument_parser()._actions
            return ({s for a in actions for s in a.option_strings},
                    {s for a in actions if a.nargs == 0 for s in a.option_strings})
        except ImportError:
            return set(D2_TRAIN_FLAGS), {"--resume", "--eval-only", "-h", "--help"}
    calls = re.findall(r"""add_argument\(\s*((?:["']-[\w-]+["']\s*,\s*)*)([^)]*)""", src)
    flags, no_value = {"-h", "--help"}, {"-h", "--help"}
    for names, rest in calls:
        opts = re.findall(r"""["'](-[\w-]+)["']""", names)
        flags |= set(opts)
        if re.search(r"""action\s*=\s*["']store_(true|false)["']""", rest):
            no_value |= set(opts)
    for helper, helper_flags in CLI.HELPER_FLAGS.items():
        if re.search(rf"\b{helper}\(", src):
            flags |= set(helper_flags)
    return (flags if "argparse" in src else None), no_value


def _split_simple(command: str) -> List[List[str]]:
    """A check's command as the argv lists of its simple commands (split at ``&&``, ``||``, ``;``, ``|``, braces),
    redirections dropped; an unquoted ``$VAR`` expands to its words (bash word splitting), other text as is."""
    lex = shlex.shlex(command, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    tokens: List[str] = []
    for tok in lex:
        m = re.fullmatch(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", tok)
        tokens += os.environ.get(m.group(1), "").split() if m else [os.path.expandvars(tok)]
    out, cur, skip = [], [], False
    for tok in tokens + [";"]:
        if skip:  # the file of a redirection
            skip = False
        elif tok in (">", ">>", "<", ">&", "&>"):
            skip = True
        elif tok in ("&&", "||", ";", "|", "&", "{", "}", "(", ")"):
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(tok)
    return out


def _check_config(cfg_file: str, opts: List[str]) -> Optional[str]:
    """Error text when ``cfg_file`` + ``opts`` do not merge (unknown key, bad value), None when they do (or when
    mmt_psm cannot be imported here: then only the file is checked)."""
    if len(opts) % 2:
        return f"odd number of KEY VALUE overrides: {opts}"
    try:
        from detectron2.config import get_cfg

        from mmt_psm.config import add_mmt_psm_config
    except ImportError:
        return None
    try:  # a plain merge: keys and values only (load_config would also resolve MODEL.DEVICE on this machine)
        cfg = get_cfg()
        add_mmt_psm_config(cfg)
        cfg.merge_from_file(cfg_file)
        cfg.merge_from_list(list(opts))
    except Exception as e:  # noqa: BLE001 - any merge error is reported
        return f"{cfg_file} + {opts}: {type(e).__name__}: {e}"
    return None


def validate_argv(argv: List[str], produced: Sequence[str], python_names: Sequence[str]) -> List[str]:
    """Problems with one simple command (paths, script flags, pytest node ids, config overrides), not run."""
    errs: List[str] = []
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
        argv = argv[1:]  # VAR=value prefixes
    if not argv:
        return errs
    prog, rest = argv[0], argv[1:]
    if os.path.basename(prog) not in python_names:
        return errs if prog in ("test", "mkdir", "rm", "cp", "ls", "echo", "true", "false", "nvidia-smi", "cat",
                                "head", "exit") else [f"unknown program {prog!r}"]
    is_produced = lambda p: any(os.path.normpath(p).startswith(os.path.normpath(q)) for q in produced)
    if rest[:2] == ["-m", "pytest"]:
        skip_value = False
        for a in rest[2:]:
            if skip_value or a.startswith("-"):
                skip_value = a in ("-p", "-m", "-k", "-o", "-c", "--rootdir", "--junitxml")
                continue
            file, _, node = a.partition("::")
            if not os.path.isfile(file):
                errs.append(f"pytest file {file} does not exist")
            elif node and not re.search(rf"^def {re.escape(node.split('[')[0])}\(", open(file).read(), re.M):
                errs.append(f"{file} has no test {node}")
        return errs
    if rest[:1] == ["-c"]:
        try:
            ast.parse(rest[1])
        except SyntaxError as e:
            errs.append(f"python -c code does not parse: {e}")
        return errs
    script = rest[0]
    if not os.path.isfile(script):
        return [f"script {script} does not exist"]
    flags, no_value = _script_flags(script)
    args = rest[1:]
    cfg_file, opts, i = None, [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", a):
            flag = a.split("=", 1)[0]
            if flags is not None and flag not in flags:
                errs.append(f"{script} has no option {flag}")
            takes_value = "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--") and (
                flag not in no_value)
            if takes_value:
                value = args[i + 1]
                if flag in ("--config-file", "--config") and value.endswith((".yaml", ".yml")):
                    cfg_file = value
                if re.search(r"\.(ya?ml|py|pth|png|json|whl)$", value) or flag in ("--images", "--source"):
                    if not os.path.exists(value) and not is_produced(value):
                        errs.append(f"{script} {flag}: {value} does not exist")
                i += 2
                continue
            i += 1
            continue
        if re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+", a):  # KEY VALUE overrides until the end
            opts = args[i:]
            break
        if re.search(r"\.\w+$", a) and os.sep in a and not os.path.exists(a) and not is_produced(a):
            errs.append(f"{script}: {a} does not exist")  # a positional file argument
        i += 1
    if cfg_file and os.path.isfile(cfg_file) and (opts or "train_net" in script or "benchmark" in script):
        err = _check_config(cfg_file, opts)
        if err:
            errs.append(err)
    return errs


def cmd_validate(args: argparse.Namespace) -> int:
    """Every planned command (``--plan``: name, timeout, mode, deps, command per line) parsed and checked without
    running it: scripts, options, pytest ids, config files and overrides, input paths (those under ``--produced``
    are written by earlier checks)."""
    problems: List[Tuple[str, str]] = []
    n = 0
    names = set()
    with open(args.plan) as f:
        rows = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
    for name, timeout, mode, deps, command in rows:
        if name in names:
            problems.append((name, "duplicate check name"))
        names.add(name)
        if not timeout.isdigit() or int(timeout) <= 0:
            problems.append((name, f"bad timeout {timeout!r}"))
        if mode not in ("seq", "bg"):
            problems.append((name, f"bad mode {mode!r} (seq or bg)"))
        for d in filter(None, deps.split(",")):
            if d not in names:
                problems.append((name, f"depends on {d}, which is not an earlier check"))
        for argv in _split_simple(command):
            n += 1
            problems += [(name, e) for e in validate_argv(argv, args.produced, args.python_names)]
    for name, err in problems:
        print(f"INVALID {name}: {err}")
    print(f"validated {n} commands of {len(rows)} checks: {len(problems)} problem(s)")
    return 1 if problems else 0



def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_validate_arguments(p)
    return cmd_validate(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
