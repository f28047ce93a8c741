"""Two gloo processes running real Trainers on CPU: a NaN loss on one rank stops both ranks with the same
FloatingPointError (no hang); every model's BatchNorm running statistics (supervised Mask R-CNN, U-Net
SemanticSegmentor, MixedSupervisionSegmentor, PSMNucleiSegmentor) are one model on every rank after training,
although each rank normalised other images."""
from __future__ import annotations

import os
import time

import torch
import torch.multiprocessing as mp
from common import REPO, tiny_cfg, tiny_synthetic
from psm_common import SCRATCH, write_tiles
from semantic_common import tiny_acdc, tiny_semantic_cfg

ITERS = 2


def _launch(fn, tmp_path, name, *args, timeout=60):
    """``fn(rank, *args)`` on 2 spawned processes sharing a gloo group; fails if either is alive after ``timeout``
    seconds (a rank waiting on a collective)."""
    ctx = mp.start_processes(_worker, args=(2, str(tmp_path / f"init_{name}"), fn, args), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=2):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError(f"{name}: a rank is still running after {timeout} s (hang in a collective?)")


def _worker(rank, world, init_file, fn, args):
    import detectron2.engine.defaults as d2_defaults
    import torch.distributed as dist
    from detectron2.utils import comm

    torch.set_num_threads(1)  # two processes on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(world)))
    create = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = lambda model, **kw: create(model, device_ids=None, **kw)  # CPU DDP
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _register(root):
    from mmt_psm.nuclei.datasets import register_psm_labels
    from mmt_psm.semantic.acdc_datasets import register_all_acdc

    tiny_synthetic(os.path.join(root, "cells"), prefix="gd")  # (re)writes the same files: same seed
    register_all_acdc(os.path.join(root, "acdc", "acdc"), prefix="gdacdc")
    register_psm_labels("gd_psm", os.path.join(root, "psm_labels"))


def _psm_cfg(out_dir):
    from mmt_psm.config import load_config

    return load_config(os.path.join(REPO, "configs", "psm", "segmentation.yaml"), SCRATCH + [
        "MODEL.UNET.CHANNELS", (4, 8, 16), "MODEL.UNET.DROPOUT", (0.0, 0.0, 0.0),
        "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["res1", "res2", "res3"], "INPUT.PSM_CROP_SIZE", 32,
        "SEMI.IMS_PER_BATCH_LABELED", 1, "SOLVER.WARMUP_ITERS", 0, "DATASETS.TRAIN", ("gd_psm",),
        "SOLVER.MAX_ITER", ITERS, "SOLVER.CHECKPOINT_PERIOD", 1000, "OUTPUT_DIR", out_dir, "SEED", 3,
        "DATALOADER.STREAM_SEED", 5])


def _configs(root):
    out = os.path.join(root, "out")
    rcnn = tiny_cfg(os.path.join(out, "rcnn"), "gd")
    rcnn.merge_from_list(["MODEL.RESNETS.NORM", "BN", "SOLVER.MAX_ITER", ITERS, "SOLVER.CHECKPOINT_PERIOD", 1000])
    cfgs = {"mask_rcnn": rcnn}
    for meta in ("SemanticSegmentor", "MixedSupervisionSegmentor"):
        cfg = tiny_semantic_cfg(os.path.join(out, meta), meta, prefix="gdacdc")
        cfg.merge_from_list(["SEMI.IMS_PER_BATCH_LABELED", 1, "SOLVER.MAX_ITER", ITERS])
        if meta != "SemanticSegmentor":
            cfg.merge_from_list(["SEMI.IMS_PER_BATCH_UNLABELED", 1])
        cfgs[meta] = cfg
    cfgs["PSMNucleiSegmentor"] = _psm_cfg(os.path.join(out, "psm"))
    return cfgs


def _bn_run(rank, root):
    from mmt_psm.core import Trainer

    _register(root)
    result = {}
    for name, cfg in _configs(root).items():
        torch.manual_seed(rank)
        trainer = Trainer(cfg)
        model = trainer.model.module
        init = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}
        assert init, f"{name}: no BatchNorm statistics"
        trainer.train()
        state = model.state_dict()
        result[name] = {"init": init, "final": {k: state[k].clone() for k in init}}
    torch.save(result, os.path.join(root, f"bn_rank{rank}.pth"))


def _prepare(tmp_path):
    from mmt_psm.nuclei.pipeline.ground_truth import run_supervised_labels
    from mmt_psm.nuclei.pipeline.label_files import resolve_images

    root = str(tmp_path)
    tiny_synthetic(os.path.join(root, "cells"), prefix="gd")
    tiny_acdc(os.path.join(root, "acdc"), prefix="gdacdc")
    tiles, gt = os.path.join(root, "tiles"), os.path.join(root, "gt")
    write_tiles(tiles, n=2, size=(48, 48), gt_folder=gt)
    run_supervised_labels(resolve_images(tiles, gt), os.path.join(root, "psm_labels"), gt, log=lambda m: None)
    return root


