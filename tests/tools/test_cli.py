"""One command line across tools/*.py and datasets/prepare_*.py (mmt_psm/core/cli.py): every tool answers
``--help`` with what it does, a tool that writes files documents ``--output`` (which files appear there), the old
spellings ``--out`` / ``--config`` still work for one release and warn, and the tools that train expose
Detectron2's launch flags."""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import runpy
import subprocess
import sys

import pytest
from common import REPO

from mmt_psm.core import cli

TOOLS = sorted(glob.glob(os.path.join(REPO, "tools", "*.py"))
               + glob.glob(os.path.join(REPO, "datasets", "prepare_*.py")))
# tools/*.py that are not argparse command lines (none today; a new one is listed here with the reason)
NOT_ARGPARSE: dict = {}
# argparse tools that write no file named by --output, with the reason
NO_OUTPUT_FLAG = {
    "benchmark.py": "prints its table (--json: the JSON object on stdout); writes nothing",
    "benchmark_cell_metrics.py": "prints two timings and the shared figures; writes nothing",
    "compare_checkpoints.py": "prints a JSON summary on stdout; writes nothing",
    "gpu_check_validate.py": "checks the GPU check plan and prints INVALID lines; writes nothing",
    "dataset_stats.py": "prints the statistics; --json FILE also saves the printed numbers",
    "loss_gradients.py": "prints a table; --json FILE also saves every batch's numbers",
    "install_detectron2.py": "installs into the Python; runs before mmt_psm can be imported (standard library "
                             "only), its wheel cache is --wheel-dir",
    "train_net.py": "Detectron2's command line: writes to the config's OUTPUT_DIR (a KEY VALUE override)",
}
# tools whose files are written by subcommands: the subcommands' help names --output
SUBCOMMANDS = {"gpu_check_steps.py": ["ddp", "summary"]}
# tools that train through mmt_psm.train_net: Detectron2's launch flags, passed on
TRAINING_TOOLS = ["isbi_protocol.py", "acdc_protocol.py", "psm_pipeline.py", "own_data_protocol.py"]


def _help(path: str, argv=("--help",), capsys=None, monkeypatch=None) -> str:
    """``python <path> <argv>`` in this process (imports are shared: fast); its stdout."""
    monkeypatch.setattr(sys, "argv", [path, *argv])
    monkeypatch.setenv("COLUMNS", "10000")  # argparse wraps at the terminal width (and breaks words at hyphens)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(path, run_name="__main__")
    out = capsys.readouterr().out
    assert e.value.code in (0, None), f"{path} {' '.join(argv)} exited {e.value.code}"
    return out


def _words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_tool_answers_help_with_what_it_does_and_where_it_writes(path, capsys, monkeypatch):
    name = os.path.basename(path)
    if name in NOT_ARGPARSE:
        pytest.skip(NOT_ARGPARSE[name])
    text = _help(path, capsys=capsys, monkeypatch=monkeypatch)
    first_line = _words(open(path).read().split('"""')[1].split("\n")[0])
    assert first_line.rstrip(":.") in _words(text), f"{name}: --help lacks its docstring's first line"
    assert "--out " not in text and "--config " not in text  # old spellings are hidden
    if name in SUBCOMMANDS:
        for sub in SUBCOMMANDS[name]:
            assert "--output" in _help(path, (sub, "--help"), capsys, monkeypatch), f"{name} {sub}"
    elif name == "train_net.py":
        assert "OUTPUT_DIR" in text and "--num-gpus" in text
    elif name not in NO_OUTPUT_FLAG:
        assert re.search(r"--output (DIR|FILE)\s+\S", text), f"{name}: --help documents no --output"


def test_training_tools_expose_detectron2_launch_flags(capsys, monkeypatch):
    for name in TRAINING_TOOLS:
        text = _help(os.path.join(REPO, "tools", name), capsys=capsys, monkeypatch=monkeypatch)
        for flag in cli.LAUNCH_FLAGS:
            assert flag in text, f"{name} lacks {flag}"
        assert "--config " not in text and "opts" in text  # trailing KEY VALUE overrides


