#!/usr/bin/env python
"""The steps of tools/gpu_check.sh that need Python (one subcommand each), and its summary and dry-run validator.

    python tools/gpu_check_steps.py setup --site DIR --wheels DIR [--d2-wheels DIR]   # wheels + imports + GPU
    python tools/gpu_check_steps.py predict --config-file CFG --image PNG             # DefaultPredictor, CUDA
    python tools/gpu_check_steps.py expect-keys FILE KEY ...                          # finite numbers in a JSON
    python tools/gpu_check_steps.py ddp --output DIR                                  # 2 processes, gloo, 1 GPU
    python tools/gpu_check_steps.py summary --results TSV --output JSON ...           # output/gpu_check/summary.json
    python tools/gpu_check_steps.py validate --plan TSV                               # --dry-run: parse, not run

``setup``, ``summary`` and ``validate`` import only the standard library at start (``validate``, in
tools/gpu_check_validate.py, also reads configs through ``mmt_psm`` when it imports).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "mmt_psm.gpu_check/1"
# what the project and its checks import on the GPU machine (torch is preinstalled there)
MODULES = ["torch", "torchvision", "numpy", "cv2", "scipy", "skimage", "sklearn", "h5py", "medpy", "pycocotools",
           "fvcore", "iopath", "yacs", "omegaconf", "PIL", "matplotlib", "tabulate", "detectron2", "pytest",
           "mmt_psm"]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script or loaded by path
from gpu_check_validate import CLI, add_validate_arguments, cmd_validate  # noqa: E402


# ---------------------------------------------------------------------- setup
def cmd_setup(args: argparse.Namespace) -> int:
    """Install the carried wheels into ``--site`` (no index, no deps) where a module is missing, then import every
    module the checks need and ask torch for the GPU; writes ``<site>/../env.json``. Exit 1 naming what is
    missing."""
    wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl"))) if args.wheels else []
    d2 = sorted(glob.glob(os.path.join(args.d2_wheels, "detectron2-*.whl"))) if args.d2_wheels else []
    missing_before = _missing_modules(["detectron2", "fvcore", "pycocotools", "iopath", "yacs", "omegaconf"])
    installed: List[str] = []
    if missing_before:
        if not d2 and "detectron2" in missing_before:
            print(f"no Detectron2 wheel in {args.d2_wheels} (python tools/install_detectron2.py writes "
                  "build/wheels/detectron2-*.whl; carry build/wheels)")
        os.makedirs(args.site, exist_ok=True)
        for whl in wheels + d2:
            r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                                args.site, "--upgrade", whl], capture_output=True, text=True)
            if r.returncode == 0:
                installed.append(os.path.basename(whl))
            else:
                print(f"pip could not install {os.path.basename(whl)}: {r.stderr.strip().splitlines()[-1:]}")
        if args.site not in sys.path:
            sys.path.insert(0, args.site)
    env: Dict[str, Any] = {"python": sys.version.split()[0], "installed_wheels": installed,
                           "wheels_dir": args.wheels, "d2_wheels": d2}
    missing = _missing_modules(MODULES, env)
    try:
        import torch

        env["cuda_available"] = bool(torch.cuda.is_available())
        env["torch_cuda"] = torch.version.cuda
        if env["cuda_available"]:
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        env["cuda_available"] = False
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                           timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        env["nvidia_smi"] = None
    env["missing"] = missing
    with open(os.path.join(os.path.dirname(os.path.abspath(args.site)), "env.json"), "w") as f:
        json.dump(env, f, indent=1)
    print(json.dumps(env))
    problems = [f"missing modules: {', '.join(missing)}"] if missing else []
    if not env["cuda_available"]:
        problems.append("torch.cuda.is_available() is False")
    if problems:
        print("; ".join(problems))
        return 1
    print(f"ok: {env.get('gpu')}, torch {env['versions']['torch']}, detectron2 {env['versions']['detectron2']}")
    return 0


def _missing_modules(names: Sequence[str], env: Optional[Dict[str, Any]] = None) -> List[str]:
    import importlib

    missing, versions = [], {}
    for name in names:
        try:
            mod = importlib.import_module(name)
            versions[name] = str(getattr(mod, "__version__", "?"))
        except Exception as e:  # noqa: BLE001 - any import failure is a missing module here
            missing.append(f"{name} ({type(e).__name__}: {e})" if env is not None else name)
    if env is not None:
        env["versions"] = versions
    return missing


# ---------------------------------------------------------------------- predict / expect-keys
def cmd_predict(args: argparse.Namespace) -> int:
    """Detectron2's DefaultPredictor from an exported plain config (without mmt_psm) on one image, on CUDA."""
    import cv2
    import torch
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor

    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.MODEL.DEVICE = args.device
    image = cv2.imread(args.image)
    if image is None:
        raise FileNotFoundError(args.image)
    out = DefaultPredictor(cfg)(image)["instances"]
    assert "mmt_psm" not in sys.modules, "DefaultPredictor needed mmt_psm"
    assert out.scores.device.type == torch.device(args.device).type, out.scores.device
    assert torch.isfinite(out.scores).all() and torch.isfinite(out.pred_boxes.tensor).all()
    print(f"ok: {len(out)} instances on {out.scores.device} from {cfg.MODEL.WEIGHTS}")
    return 0


