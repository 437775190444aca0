"""Leases: reservations and pins end on release, when their session ends, or when they expire.

An expired lease ends for the index, not for the memory: a late client may still be copying into its reserved
slot or reading its pinned bytes through the mapping, so the slot stays out of reuse until that session ends
(``Session.expired_slots``, ``expired_pins``). ``leases.max_per_session`` bounds what one session can hold.

The sweeper looks only at sessions holding reservations or pins, so lease bookkeeping costs memory per
outstanding lease, never per request served.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kvrack.daemon.counters import LeaseCounters
from kvrack.daemon.session import Session

if TYPE_CHECKING:
    from kvrack.daemon.store import Store

log = logging.getLogger("kvrack.store")


class Leases:
    """The sessions holding leases in one store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.holders: set[Session] = set()
        self.counters = LeaseCounters()

    def hold(self, session: Session) -> None:
        self.holders.add(session)

    def close_session(self, session: Session) -> tuple[int, int]:
        """A client went away: abort its reservations and end its pins. Returns (aborted, unpinned)."""
        store = self.store
        session.closed = True
        self.holders.discard(session)
        aborted = len(session.reserved)
        for e, _deadline in session.reserved.values():
            store.drop_reserved(e)
        session.reserved.clear()
        unpinned = 0
        for count, _deadline, e in session.pins.values():
            store.unpin(e, count)
            unpinned += count
        session.pins.clear()
        # leases that expired while the session lived: their slots may be reused now that nobody can touch them
        for e in session.expired_slots:
            store.tier.free(e.seg, e.slot)
        session.expired_slots.clear()
        for e, count in session.expired_pins:
            store.unpin(e, count)
        session.expired_pins.clear()
        return aborted, unpinned

    def sweep(self) -> tuple[int, int]:
        """End reservations and pins whose lease ran out. Returns (reservations, pins) ended."""
        store = self.store
        now = store.clock()
        expired_res = 0
        expired_pins = 0
        for session in list(self.holders):
            reserved = session.reserved
            # a session receiving a write's bytes into its slots keeps them until the payload is in
            # (or its connection ends): freeing one now would let the bytes land in someone else's block
            # An expired lease ends for the index (the key is free for another writer; the pin no longer the
            # client's to release), but its slot stays out of reuse until the session ends: the client may still be
            # copying into the slot, or reading the pinned bytes through its mapping.
            for key in [] if session.receiving else [k for k, (_e, deadline) in reserved.items() if deadline <= now]:
                e = reserved.pop(key)[0]
                store.drop_reserved(e, free_slot=False)
                session.expired_slots.append(e)
                expired_res += 1
            pins = session.pins
            for key in [k for k, pin in pins.items() if pin[1] <= now]:
                count, _deadline, e = pins.pop(key)
                session.expired_pins.append((e, count))
                expired_pins += count
            if not reserved and not pins:
                self.holders.discard(session)
        self.counters.expired_reservations += expired_res
        self.counters.expired_pins += expired_pins
        if expired_res or expired_pins:
            log.warning("lease expiry: %d reservation(s) and %d pin(s) ended", expired_res, expired_pins)
        return expired_res, expired_pins
