"""What a batched store operation answers: a code per key, descriptors where the keys have bytes to read or
write, and what the reply needs besides."""

from __future__ import annotations

from kvrack.daemon.index import Entry
from kvrack.protocol import Descriptor, ErrorCode

OK = int(ErrorCode.OK)


class KeysResult:
    """Per-key outcome of one batched op."""

    __slots__ = ("codes", "descriptors", "message", "promote", "hbm")

    def __init__(self, n: int, with_descriptors: bool) -> None:
        self.codes = [OK] * n
        self.descriptors: list[Descriptor | None] = [None] * n if with_descriptors else []
        self.message = ""
        self.promote: list[tuple[int, Entry]] = []  # acquired keys whose only copy is on NVMe
        self.hbm: list[Descriptor | None] | None = None  # device copies a same-host reader may use