def _seed_runs(tmp_path):
    runs = []
    for i, aji in enumerate((0.5, 0.6)):
        pred = tmp_path / f"seed{i}" / "predictions"
        pred.mkdir(parents=True)
        (pred / "metrics.json").write_text(json.dumps({"full_image": {"AJI": aji, "F1": 0.7, "Dice": 0.8}}))
        runs.append(str(tmp_path / f"seed{i}"))
    return runs


def test_old_output_spelling_still_works_and_warns(tmp_path):
    """``--out`` sets ``--output`` (same file written) with a FutureWarning naming the new flag, in this process
    and, as a user sees it, on stderr of the command."""
    tool = runpy.run_path(os.path.join(REPO, "tools", "psm_seeds.py"))
    runs = _seed_runs(tmp_path)
    new, old = tmp_path / "new.md", tmp_path / "old.md"
    tool["main"]([*runs, "--output", str(new)])
    with pytest.warns(FutureWarning, match=r"--out is deprecated .*; use --output"):
        tool["main"]([*runs, "--out", str(old)])
    assert old.read_text() == new.read_text() and "0.550 +- 0.050" in new.read_text()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "psm_seeds.py"), *runs, "--out",
                           str(tmp_path / "cmd.md")], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "cmd.md").read_text() == new.read_text()
    warned = [ln for ln in proc.stderr.splitlines() if "--out is deprecated" in ln]
    assert len(warned) == 1 and "FutureWarning" in warned[0] and "use --output" in warned[0], proc.stderr[-2000:]


def test_old_config_spelling_still_works_and_warns():
    bench = runpy.run_path(os.path.join(REPO, "tools", "benchmark.py"))
    assert bench["parse_args"]([]).config_file == "configs/mmt_psm_R50.yaml"
    assert bench["parse_args"](["--config-file", "a.yaml"]).config_file == "a.yaml"
    with pytest.warns(FutureWarning, match=r"--config is deprecated .*; use --config-file"):
        args = bench["parse_args"](["--config", "b.yaml", "SOLVER.MAX_ITER", "3"])
    assert args.config_file == "b.yaml" and args.opts == ["SOLVER.MAX_ITER", "3"]


def test_required_output_names_the_new_flag_and_refuses_both(capsys):
    p = argparse.ArgumentParser()
    cli.add_output_argument(p, "folder", required=True)
    with pytest.raises(SystemExit):
        p.parse_args([])
    assert "--output is required" in capsys.readouterr().err
    with pytest.raises(SystemExit), pytest.warns(FutureWarning):
        p.parse_args(["--out", "a", "--output", "b"])
    assert "not allowed with" in capsys.readouterr().err


def test_launch_flags_are_detectron2s_and_passed_on_when_not_default():
    from detectron2.engine import default_argument_parser

    p = argparse.ArgumentParser()
    cli.add_launch_arguments(p)
    d2 = default_argument_parser().parse_args([])
    args = p.parse_args([])
    assert [getattr(args, f) for f in ("num_gpus", "num_machines", "machine_rank", "dist_url")] == [
        d2.num_gpus, d2.num_machines, d2.machine_rank, d2.dist_url]
    assert cli.launch_argv(args) == [] and cli.launch_argv(argparse.Namespace(threads=1)) == []
    args = p.parse_args(["--num-gpus", "2", "--dist-url", "tcp://10.0.0.1:1234"])
    assert cli.launch_argv(args) == ["--num-gpus", "2", "--dist-url", "tcp://10.0.0.1:1234"]
    # two runs in parallel on one machine, several processes each: a free port each instead of the shared default
    assert cli.launch_argv(p.parse_args(["--num-gpus", "2"]), parallel_jobs=2) == ["--num-gpus", "2", "--dist-url",
                                                                                  "auto"]
    assert cli.launch_argv(p.parse_args(["--num-gpus", "2"]), parallel_jobs=1) == ["--num-gpus", "2"]
