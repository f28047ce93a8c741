"""The two-stream training loader: seeded streams, exact resume and per-position augmentation seeds."""
import itertools

import numpy as np
import pytest

from mmt_psm.core.loader import PositionSeededDataset, StreamSampler, TwoStreamLoader, build_stream_loader


def _take(it, n):
    return list(itertools.islice(iter(it), n))


def test_stream_sampler_is_seeded_and_covers_each_epoch():
    a = _take(StreamSampler(5, seed=1), 10)
    assert a == _take(StreamSampler(5, seed=1), 10)
    assert a != _take(StreamSampler(5, seed=2), 10)
    positions, indices = zip(*(divmod(x, 5) for x in a))
    assert list(positions) == list(range(10))
    assert sorted(indices[:5]) == list(range(5)) and sorted(indices[5:]) == list(range(5))


def test_stream_sampler_start_equals_tail_of_full_stream():
    full = _take(StreamSampler(7, seed=3), 30)
    assert _take(StreamSampler(7, seed=3, start=12), 18) == full[12:]


def test_stream_sampler_rejects_empty():
    with pytest.raises(ValueError, match="non-empty"):
        StreamSampler(0, seed=0)


def _random_mapper(d):
    return {"value": np.random.rand(), "id": d["id"]}


def test_position_seeding_is_independent_of_history_and_leaves_global_rng():
    ds = PositionSeededDataset([{"id": i} for i in range(3)], _random_mapper, seed=5, labeled=False)
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    first = ds[4 * 3 + 1]
    _ = [ds[i] for i in range(6)]
    again = ds[4 * 3 + 1]
    assert first == again and first["id"] == 1 and first["labeled"] is False
    assert np.array_equal(np.random.get_state()[1], before)
    assert ds[5 * 3 + 1]["value"] != first["value"]  # another position, other randomness


def test_mapper_returning_none_names_the_file():
    ds = PositionSeededDataset([{"file_name": "a.png"}], lambda d: None, seed=0, labeled=True)
    with pytest.raises(RuntimeError, match="a.png"):
        ds[0]


def test_two_stream_batches_and_resume():
    lab = [{"id": f"l{i}"} for i in range(4)]
    unl = [{"id": f"u{i}"} for i in range(6)]
    ident = lambda d: dict(d)  # noqa: E731
    loader = TwoStreamLoader(build_stream_loader(lab, ident, 2, 0, True), build_stream_loader(unl, ident, 3, 1, False))
    batches = _take(loader, 5)
    assert all(len(b) == 5 for b in batches)
    assert [d["labeled"] for d in batches[0]] == [True, True, False, False, False]
    resumed = TwoStreamLoader(
        build_stream_loader(lab, ident, 2, 0, True, start_iter=3), build_stream_loader(unl, ident, 3, 1, False, 3)
    )
    assert [[d["id"] for d in b] for b in _take(resumed, 2)] == [[d["id"] for d in b] for b in batches[3:5]]
    assert [len(b) for b in _take(TwoStreamLoader(build_stream_loader(lab, ident, 2, 0, True)), 2)] == [2, 2]


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_resume_is_exact_with_data_loader_workers(workers):
    """With NUM_WORKERS > 0 too: the batches after a resume at any iteration k are the uninterrupted run's
    (same images, same augmentation draws, same order). Detectron2 v0.6's build_batch_data_loader deals samples to
    the workers one by one and each worker batches its own, which matched only when k was a multiple of the
    worker count."""
    dicts = [{"id": i} for i in range(5)]
    full = [[(d["id"], d["value"]) for d in b] for b in _take(build_stream_loader(dicts, _random_mapper, 2, 4, True,
                                                                                  0, workers), 7)]
    for k in (1, 2, 3):
        resumed = _take(build_stream_loader(dicts, _random_mapper, 2, 4, True, k, workers), 7 - k)
        assert [[(d["id"], d["value"]) for d in b] for b in resumed] == full[k:], (workers, k)
