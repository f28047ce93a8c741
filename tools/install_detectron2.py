#!/usr/bin/env python
"""Install Detectron2 into the running Python, by the first route that works, and say which one it took.

Routes, in order:
  1. existing  - an importable ``detectron2`` is kept as it is.
  2. github    - the official source, ``pip install git+https://github.com/facebookresearch/detectron2``
                 (compiles the C++/CUDA ops; needs network access to GitHub and a compiler).
  3. sdist     - the registry sdist ``pb1-detectron2==0.6`` (detectron2 v0.6's Python sources without
                 ``layers/csrc``), patched and built as a pure-Python wheel named ``detectron2``.

Route 3 applies the small compatibility patches listed in ``PATCHES`` (each tested in
tests/tools/test_install_detectron2.py) and writes the wheel to ``--wheel-dir`` (default ``build/wheels``), where the
GPU device machine can pick it up. Ops that need the compiled extension (deformable conv, rotated boxes,
RoIAlignRotated, the fast COCOeval) raise a RuntimeError naming the op and how to get a compiled build.

Only the standard library is used here, so this runs before anything else is installed (torch must already
be installed: Detectron2 imports it at build and run time).
"""
from __future__ import annotations

import argparse
import hashlib
import html.parser
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from typing import Callable, Dict, List, Optional, Tuple

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
GITHUB_URL = "https://github.com/facebookresearch/detectron2.git"
# detectron2 v0.6's pure-Python dependencies (black, pydot and future are dropped: only used by caffe2 export
# and LazyConfig pretty-printing, which falls back without black).
RUNTIME_DEPS = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]

MISSING_OPS_MODULE = '''\
"""Stand-in for ``detectron2._C`` in a pure-Python build (added by mmt_psm's tools/install_detectron2.py)."""
AVAILABLE = False
try:
    from detectron2 import _C as _compiled  # noqa: F401

    AVAILABLE = True
except ImportError:
    _compiled = None


class _MissingCompiledOps:
    def __getattr__(self, name):
        raise RuntimeError(
            f"detectron2 op '{name}' needs the compiled extension detectron2._C, which this pure-Python "
            "build of detectron2 (from the pb1-detectron2 sdist) does not have. Deformable conv, rotated "
            "boxes/NMS, RoIAlignRotated and the fast COCOeval need it. For a compiled build install from source: "
            "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git' "
            "(needs a C++ compiler, and CUDA for GPU ops)."
        )


_C = _compiled if AVAILABLE else _MissingCompiledOps()
'''

SETUP_PY = '''\
"""Pure-Python build of detectron2 v0.6 (pb1-detectron2 sdist patched by mmt_psm's installer)."""
from setuptools import find_packages, setup

PROJECTS = {
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}
setup(
    name="detectron2",
    version="0.6+purepy",
    url="https://github.com/facebookresearch/detectron2",
    description="Detectron2 v0.6, pure-Python build (no detectron2._C)",
    license="Apache-2.0",
    packages=find_packages(include=("detectron2", "detectron2.*")) + list(PROJECTS.keys()),
    package_dir=PROJECTS,
    package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},
    python_requires=">=3.7",
    install_requires=%r,
)
'''

_COMPILED_IMPORT = "from detectron2 import _C\n"
_COMPILED_IMPORT_FIX = "from detectron2.utils._compiled_ops import _C\n"


def _sub(path: str, old: str, new: str, count: int = 1) -> Callable[[str], None]:
    """A patch that replaces ``old`` by ``new`` in one file and fails loudly if ``old`` is not there."""

    def apply(src_root: str) -> None:
        file = os.path.join(src_root, path)
        with open(file) as f:
            text = f.read()
        if old not in text:
            if new in text:
                return  # already applied
            raise RuntimeError(f"patch target not found in {file}: {old!r}")
        with open(file, "w") as f:
            f.write(text.replace(old, new, count if count > 0 else -1))

    return apply


def _numpy_aliases(src_root: str) -> None:
    """numpy >= 1.24 removed np.bool / np.int / np.float: use the builtins, as upstream later did."""
    pattern = re.compile(r"\bnp\.(bool|int|float|object)\b(?!_)")
    for dirpath, _, files in os.walk(os.path.join(src_root, "detectron2")):
        for name in files:
            if not name.endswith(".py"):
                continue
            file = os.path.join(dirpath, name)
            with open(file) as f:
                text = f.read()
            fixed = pattern.sub(r"\1", text)
            if fixed != text:
                with open(file, "w") as f:
                    f.write(fixed)


