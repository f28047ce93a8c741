"""One training loader for labeled + unlabeled images, resumable to the exact sample.

Each step yields ONE list: ``IMS_PER_BATCH_LABELED`` labeled dicts then ``IMS_PER_BATCH_UNLABELED`` unlabeled
dicts (per GPU), each dict carrying ``"labeled": bool``. So Detectron2's SimpleTrainer/AMPTrainer, DDP and hooks
work unchanged. Each stream has its own seeded sampler. A sample's augmentation randomness is seeded by its
position in its stream, so the data of iteration ``t`` is the same whether training ran straight through or
was resumed at ``t``, with any number of workers (``DATALOADER.NUM_WORKERS``): batches are formed before they
reach the workers (:func:`build_stream_loader`). Exact as long as a mapper draws its randomness from python's,
numpy's and torch's global RNGs (which are seeded per sample); a library with an RNG of its own is not covered.
"""
from __future__ import annotations

import itertools
import logging
import random
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import DatasetFromList
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.utils import comm
from torch.utils.data import BatchSampler, Dataset, Sampler

logger = logging.getLogger(__name__)


class StreamSampler(Sampler):
    """An infinite, seeded, shuffled stream over ``size`` items, sharded round-robin over ranks.

    Yields ``position * size + index``: the stream position travels with the index so the dataset can seed
    the sample's augmentations from it. ``start`` skips the first ``start`` positions (for resuming).
    """

    def __init__(self, size: int, seed: int, start: int = 0, shuffle: bool = True):
        if size <= 0:
            raise ValueError("StreamSampler needs a non-empty data set")
        self._size, self._seed, self._start, self._shuffle = size, int(seed), int(start), shuffle
        self._rank, self._world = comm.get_rank(), comm.get_world_size()

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self._seed)
        for epoch in itertools.count():
            perm = torch.randperm(self._size, generator=g) if self._shuffle else torch.arange(self._size)
            first = epoch * self._size
            if first + self._size <= self._start:
                continue
            for offset, index in enumerate(perm.tolist()):
                pos = first + offset
                if pos >= self._start and pos % self._world == self._rank:
                    yield pos * self._size + index


class PositionSeededDataset(Dataset):
    """Maps ``dataset_dicts[index]`` with ``mapper``, its python/numpy/torch randomness seeded from
    (seed, stream position) and the caller's RNG state left untouched."""

    def __init__(self, dataset_dicts: Sequence[Dict[str, Any]], mapper: Callable, seed: int, labeled: bool):
        # Detectron2's serialised list: workers share one buffer, and each access returns a fresh copy
        self._dicts = DatasetFromList(list(dataset_dicts), copy=True, serialize=True)
        self._mapper, self._seed, self._labeled = mapper, int(seed), labeled

    def __len__(self) -> int:
        return len(self._dicts)

    def __getitem__(self, encoded: int) -> Dict[str, Any]:
        pos, index = divmod(int(encoded), len(self._dicts))
        sample_seed = (self._seed * 1_000_003 + pos) % (2**32)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(sample_seed)
                np.random.seed(sample_seed)
                torch.manual_seed(sample_seed)
                record = self._dicts[index]
                out = self._mapper(record)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        if out is None:
            name = record.get("file_name", index)
            raise RuntimeError(f"the training mapper returned None for {name}")
        out["labeled"] = self._labeled
        return out


def build_stream_loader(
    dataset_dicts: Sequence[Dict[str, Any]],
    mapper: Callable,
    images_per_gpu: int,
    seed: int,
    labeled: bool,
    start_iter: int = 0,
    num_workers: int = 0,
) -> Iterator[List[Dict[str, Any]]]:
    """A batch loader over one stream (lists of ``images_per_gpu`` mapped dicts), starting at iteration
    ``start_iter``.

    The batches are formed in the main process (a ``BatchSampler`` over the stream) and handed to the
    ``num_workers`` workers one whole batch at a time, delivered in order: batch ``t`` holds the stream's positions
    ``[t * images_per_gpu, (t + 1) * images_per_gpu)`` of this rank whatever the worker count, so a resume at any
    iteration is exact with workers too. (Detectron2 v0.6's ``build_batch_data_loader`` deals single samples to
    the workers round-robin and each worker batches its own: with N workers a resume was exact only at iterations
    that are multiples of N.)"""
    world = comm.get_world_size()
    sampler = StreamSampler(len(dataset_dicts), seed, start=start_iter * images_per_gpu * world)
    dataset = PositionSeededDataset(dataset_dicts, mapper, seed, labeled)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, images_per_gpu, drop_last=True),
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
        worker_init_fn=worker_init_reset_seed,
    )


class TwoStreamLoader:
    """Zips a labeled and an (optional) unlabeled batch loader into one list per step."""

    def __init__(self, labeled: Iterator[List[Dict]], unlabeled: Optional[Iterator[List[Dict]]] = None):
        self.labeled, self.unlabeled = labeled, unlabeled

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        # create the inner iterators now, not at the first next(): a DataLoader iterator draws its base seed
        # from torch's global RNG, which must happen at the same point whether or not training was resumed
        labeled = iter(self.labeled)
        unlabeled = iter(self.unlabeled) if self.unlabeled is not None else None
        return self._batches(labeled, unlabeled)

    @staticmethod
    def _batches(labeled: Iterator, unlabeled: Optional[Iterator]) -> Iterator[List[Dict[str, Any]]]:
        if unlabeled is None:
            yield from labeled
            return
        for lab, unl in zip(labeled, unlabeled):
            yield list(lab) + list(unl)
