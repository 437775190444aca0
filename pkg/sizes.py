"""Byte sizes as people write them: one syntax for the config, the command line and the clients.

``"64MiB"`` is 64·2^20 bytes and ``"2GB"`` is 2·10^9, as written (IEC and SI units). A bare
``"2G"`` could mean either, so it is refused with both readings spelled out rather than guessed.
"""

from __future__ import annotations

import re
from typing import Any

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_IEC = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SI = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_ONE = {"": 1, "b": 1}
_AMBIGUOUS = ("k", "m", "g", "t")


class SizeError(ValueError):
    """A size that cannot be read, or that could be read two ways."""


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as ``"64MiB"`` (2^20), ``"2GB"`` (10^9) or ``"4096"``."""
    if isinstance(value, bool):
        raise SizeError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            number, unit = m.group(1), m.group(2).lower()
            if unit in _AMBIGUOUS:
                u = unit.upper()
                raise SizeError(f"{value!r} is ambiguous: write {number}{u}iB for {number}·2^{10 * (_AMBIGUOUS.index(unit) + 1)}"
                                f" bytes or {number}{u}B for {number}·10^{3 * (_AMBIGUOUS.index(unit) + 1)}")
            mult = _IEC.get(unit) or _SI.get(unit) or _ONE.get(unit)
            if mult is not None:
                return int(float(number) * mult)
    raise SizeError(f"expected a size such as 1073741824, \"1GiB\" (2^30 bytes) or \"1GB\" (10^9 bytes), got {value!r}")


def format_size(n: int) -> str:
    """The shortest exact binary-unit form of ``n`` bytes (``"64MiB"``), else the plain number."""
    for unit, mult in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def human_size(n: float) -> str:
    """``n`` bytes rounded to one binary unit for people (``"1.5 GiB"``); not for parsing back."""
    for unit, mult in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= mult:
            return f"{n / mult:.1f} {unit}"
    return f"{int(n)} B"


_BINARY = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def unit_of(n: int) -> tuple[str, int]:
    """The largest binary unit not above ``n`` (bytes for small numbers)."""
    return next(((unit, mult) for unit, mult in _BINARY if n >= mult), ("B", 1))


def in_unit(n: int, unit: tuple[str, int]) -> str:
    """``n`` bytes in ``unit`` (from ``unit_of``), exact when it divides, else to one decimal."""
    name, mult = unit
    return f"{n // mult}{name}" if n % mult == 0 else f"{n / mult:.1f}{name}"
