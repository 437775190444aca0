"""A client session: who it is and which reservations and pins it holds."""

from __future__ import annotations

import dataclasses
import os

from kvrack.daemon.index import Entry, Namespace


@dataclasses.dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int

    def groups(self) -> set[int]:
        """Primary and supplementary groups of the peer process, read from /proc."""
        groups = {self.gid}
        try:
            with open(f"/proc/{self.pid}/status") as fh:
                for line in fh:
                    if line.startswith("Groups:"):
                        groups.update(int(g) for g in line.split()[1:])
                        break
        except OSError:
            pass
        return groups

    @classmethod
    def of_self(cls) -> PeerCredentials:
        return cls(os.getpid(), os.getuid(), os.getgid())


class Session:
    """State the daemon keeps per connection; everything here ends with the connection."""

    __slots__ = ("id", "peer", "remote", "namespace", "client_name", "reserved", "pins", "closed", "receiving",
                 "expired_slots", "expired_pins")

    def __init__(self, session_id: int, peer: PeerCredentials | None, remote: str | None = None) -> None:
        self.id = session_id
        self.peer = peer  # Unix socket clients: who they are, from the kernel
        self.remote = remote  # TCP clients: "host:port"; they authenticate with a token in hello
        self.namespace: Namespace | None = None
        self.client_name = ""
        self.reserved: dict[bytes, tuple[Entry, float]] = {}  # key -> (entry, lease deadline)
        # key -> [pin count, deadline of the latest acquire, entry]
        self.pins: dict[bytes, list] = {}
        self.closed = False
        self.receiving = False  # a write's block bytes are arriving into this session's reserved slots
        # leases that ran out while the session lives: the client may still be writing into those slots, or reading
        # the pinned bytes through its mapping, so the slots stay out of reuse until the session ends
        self.expired_slots: list[Entry] = []  # reservations: out of the index, slot kept
        self.expired_pins: list[tuple[Entry, int]] = []  # pins: no longer the client's to release, still held

    def leases(self) -> int:
        """Reservations, pins and expired leases this session holds (``leases.max_per_session``)."""
        return len(self.reserved) + len(self.pins) + len(self.expired_slots) + len(self.expired_pins)

    def holds_reservation(self, key: bytes, entry: Entry) -> bool:
        """Whether this session's reservation of ``key`` is ``entry`` (and not someone else's)."""
        held = self.reserved.get(key)
        return held is not None and held[0] is entry
