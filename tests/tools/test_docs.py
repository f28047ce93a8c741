"""README.md and docs/*.md against the code, parsed and not run (except the DefaultPredictor snippet):

1. every command in their shell code blocks (and in inline code that starts with ``python tools/`` etc.) names an
   existing tool, module or make target; every flag parses with that tool's own argparse parser (captured by
   running the tool with ``parse_args`` intercepted), without a deprecated spelling; every ``configs/*.yaml`` it
   names exists; trailing ``KEY VALUE`` pairs merge into the full config (key exists, value has the right type);
   Detectron2's ``demo/demo.py`` commands use demo.py's flags and Detectron2's own keys;
2. every ``UPPER.CASE.KEY`` written in backticks exists in the merged config (``add_mmt_psm_config``);
3. the README's ``DefaultPredictor`` snippet, run as written (in a folder laid out as the README's own-data steps
   leave it), returns instances from an exported MobileNetV2-FPN model;
plus: relative links resolve, docs/framework.svg is what tools/draw_framework.py draws, the README stays short.
"""
from __future__ import annotations

import argparse
import ast
import glob
import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from functools import cache
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
from common import REPO
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from mmt_psm.config import add_mmt_psm_config
from mmt_psm.instance.synthetic import generate_sample

README = os.path.join(REPO, "README.md")
DOCS = [README] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
PYTHONS = {"python", "python3", ".venv/bin/python", "$PY"}
# Detectron2's demo/demo.py (v0.6 and later; not part of the pip package): its argparse flags
DEMO_FLAGS = {"--config-file", "--webcam", "--video-input", "--input", "--output", "--confidence-threshold", "--opts"}
KEY = re.compile(r"[A-Z][A-Z0-9_]*(?:\.[A-Z][A-Z0-9_]*)+(?:\.\*)?")
# Keys written in the docs that the merged config does not hold, with the reason (none at present)
ALLOWED_KEYS: Dict[str, str] = {}


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _rel(path: str) -> str:
    return os.path.relpath(path, REPO)


