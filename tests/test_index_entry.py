"""The index entry keeps two pairs of numbers in one int each (kvrack.daemon.index.Entry): each reads back
what was written, whatever the other fields of its int hold."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvrack.daemon.index import HIT_SHIFT, HITS_MASK, SLOT_MASK, Entry, Namespace
from kvrack.daemon.policies.clock import EntryFlags

NS = Namespace("t", b"salt")


@given(slot=st.integers(0, SLOT_MASK), nbytes=st.integers(1, 1 << 40), slot2=st.integers(0, SLOT_MASK))
def test_size_and_memory_slot_share_an_int(slot, nbytes, slot2):
    e = Entry(b"k" * 32, NS, None, slot, nbytes, None)
    assert (e.slot, e.nbytes) == (slot, nbytes)
    e.slot = slot2
    assert (e.slot, e.nbytes) == (slot2, nbytes)


@given(nslot=st.integers(0, 1 << 40), clock=st.integers(0, 7), hits=st.integers(0, 40))
def test_clock_bits_hits_and_nvme_slot_share_an_int(nslot, clock, hits):
    e = Entry(b"k" * 32, NS, None, 0, 64, None)
    e.nslot = nslot
    EntryFlags.set(e, clock)
    for _ in range(hits):
        e.count_hit()
    assert (e.nslot, EntryFlags.get(e), e.hits) == (nslot, clock, hits)
    e.nslot = 5
    EntryFlags.set(e, 0)
    assert (e.nslot, EntryFlags.get(e), e.hits) == (5, 0, hits)


def test_hits_saturate_instead_of_reaching_the_nvme_slot():
    e = Entry(b"k" * 32, NS, None, 0, 64, None)
    e.nslot = 123
    e.nflags |= HITS_MASK - (1 << HIT_SHIFT)  # one hit short of the most it counts
    e.count_hit()
    e.count_hit()
    assert e.hits == HITS_MASK >> HIT_SHIFT and e.nslot == 123


def test_an_entry_is_128_bytes():
    """12 slots: with its GC header, one 128-byte allocation (a 13th slot would make it 144)."""
    assert sys.getsizeof(Entry(b"k" * 32, NS, None, 7, 64, None)) <= 128


def test_slots_out_of_range_are_refused():
    e = Entry(b"k" * 32, NS, None, 0, 64, None)
    with pytest.raises(ValueError):
        e.slot = SLOT_MASK + 1
    with pytest.raises(ValueError):
        e.nslot = -1
