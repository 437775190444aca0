"""Slot allocator: property tests over random allocate/free sequences."""

from hypothesis import given, settings
from hypothesis import strategies as st

from kvrack.protocol import TierId
from kvrack.tiers.allocator import SlotAllocator, size_class
from kvrack.tiers.dram import HeapBacking

SEG = 64 * 1024


def test_size_classes():
    assert size_class(1) == 64
    assert size_class(64) == 64
    assert size_class(65) == 128
    assert size_class(4095) == 4096
    assert size_class(4097) == 8192
    assert size_class(2 * 1024 * 1024) == 2 * 1024 * 1024


ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.sampled_from(["a", "b"]), st.sampled_from([100, 4096, 5000, 20000, 65536])),
        st.tuples(st.just("free"), st.integers(0, 10_000), st.just(0)),
    ),
    max_size=200,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, nseg=st.integers(1, 4))
def test_random_sequences_keep_every_invariant(ops, nseg):
    alloc = SlotAllocator(TierId.DRAM, nseg * SEG, SEG, HeapBacking())
    live: list[tuple] = []  # (seg, slot, owner, size)
    for op, a, b in ops:
        if op == "alloc":
            got = alloc.allocate(a, b)
            if got is None:
                # only when no segment has a free slot of this class and none is free or empty
                assert not alloc.has_room_for(a, b)
                continue
            seg, slot = got
            assert seg.owner == a, "a slot is only ever handed out from its owner's segment"
            assert seg.slot_size >= b and (slot + 1) * seg.slot_size <= seg.size
            live.append((seg, slot, a, b))
        elif live:
            seg, slot, _, _ = live.pop(a % len(live))
            alloc.free(seg, slot)
        # no two live slots overlap, and segments count within capacity
        spans = sorted((s.id, sl * s.slot_size, (sl + 1) * s.slot_size) for s, sl, _, _ in live)
        for (i1, _s1, e1), (i2, s2, _e2) in zip(spans, spans[1:]):
            assert i1 != i2 or e1 <= s2
        assert len(alloc._segments) <= alloc.max_segments
        # live counts agree with what we hold
        for seg in alloc._segments.values():
            assert seg.live == sum(1 for s, *_ in live if s is seg)
    for seg, _slot, *_ in live:
        assert alloc.segment(seg.id) is seg, "a segment with live slots is never retired"


def test_empty_segment_is_retired_for_another_owner_and_replaced_fresh():
    alloc = SlotAllocator(TierId.DRAM, SEG, SEG, HeapBacking())
    seg, slot = alloc.allocate("a", 1000)
    assert alloc.allocate("b", 1000) is None  # the only segment belongs to a
    alloc.free(seg, slot)
    seg_b, _ = alloc.allocate("b", 1000)
    assert seg_b is not seg and seg_b.owner == "b" and alloc.retired == 1
    assert alloc.segment(seg.id) is None


def test_prefill_creates_every_segment_up_front():
    alloc = SlotAllocator(TierId.DRAM, 3 * SEG + 100, SEG, HeapBacking())
    alloc.prefill()
    assert alloc.capacity == 3 * SEG and len(alloc._segments) == 3
    stats = alloc.stats()
    assert stats["segments_total"] == 3 and stats["segments_assigned"] == 0