def fenced_blocks(text: str) -> List[Tuple[str, str, int]]:
    """(language, body, first line number) of every ``` block."""
    blocks, lang, body, start = [], None, [], 0
    for i, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*```(\S*)", line)
        if m and lang is None:
            lang, body, start = m.group(1).lower(), [], i + 1
        elif m and lang is not None:
            blocks.append((lang, "\n".join(body), start))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def prose(text: str) -> str:
    """``text`` without its fenced blocks."""
    return re.sub(r"^\s*```.*?^\s*```[^\n]*$", "", text, flags=re.S | re.M)


def inline_code(text: str) -> List[str]:
    return re.findall(r"`([^`\n]+)`", prose(text))


def shell_commands(body: str) -> List[List[str]]:
    """Token lists of the commands of a shell block: continuations joined, comments dropped, split at ; && || |."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        cur: List[str] = []
        for t in tokens + [";"]:
            if t in (";", "&&", "||", "|"):
                if cur:
                    commands.append(cur)
                cur = []
            else:
                cur.append(t)
    return commands


def doc_commands() -> List[Tuple[str, List[str]]]:
    """(where, tokens) of every command in the docs' shell blocks and command-like inline code."""
    out = []
    for path in DOCS:
        text = _read(path)
        for lang, body, line in fenced_blocks(text):
            if lang in ("bash", "sh", "shell", "console"):
                out += [(f"{_rel(path)}:{line}", c) for c in shell_commands(body)]
        for span in inline_code(text):
            if re.match(r"(python3? (tools|datasets|demo)/|python3? -m mmt_psm|make )", span):
                out += [(f"{_rel(path)} `{span}`", c) for c in shell_commands(span)]
    return out


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__("parser captured")
        self.parser = parser


@cache
def tool_parser(path: str) -> argparse.ArgumentParser:
    """The argparse parser ``path`` builds when run as a script: it is run with ``parse_args`` intercepted."""
    saved = (argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args, sys.argv)

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = capture
    sys.argv = [path]
    try:
        runpy.run_path(os.path.join(REPO, path), run_name="__main__")
    except _Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args, sys.argv = saved
    raise AssertionError(f"{path} never parsed its command line")


def parse(parser: argparse.ArgumentParser, args: List[str]) -> argparse.Namespace:
    """``parser.parse_args(args)`` that raises (instead of exiting) on an error and on a deprecated spelling."""
    def error(self, message):
        raise ValueError(message)

    saved = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            return parser.parse_args(args)
    finally:
        argparse.ArgumentParser.error = saved


@cache
def full_config():
    cfg = get_cfg()
    add_mmt_psm_config(cfg)
    return cfg


def check_opts(opts: List[str], cfg) -> None:
    """Trailing KEY VALUE pairs merge into ``cfg`` (existing keys, values of the right type)."""
    assert len(opts) % 2 == 0, f"odd number of KEY VALUE tokens: {opts}"
    for key in opts[::2]:
        assert KEY.fullmatch(key) or re.fullmatch(r"[A-Z][A-Z_]*", key), f"{key!r} is not a config key"
    cfg.clone().merge_from_list(list(opts))


def check_paths(tokens: List[str]) -> None:
    """Every config file and split file a command names is in the repository (run outputs are not checked)."""
    for t in tokens:
        for path in re.findall(r"(?:^|[\s=])((?:configs|datasets/splits)/\S+\.(?:yaml|json))", t):
            assert os.path.isfile(os.path.join(REPO, path)), f"{path} does not exist"


def check_demo(args: List[str]) -> None:
    """Detectron2's demo/demo.py: its own flags, and after --opts Detectron2's own keys (demo.py adds none)."""
    opts = args[args.index("--opts") + 1:] if "--opts" in args else []
    flags = [a for a in (args[: args.index("--opts") + 1] if opts else args) if a.startswith("--")]
    assert set(flags) <= DEMO_FLAGS, f"demo.py has no {sorted(set(flags) - DEMO_FLAGS)}"
    assert "--config-file" in flags
    check_opts(opts, get_cfg())


def check_command(tokens: List[str]) -> Optional[str]:
    """Check one command; returns what it was recognised as (None: not a command this test knows)."""
    while tokens and (re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]) or tokens[0] == "time"):
        tokens = tokens[1:]
    if not tokens:
        return None
    check_paths(tokens)
    if tokens[0] == "make":
        targets = set(re.findall(r"^([a-z][a-z-]*):", _read(os.path.join(REPO, "Makefile")), re.M))
        goals = [t for t in tokens[1:] if "=" not in t]
        assert set(goals) <= targets, f"Makefile has no target {sorted(set(goals) - targets)}"
        return "make"
    if tokens[0] == "bash" and len(tokens) > 1:
        assert os.path.isfile(os.path.join(REPO, tokens[1])), f"{tokens[1]} does not exist"
        return "bash"
    if tokens[0] not in PYTHONS or len(tokens) < 2:
        return None
    if tokens[1] == "-c":
        if "demo/demo.py" in tokens[2]:
            check_demo(tokens[3:])
            return "demo"
        return None
    if tokens[1] == "-m":
        if not tokens[2].startswith("mmt_psm"):
            return None
        path = os.path.join(*tokens[2].split(".")) + ".py"
        assert os.path.isfile(os.path.join(REPO, path)), f"no module {tokens[2]}"
        tool, args = "tools/train_net.py" if tokens[2] == "mmt_psm.train_net" else path, tokens[3:]
    else:
        tool, args = tokens[1], tokens[2:]
    if tool.endswith("demo/demo.py"):
        check_demo(args)
        return "demo"
    if not re.match(r"(tools|datasets)/\w+\.py$", tool):
        return None
    assert os.path.isfile(os.path.join(REPO, tool)), f"{tool} does not exist"
    ns = parse(tool_parser(tool), args)
    if isinstance(getattr(ns, "opts", None), list):
        check_opts(ns.opts, full_config())
    return tool


