"""Byte views of caller buffers: numpy arrays, torch CPU tensors, bytes-likes."""

from __future__ import annotations

from typing import Any

_native: Any
try:
    from kvrack import _native
except ImportError as _exc:  # the package imports, but says what is missing
    _native = None
    NATIVE_IMPORT_ERROR: str | None = (f"kvrack._native is not built ({_exc}); reinstall kvrack "
                                       "(pip install .) with a C compiler available")
else:
    NATIVE_IMPORT_ERROR = None

# native copies of at least this many bytes run without the GIL (none do without the extension)
GIL_RELEASE_BYTES: int = _native.GIL_RELEASE_BYTES if _native is not None else 1 << 62


def byte_view(obj: Any, writable: bool = False) -> memoryview:
    """A flat, C-contiguous ``uint8`` memoryview of ``obj`` without copying."""
    mod = type(obj).__module__
    if mod.startswith("torch"):
        if obj.device.type != "cpu":
            raise ValueError(f"tensor is on {obj.device}; this path takes CPU tensors")
        if not obj.is_contiguous():
            raise ValueError("tensor must be contiguous")
        import torch

        obj = obj.detach().reshape(-1).view(torch.uint8).numpy()
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"{type(obj).__name__} does not expose a buffer; pass bytes, numpy arrays or torch tensors") from None
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    if writable and view.readonly:
        raise ValueError(f"{type(obj).__name__} is read-only; get_into needs writable buffers")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def copy(dst: Any, dst_offset: int, src: Any, src_offset: int, nbytes: int) -> None:
    """memcpy between buffers; the native copy releases the GIL for large blocks."""
    if _native is not None:
        _native.copy(dst, dst_offset, src, src_offset, nbytes)
    else:
        memoryview(dst)[dst_offset : dst_offset + nbytes] = memoryview(src)[src_offset : src_offset + nbytes]


def stream(dst: Any, dst_offset: int, src: Any, src_offset: int, nbytes: int) -> None:
    """Copy with non-temporal (streaming) stores, then a store fence: the bytes go to memory without first
    reading the destination's lines into the cache and without evicting the caller's working set. For
    blocks written into a tier that another process reads later, this moves about 1.5x the bytes per
    second of ``copy`` (``docs/benchmarks.md``)."""
    if _native is not None:
        _native.nt_store(dst, dst_offset, src, src_offset, nbytes)
    else:
        copy(dst, dst_offset, src, src_offset, nbytes)
