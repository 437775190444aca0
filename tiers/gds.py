"""GPUDirect Storage: NVMe-tier blocks read straight into GPU memory (kvikio), checked on the GPU.

Present only with a GPU and the ``gpu`` extra (kvikio needs libcuda even for
host buffers, so the CPU data path stays O_DIRECT). A block read into GPU
memory cannot be checked with the host's xxh3 without copying it back, which
would undo the point of the read. So when a GPU reader is attached, the tier
also records a *word checksum* at write time: the sum over the block's
little-endian 64-bit words ``w[i]`` of ``w[i] * (2i + 1)``, modulo 2^64, mixed
with the length. Every weight is odd, hence invertible modulo 2^64, so a
change to any single word always changes the sum; numpy (host, at write) and
cupy (device, at read) compute it with the same exact integer arithmetic.
Blocks written before the reader was attached carry no word checksum and are
checked on the host after the read (a copy back; correct, not fast).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from kvrack import install_hint

if TYPE_CHECKING:
    from kvrack.tiers.nvme import NvmeTier

log = logging.getLogger("kvrack.tiers.gds")

_LENGTH_MIX = np.uint64(0x9E3779B97F4A7C15)
_weights_cache: dict[Any, Any] = {}


def _weights(xp: Any, nwords: int) -> Any:
    """(2i + 1) for i < nwords, cached per array module and grown as needed."""
    cached = _weights_cache.get(xp)
    if cached is None or len(cached) < nwords:
        cached = xp.arange(max(nwords, 1 << 15), dtype=xp.uint64) * xp.uint64(2) + xp.uint64(1)
        _weights_cache[xp] = cached
    return cached[:nwords]


def _word_checksum(xp: Any, data: Any, length: int) -> int:
    body = length - length % 8
    words = data[:body].view(xp.uint64)
    total = (words * _weights(xp, len(words))).sum(dtype=xp.uint64) if len(words) else xp.uint64(0)
    if length % 8:
        tail = xp.zeros(8, dtype=xp.uint8)
        tail[: length % 8] = data[body:length]
        total = total + tail.view(xp.uint64)[0] * xp.uint64(2 * (body // 8) + 1)
    return int(total) ^ int(np.uint64(length) * _LENGTH_MIX)


def word_checksum(data: Any) -> int:
    """The word checksum of host bytes (any buffer)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    with np.errstate(over="ignore"):
        return _word_checksum(np, arr, len(arr))


def device_word_checksum(data: Any) -> int:
    """The same checksum of a cupy uint8 array, computed on its GPU."""
    import cupy

    return _word_checksum(cupy, data, int(data.size))


def unavailable_reason() -> str | None:
    """None when GPUDirect Storage reads can run here, else why not."""
    try:
        import cupy
        import kvikio  # noqa: F401
    except ImportError as exc:
        return f"the gpu extra is not installed ({exc.name} missing): {install_hint('gpu')}"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as exc:  # no driver, no libcuda
        return f"no usable CUDA driver: {exc}"
    return None


class GdsReader:
    """Reads of one NVMe tier's blocks into GPU memory through kvikio (GDS, or kvikio's compat mode)."""

    def __init__(self, tier: NvmeTier) -> None:
        why = unavailable_reason()
        if why is not None:
            raise RuntimeError(f"GPUDirect Storage reads unavailable: {why}")
        import kvikio

        self.tier = tier
        self.files = [kvikio.CuFile(p.path, "r") for p in tier.paths]
        self.compat_mode = bool(getattr(kvikio.defaults, "is_compat_mode_preferred", lambda: False)())
        tier.device_checksums = True  # from now on writes record the word checksum
        self.host_checked = 0

    def read_into_device(self, namespace: str, key: bytes, out: Any) -> Any:
        """Read a block into ``out`` (cupy uint8, at least the block's length); returns the filled view.

        A checksum mismatch raises ``ChecksumError`` and counts, as on the host path.
        """
        from kvrack.tiers.nvme import ChecksumError

        tier = self.tier
        rec = tier.index.get(namespace, key)
        if rec is None:
            raise KeyError(key)
        if out.size < rec.length:
            raise ValueError(f"device buffer of {out.size} bytes is smaller than the {rec.length}-byte block")
        view = out[: rec.length]
        try:
            self.files[rec.file].pread(view, rec.length, rec.offset).get()
        except (OSError, RuntimeError) as exc:
            err = exc if isinstance(exc, OSError) else OSError(5, f"GDS read failed: {exc}")
            tier._fail("read", err)
            raise err from None
        if rec.device_checksum:
            ok = device_word_checksum(view) == rec.device_checksum
        else:  # written before a GPU reader existed: check on the host
            self.host_checked += 1
            ok = xxhash.xxh3_64_intdigest(view.get().tobytes()) == rec.checksum
        if not ok:
            tier.errors["checksum"] += 1
            raise ChecksumError(74, f"checksum mismatch at {tier.paths[rec.file].path}+{rec.offset} (GPU read)")
        tier.bytes_read += rec.length
        return view

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files = []