def test_every_documented_command_names_existing_tools_configs_flags_and_keys():
    commands = doc_commands()
    seen, failures = set(), []
    for where, tokens in commands:
        try:
            seen.add(check_command(tokens))
        except Exception as e:  # noqa: BLE001  (collect them all, report at once)
            failures.append(f"{where}: {' '.join(tokens)}\n    -> {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)
    # the README shows the two set-up commands, the training tool, the export, Detectron2's demo
    assert {"make", "tools/train_net.py", "tools/export_teacher.py", "tools/dataset_stats.py", "demo"} <= seen
    readme = [t for w, t in commands if w.startswith("README.md")]
    assert ["make", "quickstart"] in readme and ["make", "test"] in readme


def test_every_config_key_in_backticks_exists():
    cfg, missing = full_config(), []
    for path in DOCS:
        for span in inline_code(_read(path)):
            for token in re.split(r"[\s/,;()]+", span):
                if not KEY.fullmatch(token) or token in ALLOWED_KEYS:
                    continue
                node = cfg
                for part in token.removesuffix(".*").split("."):
                    node = node.get(part) if hasattr(node, "get") else None
                if node is None:
                    missing.append(f"{_rel(path)}: `{span}` ({token})")
    assert not missing, "\n".join(missing)


def test_relative_links_resolve():
    bad = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", prose(_read(path))):
            if re.match(r"[a-z]+:", target):
                continue
            if not os.path.exists(os.path.join(os.path.dirname(path), target)):
                bad.append(f"{_rel(path)} -> {target}")
    assert not bad, "\n".join(bad)


def test_module_docstrings_keep_their_shell_line_continuations():
    """A tool's docstring is its ``--help`` text: a ``\\`` ending a command line there must reach the reader."""
    bad = []
    modules = glob.glob(os.path.join(REPO, "tools", "*.py"))
    modules += glob.glob(os.path.join(REPO, "mmt_psm", "**", "*.py"), recursive=True)
    for path in sorted(modules):
        source = _read(path)
        tree = ast.parse(source)
        doc = ast.get_docstring(tree, clean=False)
        if doc is None:
            continue
        written = ast.get_source_segment(source, tree.body[0].value)
        if written.count("\\\n") > doc.count("\\\n"):
            bad.append(_rel(path))
    assert not bad, "docstrings that drop their backslash-newlines (make them r-strings): " + ", ".join(bad)


def test_readme_stays_short():
    assert len(_read(README).splitlines()) <= 250


def test_framework_figure_is_what_the_script_draws():
    draw = runpy.run_path(os.path.join(REPO, "tools", "draw_framework.py"))
    expected = draw["render"](draw["method_boxes"](), draw["core_keys"]())
    assert _read(os.path.join(REPO, "docs", "framework.svg")) == expected, (
        "docs/framework.svg is stale: python tools/draw_framework.py")


def _predictor_snippet() -> str:
    blocks = [b for lang, b, _ in fenced_blocks(_read(README)) if lang == "python" and "DefaultPredictor" in b]
    assert len(blocks) == 1, "the README has one python block with DefaultPredictor"
    return blocks[0]


def _tiny_mobilenet_run(run_dir: str) -> None:
    """A teacher-student run folder as training leaves it (config.yaml, model_final.pth with teacher./student.
    weights, last_checkpoint) for configs/pretrained/mmt_psm_mobilenet_v2.yaml shrunk to a tiny random model."""
    cfg = full_config().clone()
    cfg.merge_from_file(os.path.join(REPO, "configs", "pretrained", "mmt_psm_mobilenet_v2.yaml"))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
        "MODEL.ROI_MASK_HEAD.NUM_CONV", 1, "MODEL.ROI_HEADS.NUM_CLASSES", 1, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
        "TEST.DETECTIONS_PER_IMAGE", 20, "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 128, "OUTPUT_DIR", run_dir,
    ])
    plain = cfg.clone()
    plain.MODEL.META_ARCHITECTURE = cfg.MODEL.MMT_PSM.STUDENT_ARCHITECTURE
    torch.manual_seed(0)
    state = build_model(plain).state_dict()
    os.makedirs(run_dir)
    torch.save({"model": {f"{part}.{k}": v for part in ("teacher", "student") for k, v in state.items()}},
               os.path.join(run_dir, "model_final.pth"))
    with open(os.path.join(run_dir, "last_checkpoint"), "w") as f:
        f.write("model_final.pth")
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump())


def test_readme_default_predictor_snippet_returns_instances(tmp_path):
    snippet = _predictor_snippet()
    assert len(snippet.strip().splitlines()) <= 7
    config = re.search(r'merge_from_file\("([^"]+)"\)', snippet).group(1)
    image = re.search(r'imread\("([^"]+)"\)', snippet).group(1)
    run_dir = os.path.dirname(config)
    # the README exports the run the snippet loads
    exports = [t for w, t in doc_commands() if w.startswith("README") and "tools/export_teacher.py" in t]
    assert any(t[t.index("tools/export_teacher.py") + 1] == run_dir for t in exports), exports
    _tiny_mobilenet_run(str(tmp_path / run_dir))
    export = runpy.run_path(os.path.join(REPO, "tools", "export_teacher.py"))
    assert export["main"]([str(tmp_path / run_dir)]) == 0
    os.makedirs(os.path.dirname(str(tmp_path / image)), exist_ok=True)
    cv2.imwrite(str(tmp_path / image), generate_sample(np.random.default_rng(0), 128, 128).image)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    count = int(r.stdout.strip().splitlines()[-1].split()[0])
    assert count > 0, r.stdout
