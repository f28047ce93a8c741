"""A 2-process DDP run on CPU (gloo): no hang when one rank's teacher predicts nothing, identical teachers."""
import os
import time

import torch
import torch.multiprocessing as mp
from common import tiny_cfg, tiny_synthetic


def _worker(rank: int, world: int, init_file: str, data_root: str, out_dir: str) -> None:
    import detectron2.engine.defaults as d2_defaults
    import torch.distributed as dist
    from detectron2.utils import comm

    from mmt_psm.data.datasets import register_cell_coco
    from mmt_psm.engine import Trainer

    torch.set_num_threads(1)  # two processes on a 2-core CI machine: no OpenMP oversubscription
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(world)))
    create = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = lambda model, **kw: create(model, device_ids=None, **kw)  # CPU DDP
    for split in ("train", "test", "unlabeled"):
        register_cell_coco(f"ddp_{split}", os.path.join(data_root, f"{split}.json"),
                           os.path.join(data_root, "images"), "", strip_annotations=split == "unlabeled")
    cfg = tiny_cfg(out_dir, "ddp", "MMTPSMRCNN")
    cfg.merge_from_list(["SOLVER.MAX_ITER", 5, "SOLVER.CHECKPOINT_PERIOD", 1000,
                         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    torch.manual_seed(rank)  # different local randomness on purpose; DDP must still keep the models in sync
    trainer = Trainer(cfg)
    if rank == 1:  # this rank's teacher predicts nothing: zero pseudo-labels, same collectives
        trainer.model.module.teacher.roi_heads.box_predictor.test_score_thresh = 1.01
    trainer.train()
    pseudo = trainer.storage.history("mmt_psm/pseudo_labels_per_image").values()
    torch.save({"teacher": trainer.model.module.teacher.state_dict(),
                "student": trainer.model.module.student.state_dict(),
                "pseudo": [v for v, _ in pseudo]}, os.path.join(out_dir, f"rank{rank}.pth"))
    dist.destroy_process_group()


def test_ddp_two_ranks_keep_identical_teachers(tmp_path):
    data_root = str(tmp_path / "data")
    tiny_synthetic(data_root, prefix="ddp")
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
    assert r0["pseudo"] and all(v > 0 for v in r0["pseudo"])
    assert r1["pseudo"] and all(v == 0 for v in r1["pseudo"])
    for part in ("teacher", "student"):
        diff = [k for k in r0[part] if not torch.equal(r0[part][k], r1[part][k])]
        assert not diff, (part, diff[:5])
