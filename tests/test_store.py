"""Store logic without sockets: two-phase writes, pins, LRU eviction, leases, namespaces."""

import pytest

from kvrack.daemon.index import COMMITTED
from kvrack.daemon.session import Session
from kvrack.daemon.settings import NamespaceConfig
from kvrack.daemon.store import Store
from kvrack.protocol import ErrorCode, TierId
from kvrack.tiers.dram import HeapBacking, MemoryTier

SEG = 64 * 1024
BLOCK = 16 * 1024  # 4 blocks per segment


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(clock):
    tier = MemoryTier(TierId.DRAM, 2 * SEG, SEG, HeapBacking())  # room for 8 blocks
    return Store(tier, [NamespaceConfig("a"), NamespaceConfig("b")], reserve_timeout_s=10, pin_timeout_s=60, clock=clock)


_sid = iter(range(1, 10_000))


def session(store, ns="a"):
    s = Session(next(_sid), None)
    s.namespace = store.namespaces[ns]
    return s


def put(store, s, keys, size=BLOCK, parents=None):
    res = store.reserve(s, keys, [size] * len(keys), parents)
    ok = [k for k, c in zip(keys, res.codes) if c == 0]
    store.commit(s, ok)
    return res


def test_reserve_commit_then_visible(store):
    s = session(store)
    res = store.reserve(s, [key(1)], [BLOCK], None)
    assert res.codes == [0] and res.descriptors[0].length == BLOCK
    assert store.lookup(s.namespace, [key(1)]) == (0, bytes([0])), "reserved is invisible"
    assert store.acquire(s, [key(1)]).codes == [ErrorCode.IN_PROGRESS]
    assert store.commit(s, [key(1)]).codes == [0]
    assert store.lookup(s.namespace, [key(1), key(2)]) == (1, bytes([TierId.DRAM, 0]))


def test_put_is_idempotent_and_concurrent_writers_do_not_collide(store):
    w1, w2 = session(store), session(store)
    r1 = store.reserve(w1, [key(1)], [BLOCK], None)
    r2 = store.reserve(w2, [key(1)], [BLOCK], None)
    assert r1.codes == [0] and r2.codes == [ErrorCode.IN_PROGRESS]
    assert store.reserve(w1, [key(1)], [BLOCK], None).descriptors == r1.descriptors, "a retried reserve gets its slot"
    store.commit(w1, [key(1)])
    assert store.reserve(w2, [key(1)], [BLOCK], None).codes == [ErrorCode.ALREADY_EXISTS]
    assert store.commit(w2, [key(1)]).codes == [ErrorCode.ALREADY_EXISTS]
    assert store.namespaces["a"].blocks == 1


def test_bad_keys_sizes_and_parents_fail_per_key(store):
    s = session(store)
    res = store.reserve(s, [b"short", key(2), key(3), key(4), key(5)], [BLOCK, 0, SEG + 1, BLOCK, BLOCK],
                        [None, None, None, b"bad", key(4)])
    assert res.codes == [ErrorCode.INVALID_KEY, ErrorCode.INVALID_SIZE, ErrorCode.VALUE_TOO_LARGE,
                         ErrorCode.INVALID_PARENT, 0]
    assert "segment_bytes" in res.message
    assert isinstance(store.lookup(s.namespace, [key(1), b"x" * 31]), str)


def test_parent_cycles_declared_by_a_client_cannot_hang_eviction(store):
    """Parents are the client's word: a key naming itself is refused, and a cycle through other keys
    (each block the other's parent) still lets leaf-first eviction finish."""
    s = session(store)
    assert store.reserve(s, [key(3)], [BLOCK], [key(3)]).codes == [ErrorCode.INVALID_PARENT]
    put(store, s, [key(1), key(2)], parents=[key(2), key(1)])
    ring = [key(i) for i in range(200, 204)]  # a longer loop: 200 -> 201 -> 202 -> 203 -> 200
    put(store, s, ring, parents=ring[-1:] + ring[:-1])
    for i in range(10, 30):  # every put from here on evicts
        put(store, s, [key(i)])
    assert store.counters.evictions == 6 + 20 - 8  # room for 8 blocks
    assert store.lookup(s.namespace, [key(29)])[0] == 1


