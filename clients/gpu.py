"""GPU buffers in the client: recognise them, and copy between them, mapped DRAM slots and HBM copies.

An engine's KV pool lives in GPU memory (torch CUDA tensors, cupy arrays,
anything with ``__cuda_array_interface__``). ``get_into`` copies a block
straight into it: device to device from the daemon's HBM copy (CUDA IPC),
or host to device from the mapped DRAM slot. ``put`` copies device to host
into the reserved DRAM slot. The copies run on one stream per thread and the
batch waits for them once.

cupy is optional (``pip install kvrack[gpu]``); without it device buffers are
refused with a clear error.
"""

from __future__ import annotations

import threading
from typing import Any

from kvrack import _native
from kvrack.tiers.hbm import IpcMaps

_local = threading.local()


class DeviceSpan:
    """A contiguous range of device memory named by a caller's buffer (pointer and length)."""

    __slots__ = ("ptr", "nbytes", "device")

    def __init__(self, ptr: int, nbytes: int, device: int) -> None:
        self.ptr = ptr
        self.nbytes = nbytes
        self.device = device


def device_span(obj: Any) -> DeviceSpan | None:
    """The device memory of a GPU buffer, or None for host buffers."""
    mod = type(obj).__module__
    if mod.startswith("torch"):
        if obj.device.type != "cuda":
            return None
        if not obj.is_contiguous():
            raise ValueError("tensor must be contiguous")
        return DeviceSpan(int(obj.data_ptr()), obj.numel() * obj.element_size(), obj.device.index or 0)
    iface = getattr(obj, "__cuda_array_interface__", None)
    if iface is None:
        return None
    shape = iface["shape"]
    itemsize = int(iface["typestr"][2:])
    n = itemsize
    for dim in shape:
        n *= dim
    strides = iface.get("strides")
    if strides is not None:  # C-contiguous only
        expect = itemsize
        for dim, stride in zip(reversed(shape), reversed(strides)):
            if dim > 1 and stride != expect:
                raise ValueError("device array must be C-contiguous")
            expect *= dim
    device = getattr(getattr(obj, "device", None), "id", 0) or 0
    return DeviceSpan(int(iface["data"][0]), n, int(device))


def any_device(buffers: Any) -> bool:
    return any(device_span(b) is not None for b in buffers)


def _runtime() -> Any:
    try:
        import cupy.cuda.runtime as rt
    except ImportError as exc:
        raise RuntimeError(f"GPU buffers need cupy (pip install 'kvrack[gpu]'): {exc}") from None
    return rt


class GpuCopier:
    """Queues copies on this thread's stream; ``wait`` returns when all of them are done."""

    def __init__(self, device: int) -> None:
        self.rt = _runtime()
        self.rt.setDevice(device)
        streams = getattr(_local, "streams", None)
        if streams is None:
            streams = _local.streams = {}
        stream = streams.get(device)
        if stream is None:
            stream = streams[device] = self.rt.streamCreate()
        self.stream = stream

    def host_to_device(self, dst: DeviceSpan, host: Any, offset: int, nbytes: int) -> None:
        """From a mapped segment (``host``, at ``offset``) into a device buffer."""
        src = _native.address(memoryview(host)[offset: offset + nbytes])
        self.rt.memcpyAsync(dst.ptr, src, nbytes, self.rt.memcpyHostToDevice, self.stream)

    def device_to_host(self, host: Any, offset: int, src: DeviceSpan, nbytes: int) -> None:
        dst = _native.address(memoryview(host)[offset: offset + nbytes])
        self.rt.memcpyAsync(dst, src.ptr, nbytes, self.rt.memcpyDeviceToHost, self.stream)

    def device_to_device(self, dst: DeviceSpan, src_ptr: int, nbytes: int) -> None:
        self.rt.memcpyAsync(dst.ptr, src_ptr, nbytes, self.rt.memcpyDeviceToDevice, self.stream)

    def wait(self) -> None:
        self.rt.streamSynchronize(self.stream)


__all__ = ["DeviceSpan", "GpuCopier", "IpcMaps", "any_device", "device_span"]
