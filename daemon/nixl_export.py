"""The daemon's NIXL agent: DRAM segments registered for remote one-sided READ and WRITE.

A segment is registered the first time a remote client of its namespace needs
it and deregistered when the tier retires it (segments are never reused across
namespaces, so an old registration never reaches another tenant's bytes). A
client gets the agent's *partial* metadata: connection info plus the
registrations of its own namespace's segments only, so on RDMA NICs it holds
remote keys for nothing else. Over UCX's TCP transport the target does not
check remote keys; keep NIXL on networks you trust (docs/remote.md).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Sequence
from typing import Any

from kvrack import nixl_agent
from kvrack.protocol import RemoteSegment
from kvrack.tiers.base import Segment
from kvrack.tiers.dram import MemoryTier

log = logging.getLogger("kvrack.nixl")


class NixlExport:
    """Registrations of one memory tier's segments with one agent (event-loop thread only)."""

    def __init__(self, tier: MemoryTier, idle_delay_us: int) -> None:
        self.name = f"kvrackd-{os.getpid()}-{secrets.token_hex(4)}"
        self.agent = nixl_agent.make_agent(self.name, progress_thread=True, idle_delay_us=idle_delay_us)
        self.tier = tier
        self._regs: dict[int, tuple[Any, nixl_agent.Pinned]] = {}  # segment id -> (reg dlist, address)
        tier.retire_hooks.append(self._retire)

    def _register(self, seg: Segment) -> nixl_agent.Pinned:
        held = self._regs.get(seg.id)
        if held is None:
            pinned = nixl_agent.Pinned(self.tier.window(seg, 0, seg.size))
            reg = self.agent.register_memory([(pinned.addr, pinned.nbytes, 0, "")], "DRAM")
            held = self._regs[seg.id] = (reg, pinned)
        return held[1]

    def export(self, segments: Sequence[Segment]) -> tuple[list[RemoteSegment], bytes]:
        """Where each segment is in the daemon's memory, and the metadata that lets a client reach them."""
        out = []
        for seg in segments:
            if not isinstance(seg.handle, int):
                continue  # heap-backed test tiers have no stable mapping to register
            pinned = self._register(seg)
            out.append(RemoteSegment(seg.id, int(seg.tier), pinned.addr, pinned.nbytes))
        if out:
            descs = self.agent.get_reg_descs([(r.addr, r.size, 0, "") for r in out], "DRAM")
        else:  # connection info only; segments follow with ``map``
            bind = nixl_agent.load().nixlBind
            descs = bind.nixlRegDList(bind.DRAM_SEG)
        return out, self.agent.get_partial_agent_metadata(descs, True)

    def _retire(self, seg: Segment) -> None:
        held = self._regs.pop(seg.id, None)
        if held is not None:
            reg, pinned = held
            try:
                self.agent.deregister_memory(reg)
            except Exception as exc:  # the mapping goes away regardless; say so
                log.warning("nixl: deregistering segment %#x failed: %s", seg.id, exc)
            pinned.release()

    def stats(self) -> dict[str, Any]:
        return {"agent": self.name, "registered_segments": len(self._regs)}

    def close(self) -> None:
        for seg_id in list(self._regs):
            reg, pinned = self._regs.pop(seg_id)
            try:
                self.agent.deregister_memory(reg)
            except Exception:
                pass
            pinned.release()
