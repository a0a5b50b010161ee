"""EpochShuffleSampler under DDP: one order dealt out to the ranks, equal steps per rank."""

from __future__ import annotations

import pytest
import torch

from ser_pipeline.data import EpochShuffleSampler, class_balanced_weights


def shard_batches(sampler: EpochShuffleSampler, batch_size: int) -> list[list[int]]:
    order = list(sampler)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@pytest.mark.parametrize("weighted", [False, True])
def test_ranks_batches_together_are_one_processs_batch(weighted):
    labels = torch.tensor([0] * 30 + [1] * 10)
    weights = class_balanced_weights(labels, 2) if weighted else None
    one = EpochShuffleSampler(40, seed=3, weights=weights)
    ranks = [EpochShuffleSampler(40, seed=3, weights=weights, num_replicas=2, rank=r)
             for r in (0, 1)]
    for sampler in (one, *ranks):
        sampler.set_epoch(5)
    if not weighted:  # the same order, dealt out: batch k of both ranks = batch k of one
        together = zip(*(shard_batches(s, 4) for s in ranks), strict=True)
        assert [sorted(a + b) for a, b in together] == [sorted(b) for b in shard_batches(one, 8)]
    assert len(ranks[0]) == len(ranks[1]) == 20  # equal steps per rank, or DDP hangs


def test_a_class_balanced_shard_is_drawn_anew_every_epoch():
    weights = class_balanced_weights(torch.tensor([0] * 30 + [1] * 10), 2)
    sampler = EpochShuffleSampler(40, seed=3, weights=weights, num_replicas=2, rank=1)
    draws = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        draws.append(list(sampler))
    assert draws[0] != draws[1]


def test_an_uneven_set_is_padded_so_every_rank_runs_as_many_steps():
    ranks = [EpochShuffleSampler(5, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    orders = [list(s) for s in ranks]
    assert [len(o) for o in orders] == [3, 3]
    assert set(orders[0] + orders[1]) == set(range(5))


def test_one_process_sees_the_order_it_saw_before_sharding():
    sampler = EpochShuffleSampler(10, seed=1)
    sampler.set_epoch(2)
    generator = torch.Generator().manual_seed(1 * 100_003 + 2)
    assert list(sampler) == torch.randperm(10, generator=generator).tolist()
