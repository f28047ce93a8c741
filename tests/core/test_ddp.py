"""A 2-process DDP run on CPU (gloo) with a BatchNorm backbone: the teacher (and the student) stay one model on
every rank although each rank's BN statistics see other images; no hang when one rank's teacher predicts
nothing; the training streams are sharded without overlap; distributed evaluation scores every test image once.
"""
import json
import os
import time

import torch
import torch.multiprocessing as mp
from common import tiny_cfg, tiny_synthetic

ITERS = 4


def _cfg(out_dir: str):
    cfg = tiny_cfg(out_dir, "ddp", "MMTPSMRCNN")
    cfg.merge_from_list(["SOLVER.MAX_ITER", ITERS, "SOLVER.CHECKPOINT_PERIOD", 1000,
                         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "MODEL.RESNETS.NORM", "BN",
                         "DATASETS.TEST", ("ddp_test",)])
    return cfg


def _worker(rank: int, world: int, init_file: str, data_root: str, out_dir: str) -> None:
    import detectron2.engine.defaults as d2_defaults
    import torch.distributed as dist
    from detectron2.utils import comm

    from mmt_psm.core import Trainer
    from mmt_psm.instance.datasets import register_cell_coco

    torch.set_num_threads(1)  # two processes on a 2-core CI machine: no OpenMP oversubscription
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(world)))
    create = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = lambda model, **kw: create(model, device_ids=None, **kw)  # CPU DDP
    for split in ("train", "test", "unlabeled"):
        register_cell_coco(f"ddp_{split}", os.path.join(data_root, f"{split}.json"),
                           os.path.join(data_root, "images"), "", strip_annotations=split == "unlabeled")
    cfg = _cfg(out_dir)
    torch.manual_seed(rank)  # different local randomness on purpose; the models must still stay in sync
    trainer = Trainer(cfg)
    model = trainer.model.module
    assert isinstance(model.student.backbone.bottom_up.stem.conv1.norm, torch.nn.BatchNorm2d)
    bn_before = model.student.backbone.bottom_up.stem.conv1.norm.running_mean.clone()
    box_predictor = model.teacher.roi_heads.box_predictor
    if rank == 1:  # this rank's teacher predicts nothing: zero pseudo-labels, same collectives
        box_predictor.test_score_thresh = 1.01
    trainer.train()
    box_predictor.test_score_thresh = 0.0
    pseudo = [v for v, _ in trainer.storage.history("mmt_psm/pseudo_labels_per_image").values()]
    results = Trainer.test(cfg, trainer.model)  # distributed: each rank scores its shard, rank 0 gathers

    # what each rank's training streams hand out in the first steps (a fresh loader: same seeds)
    it = iter(Trainer.build_train_loader(cfg))
    streams = []
    for _ in range(2 * ITERS):
        batch = next(it)
        streams.append({"labeled": [os.path.basename(d["file_name"]) for d in batch if d["labeled"]],
                        "unlabeled": [os.path.basename(d["file_name"]) for d in batch if not d["labeled"]]})
    torch.save({"teacher": model.teacher.state_dict(), "student": model.student.state_dict(),
                "bn_before": bn_before, "pseudo": pseudo, "streams": streams,
                "results": json.loads(json.dumps(results))}, os.path.join(out_dir, f"rank{rank}.pth"))
    dist.destroy_process_group()


def test_ddp_bn_two_ranks_keep_one_teacher_shard_data_and_gather_evaluation(tmp_path):
    data_root = str(tmp_path / "data")
    tiny_synthetic(data_root, prefix="ddp", n_train=4, n_test=3, n_unlabeled=4)  # 3 test images: shards 2 + 1
    out_dir = str(tmp_path / "out")
    os.makedirs(out_dir)
    ctx = mp.start_processes(_worker, args=(2, str(tmp_path / "init"), data_root, out_dir), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.time() + 400
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("DDP run did not finish in time (a rank is waiting on a collective)")
    r0, r1 = (torch.load(os.path.join(out_dir, f"rank{r}.pth"), weights_only=True) for r in (0, 1))
    assert len(r0["pseudo"]) == 2 and all(v > 0 for v in r0["pseudo"])  # 2 steps after a burn-in of 2
    assert len(r1["pseudo"]) == 2 and all(v == 0 for v in r1["pseudo"])

    # one model on every rank, BN statistics included (and they did move away from their initial values)
    for part in ("teacher", "student"):
        diff = [k for k in r0[part] if not torch.equal(r0[part][k], r1[part][k])]
        assert not diff, (part, diff[:5])
    key = "backbone.bottom_up.stem.conv1.norm.running_mean"
    assert not torch.equal(r0["student"][key], r0["bn_before"]) and not torch.equal(r0["teacher"][key], r0["bn_before"])

    # the streams: each step, the ranks get different images; every 2 steps (one pass of the 4 images over the
    # 2 ranks) each image is handed out exactly once
    for stream, n in (("labeled", 4), ("unlabeled", 4)):
        for step in range(0, 2 * ITERS, 2):
            seen = [name for r in (r0, r1) for s in (step, step + 1) for name in r["streams"][s][stream]]
            assert len(seen) == n and len(set(seen)) == n, (stream, step, seen)

    # evaluation: rank 0 holds the merged results of both models, rank 1 none; every test image scored once
    res = r0["results"]
    assert {"bbox", "segm", "cell", "bbox_student", "segm_student", "cell_student"} <= set(res)
    assert not r1["results"]
    with open(os.path.join(data_root, "test.json")) as f:
        test_ids = sorted(im["id"] for im in json.load(f)["images"])
    folder = os.path.join(out_dir, "inference", "ddp_test")
    with open(os.path.join(folder, "cell_metrics.json")) as f:
        assert sorted(img["image_id"] for img in json.load(f)) == test_ids
    coco = torch.load(os.path.join(folder, "instances_predictions.pth"), weights_only=False)
    assert sorted(p["image_id"] for p in coco) == test_ids
