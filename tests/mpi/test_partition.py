"""Slab decomposition: pure arithmetic (no communication), checked for many sizes.

Runs in every MPI run too (cheap); it needs no communicator.
"""

import numpy as np
import pytest

from mpiblmm.parallel import Slab, partition, partition_by_cost


@pytest.mark.parametrize("n_items", [0, 1, 2, 3, 7, 10, 1000, 1001])
@pytest.mark.parametrize("n_parts", [1, 2, 3, 4, 7, 512])
def test_partition_is_contiguous_complete_and_balanced(n_items, n_parts):
    slabs = [partition(n_items, n_parts, p) for p in range(n_parts)]
    assert slabs[0].start == 0 and slabs[-1].stop == n_items
    for left, right in zip(slabs, slabs[1:]):
        assert left.stop == right.start
    sizes = [s.size for s in slabs]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first parts take the remainder


def test_fewer_items_than_parts_leaves_empty_slabs_at_the_end():
    assert [partition(2, 4, p) for p in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert partition(2, 4, 3).size == 0


def test_slab_slices_an_array():
    data = np.arange(10)
    assert data[partition(10, 3, 1).as_slice()].tolist() == [4, 5, 6]
    assert isinstance(partition(10, 3, 1), Slab)


@pytest.mark.parametrize("args", [(-1, 2, 0), (5, 0, 0), (5, 2, 2), (5, 2, -1)])
def test_partition_rejects_invalid_arguments(args):
    with pytest.raises(ValueError):
        partition(*args)


@pytest.mark.parametrize("n_parts", [1, 2, 3, 5])
def test_partition_by_cost_covers_everything_and_balances_cost(n_parts):
    rng = np.random.default_rng(1)
    costs = rng.uniform(0.5, 5.0, size=200)
    slabs = [partition_by_cost(costs, n_parts, p) for p in range(n_parts)]
    assert slabs[0].start == 0 and slabs[-1].stop == costs.size
    assert all(a.stop == b.start for a, b in zip(slabs, slabs[1:]))
    loads = [costs[s.as_slice()].sum() for s in slabs]
    assert max(loads) - min(loads) <= 2 * costs.max()


def test_partition_by_cost_puts_expensive_items_on_their_own():
    costs = np.array([100.0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    assert partition_by_cost(costs, 2, 0) == (0, 1)
    assert partition_by_cost(costs, 2, 1) == (1, 11)


def test_partition_by_cost_with_equal_or_zero_costs_matches_partition_sizes():
    for costs in (np.ones(10), np.zeros(10)):
        sizes = sorted(partition_by_cost(costs, 3, p).size for p in range(3))
        assert sizes == [3, 3, 4]
