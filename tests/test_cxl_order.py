"""The daemon's eviction order over a CXL region: a named policy, leaf first, reads reported by clients."""

from __future__ import annotations

import pytest

from kvrack.daemon.cxl_order import RegionOrder
from kvrack.daemon.policies import POLICIES


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def chain(order: RegionOrder, ids: list[int], parent: int | None = None) -> None:
    prev = None if parent is None else key(parent)
    for i in ids:
        order.add(key(i), prev)
        prev = key(i)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_chain_leaves_tail_first_under_every_policy(policy: str) -> None:
    order = RegionOrder(policy, 16)
    chain(order, [1, 2, 3, 4])
    chain(order, [10, 11], parent=2)  # a fork behind block 2
    gone = []
    while len(order):
        v = order.victim()
        assert v is not None
        gone.append(int.from_bytes(v, "big"))
        order.remove(v)
    for parent, child in ((1, 2), (2, 3), (3, 4), (2, 10), (10, 11)):
        assert gone.index(child) < gone.index(parent), f"{policy}: {parent} went before its child {child}"


def test_reported_reads_keep_a_block_under_lru() -> None:
    order = RegionOrder("lru", 8)
    for i in range(4):
        order.add(key(i))
    assert order.touch([key(0), key(99)]) == 1  # 99 is not in the region
    assert order.victim() == key(1)
    assert order.stats() == {"policy": "lru", "tracked_blocks": 4, "policy_evictions": 0, "touches": 1}


def test_removal_unlinks_children_and_a_stored_again_block_is_a_hit() -> None:
    order = RegionOrder("lru", 8)
    chain(order, [1, 2, 3])
    assert order.remove(key(3)) and not order.remove(key(3))
    assert order.victim() == key(2)  # 2 is a leaf now
    order.add(key(0))
    order.add(key(1))  # again: a hit, 1 is the most recent; 2 behind it is still a leaf
    assert order.victim() == key(2) and len(order) == 3


def test_parent_cycles_end_the_descent() -> None:
    order = RegionOrder("lru", 8)
    order.add(key(1), key(1))  # its own parent: taken as a root
    order.add(key(2), key(3))
    order.add(key(3), key(2))  # 2 -> 3 -> 2
    for _ in range(3):
        v = order.victim()
        assert v is not None
        order.remove(v)
    assert len(order) == 0


@pytest.mark.parametrize("policy", ["lru", "chain"])
def test_a_deep_chain_leaves_in_linear_steps(policy: str) -> None:
    depth = 2000
    order = RegionOrder(policy, depth)
    chain(order, list(range(depth)))
    steps = 0
    a_kid = order._a_kid

    def counted(k: bytes) -> bytes | None:
        nonlocal steps
        steps += 1
        return a_kid(k)

    order._a_kid = counted  # type: ignore[method-assign]
    gone = [int.from_bytes(order.evict() or b"", "big") for _ in range(depth)]
    assert gone == list(range(depth - 1, -1, -1)) and len(order) == 0
    assert steps <= 3 * depth, f"{steps} descent steps for a chain of {depth}"
