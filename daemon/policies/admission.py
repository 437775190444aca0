"""Admission rules for the NVMe tier: which blocks are worth a write to flash.

``all`` writes every block through when it is stored (the daemon's default:
every committed block survives a restart). The others write a block only when
DRAM evicts it (demotion), and only if it has shown reuse:

- ``reused``: read at least once while in DRAM, or seen (stored or asked for)
  at least twice in the recent past according to a frequency sketch. One-time
  blocks (a prompt's unique tail, a scan) never reach flash; CacheLib's
  admission cut flash writes 44% with the same idea.
- ``demote``: every block DRAM evicts (write-back without a filter).
"""

from __future__ import annotations

from collections.abc import Hashable

from kvrack.daemon.policies.sketch import FrequencySketch


class Admission:
    name = "all"

    def record(self, key: Hashable) -> None:
        """The block was stored or requested."""

    def hit_in_dram(self, key: Hashable) -> None:
        """The block was read from DRAM."""

    def admit_on_eviction(self, key: Hashable) -> bool:
        """Whether DRAM's eviction of the block writes it to NVMe."""
        return False


class DemoteAll(Admission):
    name = "demote"

    def admit_on_eviction(self, key: Hashable) -> bool:
        return True


class AdmitReused(Admission):
    name = "reused"

    def __init__(self, capacity: int) -> None:
        self.sketch = FrequencySketch(capacity)
        self.hit: set[Hashable] = set()

    def record(self, key: Hashable) -> None:
        self.sketch.add(key)

    def hit_in_dram(self, key: Hashable) -> None:
        self.hit.add(key)

    def admit_on_eviction(self, key: Hashable) -> bool:
        if key in self.hit:
            self.hit.discard(key)
            return True
        return self.sketch.estimate(key) >= 2


ADMISSIONS = {"all": Admission, "demote": DemoteAll, "reused": AdmitReused}


def make_admission(name: str, capacity: int) -> Admission:
    if name == "all":
        return Admission()
    if name == "demote":
        return DemoteAll()
    if name == "reused":
        return AdmitReused(capacity)
    raise ValueError(f"unknown admission rule {name!r}; choose from {', '.join(ADMISSIONS)}")
