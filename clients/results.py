"""What batched client calls return: per-key outcomes that print as names, not numbers."""

from __future__ import annotations

import dataclasses

from kvrack.clients.errors import code_name
from kvrack.protocol import ErrorCode, TierId

_OK = int(ErrorCode.OK)


def tier_name(value: int) -> str:
    try:
        return TierId(value).name
    except ValueError:
        return str(value)


@dataclasses.dataclass(repr=False)
class LookupResult:
    """How many leading keys are cached (``prefix``), and each key's tier (``tiers``, one ``TierId`` byte per key,
    0 = ``TierId.NONE`` for a miss: compact for big batches)."""

    prefix: int
    tiers: bytes

    def tier(self, i: int) -> TierId:
        return TierId(self.tiers[i])

    @property
    def hits(self) -> int:
        """Keys cached anywhere, in the prefix or after a miss."""
        return sum(1 for t in self.tiers if t)

    def __len__(self) -> int:
        return self.prefix

    def __repr__(self) -> str:
        shown = ", ".join(tier_name(t) for t in self.tiers[:8]) + (", ..." if len(self.tiers) > 8 else "")
        return f"LookupResult(prefix={self.prefix} of {len(self.tiers)}, tiers=[{shown}])"


@dataclasses.dataclass(repr=False)
class PutResult:
    """Per key: OK (stored now), ALREADY_EXISTS, IN_PROGRESS (another client is writing it), or a failure."""

    codes: list[int]

    @property
    def stored(self) -> int:
        return sum(1 for c in self.codes if c == _OK)

    @property
    def existing(self) -> int:
        return sum(1 for c in self.codes if c == ErrorCode.ALREADY_EXISTS)

    @property
    def in_progress(self) -> int:
        return sum(1 for c in self.codes if c == ErrorCode.IN_PROGRESS)

    @property
    def failed(self) -> list[int]:
        """Indices of keys that are not stored and not being stored by anyone."""
        ok = (_OK, ErrorCode.ALREADY_EXISTS, ErrorCode.IN_PROGRESS)
        return [i for i, c in enumerate(self.codes) if c not in ok]

    def names(self) -> list[str]:
        return [code_name(c) for c in self.codes]

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for c in self.codes:
            counts[code_name(c)] = counts.get(code_name(c), 0) + 1
        return f"PutResult({', '.join(f'{name}={n}' for name, n in counts.items()) or 'no keys'})"


class GetResult(list[bool]):
    """``get_into``'s per-key hit flags (a list of bools), with the bytes each hit wrote (``nbytes``)."""

    nbytes: list[int]

    def __init__(self, hits: list[bool], nbytes: list[int]) -> None:
        super().__init__(hits)
        self.nbytes = nbytes

    @property
    def hits(self) -> int:
        return sum(self)

    def __repr__(self) -> str:
        return f"GetResult(hits={self.hits} of {len(self)}, nbytes={self.nbytes[:8]}{'...' if len(self) > 8 else ''})"