def test_lru_evicts_least_recently_used_unpinned(store):
    s = session(store)
    put(store, s, [key(i) for i in range(8)])  # full
    store.acquire(s, [key(0)])
    store.release(s, [key(0)])  # key 0 is now the most recently used
    put(store, s, [key(100)])
    hits = store.lookup(s.namespace, [key(i) for i in range(8)])[1]
    assert hits[0] == TierId.DRAM and hits[1] == 0, "key 1 was the least recently used"
    assert store.counters.evictions == 1


def test_pinned_blocks_are_never_evicted_and_full_pins_give_no_space(store):
    s = session(store)
    keys = [key(i) for i in range(8)]
    put(store, s, keys)
    assert store.acquire(s, keys).codes == [0] * 8
    res = store.reserve(s, [key(50), key(51)], [BLOCK, BLOCK], None)
    assert res.codes == [ErrorCode.NO_SPACE] * 2
    assert "dram tier full" in res.message and str(2 * BLOCK) in res.message and "8 blocks pinned" in res.message
    assert store.stats()["tiers"][0]["pinned_blocks"] == 8
    assert store.lookup(s.namespace, keys)[0] == 8, "nothing committed was disturbed"
    store.release(s, keys[:1])
    assert store.reserve(s, [key(50)], [BLOCK], None).codes == [0], "one release makes room again"


def test_delete_of_a_pinned_block_keeps_its_bytes_until_release(store):
    s, reader = session(store), session(store)
    put(store, s, [key(1)])
    d = store.acquire(reader, [key(1)]).descriptors[0]
    assert store.delete(s, [key(1), key(2)]).codes == [0, ErrorCode.NOT_FOUND]
    assert store.lookup(s.namespace, [key(1)])[0] == 0
    seg = store.tier.segment(d.segment)
    assert seg.live == 1, "slot still held by the reader's pin"
    store.release(reader, [key(1)])
    assert seg.live == 0 and store.pinned_blocks == 0


def test_abort_and_session_close_free_reservations_and_pins(store):
    s = session(store)
    store.reserve(s, [key(1), key(2)], [BLOCK, BLOCK], None)
    assert store.abort(s, [key(1), key(9)]).codes == [0, ErrorCode.NOT_RESERVED]
    put(store, s, [key(3)])
    store.acquire(s, [key(3)])
    assert store.close_session(s) == (1, 1)
    e = store.namespaces["a"].entries[key(3)]
    assert e.state == COMMITTED and e.pins == 0 and key(2) not in store.namespaces["a"].entries
    assert store.pinned_blocks == 0
    assert store.order.size == 1


def test_leases_expire_on_the_injected_clock(store, clock):
    s = session(store)
    store.reserve(s, [key(1)], [BLOCK], None)
    put(store, s, [key(2)])
    store.acquire(s, [key(2)])
    clock.now += 9
    assert store.sweep() == (0, 0)
    clock.now += 2
    assert store.sweep() == (1, 0), "reservation lease (10 s) ended"
    assert store.commit(s, [key(1)]).codes == [ErrorCode.NOT_RESERVED]
    store.acquire(s, [key(2)])  # re-acquire renews the pin lease
    clock.now += 59
    assert store.sweep() == (0, 0)
    clock.now += 2
    assert store.sweep() == (0, 2), "both pins of key 2 ended together"
    e = store.namespaces["a"].entries[key(2)]
    assert store.release(s, [key(2)]).codes == [ErrorCode.NOT_PINNED], "no longer the client's to release"
    # but the session is still connected: its client may still read through its mapping, so the slot stays put
    assert e.pins == 2 and store.order.size == 0
    assert store.close_session(s) == (0, 0)
    assert e.pins == 0 and store.order.size == 1, "the session gone, the block is evictable again"


def test_namespaces_are_isolated(store):
    a, b = session(store, "a"), session(store, "b")
    put(store, a, [key(1)])
    assert store.lookup(b.namespace, [key(1)])[0] == 0
    assert store.acquire(b, [key(1)]).codes == [ErrorCode.NOT_FOUND]
    assert store.delete(b, [key(1)]).codes == [ErrorCode.NOT_FOUND]
    put(store, b, [key(1)])  # same key, separate block
    da = store.acquire(a, [key(1)]).descriptors[0]
    db = store.acquire(b, [key(1)]).descriptors[0]
    assert da.segment != db.segment, "tenants never share a segment"


