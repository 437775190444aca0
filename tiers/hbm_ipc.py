"""What a client needs of the HBM tier, and the daemon too: CUDA through cupy, a per-thread copier, and the
CUDA IPC handles of the daemon's arenas opened in the client's process.

cupy is optional (the ``gpu`` extra); ``probe()`` says why the tier is absent on a machine without it or
without a CUDA device.
"""

from __future__ import annotations

import threading
from typing import Any

from kvrack import install_hint


def cuda_runtime() -> Any:
    """cupy's CUDA runtime bindings; RuntimeError saying how to install them when cupy is missing."""
    try:
        import cupy.cuda.runtime as rt  # optional dependency: kvrack[gpu]
    except ImportError as exc:
        raise RuntimeError(f"cupy is not installed ({install_hint('gpu')}): {exc}") from None
    return rt


def probe(device: int = 0) -> tuple[bool, str]:
    """(present, why not): whether cupy loads and CUDA device ``device`` exists."""
    try:
        rt = cuda_runtime()
    except RuntimeError as exc:
        return False, str(exc)
    except Exception as exc:  # a broken CUDA install raises at import
        return False, f"cupy failed to load: {exc}"
    try:
        count = rt.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, insufficient driver, no device
        return False, f"no usable CUDA device: {exc}"
    if device >= count:
        return False, f"CUDA device {device} requested, {count} present"
    return True, ""


_streams = threading.local()  # this thread's stream per device


class Copier:
    """Copies queued on this thread's stream for one device (addresses in bytes); ``wait`` returns when
    all of them are done. The daemon's HBM worker and the clients' GPU reads and writes both use it."""

    def __init__(self, device: int) -> None:
        self.rt = cuda_runtime()
        self.rt.setDevice(device)
        by_device = getattr(_streams, "by_device", None)
        if by_device is None:
            by_device = _streams.by_device = {}
        stream = by_device.get(device)
        if stream is None:
            stream = by_device[device] = self.rt.streamCreate()
        self.stream = stream

    def host_to_device(self, dst: int, src: int, nbytes: int) -> None:
        self.rt.memcpyAsync(dst, src, nbytes, self.rt.memcpyHostToDevice, self.stream)

    def device_to_host(self, dst: int, src: int, nbytes: int) -> None:
        self.rt.memcpyAsync(dst, src, nbytes, self.rt.memcpyDeviceToHost, self.stream)

    def device_to_device(self, dst: int, src: int, nbytes: int) -> None:
        self.rt.memcpyAsync(dst, src, nbytes, self.rt.memcpyDeviceToDevice, self.stream)

    def wait(self) -> None:
        self.rt.streamSynchronize(self.stream)


class IpcMaps:
    """A client's view of HBM segments: each handle opened once, on first use (segment ids and handles
    never change while the daemon runs)."""

    def __init__(self) -> None:
        self.handles: dict[int, bytes] = {}
        self.pointers: dict[int, int] = {}

    def add(self, segments: list[tuple[int, int, bytes]]) -> None:
        for seg_id, _size, handle in segments:
            self.handles[seg_id] = handle

    def pointer(self, seg_id: int) -> int:
        """The device address of a segment in this process (opened on first use)."""
        ptr = self.pointers.get(seg_id)
        if ptr is None:
            rt = cuda_runtime()
            ptr = self.pointers[seg_id] = int(rt.ipcOpenMemHandle(self.handles[seg_id],
                                                                   rt.cudaIpcMemLazyEnablePeerAccess))
        return ptr

    def close(self) -> None:
        if self.pointers:
            rt = cuda_runtime()
            for ptr in self.pointers.values():
                try:
                    rt.ipcCloseMemHandle(ptr)
                except Exception:  # the context may already be gone at interpreter exit
                    pass
        self.pointers.clear()