def cmd_expect_keys(args: argparse.Namespace) -> int:
    """Every key is in the JSON object and a finite number (or NaN with ``--allow-nan``: COCO AP of a model
    without a detection)."""
    with open(args.file) as f:
        data = json.load(f)
    bad = [k for k in args.keys if not isinstance(data.get(k), (int, float))
           or not (math.isfinite(data[k]) or (args.allow_nan and math.isnan(data[k])))]
    if bad:
        print(f"{args.file}: missing or not finite: {bad} (has {sorted(data)[:20]})")
        return 1
    print("ok: " + ", ".join(f"{k} {data[k]:.2f}" for k in args.keys))
    return 0


# ---------------------------------------------------------------------- ddp
def _ddp_worker(rank: int, world: int, init_file: str, data_root: str, out_dir: str, device: str) -> None:
    import detectron2.engine.defaults as d2_defaults
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    from mmt_psm.config import load_config
    from mmt_psm.core import Trainer
    from mmt_psm.instance.datasets import register_cell_coco

    if device == "cuda":
        torch.cuda.set_device(0)  # both ranks on the one GPU
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(world)))
    create = d2_defaults.create_ddp_model
    ids = [0] if device == "cuda" else None  # Detectron2 would put rank r on cuda:r
    d2_defaults.create_ddp_model = lambda model, **kw: create(model, device_ids=ids, **kw)
    for split in ("train", "unlabeled"):
        register_cell_coco(f"gpucheck_ddp_{split}", os.path.join(data_root, f"{split}.json"),
                           os.path.join(data_root, "images"), "", strip_annotations=split == "unlabeled")
    cfg = load_config(os.path.join(REPO, "configs", "quickstart", "mmt_psm.yaml"), [
        "MODEL.DEVICE", device, "MODEL.RESNETS.NORM", "BN", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
        "DATASETS.TRAIN", ("gpucheck_ddp_train",), "DATASETS.TRAIN_UNLABELED", ("gpucheck_ddp_unlabeled",),
        "DATASETS.TEST", (), "DATASETS.UNLABELED_GT", (), "INPUT.MIN_SIZE_TRAIN", (128,), "INPUT.MAX_SIZE_TRAIN", 128,
        "SOLVER.IMS_PER_BATCH", 2, "SEMI.IMS_PER_BATCH_LABELED", 1, "SEMI.IMS_PER_BATCH_UNLABELED", 1,
        "SOLVER.MAX_ITER", 6, "SOLVER.STEPS", (), "SOLVER.WARMUP_ITERS", 0, "SOLVER.CHECKPOINT_PERIOD", 1000,
        "SEMI.BURN_IN_ITERS", 2, "SEMI.EMA_START_ITER", 1, "SEMI.RAMP_UP_ITERS", 2, "SEMI.RAMP_DOWN_ITERS", 0,
        "SEMI.VIS_PERIOD", 0, "SEMI.PSEUDO_MONITOR_PERIOD", 0, "TEST.EVAL_PERIOD", 0,
        "OUTPUT_DIR", os.path.join(out_dir, f"rank{rank}_run")])
    torch.manual_seed(rank)  # different local randomness on purpose: the models must stay one model anyway
    trainer = Trainer(cfg)
    trainer.train()
    model = trainer.model.module
    pseudo = [v for v, _ in trainer.storage.history("mmt_psm/pseudo_labels_per_image").values()]
    torch.save({"teacher": {k: v.cpu() for k, v in model.teacher.state_dict().items()},
                "student": {k: v.cpu() for k, v in model.student.state_dict().items()},
                "pseudo": pseudo, "device": str(next(model.teacher.parameters()).device)},
               os.path.join(out_dir, f"rank{rank}.pth"))
    dist.destroy_process_group()