def _missing_ops_module(src_root: str) -> None:
    with open(os.path.join(src_root, "detectron2", "utils", "_compiled_ops.py"), "w") as f:
        f.write(MISSING_OPS_MODULE)


def _pure_setup(src_root: str) -> None:
    with open(os.path.join(src_root, "setup.py"), "w") as f:
        f.write(SETUP_PY % (RUNTIME_DEPS,))
    for stale in ("pyproject.toml", "setup.cfg"):
        if os.path.exists(os.path.join(src_root, stale)):
            os.remove(os.path.join(src_root, stale))


# name -> (why, patch). Each is small; tests/tools/test_install_detectron2.py checks every one on the built package.
PATCHES: Dict[str, Tuple[str, Callable[[str], None]]] = {
    "pillow10-linear": (
        "PIL.Image.LINEAR was removed in Pillow 10; BILINEAR is the same filter",
        _sub("detectron2/data/transforms/transform.py", "interp=Image.LINEAR", "interp=Image.BILINEAR"),
    ),
    "model-zoo-no-pkg-resources": (
        "pkg_resources is deprecated/absent in new setuptools; configs sit beside model_zoo.py",
        lambda root: (
            _sub("detectron2/model_zoo/model_zoo.py", "import pkg_resources\n", "")(root),
            _sub(
                "detectron2/model_zoo/model_zoo.py",
                "pkg_resources.resource_filename(\n"
                '        "detectron2.model_zoo", os.path.join("configs", config_path)\n    )',
                'os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)',
            )(root),
        ),
    ),
    "missing-compiled-ops": (
        "without layers/csrc there is no detectron2._C: compiled-only ops raise a RuntimeError naming the op",
        lambda root: (
            _missing_ops_module(root),
            *[
                _sub(p, _COMPILED_IMPORT, _COMPILED_IMPORT_FIX)(root)
                for p in (
                    "detectron2/layers/deform_conv.py",
                    "detectron2/layers/rotated_boxes.py",
                    "detectron2/layers/roi_align_rotated.py",
                    "detectron2/evaluation/fast_eval_api.py",
                )
            ],
        ),
    ),
    "coco-eval-pure-fallback": (
        "COCOEvaluator defaults to the compiled COCOeval; use pycocotools' when _C is absent",
        _sub(
            "detectron2/evaluation/coco_evaluation.py",
            "self._use_fast_impl = use_fast_impl\n",
            "from detectron2.utils._compiled_ops import AVAILABLE as _HAS_C\n\n"
            "        self._use_fast_impl = use_fast_impl and _HAS_C\n",
        ),
    ),
    "mapdataset-py311-sample": (
        "random.sample() of a set is a TypeError on Python >= 3.11 (upstream wraps it in list())",
        _sub(
            "detectron2/data/common.py",
            "self._rng.sample(self._fallback_candidates, k=1)",
            "self._rng.sample(list(self._fallback_candidates), k=1)",
        ),
    ),
    "numpy124-aliases": ("np.bool/np.int/np.float were removed in numpy 1.24", _numpy_aliases),
    "pure-python-setup": (
        "the sdist's setup.py compiles layers/csrc, which it lacks, and imports torch to read metadata",
        _pure_setup,
    ),
}


def apply_patches(src_root: str) -> List[str]:
    """Apply every patch in ``PATCHES`` to an extracted sdist tree; return their names."""
    for _, patch in PATCHES.values():
        patch(src_root)
    return list(PATCHES)


def _run(cmd: List[str], timeout: Optional[float] = None, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, timeout=timeout, **kw)


