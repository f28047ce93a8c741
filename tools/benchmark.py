#!/usr/bin/env python
"""Step time and peak memory of an MMT-PSM training step against supervised Mask R-CNN steps, in one run.

Variants (synthetic in-memory inputs, no data loading):
  A  MMT-PSM, past burn-in (unsupervised path on): L labeled + U unlabeled images, + the EMA teacher update;
  B  supervised GeneralizedRCNN on L+U labeled images (same number of student images);
  C  supervised GeneralizedRCNN on the same L labeled images.
Steps are interleaved (A B C, B C A, C A B, ...) so drift hits all three alike; medians are reported.

    python tools/benchmark.py --config-file configs/mmt_psm_R50.yaml --device cuda --amp --iters 20 --profile

Peak memory = the variant's own persistent state (parameters, buffers, optimizer state) + the most a step adds
over what is allocated before it: the peak it would have alone on the device. CUDA: ``max_memory_allocated``;
CPU: ``VmHWM - VmRSS`` around one extra step after ``malloc_trim`` and a ``clear_refs`` peak reset (or n/a).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

import detectron2
import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage, get_event_storage

from mmt_psm.config import load_config  # importing mmt_psm registers its models
from mmt_psm.core.cli import add_config_argument
from mmt_psm.core.ema import ema_update_
from mmt_psm.instance.bench_inputs import (
    data_loading_times,
    dataset_dicts,
    labeled_dict,
    load_weights,
    unlabeled_dict,
)
from mmt_psm.instance.view_mapper import MMTPSMViewMapper

NAMES = {"A": "MMT-PSM", "T": "MMT-PSM, trained weights", "B": "supervised, same images",
         "C": "supervised, same labeled"}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command line; trailing ``KEY VALUE`` pairs override the config."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_argument(p, "MMT-PSM config to time", default="configs/mmt_psm_R50.yaml")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="torch.autocast(float16) + GradScaler (CUDA only)")
    p.add_argument("--size", type=int, default=512, help="square image side in pixels")
    p.add_argument("--labeled", type=int, default=2, help="L: labeled images per step")
    p.add_argument("--unlabeled", type=int, default=2, help="U: unlabeled images per step")
    p.add_argument("--instances", type=int, default=8, help="ground-truth instances per labeled image")
    p.add_argument("--iters", type=int, default=20, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps per variant first")
    p.add_argument("--lr", type=float, default=None, help="default BASE_LR*WARMUP_FACTOR: a steady workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--profile", action="store_true", help="also time the parts of each step (synchronised)")
    p.add_argument("--weights", default="", help="a trained checkpoint (plain detector or MMT-PSM): adds variant "
                   "T = MMT-PSM with it as teacher and student (realistic pseudo-label count), B/C load it too")
    p.add_argument("--dataset", default="", help="take the images from this registered labeled data set "
                   "(training mappers, config crop/resize; --size/--instances ignored) instead of noise images; "
                   "also times the mappers on one step's images (data time)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (table on stderr)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = p.parse_args(argv)
    if (args.amp and args.device != "cuda") or min(args.labeled, args.unlabeled, args.iters) < 1 or args.warmup < 0:
        p.error("--amp needs --device cuda; --labeled, --unlabeled, --iters must be >= 1; --warmup >= 0")
    return args


def load_cfg(args: argparse.Namespace) -> CfgNode:
    """The MMT-PSM config from ``--config-file`` + overrides, on ``--device``."""
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = args.device
    if cfg.MODEL.META_ARCHITECTURE != "MMTPSMRCNN":
        raise ValueError(f"{args.config_file}: MODEL.META_ARCHITECTURE must be MMTPSMRCNN")
    cfg.SOLVER.BASE_LR = args.lr if args.lr is not None else cfg.SOLVER.BASE_LR * cfg.SOLVER.WARMUP_FACTOR
    return cfg


class PhaseTimer:
    """Accumulates wall time per phase between ``switch`` calls (synchronising CUDA first when enabled)."""

    def __init__(self, cuda: bool, enabled: bool):
        self.cuda, self.enabled, self.phase, self.t = cuda, enabled, None, 0.0
        self.steps: List[Dict[str, float]] = []

    def switch(self, phase: Optional[str]) -> None:
        """End the current phase, start ``phase`` (``None``: end of step)."""
        if not self.enabled:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self.phase is None:
            self.steps.append({})
        else:
            self.steps[-1][self.phase] = self.steps[-1].get(self.phase, 0.0) + now - self.t
        self.phase, self.t = phase, now


def install_mmt_profile_hooks(model: torch.nn.Module, timer: PhaseTimer) -> Callable[[], None]:
    """Split an MMT-PSM forward into parts through the model's public ``part_timer`` hook (``MMTPSMRCNN``).

    Parts: ``sup_forward`` (student, labeled images), ``teacher_backbones`` (all views, one batched pass),
    ``teacher_rpn``, ``teacher_detect`` (box branch on every proposal of the views it detects on, box inference,
    NMS), ``teacher_mask_head`` (on the detections), ``teacher_fg_map``, ``teacher_box_heads`` (the sampled
    proposals on views whose detection pass did not score them), ``teacher_distill_masks`` (mask logits of the
    positives, mask distillation), ``teacher_other`` (images to the device, fusion, sampling, adaptors, flips,
    sensitivity, mining), ``student_unsup`` (student view backbone, box head, adaptors, losses). Returns an undo
    function.
    """
    stack: List[Optional[str]] = []

    @contextlib.contextmanager
    def part(name: str) -> Iterator[None]:
        stack.append(timer.phase)
        timer.switch(name)
        try:
            yield
        finally:
            timer.switch(stack.pop())

    model.part_timer = part

    def remove() -> None:
        model.part_timer = None

    return remove


@dataclass
class Variant:
    """One model, its optimizer, its fixed batch and its measurements."""
    key: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batch: List[Dict[str, Any]]
    scaler: Optional[Any] = None
    ema_decay: float = 0.99
    times: List[float] = field(default_factory=list)
    step_peaks: List[int] = field(default_factory=list)
    stats: Dict[str, List[float]] = field(default_factory=dict)
    state_bytes: int = 0


def build_variant(key: str, cfg: CfgNode, batch: List[Dict], args: argparse.Namespace) -> Variant:
    """Model (same init seed for all variants; ``--weights`` for T, B, C), SGD optimizer of the config,
    GradScaler when ``--amp``."""
    torch.manual_seed(args.seed)
    model = build_model(cfg).train()
    if args.weights and key != "A":
        load_weights(model, args.weights)
    scaler = torch.amp.GradScaler("cuda") if args.amp else None
    return Variant(key, model, build_optimizer(cfg, model), batch, scaler, cfg.SEMI.EMA_DECAY)


def train_step(v: Variant, timer: PhaseTimer) -> None:
    """forward + backward + optimizer step (+ EMA teacher update), as SimpleTrainer/AMPTrainer + EMA hook."""
    timer.switch("forward")
    amp = torch.autocast("cuda", dtype=torch.float16) if v.scaler is not None else contextlib.nullcontext()
    with amp:
        losses = v.model(v.batch)
        loss = sum(losses.values())
    timer.switch("backward")
    v.optimizer.zero_grad(set_to_none=True)  # after the forward, as in SimpleTrainer (old grads live till here)
    (v.scaler.scale(loss) if v.scaler is not None else loss).backward()
    if not torch.isfinite(loss):  # one sync here, like SimpleTrainer's metric writing between backward and step
        raise FloatingPointError(f"variant {v.key}: non-finite loss {losses}")
    timer.switch("optimizer")
    if v.scaler is not None:
        v.scaler.step(v.optimizer)
        v.scaler.update()
    else:
        v.optimizer.step()
    if hasattr(v.model, "teacher_student_pairs"):
        timer.switch("ema")
        for teacher, student in v.model.teacher_student_pairs():
            ema_update_(teacher, student, v.ema_decay)
    timer.switch(None)


def persistent_bytes(v: Variant) -> int:
    """Bytes of the state kept between steps: parameters, buffers, gradients (if kept), optimizer state."""
    tensors = list(v.model.parameters()) + list(v.model.buffers())
    tensors += [p.grad for p in v.model.parameters() if p.grad is not None]
    for state in v.optimizer.state.values():
        tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":"))


def cpu_step_peak(v: Variant) -> Optional[int]:
    """Resident-memory peak of one step over the resident memory before it (bytes), or None if unmeasurable."""
    try:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so the RSS before is live memory
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _proc_status_kib("VmRSS")
        train_step(v, PhaseTimer(False, False))
        return (_proc_status_kib("VmHWM") - before) * 1024
    except (OSError, StopIteration, AttributeError):
        return None


def run_rounds(variants: List[Variant], n: int, cuda: bool, record: bool,
               timers: Optional[Dict[str, PhaseTimer]] = None) -> None:
    """``n`` rounds, each one step of every variant, the order rotated by one each round."""
    for r in range(n):
        for i in range(len(variants)):
            v = variants[(r + i) % len(variants)]
            t = timers[v.key] if timers else PhaseTimer(cuda, False)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            train_step(v, t)
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if record:
                v.times.append(elapsed)
                if hasattr(v.model, "teacher_student_pairs"):  # this step's MMT-PSM statistics, per variant
                    for k, (val, _) in get_event_storage().latest().items():
                        if k.startswith("mmt_psm/"):
                            v.stats.setdefault(k, []).append(val)
                v.step_peaks += [torch.cuda.max_memory_allocated() - before] if cuda else []


def device_name(device: str) -> str:
    """GPU name, or the CPU model with core and torch-thread counts."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    """Build the three variants, measure them interleaved, and return the results dict."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = load_cfg(args)
    sup_cfg = cfg.clone()
    sup_cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    rng = np.random.default_rng(args.seed)
    ncls, view_kwargs = cfg.MODEL.ROI_HEADS.NUM_CLASSES, MMTPSMViewMapper.from_config(cfg)["view_kwargs"]
    if args.dataset:
        lab, unl = dataset_dicts(cfg, args)
    else:
        lab = [labeled_dict(rng, args.size, args.instances, ncls) for _ in range(args.labeled + args.unlabeled)]
        unl = [unlabeled_dict(rng, args.size, view_kwargs) for _ in range(args.unlabeled)]
    variants = [build_variant("A", cfg, lab[: args.labeled] + unl, args)]
    if args.weights:
        variants.append(build_variant("T", cfg, lab[: args.labeled] + unl, args))
    variants += [build_variant("B", sup_cfg, lab, args), build_variant("C", sup_cfg, lab[: args.labeled], args)]
    cuda, semi = args.device == "cuda", cfg.SEMI
    it = semi.BURN_IN_ITERS + semi.RAMP_UP_ITERS  # past burn-in (and ramp-up: full unsupervised weight)
    it = it if it <= cfg.SOLVER.MAX_ITER - semi.RAMP_DOWN_ITERS else semi.BURN_IN_ITERS
    out: Dict[str, Any] = {}
    with EventStorage(start_iter=it):
        run_rounds(variants, args.warmup, cuda, record=False)
        run_rounds(variants, args.iters, cuda, record=True)
        for v in variants:
            v.state_bytes = persistent_bytes(v)  # now with gradients and momentum buffers
        stats = {k: statistics.median(vals) for k, vals in variants[0].stats.items()}
        trained = {k: statistics.median(vals) for k, vals in variants[1].stats.items()} if args.weights else {}
        if "mmt_psm/pseudo_labels_per_image" not in stats:
            raise RuntimeError("the MMT-PSM unsupervised path did not run")
        for v in variants if not cuda else []:
            v.step_peaks = [p for p in [cpu_step_peak(v)] if p is not None]
        if args.profile:
            timers = {v.key: PhaseTimer(cuda, True) for v in variants}
            remove = install_mmt_profile_hooks(variants[0].model, timers["A"])
            try:
                run_rounds(variants, args.iters, cuda, record=False, timers=timers)
            finally:
                remove()
            out["profile"] = {k: summarize_profile(t.steps) for k, t in timers.items()}
    med = {v.key: statistics.median(v.times) for v in variants}
    ratio = lambda a, b: a / b if a is not None and b else None
    # the data side of an MMT-PSM step (real images only): its L + U images through the training mappers
    data_s = statistics.median(data_loading_times(cfg, args, args.iters)) if args.dataset else None
    peak = {v.key: (max(v.step_peaks) + v.state_bytes if v.step_peaks else None) for v in variants}
    out.update({
        "step_time_ratio_same_images": med["A"] / med["B"],
        "step_time_ratio_same_labeled": med["A"] / med["C"],
        "step_time_ratio_same_images_trained": ratio(med.get("T"), med["B"]),
        "step_time_ratio_same_labeled_trained": ratio(med.get("T"), med["C"]),
        "peak_mem_ratio_same_images": ratio(peak["A"], peak["B"]),
        "peak_mem_ratio_same_labeled": ratio(peak["A"], peak["C"]),
        "data_time_per_step_s": data_s,
        "data_time_share_serial": ratio(data_s, None if data_s is None else data_s + med["A"]),
        "loader_workers_to_hide_data_time": None if data_s is None else math.ceil(data_s / med["A"]),
        "variants": {v.key: {
            "name": NAMES[v.key], "labeled_images": sum(d["labeled"] for d in v.batch),
            "unlabeled_images": sum(not d["labeled"] for d in v.batch), "median_step_s": med[v.key],
            "min_step_s": min(v.times), "max_step_s": max(v.times), "peak_mem_bytes": peak[v.key],
            "persistent_state_bytes": v.state_bytes} for v in variants},
        "peak_mem_method": ("cuda max_memory_allocated per step - allocated before + own persistent state"
                            if cuda else "VmHWM - VmRSS around one step (malloc_trim, clear_refs) + own state"),
        "mmt_psm_stats": stats, "mmt_psm_stats_trained": trained, "storage_iter": it,
        "device": args.device, "device_name": device_name(args.device), "amp": args.amp,
        "torch": torch.__version__, "detectron2": detectron2.__version__, "cuda": torch.version.cuda if cuda else None,
        "python": sys.version.split()[0],
        "config_file": args.config_file, "opts": args.opts, "weights": args.weights,
        "dataset": args.dataset, "size": args.size, "labeled": args.labeled,
        "unlabeled": args.unlabeled, "instances": args.instances, "iters": args.iters, "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "lr": cfg.SOLVER.BASE_LR, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    return out


def summarize_profile(steps: List[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Median seconds per part (largest first) and its share of the median step total."""
    med = {k: statistics.median(s.get(k, 0.0) for s in steps) for k in {k for s in steps for k in s}}
    med["total"] = statistics.median(sum(s.values()) for s in steps)
    return {k: {"median_s": t, "share": t / med["total"]} for k, t in sorted(med.items(), key=lambda x: -x[1])}


def format_report(r: Dict[str, Any]) -> str:
    """Readable table of the results."""
    gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f} GiB"
    inputs = f"data set {r['dataset']}" if r.get("dataset") else f"{r['size']}x{r['size']}"
    lines = [f"{r['device_name']} | torch {r['torch']} | {'AMP fp16' if r['amp'] else 'fp32'} | "
             f"{inputs} | L={r['labeled']} U={r['unlabeled']} | {r['iters']} iters "
             f"(+{r['warmup']} warm-up) | {r['config_file']}",
             f"{'':2} {'variant':26} {'lab+unl':>7} {'median':>9} {'min':>9} {'max':>9} {'peak mem':>10}"]
    for k, v in r["variants"].items():
        lines.append(f"{k:2} {v['name']:26} {v['labeled_images']:>3}+{v['unlabeled_images']:<3} "
                     f"{v['median_step_s'] * 1e3:7.1f}ms {v['min_step_s'] * 1e3:7.1f}ms "
                     f"{v['max_step_s'] * 1e3:7.1f}ms {gib(v['peak_mem_bytes']):>10}")
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}x"
    if r.get("step_time_ratio_same_images_trained") is not None:
        lines.append(f"trained weights ({r['weights']}): step time  T/B "
                     f"{fmt(r['step_time_ratio_same_images_trained'])}  T/C "
                     f"{fmt(r['step_time_ratio_same_labeled_trained'])}")
    lines.append(f"step time  A/B {fmt(r['step_time_ratio_same_images'])}  A/C {fmt(r['step_time_ratio_same_labeled'])}"
                 f" | peak mem  A/B {fmt(r['peak_mem_ratio_same_images'])}  "
                 f"A/C {fmt(r['peak_mem_ratio_same_labeled'])}   ({r['peak_mem_method']})")
    if r.get("data_time_per_step_s") is not None:
        lines.append(f"data: {r['data_time_per_step_s'] * 1e3:.1f} ms to map one step's L+U images in one process, "
                     f"{r['data_time_share_serial'] * 100:.1f} % of a step if not overlapped (DATALOADER.NUM_WORKERS "
                     f"0); >= {r['loader_workers_to_hide_data_time']} loader worker(s) hide it")
    lines.append("MMT-PSM: " + ", ".join(f"{k.split('/')[1]} {v:.1f}" for k, v in r["mmt_psm_stats"].items()))
    if r.get("mmt_psm_stats_trained"):
        lines.append("MMT-PSM, trained weights: " + ", ".join(
            f"{k.split('/')[1]} {v:.1f}" for k, v in r["mmt_psm_stats_trained"].items()))
    for key, parts in r.get("profile", {}).items():
        lines.append(f"profile {key} ({NAMES[key]}), median per part:")
        lines += [f"   {p:22} {d['median_s'] * 1e3:8.1f} ms {d['share'] * 100:5.1f} %" for p, d in parts.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run, print the table (stderr with ``--json``) and the JSON object."""
    args = parse_args(argv)
    result = benchmark(args)
    print(format_report(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    main()
