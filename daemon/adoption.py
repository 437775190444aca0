"""The store's side of a warm restart: index the blocks the DRAM tier kept over a clean shutdown, and blocks copied
up from another tier. Part of ``Store`` (kvrack.daemon.store)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvrack.daemon.index import COMMITTED, Entry, Namespace
from kvrack.daemon.order import NamespaceOrders
from kvrack.tiers.base import Segment
from kvrack.tiers.dram import MemoryTier

if TYPE_CHECKING:
    from kvrack.daemon.mover import Mover


class Adoption:
    """Part of ``Store``: the attributes and methods below are the store's."""

    tier: MemoryTier
    order: NamespaceOrders
    namespaces: dict[str, Namespace]
    nvme: Mover | None

    def add_dram_copy(self, e: Entry, seg: Segment, slot: int) -> None: ...

    def intern_size(self, size: int) -> int:
        raise NotImplementedError  # the store's

    def _settle(self, e: Entry) -> None: ...

    def adopt_dram(self, blocks: Sequence[tuple[str, bytes, bytes | None, Segment, int, int]]) -> int:
        """Index blocks the DRAM tier kept over a clean restart, oldest first; returns how many.

        Runs after NVMe recovery: a block with an NVMe copy gains its DRAM copy back; one
        without is queued for its NVMe copy like a fresh commit.
        """
        adopted = 0
        for ns_name, key, parent, seg, slot, nbytes in blocks:
            ns = self.namespaces.get(ns_name)
            e = ns.entries.get(key) if ns is not None else None
            if ns is None or (e is not None and (e.seg is not None or e.nbytes != nbytes)):
                self.tier.free(seg, slot)  # namespace no longer configured, or a duplicate: drop the copy
                continue
            if parent is not None:
                pe = ns.entries.get(parent)
                parent = pe.key if pe is not None else parent
            if e is None:
                self.adopt_block(ns, key, seg, slot, nbytes, parent)
            else:
                e.parent = parent
                self.add_dram_copy(e, seg, slot)
                self.order.add(e)
            adopted += 1
        return adopted

    def adopt_block(self, ns: Namespace, key: bytes, seg: Segment, slot: int, nbytes: int,
                    parent: bytes | None = None) -> Entry:
        """Index a committed block whose bytes are already in a DRAM slot (kept over a restart, or copied
        up from CXL): NVMe gets it as the admission rule says; it is not copied back where it came from."""
        e = Entry(bytes(key), ns, None, 0, self.intern_size(nbytes), parent)
        e.state = COMMITTED
        ns.entries[e.key] = e
        ns.blocks += 1
        ns.bytes += nbytes
        self.add_dram_copy(e, seg, slot)
        self._settle(e)
        return e
