"""Integer counters in slots: the one source every stats view (CLI, REST, metrics) reads."""

from __future__ import annotations


class SlotCounters:
    """Subclasses list their counters in ``__slots__``; all start at 0."""

    __slots__: tuple[str, ...] = ()

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}