def detectron2_importable(python: str) -> Optional[str]:
    """Path of an importable detectron2 for ``python``, or None."""
    code = "import detectron2, detectron2.config, os; print(os.path.dirname(detectron2.__file__))"
    r = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def github_reachable(timeout: float = 15.0) -> bool:
    """True when the official repository answers ``git ls-remote`` in time."""
    try:
        r = subprocess.run(
            ["git", "ls-remote", GITHUB_URL, "HEAD"], capture_output=True, timeout=timeout,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _index_url() -> str:
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        r = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True, text=True
        )
        url = r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "https://pypi.org/simple"
    return url.rstrip("/")


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: List[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def download_sdist(cache_dir: str) -> str:
    """Fetch pb1-detectron2==0.6 from the package index (PEP 503 simple page), checking its sha256.

    ``pip download`` cannot be used: the sdist declares a direct-URL extra, which pip rejects when it
    prepares metadata.
    """
    fname = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
    target = os.path.join(cache_dir, fname)
    if os.path.exists(target):
        return target
    page_url = f"{_index_url()}/{SDIST_NAME}/"
    with urllib.request.urlopen(page_url, timeout=60) as r:
        parser = _Links()
        parser.feed(r.read().decode("utf-8", "replace"))
    hrefs = [h for h in parser.hrefs if urllib.parse.urlparse(h).path.endswith("/" + fname) or h.startswith(fname)]
    if not hrefs:
        raise RuntimeError(f"{fname} not listed on {page_url}")
    url = urllib.parse.urljoin(page_url, hrefs[0])
    want = urllib.parse.urlparse(url).fragment.partition("sha256=")[2]
    os.makedirs(cache_dir, exist_ok=True)
    print(f"downloading {url.split('#')[0]}", flush=True)
    with urllib.request.urlopen(url.split("#")[0], timeout=120) as r:
        data = r.read()
    got = hashlib.sha256(data).hexdigest()
    if want and got != want:
        raise RuntimeError(f"sha256 mismatch for {fname}: expected {want}, got {got}")
    tmp = target + ".part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
    return target


def build_wheel_from_sdist(sdist: str, wheel_dir: str, python: str) -> str:
    """Extract, patch and build the pure-Python detectron2 wheel; return its path."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tf.extractall(tmp)
        (top,) = [d for d in os.listdir(tmp) if os.path.isdir(os.path.join(tmp, d))]
        src = os.path.join(tmp, top)
        for name in apply_patches(src):
            print(f"  patch {name}: {PATCHES[name][0]}", flush=True)
        os.makedirs(wheel_dir, exist_ok=True)
        for old in os.listdir(wheel_dir):
            if old.startswith("detectron2-"):
                os.remove(os.path.join(wheel_dir, old))
        r = _run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheel_dir, src])
        if r.returncode != 0:
            raise RuntimeError("building the detectron2 wheel failed (see pip output above)")
    (wheel,) = [os.path.join(wheel_dir, w) for w in os.listdir(wheel_dir) if w.startswith("detectron2-")]
    return wheel


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="interpreter to install into")
    ap.add_argument("--route", choices=["auto", "github", "sdist"], default=os.environ.get("D2_ROUTE", "auto"))
    ap.add_argument("--sdist", default="", help="local pb1-detectron2-0.6.tar.gz (skips the download)")
    ap.add_argument("--wheel-dir", default="build/wheels")
    ap.add_argument("--cache-dir", default="build/cache")
    ap.add_argument("--force", action="store_true", help="reinstall even if detectron2 imports")
    args = ap.parse_args(argv)

    if not args.force:
        where = detectron2_importable(args.python)
        if where:
            print(f"detectron2 route: existing ({where})")
            return 0
    if args.route in ("auto", "github") and github_reachable():
        r = _run([args.python, "-m", "pip", "install", "--no-build-isolation", f"git+{GITHUB_URL}"])
        if r.returncode == 0 and detectron2_importable(args.python):
            print("detectron2 route: github (official source, compiled ops)")
            return 0
        print("GitHub install failed; falling back to the registry sdist", flush=True)
    elif args.route in ("auto", "github"):
        print("GitHub is not reachable; using the registry sdist", flush=True)

    sdist = args.sdist or download_sdist(args.cache_dir)
    wheel = build_wheel_from_sdist(sdist, args.wheel_dir, args.python)
    r = _run([args.python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", wheel])
    r2 = _run([args.python, "-m", "pip", "install", "-q", *RUNTIME_DEPS])
    if r.returncode or r2.returncode or not detectron2_importable(args.python):
        print("detectron2 installation failed", file=sys.stderr)
        return 1
    print(f"detectron2 route: sdist ({SDIST_NAME}=={SDIST_VERSION} patched, pure Python; wheel {wheel})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
