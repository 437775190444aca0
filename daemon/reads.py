"""The store's reads that may wait for a copy (and writes that may wait for room): blocks brought back into DRAM
from the tier that still holds them (NVMe, CXL) before a reader gets its descriptors, prefetch, and reserves
that wait for copies out of DRAM to land. Each returns a ``KeysResult`` at once when nothing must be waited
for, else a coroutine that the server awaits off the request path."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from kvrack.daemon.counters import StoreCounters
from kvrack.daemon.movement import CopyingTier, Movement
from kvrack.daemon.results import KeysResult
from kvrack.daemon.session import Session
from kvrack.protocol import ErrorCode

if TYPE_CHECKING:
    from kvrack.daemon.mover import Mover

Reply: TypeAlias = KeysResult | Coroutine[Any, Any, KeysResult]

# how long a reserve may wait for copies out of DRAM (NVMe write-behind, CXL) to free room before NO_SPACE
WAIT_FOR_ROOM_S = 10.0



class Reads:
    """Part of ``Store`` (kvrack.daemon.store): the attributes below are the store's."""

    counters: StoreCounters
    movement: Movement
    nvme: Mover | None
    clock: Callable[[], float]

    def reserve(self, session: Session, keys: Sequence[bytes], sizes: Sequence[int],
                parents: Sequence[bytes | None] | None) -> KeysResult:
        raise NotImplementedError

    def acquire(self, session: Session, keys: Sequence[bytes]) -> KeysResult:
        raise NotImplementedError

    def release(self, session: Session, keys: Sequence[bytes]) -> KeysResult:
        raise NotImplementedError

    def reserve_or_wait(self, session: Session, keys: Sequence[bytes], sizes: Sequence[int],
                        parents: Sequence[bytes | None] | None, still_wanted: Callable[[], bool]) -> Reply:
        """``reserve``; when keys found no room while copies out of DRAM are running (their blocks pinned
        until they land), a coroutine that retries those keys as the copies finish, so a writer faster than
        the copies is slowed to their speed instead of failing."""
        res = self.reserve(session, keys, sizes, parents)
        if ErrorCode.NO_SPACE in res.codes and self.movement.copying():
            return self._reserve_when_room(session, keys, sizes, parents, res, still_wanted)
        return res

    async def _reserve_when_room(self, session: Session, keys: Sequence[bytes], sizes: Sequence[int],
                                 parents: Sequence[bytes | None] | None, res: KeysResult,
                                 still_wanted: Callable[[], bool]) -> KeysResult:
        deadline = self.clock() + WAIT_FOR_ROOM_S
        while still_wanted():
            todo = [i for i, c in enumerate(res.codes) if c == ErrorCode.NO_SPACE]
            left = deadline - self.clock()
            if not todo or left <= 0:
                break
            copiers = await self.movement.wait_for_progress(left)
            # retry even when nothing was running: the copies may have finished between the check and the
            # wait; a retry with nothing running is the last one
            retry = self.reserve(session, [keys[i] for i in todo], [sizes[i] for i in todo],
                                 [parents[i] for i in todo] if parents is not None else None)
            for i, code, desc in zip(todo, retry.codes, retry.descriptors):
                res.codes[i] = code
                res.descriptors[i] = desc
            # keys that found room on a retry were never refused
            self.counters.no_space -= len(todo) - retry.codes.count(ErrorCode.NO_SPACE)
            res.message = retry.message
            if not copiers:
                break
        return res

    def read(self, session: Session, keys: Sequence[bytes], local: bool) -> Reply:
        """Pins for a reader: blocks only a copying tier holds come back into DRAM first (CXL, for clients
        that cannot map it; NVMe-only copies), and a ``local`` (same-host) reader learns of device copies
        (HBM). A coroutine only when something must be copied first."""
        ns = session.namespace
        assert ns is not None
        if self.movement:
            bring = self.movement.promotable(ns, keys)
            if bring:
                return self._read_after(bring, session, keys, local)
        return self._pin_for_read(session, keys, local)

    async def _read_after(self, bring: list[tuple[CopyingTier, list[bytes]]], session: Session,
                          keys: Sequence[bytes], local: bool) -> KeysResult:
        for tier, todo in bring:
            await tier.promote_keys(session.namespace, todo)  # type: ignore[arg-type]
        out = self._pin_for_read(session, keys, local)
        return out if isinstance(out, KeysResult) else await out

    def _pin_for_read(self, session: Session, keys: Sequence[bytes], local: bool) -> Reply:
        res = self.acquire(session, keys)
        if res.promote:
            return self._promote_then(session, keys, res, local)
        self._note_reads(session, keys, res, local)
        return res

    async def _promote_then(self, session: Session, keys: Sequence[bytes], res: KeysResult, local: bool) -> KeysResult:
        await self.promote(session, keys, res)  # blocks just read up from NVMe have no device copy to name
        return res

    async def promote(self, session: Session, keys: Sequence[bytes], res: KeysResult) -> None:
        """Read the acquired blocks whose only copy is on NVMe into DRAM; one lost meanwhile is NOT_FOUND for
        this reader and no longer counted as a hit."""
        assert self.nvme is not None
        lost = await self.nvme.promote(session, keys, res, res.promote)
        self.counters.get_hits -= len(lost)

    def _note_reads(self, session: Session, keys: Sequence[bytes], res: KeysResult, local: bool) -> None:
        """Tell the copying tiers what was read (HBM counts reads toward promotion; a local reader learns of
        device copies it may read instead)."""
        readers = self.movement.on_read
        if not readers:
            return
        ns = session.namespace
        assert ns is not None
        entries = [e for e in (ns.entries.get(k) for k, d in zip(keys, res.descriptors) if d is not None)
                   if e is not None]
        for t in readers:
            t.acquired(entries, local)
            if local and res.hbm is None:
                res.hbm = t.hbm_descriptors(ns, keys, res.descriptors)

    def prefetch(self, session: Session, keys: Sequence[bytes]) -> tuple[KeysResult, Coroutine[Any, Any, None] | None]:
        """Start bringing NVMe-only blocks into DRAM: OK per key that is, or is becoming, a DRAM block; and
        the work that brings them (None when there is none). Nothing stays pinned once it is done."""
        res = self.acquire(session, keys)  # the pins last only as long as the promotion
        self.counters.get_keys -= len(keys)  # a prefetch is not a get
        self.counters.get_hits -= sum(1 for c in res.codes if c == ErrorCode.OK)
        self.counters.prefetch_keys += len(keys)
        in_dram = [k for k, d in zip(keys, res.descriptors) if d is not None]
        if in_dram:
            self.release(session, in_dram)
        if not res.promote:
            return res, None
        self.counters.prefetched_blocks += len(res.promote)
        return res, self._promote_and_release(session, keys, res)

    async def _promote_and_release(self, session: Session, keys: Sequence[bytes], res: KeysResult) -> None:
        assert self.nvme is not None
        try:
            await self.nvme.promote(session, keys, res, res.promote)
        finally:  # the mover released the keys it could not bring up; these are ours to release
            self.release(session, [keys[i] for i, _e in res.promote if res.descriptors[i] is not None])
