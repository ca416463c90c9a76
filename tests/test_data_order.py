"""Epoch order: seeded, sharded (disjoint, covering), resumable."""
import numpy as np
import pytest

from fastkd.data.order import epoch_order, num_batches


def _orders(n, ws, bs, drop_last, epoch=0, seed=3):
    return [epoch_order(n, seed=seed, epoch=epoch, shuffle=True, rank=r, world_size=ws, batch_size=bs,
                        drop_last=drop_last) for r in range(ws)]


def test_same_seed_same_order_and_epochs_differ():
    a = epoch_order(100, seed=7, epoch=2, shuffle=True)
    np.testing.assert_array_equal(a, epoch_order(100, seed=7, epoch=2, shuffle=True))
    assert not np.array_equal(a, epoch_order(100, seed=7, epoch=3, shuffle=True))
    assert not np.array_equal(a, epoch_order(100, seed=8, epoch=2, shuffle=True))
    assert sorted(a.tolist()) == list(range(100))
    np.testing.assert_array_equal(epoch_order(10, seed=1, epoch=5, shuffle=False), np.arange(10))


@pytest.mark.parametrize("n, ws, bs", [(100, 1, 7), (101, 2, 8), (97, 3, 5), (10, 4, 3), (64, 8, 8)])
def test_shards_disjoint_and_covering_without_drop_last(n, ws, bs):
    shards = _orders(n, ws, bs, drop_last=False)
    flat = np.concatenate(shards)
    assert len(flat) == n and len(set(flat.tolist())) == n
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for r, s in enumerate(shards):
        assert num_batches(n, rank=r, world_size=ws, batch_size=bs) == -(-len(s) // bs)


@pytest.mark.parametrize("n, ws, bs", [(100, 1, 7), (101, 2, 8), (97, 3, 5), (64, 8, 8)])
def test_drop_last_gives_equal_full_batches_on_every_rank(n, ws, bs):
    for epoch in range(3):
        shards = _orders(n, ws, bs, drop_last=True, epoch=epoch)
        flat = np.concatenate(shards)
        assert len(set(flat.tolist())) == len(flat)  # disjoint
        assert {len(s) for s in shards} == {(n // ws) // bs * bs}
        assert n - len(flat) < ws * bs  # only the remainder is dropped


def test_start_batch_is_the_suffix():
    full = epoch_order(50, seed=0, epoch=1, shuffle=True, rank=1, world_size=2, batch_size=4, drop_last=True)
    tail = epoch_order(50, seed=0, epoch=1, shuffle=True, rank=1, world_size=2, batch_size=4, drop_last=True,
                       start_batch=3)
    np.testing.assert_array_equal(tail, full[12:])


def test_bad_rank_is_an_error():
    with pytest.raises(ValueError, match="rank 2"):
        epoch_order(10, seed=0, epoch=0, shuffle=True, rank=2, world_size=2)


def test_global_batch_is_independent_of_the_split_and_follows_sample_offset():
    """Rank r's batch is chunk r of the global batch: masks keyed on r*batch + i follow the samples."""
    n, seed, epoch = 103, 5, 2
    whole = epoch_order(n, seed=seed, epoch=epoch, shuffle=True, world_size=1, batch_size=12, drop_last=True)
    for world, micro in ((2, 6), (3, 4), (4, 3)):
        shards = [epoch_order(n, seed=seed, epoch=epoch, shuffle=True, rank=r, world_size=world, batch_size=micro,
                              drop_last=True) for r in range(world)]
        steps = len(shards[0]) // micro
        assert all(len(s) == steps * micro for s in shards)
        for k in range(steps):
            rebuilt = np.concatenate([s[k * micro:(k + 1) * micro] for s in shards])
            np.testing.assert_array_equal(rebuilt, whole[k * 12:(k + 1) * 12])