def test_eviction_crosses_namespaces_by_retiring_emptied_segments(store):
    a, b = session(store, "a"), session(store, "b")
    put(store, a, [key(i) for i in range(8)])  # both segments belong to a
    res = put(store, b, [key(100)])
    assert res.codes == [0], "b gets a fresh segment once a's least recent segment empties"
    assert store.tier.allocator.retired == 1
    assert store.namespaces["a"].blocks == 4


def test_parents_are_recorded(store):
    s = session(store)
    put(store, s, [key(1), key(2)], parents=[None, key(1)])
    e = store.namespaces["a"].entries[key(2)]
    assert e.parent == key(1) and e.parent is store.namespaces["a"].entries[key(1)].key


def test_reservations_receiving_a_write_do_not_expire_mid_payload(store, clock):
    s = session(store)
    assert store.reserve(s, [key(1)], [BLOCK], None).codes == [0]
    s.receiving = True  # the TCP byte stream is filling the slot
    clock.now += 3600
    assert store.sweep() == (0, 0), "the slot stays this session's while its bytes arrive"
    s.receiving = False
    assert store.sweep() == (1, 0)


@pytest.mark.parametrize("policy", ["lru", "chain", "s3fifo"])
def test_eviction_is_leaf_first(clock, policy):
    tier = MemoryTier(TierId.DRAM, 2 * SEG, SEG, HeapBacking())  # room for 8 blocks
    store = Store(tier, [NamespaceConfig("a")], clock=clock, policy=policy, typical_block_bytes=BLOCK)
    s = session(store)
    chain = [key(i) for i in range(1, 7)]  # a chain of 6: key(1) is its head and the oldest block
    put(store, s, chain, parents=[None] + chain[:-1])
    put(store, s, [key(100), key(101)])  # two one-block chains after it: the tier is full
    put(store, s, [key(200), key(201)])  # room for two more: what goes?
    present = store.lookup(s.namespace, chain)[1]
    assert present[:4] == bytes([TierId.DRAM]) * 4, "the chain's head stays"
    # the policy named old blocks of the chain; its tail went instead of its head
    gone = [k for k in chain + [key(100), key(101)] if s.namespace.entries.get(k) is None]
    assert len(gone) == 2 and all(k in chain[4:] or k in (key(100), key(101)) for k in gone)
    if policy == "lru":
        assert gone == chain[4:], "LRU named key(1) twice; leaf first took the two deepest blocks"


def test_kids_are_tracked_through_eviction_and_delete(store):
    s = session(store)
    chain = [key(i) for i in range(1, 4)]
    put(store, s, chain, parents=[None] + chain[:-1])
    head, mid, tail = (s.namespace.entries[k] for k in chain)
    assert head.kids is mid and mid.kids is tail and tail.kids is None
    store.delete(s, [tail.key])
    assert mid.kids is None
    put(store, s, [key(10), key(11)], parents=[head.key, head.key])  # a fork under the head
    assert isinstance(head.kids, set) and len(head.kids) == 3


@pytest.mark.parametrize("policy", ["lru", "chain"])
def test_a_deep_chain_is_evicted_tail_first_in_linear_steps(clock, policy, monkeypatch):
    """A 1,000-block chain (a long prompt in small blocks) fills the tier; new blocks push it out tail first,
    and the descents from its head resume instead of walking the chain at every eviction."""
    depth = 1000
    tier = MemoryTier(TierId.DRAM, depth * BLOCK, SEG, HeapBacking())
    store = Store(tier, [NamespaceConfig("a")], clock=clock, policy=policy, typical_block_bytes=BLOCK)
    s = session(store)
    chain = [key(i) for i in range(1, depth + 1)]
    put(store, s, chain, parents=[None] + chain[:-1])
    steps = 0
    kid_of = store.chains.first

    def counted(e, may_go):
        nonlocal steps
        steps += 1
        return kid_of(e, may_go)

    monkeypatch.setattr(store.chains, "first", counted)
    for i in range(0, depth // 2, 50):
        put(store, s, [key(10_000 + j) for j in range(i, i + 50)])
    present = store.lookup(s.namespace, chain)
    assert present[0] == depth // 2, "the head half stays, the tail half went"
    assert steps <= 4 * depth, f"{steps} descent steps to evict {depth // 2} blocks"
