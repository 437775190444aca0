"""GPU buffers in the client: recognise them, and copy between them, mapped DRAM slots and HBM copies.

An engine's KV pool lives in GPU memory (torch CUDA tensors, cupy arrays,
anything with ``__cuda_array_interface__``). ``get_into`` copies a block
straight into it: device to device from the daemon's HBM copy (CUDA IPC),
or host to device from the mapped DRAM slot. ``put`` copies device to host
into the reserved DRAM slot. The copies run on one stream per thread
(``kvrack.tiers.hbm.Copier``) and the batch waits for them once.

cupy is optional (``pip install kvrack[gpu]``); without it device buffers are
refused with a clear error.
"""

from __future__ import annotations

from typing import Any

from kvrack import _native
from kvrack.tiers.hbm_ipc import Copier, IpcMaps


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
    """Whether a call's buffers are GPU buffers: a call takes all-GPU or all-host buffers, so the first says."""
    return bool(buffers) and device_span(buffers[0]) is not None


def host_address(buf: Any, offset: int, nbytes: int) -> int:
    """The address of ``nbytes`` of a host buffer (a mapped segment) at ``offset``, bounds checked."""
    return _native.address(memoryview(buf)[offset: offset + nbytes])


__all__ = ["Copier", "DeviceSpan", "IpcMaps", "any_device", "device_span", "host_address"]
