"""Training state and checkpoints: a DetectionCheckpointer that writes atomically and loads plain detector weights
into teacher-student models, and the hook that checkpoints what Detectron2 does not (data seed, every rank's RNG
states)."""
from __future__ import annotations

import logging
import os
import random
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from mmt_psm.core.atomic import save_torch, write_text

logger = logging.getLogger(__name__)


class AtomicCheckpointer(DetectionCheckpointer):
    """Detectron2's checkpointer with two additions.

    - ``save``: an interrupted save never leaves a truncated ``.pth`` (or a ``last_checkpoint`` pointing at one,
      or a half-written ``last_checkpoint``): each file goes to a temp file renamed into place.
    - ``load`` of a plain detector checkpoint (``MODEL.WEIGHTS``: a supervised run, a COCO model, an ImageNet
      backbone) into a teacher-student model fills both ``student.*`` and ``teacher.*``, keeping Detectron2's
      name-matching heuristics and its skipping of shape-mismatched keys (e.g. another number of classes).
    """

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        save_torch(save_file, data)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``last_checkpoint`` at ``last_filename_basename`` (temp file + rename: never half-written)."""
        path = os.path.join(self.save_dir, "last_checkpoint")
        write_text(path, last_filename_basename)

    def _load_model(self, checkpoint: Dict[str, Any]):
        model = self.model
        state = checkpoint["model"]
        if hasattr(model, "teacher_student_pairs") and not any(k.startswith("student.") for k in state):
            if checkpoint.get("matching_heuristics", False):
                self._convert_ndarray_to_tensor(state)
                state = align_and_update_state_dicts(
                    model.student.state_dict(), state, c2_conversion=checkpoint.get("__author__") == "Caffe2"
                )
                checkpoint["matching_heuristics"] = False
            checkpoint["model"] = {f"{part}.{k}": v for k, v in state.items() for part in ("student", "teacher")}
        return super()._load_model(checkpoint)


def _numpy_state_to_tensors(state: tuple) -> tuple:
    kind, key, pos, has_gauss, gauss = state
    return kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


def capture_rng_state() -> Dict[str, Any]:
    """This process's python / numpy / torch (/ current CUDA device) RNG states, loadable with
    ``torch.load(weights_only=True)``."""
    state = {
        "python_rng": random.getstate(),
        # numpy's key array as a tensor: checkpoints stay loadable with torch.load(weights_only=True)
        "numpy_rng": _numpy_state_to_tensors(np.random.get_state()),
        "torch_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Set this process's RNGs to ``state`` (:func:`capture_rng_state`'s; a list ``cuda_rng``, as checkpoints before
    per-rank states held, sets every device)."""
    random.setstate(state["python_rng"])
    kind, key, pos, has_gauss, gauss = state["numpy_rng"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        cuda = state["cuda_rng"]
        if isinstance(cuda, (list, tuple)):
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda)


_RESEED = "reseed"


class TrainingStateHook(HookBase):
    """Checkpoints what Detectron2 does not: the data seed and the python/numpy/torch(/CUDA) RNG states of every
    rank, so that ``--resume`` continues exactly like an uninterrupted run.

    A run that does not resume re-seeds every RNG with ``SEED`` (+ rank) when training starts. Building a
    teacher or a second data stream draws random numbers, so without this a teacher-student run would sample
    other RPN / ROI proposals and dropout masks than a supervised run of the same seed from its first step,
    and its burn-in would drift from the supervised run's first iterations (BENCHMARKS.md measures it).

    Multi-process: only rank 0 writes checkpoints, so at every iteration that ends with a scheduled checkpoint
    (``SOLVER.CHECKPOINT_PERIOD`` and the last iteration) :meth:`gather_hook` all-gathers each rank's RNG state just
    before the checkpointer runs, and the checkpoint holds ``rng_states[rank]`` for every rank; a resumed rank
    restores its own. A checkpoint from another world size, one written outside that schedule, or one written
    before per-rank states (one state) re-seeds each rank with ``SEED + rank`` instead, with a warning: every rank
    still draws its own random numbers, but the resumed run is not the uninterrupted one."""

    def __init__(self):
        self._gathered: Optional[Tuple[int, List[Dict[str, Any]]]] = None
        self._pending: Any = None

    def state_dict(self) -> Dict[str, Any]:
        world = comm.get_world_size()
        if world == 1:
            states = [capture_rng_state()]
        elif self._gathered is not None and self._gathered[0] == self.trainer.iter:
            states = self._gathered[1]
        else:  # a save outside the checkpoint schedule: the other ranks' states are not here
            logger.warning(f"Checkpoint at iteration {self.trainer.iter} outside SOLVER.CHECKPOINT_PERIOD: it holds "
                           f"rank {comm.get_rank()}'s RNG state only (a resume from it re-seeds every rank)")
            states = [capture_rng_state()]
        return {"data_seed": self.trainer.data_seed, "world_size": world, "rng_states": states}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        # RNG states are applied in before_train: resuming rebuilds the data loader, which draws from torch's RNG
        self.trainer.data_seed = int(state["data_seed"])
        states = state.get("rng_states")
        if states is None:  # written before per-rank states: rank 0's state only
            states = [{k: v for k, v in state.items() if k.endswith("_rng")}]
        world, rank = comm.get_world_size(), comm.get_rank()
        if len(states) == world:
            self._pending = states[rank]
        else:
            logger.warning(f"The checkpoint holds the RNG states of {len(states)} rank(s) and this run has {world}: "
                           "every rank's RNGs are re-seeded with SEED + rank (the resumed run draws other random "
                           "numbers than an uninterrupted one would)")
            self._pending = _RESEED

    def before_train(self) -> None:
        state, self._pending = self._pending, None
        if state is None or state == _RESEED:
            seed = int(self.trainer.cfg.SEED)
            if seed >= 0:  # SEED < 0: Detectron2 drew a random seed at set-up; there is nothing to align
                seed_all_rng(seed + comm.get_rank())
            elif state == _RESEED:
                seed_all_rng(None)  # a fresh random seed in this process
            return
        restore_rng_state(state)

    def checkpoint_due(self, iteration: int) -> bool:
        """Whether Detectron2's PeriodicCheckpointer saves after ``iteration`` (its ``step`` rule)."""
        period = int(self.trainer.cfg.SOLVER.CHECKPOINT_PERIOD)
        return (period > 0 and (iteration + 1) % period == 0) or iteration >= self.trainer.max_iter - 1

    def gather(self) -> None:
        """Multi-process, at an iteration that ends with a checkpoint: all-gather every rank's RNG state (every rank
        calls this at the same point of the step)."""
        it = self.trainer.iter
        if comm.get_world_size() > 1 and self.checkpoint_due(it):
            self._gathered = (it, comm.all_gather(capture_rng_state()))

    def gather_hook(self) -> HookBase:
        """The hook to place right before the checkpointer: it runs :meth:`gather` after every step, so the states
        are those the checkpoint is written with."""
        return _GatherRNGStates(self)


class _GatherRNGStates(HookBase):
    def __init__(self, state_hook: TrainingStateHook):
        self._state_hook = state_hook

    def after_step(self) -> None:
        self._state_hook.gather()
