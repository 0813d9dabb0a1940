"""LengthGroupedSampler: shape purity, DP disjointness, TP identity, determinism, exact resume."""


import numpy as np
import pytest

from mindspeed_mm_osp.data import LengthGroupedSampler


def _shapes(seed=0, sizes=(37, 20, 11, 50)):
    ids = np.concatenate([np.full(n, s) for s, n in enumerate(sizes)])
    return np.random.default_rng(seed).permutation(ids)


def _make(shape_id, rank, world, b=2, gbs=None, **kw):
    gbs = gbs or b * world * 2
    return LengthGroupedSampler(shape_id, micro_batch_size=b, global_batch_size=gbs, dp_rank=rank, dp_size=world,
                                seed=7, **kw)


@pytest.mark.parametrize("world,b,ga", [(1, 1, 1), (2, 1, 2), (2, 2, 1), (3, 2, 2), (8, 1, 1)])
def test_shape_purity_disjoint_covering(world, b, ga):
    sid = _shapes()
    gbs = world * b * ga
    per_rank = [list(_make(sid, r, world, b=b, gbs=gbs)) for r in range(world)]
    n_steps = len(per_rank[0])
    assert all(len(p) == n_steps for p in per_rank)
    # Every micro-batch of every rank, and all ranks of an optimizer step, have one shape.
    for step in range(0, n_steps, ga):
        keys = [k for r in range(world) for mb in per_rank[r][step:step + ga] for k in mb]
        assert len({int(sid[k.position]) for k in keys}) == 1
    flat = [k.position for p in per_rank for mb in p for k in mb]
    assert len(flat) == len(set(flat))  # DP ranks disjoint, no duplicates
    expected = sum(np.bincount(sid) // gbs * gbs)
    assert len(flat) == expected  # covering: only each shape's remainder (< gbs) is left out
    assert len({k.slot for p in per_rank for mb in p for k in mb}) == len(flat)


def test_covering_when_groups_divide():
    sid = _shapes(sizes=(8, 16, 4))
    flat = sorted(k.position for r in range(2) for mb in _make(sid, r, 2, b=1, gbs=4) for k in mb)
    assert flat == list(range(len(sid)))


def test_tp_peers_identical_and_deterministic():
    sid = _shapes()
    a, b = list(_make(sid, 1, 4)), list(_make(sid, 1, 4))
    assert a == b


def test_epochs_differ_and_resume_is_exact():
    sid = _shapes()
    world, b, gbs = 2, 2, 8
    for rank in range(world):
        full = list(_make(sid, rank, world, b=b, gbs=gbs, num_epochs=3))
        per_epoch = len(full) // 3
        assert [k.position for mb in full[:per_epoch] for k in mb] != [k.position for mb in full[per_epoch:2 * per_epoch] for k in mb]
        for steps_done in (0, 1, 5, per_epoch // 2, per_epoch + 1):  # optimizer steps, GA = 2
            consumed = steps_done * gbs
            resumed = list(_make(sid, rank, world, b=b, gbs=gbs, num_epochs=3, consumed_samples=consumed))
            assert resumed == full[steps_done * 2:]
            assert len(_make(sid, rank, world, b=b, gbs=gbs, num_epochs=3, consumed_samples=consumed)) == len(resumed)


def test_bad_batch_arithmetic_is_rejected():
    sid = _shapes()
    with pytest.raises(ValueError, match="multiple"):
        _make(sid, 0, 2, b=2, gbs=6)
    with pytest.raises(ValueError, match="consumed_samples"):
        _make(sid, 0, 2, b=2, gbs=8, consumed_samples=3)
    with pytest.raises(ValueError, match="no shape"):
        _make(np.arange(5), 0, 2, b=1, gbs=2)