def test_every_models_bn_statistics_are_one_model_on_every_rank(tmp_path):
    root = _prepare(tmp_path)
    _launch(_bn_run, tmp_path, "bn", root, timeout=240)
    r0, r1 = (torch.load(os.path.join(root, f"bn_rank{r}.pth"), weights_only=True) for r in (0, 1))
    assert set(r0) == {"mask_rcnn", "SemanticSegmentor", "MixedSupervisionSegmentor", "PSMNucleiSegmentor"}
    for name in r0:
        final0, final1, init = r0[name]["final"], r1[name]["final"], r0[name]["init"]
        differ = [k for k in final0 if not torch.equal(final0[k], final1[k])]
        assert not differ, (name, differ[:5])
        assert any(not torch.equal(final0[k], init[k]) for k in init), name  # training did move them


def _nan_run(rank, root):
    from detectron2.utils.events import get_event_storage

    from mmt_psm.core import Trainer

    _register(root)
    cfg = _configs(root)["SemanticSegmentor"]
    cfg.merge_from_list(["SOLVER.MAX_ITER", 4])
    trainer = Trainer(cfg)
    inner = trainer.model.module
    forward = inner.forward

    def nan_on_rank1_at_iteration_1(batched_inputs):
        losses = forward(batched_inputs)
        if rank == 1 and get_event_storage().iter == 1:
            losses["loss_sem_seg"] = losses["loss_sem_seg"] * float("nan")
        return losses

    inner.forward = nan_on_rank1_at_iteration_1
    try:
        trainer.train()
        outcome = "finished"
    except Exception as e:  # noqa: BLE001  (what each rank ends with is the result)
        outcome = f"{type(e).__name__}: {e}"
    with open(os.path.join(root, f"nan_rank{rank}.txt"), "w") as f:
        f.write(f"{outcome}\niter {trainer.iter}")


def test_nan_loss_on_one_rank_stops_every_rank(tmp_path):
    root = _prepare(tmp_path)
    start = time.time()
    _launch(_nan_run, tmp_path, "nan", root, timeout=60)
    for rank in (0, 1):
        with open(os.path.join(root, f"nan_rank{rank}.txt")) as f:
            outcome, last = f.read().split("\n")
        assert outcome.startswith("FloatingPointError: Loss became infinite or NaN at iteration=1"), (rank, outcome)
        assert "rank 1: {'loss_sem_seg': nan}" in outcome and "rank 0:" not in outcome, outcome
        assert last == "iter 1", (rank, last)  # stopped in the step that went wrong, before the optimizer step
    assert time.time() - start < 60


def _resume_run(rank, root, full, part):
    """An uninterrupted 4-iteration run, then (same processes) a run resumed from its checkpoint after 2."""
    import random
    import shutil

    import numpy as np
    from detectron2.utils import comm

    from mmt_psm.core import Trainer

    _register(root)
    for out_dir, resume in ((full, False), (part, True)):
        if resume and rank == 0:  # the interrupted run's folder: only what existed after iteration 2
            os.makedirs(part)
            shutil.copy(os.path.join(full, "model_0000001.pth"), part)
            with open(os.path.join(part, "last_checkpoint"), "w") as f:
                f.write("model_0000001.pth")
        comm.synchronize()
        cfg = _configs(root)["SemanticSegmentor"]  # U-Net with dropout: training draws from each rank's RNGs
        cfg.merge_from_list(["SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2, "OUTPUT_DIR", out_dir])
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=resume)
        trainer.train()
        torch.save({"start": trainer.start_iter, "model": trainer.model.module.state_dict(),
                    "next": [random.random(), float(np.random.rand()), float(torch.rand(1))]},
                   os.path.join(out_dir, f"resume_rank{rank}.pth"))
        comm.synchronize()


def test_resume_continues_every_ranks_own_rng_stream(tmp_path):
    root = _prepare(tmp_path)
    full, part = os.path.join(root, "full"), os.path.join(root, "part")
    _launch(_resume_run, tmp_path, "resume", root, full, part, timeout=120)
    a = [torch.load(os.path.join(full, f"resume_rank{r}.pth"), weights_only=True) for r in (0, 1)]
    b = [torch.load(os.path.join(part, f"resume_rank{r}.pth"), weights_only=True) for r in (0, 1)]
    assert [x["start"] for x in b] == [2, 2]
    assert a[0]["next"] != a[1]["next"]  # each rank draws its own numbers
    for r in (0, 1):
        assert b[r]["next"] == a[r]["next"], r  # ... and after a resume the same ones as without it
        differ = [k for k in a[r]["model"] if not torch.equal(a[r]["model"][k], b[r]["model"][k])]
        assert not differ, (r, differ[:5])
