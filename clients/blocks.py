"""A block's buffer on the client side: one buffer, or ``Pieces`` of one (an engine's page of the block in each
layer), on the host or on a GPU. Puts copy the pieces into the block's slot one after another and reads copy the
slot out across them: the one copy into or out of kvrack's memory, no staging buffer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from kvrack import protocol as P
from kvrack.clients.buffers import GIL_RELEASE_BYTES, byte_view, copy, stream
from kvrack.clients.gpu import Copier, DeviceSpan, device_span, host_address


class Pieces:
    """One block given as several buffers, in order: numpy arrays, torch tensors (CPU or CUDA), bytearrays."""

    __slots__ = ("parts",)

    def __init__(self, parts: Sequence[Any]) -> None:
        if not parts:
            raise ValueError("a block needs at least one piece")
        self.parts = list(parts)

    @property
    def dtype(self) -> Any:
        """The pieces' element type (for the layout check), when they have one."""
        return getattr(self.parts[0], "dtype", None)


class PieceViews:
    """Byte views (host) or device spans (GPU) of a block's pieces, and their total size."""

    __slots__ = ("parts", "nbytes", "device")

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.nbytes = sum(p.nbytes for p in parts)
        on_device = [isinstance(p, DeviceSpan) for p in parts]
        if any(on_device) and not all(on_device):
            raise ValueError("a block's pieces are all on the host or all on a GPU")
        self.device = on_device[0]


BlockView = memoryview | DeviceSpan | PieceViews


_HOST_TYPES = (memoryview, bytearray, bytes)


def block_view(buf: Any, writable: bool = False) -> BlockView:
    """What the copies walk for one block's buffer."""
    kind = type(buf)
    if kind in _HOST_TYPES or kind.__module__ == "numpy":  # never device memory: skip the GPU checks
        return byte_view(buf, writable)
    if kind is Pieces:
        return PieceViews([p if isinstance(p, DeviceSpan) else device_span(p) or byte_view(p, writable)
                           for p in buf.parts])
    return device_span(buf) or byte_view(buf, writable)


def on_device(view: BlockView) -> bool:
    return isinstance(view, DeviceSpan) or (isinstance(view, PieceViews) and view.device)


def parts_of(view: BlockView) -> list[Any]:
    return view.parts if isinstance(view, PieceViews) else [view]


STREAM_PUT_BYTES = 1 << 20
"""A put that moves at least this many bytes in one call writes them with streaming stores: such a batch
outgrows the caller's private caches, its reader is another process, later, and skipping the
read-for-ownership of each destination line makes the copy ~1.5x faster (measured at 64 KiB-2 MiB blocks)."""

STREAM_GET_BYTES = 8 << 20
"""A get_into that moves at least this many bytes in one call streams them into the caller's buffers: the
caller reads what it asked for soon, so smaller batches stay in the cache it will read them from; a batch
this large would not (and a GPU's DMA reads it from memory in any case)."""


def copies_run_unlocked(views: Iterable[BlockView]) -> bool:
    """Whether every host copy of these blocks is large enough to run without the GIL (pieces of a block
    are copied one by one), so that threads sharing them run at once rather than by turns."""
    return all(p.nbytes >= GIL_RELEASE_BYTES for v in views for p in parts_of(v))


def copy_in(mapping: Any, offset: int, view: BlockView, gpu: Copier | None, streaming: bool = False
            ) -> Copier | None:
    """Copy a block's buffer into its mapped slot at ``offset``; the GPU copier used (device pieces), if any.
    ``streaming``: host bytes go with non-temporal stores (see ``STREAM_PUT_BYTES``)."""
    write = stream if streaming else copy
    if type(view) is memoryview:  # the common case, first: one host buffer
        write(mapping, offset, view, 0, view.nbytes)
        return gpu
    for part in parts_of(view):
        if isinstance(part, DeviceSpan):  # device to host, straight into the reserved slot
            gpu = gpu or Copier(part.device)
            gpu.device_to_host(host_address(mapping, offset, part.nbytes), part.ptr, part.nbytes)
        else:
            write(mapping, offset, part, 0, part.nbytes)
        offset += part.nbytes
    return gpu


def copy_out(view: BlockView, mapping: Any, offset: int, nbytes: int, streaming: bool = False) -> None:
    """Copy ``nbytes`` of a mapped slot at ``offset`` into a host block buffer (its pieces in order);
    ``streaming``: with non-temporal stores (see ``STREAM_GET_BYTES``)."""
    write = stream if streaming else copy
    if type(view) is memoryview:
        write(view, 0, mapping, offset, nbytes)
        return
    for part in parts_of(view):
        n = min(part.nbytes, nbytes)
        write(part, 0, mapping, offset, n)
        offset += n
        nbytes -= n
        if not nbytes:
            return


def split(descriptors: Sequence[P.Descriptor | None], views: Sequence[Any]
          ) -> tuple[list[P.Descriptor | None], list[Any]]:
    """One (descriptor, view) pair per piece: a block given in pieces becomes that many ranges of its slot."""
    if not any(isinstance(v, PieceViews) for v in views):
        return list(descriptors), list(views)
    ds: list[P.Descriptor | None] = []
    vs: list[Any] = []
    for d, v in zip(descriptors, views):
        if d is None or not isinstance(v, PieceViews):
            ds.append(d)
            vs.append(v)
            continue
        pos = d.offset
        for part in v.parts:
            ds.append(P.Descriptor(d.tier, d.segment, pos, part.nbytes))
            vs.append(part)
            pos += part.nbytes
    return ds, vs