def cmd_ddp(args: argparse.Namespace) -> int:
    """Two ranks (gloo) on the one GPU train the MMT-PSM quickstart model 6 iterations; their teachers (and
    students) must be equal tensor for tensor."""
    import torch
    import torch.multiprocessing as mp

    from mmt_psm.instance.synthetic import write_synthetic_dataset

    os.makedirs(args.output, exist_ok=True)
    data_root = os.path.join(args.output, "data")
    write_synthetic_dataset(data_root, 4, 1, 4, size=128, seed=0)
    init = os.path.join(args.output, f"init_{os.getpid()}")
    ctx = mp.start_processes(_ddp_worker, args=(2, init, data_root, args.output, args.device), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + args.timeout
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            print(f"the 2 ranks did not finish in {args.timeout} s (a rank waits on a collective?)")
            return 1
    r0, r1 = (torch.load(os.path.join(args.output, f"rank{r}.pth"), weights_only=True) for r in (0, 1))
    diff = {part: [k for k in r0[part] if not torch.equal(r0[part][k], r1[part][k])] for part in ("teacher", "student")}
    if any(diff.values()):
        print(f"ranks differ: teacher {diff['teacher'][:5]}, student {diff['student'][:5]}")
        return 1
    if not r0["pseudo"] or not r1["pseudo"]:
        print("the unsupervised path did not run on both ranks")
        return 1
    print(f"ok: teachers equal across 2 ranks ({len(r0['teacher'])} tensors, on {r0['device']}), pseudo-labels "
          f"per image {r0['pseudo']} / {r1['pseudo']}")
    return 0


# ---------------------------------------------------------------------- summary
def _bench_metrics(path: str) -> Optional[Dict[str, Any]]:
    """The numbers of one tools/benchmark.py --json output worth keeping."""
    try:
        with open(path) as f:
            r = json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None
    v = r.get("variants", {})
    out = {k: r.get(k) for k in ("step_time_ratio_same_images", "step_time_ratio_same_labeled",
                                 "peak_mem_ratio_same_images", "peak_mem_ratio_same_labeled", "data_time_per_step_s",
                                 "data_time_share_serial", "loader_workers_to_hide_data_time", "amp", "device_name",
                                 "config_file")}
    out["median_step_s"] = {k: x.get("median_step_s") for k, x in v.items()}
    out["peak_mem_gib"] = {k: (x["peak_mem_bytes"] / 2**30 if x.get("peak_mem_bytes") else None) for k, x in v.items()}
    prof = r.get("profile", {}).get("A")
    if prof:
        out["profile_A_share"] = {k: round(p["share"], 3) for k, p in prof.items() if k != "total"}
    return out


def cmd_summary(args: argparse.Namespace) -> int:
    """``--output`` JSON from the script's results TSV (name, status, rc, seconds, reason or a passed check's last
    output line, log, command); benchmark checks get their numbers and the AMP speed-up (fp32 / AMP median step,
    per variant) per config."""
    checks = []
    with open(args.results) as f:
        for line in f:
            if not line.strip():
                continue
            name, status, rc, seconds, reason, log, command = line.rstrip("\n").split("\t")
            c = {"name": name, "status": status, "rc": int(rc), "seconds": float(seconds),
                 "reason": (reason or None) if status != "pass" else None,
                 "detail": (reason or None) if status == "pass" else None, "log": log, "command": command,
                 "metrics": None}
            if name.startswith("bench_") and status == "pass":
                c["metrics"] = _bench_metrics(os.path.join(args.bench_dir, f"{name}.json"))
            checks.append(c)
    bench: Dict[str, Any] = {}
    for c in checks:
        m = c.get("metrics")
        if m:
            config, precision = c["name"][len("bench_"):].rsplit("_", 1)
            bench.setdefault(config, {})[precision] = m
    for runs in bench.values():
        fp32, amp = runs.get("fp32"), runs.get("amp")
        if fp32 and amp:
            runs["amp_speedup"] = {k: fp32["median_step_s"][k] / amp["median_step_s"][k]
                                   for k in fp32["median_step_s"] if amp["median_step_s"].get(k)}
    env = None
    if args.env and os.path.isfile(args.env):
        with open(args.env) as f:
            env = json.load(f)
    counts = {s: sum(c["status"] == s for c in checks) for s in ("pass", "fail", "skip")}
    summary = {
        "schema": SCHEMA, "mode": args.mode, "started": args.started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": round(float(args.wall_s), 1),
        "budget_s": int(args.budget_s), "ok": counts["fail"] == 0, "passed": counts["pass"], "failed": counts["fail"],
        "skipped": counts["skip"], "env": env, "benchmark": bench, "checks": checks,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, args.output)
    for config, runs in bench.items():
        for prec in ("fp32", "amp"):
            m = runs.get(prec)
            if m:
                print(f"benchmark {config} {prec}: MMT-PSM/supervised step {m['step_time_ratio_same_images']:.2f}x "
                      f"(same images), {m['step_time_ratio_same_labeled']:.2f}x (same labeled); peak "
                      f"{m['peak_mem_gib'].get('A') or 0:.2f} GiB; data share {m['data_time_share_serial']}")
        if "amp_speedup" in runs:
            print(f"benchmark {config}: AMP speed-up of the MMT-PSM step {runs['amp_speedup'].get('A', 0):.2f}x")
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped -> {args.output}")
    return 0


# ---------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--site", required=True)
    s.add_argument("--wheels", default="")
    s.add_argument("--d2-wheels", default="build/wheels")
    s = sub.add_parser("predict")
    CLI.add_config_argument(s, "config of the exported model", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--device", default="cuda")
    s = sub.add_parser("expect-keys")
    s.add_argument("file")
    s.add_argument("keys", nargs="+")
    s.add_argument("--allow-nan", action="store_true")
    s = sub.add_parser("ddp")
    CLI.add_output_argument(s, "folder for the two ranks' data, rank<R>.pth weights and logs", required=True)
    s.add_argument("--device", default="cuda")
    s.add_argument("--timeout", type=float, default=150.0)
    s = sub.add_parser("summary")
    s.add_argument("--results", required=True)
    CLI.add_output_argument(s, "the summary JSON file to write (output/gpu_check/summary.json)", required=True,
                            metavar="FILE")
    s.add_argument("--bench-dir", default="")
    s.add_argument("--env", default="")
    s.add_argument("--mode", default="run")
    s.add_argument("--started", default="")
    s.add_argument("--wall-s", default="0")
    s.add_argument("--budget-s", default="480")
    add_validate_arguments(sub.add_parser("validate"))
    args = p.parse_args(argv)
    return {"setup": cmd_setup, "predict": cmd_predict, "expect-keys": cmd_expect_keys, "ddp": cmd_ddp,
            "summary": cmd_summary, "validate": cmd_validate}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
