"""What the sync and async clients share: requests, batching, segment maps, copies.

Each operation is a generator that yields ``(op, request)`` and is sent the
reply, so the sync client drives it with blocking calls and the async client
with awaits, and the logic exists once.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Sequence
from typing import Any

from kvrack import protocol as P
from kvrack.clients import blocks
from kvrack.clients.blocks import PieceViews, block_view, copy_in, on_device, parts_of, split
from kvrack.clients.blocks import copy_out as scatter
from kvrack.clients.copies import CopyPool
from kvrack.clients.errors import KvrackError, SizeMismatch, TierUnavailable, error_for
from kvrack.clients.gpu import Copier, IpcMaps, any_device, host_address
from kvrack.clients.layout import Layout
from kvrack.clients.results import GetResult, LookupResult, PutResult
from kvrack.clients.steps import Call, Op, Post, ReadCall, Sleep, Transfer, WriteCall
from kvrack.protocol import ErrorCode, TierId

_OK = int(ErrorCode.OK)
_KEY_WIRE_BYTES = 40  # a 32-byte key as msgpack bin plus list overhead, for batch sizing
TOUCH_BATCH = 64  # CXL reads reported to the daemon in one posted touch ...
TOUCH_EVERY_S = 1.0  # ... or as soon as the oldest unreported one is this old (checked at the next read)


def check_fit(i: int, have: int, block: int, exact: bool) -> None:
    """A buffer of ``have`` bytes for key ``i``'s block of ``block`` bytes: exactly its size, or (``exact=False``)
    at least its size. A read never reports success for bytes it did not write."""
    if have == block or (have > block and not exact):
        return
    if have < block:
        raise SizeMismatch(ErrorCode.INVALID_SIZE, f"get_into: buffer {i} of {have} bytes is smaller than its "
                                                   f"{block}-byte block")
    raise SizeMismatch(ErrorCode.INVALID_SIZE, f"get_into: buffer {i} of {have} bytes is larger than its {block}-byte "
                       "block; nothing was reported read (exact=False reads a block into a larger buffer, and "
                       "GetResult.nbytes then says how many bytes each hit wrote)")


class LeaseViews:
    """What sync and async leases share: the pinned keys and their zero-copy views."""

    def __init__(self, keys: list[bytes], views: list[memoryview | None]) -> None:
        self._keys = keys
        self.views = views

    @property
    def hits(self) -> int:
        return sum(v is not None for v in self.views)

    def arrays(self, dtype: Any = "uint8") -> list[Any]:
        """The views as numpy arrays of ``dtype`` (None for misses)."""
        import numpy as np

        return [None if v is None else np.frombuffer(v, dtype=dtype) for v in self.views]

    def _end(self) -> list[bytes]:
        """Invalidate the views; the keys whose pins must now be released."""
        keys, self._keys = self._keys, []
        for v in self.views:
            if v is not None:
                v.release()
        return keys


class SegmentMaps:
    """Segments mapped once per connection (MAP_POPULATE: no faults on the data path)."""

    def __init__(self) -> None:
        self.maps: dict[int, mmap.mmap] = {}

    def add(self, infos: Sequence[P.SegmentInfo], fds: Sequence[int]) -> None:
        if len(infos) != len(fds):
            for fd in fds:
                os.close(fd)
            raise KvrackError(ErrorCode.INTERNAL, f"daemon sent {len(fds)} fds for {len(infos)} segments")
        for info, fd in zip(infos, fds):
            try:
                if info.segment not in self.maps:
                    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                    self.maps[info.segment] = mmap.mmap(fd, info.size, flags=flags,
                                                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)

    def missing(self, descriptors: Sequence[P.Descriptor | None]) -> list[int]:
        maps = self.maps
        return sorted({d.segment for d in descriptors if d is not None and d.segment not in maps})

    def close(self) -> None:
        for m in self.maps.values():
            try:
                m.close()
            except BufferError:  # a caller still holds a view; the mapping ends with it
                pass
        self.maps.clear()


TRANSPORTS = ("auto", P.TRANSPORT_SHM, P.TRANSPORT_NIXL, P.TRANSPORT_TCP)


class ClientCore:
    """Connection-independent client state and the operations as generators.

    ``transport`` is how block bytes move: ``shm`` (mapped segments, Unix socket
    clients), ``nixl`` (one-sided transfers, remote clients) or ``tcp`` (bytes
    after ``read``/``write`` frames); ``auto`` takes the best the daemon offers.
    """

    def __init__(self, namespace: str, client_name: str, token: str = "", transport: str = "auto",
                 remote: bool = False, data_timeout: float | None = None, layout: Layout | None = None,
                 copy_threads: int | None = None) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.namespace = namespace
        self.client_name = client_name
        self.token = token
        self.wanted = transport
        self.remote = remote
        self.data_timeout = data_timeout
        self.layout = layout  # when set, puts and reads check every buffer against it
        self.transport = P.TRANSPORT_SHM
        self.nixl: Any = None  # NixlData when the transport is nixl
        self.cxl: Any = None  # the namespace's CxlRegion, read directly (no request to the daemon)
        self.hbm = IpcMaps()  # the namespace's HBM arena, opened by CUDA IPC on first device read
        self.segments = SegmentMaps()
        self.copy_pool = CopyPool(copy_threads)  # a large request's block copies, spread over threads
        self.salt = b""
        self.session = 0
        self.reserve_lease_s = 0.0
        self.pin_lease_s = 0.0
        self.max_batch_keys = 1024
        self.max_frame_bytes = P.DEFAULT_MAX_FRAME_BYTES
        self._next_id = 1
        self.hbm_reads = 0  # blocks copied device to device from the daemon's HBM arena
        # keys read from the CXL region directly, not yet reported to the daemon's eviction order (touch)
        self.cxl_touched: list[bytes] = []
        self.cxl_touched_since = 0.0
        self.touch_reports = 0

    def close(self) -> None:
        """Unmap the segments and the CXL region, drop the NIXL agent's connection."""
        self.copy_pool.close()
        self.segments.close()
        self.hbm.close()
        if self.cxl is not None:
            self.cxl.close()
            self.cxl = None
        if self.nixl is not None:
            self.nixl.close()
            self.nixl = None

    def client_stats(self, requests: int) -> dict[str, Any]:
        """The ``client`` section of ``stats()``: what this client uses and has sent."""
        cxl_reads = self.cxl.read_counts() if self.cxl is not None else {}
        return {"transport": self.transport, "session": self.session, "requests": requests,
                "cxl_region": getattr(self.cxl, "path", None), "hbm_segments": len(self.hbm.handles),
                "hbm_reads": self.hbm_reads, "touch_reports": self.touch_reports,
                "copy_threads": self.copy_pool.threads, "parallel_copies": self.copy_pool.parallel_requests,
                "cxl_reads_invalidated": cxl_reads.get("reads_invalidated", 0),
                "cxl_reads_unchanged": cxl_reads.get("reads_unchanged_since_last_read", 0)}

    def _id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    @property
    def max_batch(self) -> int:
        """Keys per request: the daemon's batch limit, and what fits a frame with room to spare."""
        return max(1, min(self.max_batch_keys, (self.max_frame_bytes - 4096) // (2 * _KEY_WIRE_BYTES)))

    def _chunks(self, n: int) -> range:
        return range(0, n, self.max_batch)

    # ---------------------------------------------------------------- steps
    def hello(self) -> Op[None]:
        reply, fds = yield Call("hello", P.Hello(id=self._id(), version=P.PROTOCOL_VERSION, namespace=self.namespace,
                                                 client_name=self.client_name, token=self.token))
        self.salt = reply.salt
        self.session = reply.session
        self.reserve_lease_s = reply.reserve_lease_s  # how long the daemon holds a reservation / a pin
        self.pin_lease_s = reply.pin_lease_s
        self.max_batch_keys = reply.max_batch_keys or self.max_batch_keys
        self.max_frame_bytes = reply.max_frame_bytes
        if reply.cxl_path and len(fds) == len(reply.segments) + 1:
            self._open_cxl(reply, fds.pop())
        elif reply.cxl_path and self.remote:
            self._open_cxl(reply, None)
        self.segments.add(reply.segments, fds)
        self.hbm.add([(s.segment, s.size, s.ipc_handle) for s in reply.hbm_segments])
        self.transport = self._pick_transport(reply.transports or [P.TRANSPORT_SHM])
        if self.transport == P.TRANSPORT_NIXL:
            self.nixl.add(reply.remote_segments, reply.nixl_metadata)

    def _open_cxl(self, reply: Any, fd: int | None) -> None:
        """Map the namespace's CXL region read-only: from the fd the daemon passed, or (another host on the
        same CXL fabric) from its path; a region this host cannot open is simply not used."""
        from kvrack.tiers.cxl import CxlRegion

        try:
            self.cxl = CxlRegion.open(reply.cxl_path, reply.namespace, coherent=reply.cxl_coherent, fd=fd)
        except (OSError, ValueError) as exc:  # PermissionError included
            if fd is not None:
                raise TierUnavailable(ErrorCode.TIER_UNAVAILABLE, f"cannot map the CXL region {reply.cxl_path}: {exc}") from None
        finally:
            if fd is not None:
                os.close(fd)  # the mapping keeps the region

    def cxl_lookup(self, keys: Sequence[bytes]) -> tuple[int, Any] | None:
        """Leading hits and slots in the CXL region's shared index, or None without a region."""
        if self.cxl is None or not keys:
            return None
        return self.cxl.lookup(keys)

    def _pick_transport(self, offered: list[str]) -> str:
        """The wanted transport if the daemon offers it (and, for NIXL, it loads here), else the best offered."""
        why_not_nixl = None
        if P.TRANSPORT_NIXL in offered and self.wanted in ("auto", P.TRANSPORT_NIXL):
            from kvrack.clients.remote import NixlData
            from kvrack.nixl_agent import NixlUnavailable

            try:
                self.nixl = NixlData(self.data_timeout)
                return P.TRANSPORT_NIXL
            except NixlUnavailable as exc:
                why_not_nixl = str(exc)
        if self.wanted == "auto":
            return offered[0] if offered[0] != P.TRANSPORT_NIXL else P.TRANSPORT_TCP
        if self.wanted not in offered or why_not_nixl:
            raise TierUnavailable(ErrorCode.TIER_UNAVAILABLE, f"transport {self.wanted!r} is not available on this "
                              f"connection (the daemon offers {', '.join(offered)}){': ' + why_not_nixl if why_not_nixl else ''}")
        return self.wanted

    def map_segments(self, descriptors: Sequence[P.Descriptor | None]) -> Op[None]:
        if self.nixl is not None:
            missing = self.nixl.missing(descriptors)
        else:
            missing = self.segments.missing(descriptors)
        step = P.MAX_FDS_PER_FRAME
        for i in range(0, len(missing), step):
            reply, fds = yield Call("map", P.MapSegments(id=self._id(), segments=missing[i : i + step]))
            if self.nixl is not None:
                self.nixl.add(reply.remote_segments, reply.nixl_metadata)
            else:
                self.segments.add(reply.segments, fds)

    def lookup(self, keys: Sequence[bytes]) -> Op[LookupResult]:
        cxl = self.cxl_lookup(keys)
        if cxl is not None and cxl[0] == len(keys):  # every key in CXL: no request at all
            return LookupResult(len(keys), bytes([TierId.CXL]) * len(keys))
        found = yield from self._lookup_daemon(keys)
        if cxl is None:
            return found
        return LookupResult(*P.with_extra_hits(found.tiers, cxl[1] >= 0, TierId.CXL))  # blocks only in CXL

    def _lookup_daemon(self, keys: Sequence[bytes]) -> Op[LookupResult]:
        tiers = bytearray()
        prefix = None
        for start in self._chunks(len(keys)):
            chunk = list(keys[start : start + self.max_batch])
            reply, _ = yield Call("lookup", P.Lookup(id=self._id(), keys=chunk))
            tiers += reply.tiers
            if prefix is None and reply.prefix < len(chunk):
                prefix = start + reply.prefix
        return LookupResult(len(keys) if prefix is None else prefix, bytes(tiers))

    def keys_op(self, op: str, cls: type, keys: Sequence[bytes]
                ) -> Op[tuple[list[int], list[P.Descriptor | None], str]]:
        """commit / abort / release / delete / acquire over any number of keys."""
        codes: list[int] = []
        descriptors: list[P.Descriptor | None] = []
        message = ""
        for start in self._chunks(len(keys)):
            reply, _ = yield Call(op, cls(id=self._id(), keys=list(keys[start : start + self.max_batch])))
            codes += reply.codes
            descriptors += reply.descriptors
            message = reply.message or message
        return codes, descriptors, message

    def prefetch(self, keys: Sequence[bytes], wait: bool) -> Op[int]:
        """Ask for blocks on lower tiers to come up into DRAM; how many keys the daemon holds."""
        found = 0
        for start in self._chunks(len(keys)):
            reply, _ = yield Call("prefetch", P.Prefetch(id=self._id(), keys=list(keys[start : start + self.max_batch]),
                                                         wait=wait))
            found += sum(1 for c in reply.codes if c == _OK)
        return found

    def release_soon(self, keys: Sequence[bytes]) -> Op[None]:
        """End pins without waiting for the reply (``post``): the next request's reply comes after it."""
        for start in self._chunks(len(keys)):
            yield Post("release", P.Release(id=self._id(), keys=list(keys[start : start + self.max_batch])))

    def put(self, keys: Sequence[bytes], buffers: Sequence[Any], parents: Sequence[bytes | None] | None
            ) -> Op[tuple[PutResult, str]]:
        if len(buffers) != len(keys) or (parents is not None and len(parents) != len(keys)):
            raise ValueError("put: keys, buffers and parents must have the same length")
        views: list[Any] = [block_view(b) for b in buffers]
        if self.layout is not None:
            for i, (buf, view) in enumerate(zip(buffers, views)):
                why = self.layout.mismatch(buf, view.nbytes)
                if why:
                    raise SizeMismatch(ErrorCode.INVALID_SIZE, f"put: block {i}: {why}")
        if self.transport != P.TRANSPORT_SHM and any(on_device(v) for v in views):
            raise ValueError(f"put: GPU buffers need a same-host client (transport shm), this one uses {self.transport}")
        cxl = self.cxl_lookup(keys)
        if cxl is not None and (cxl[1] >= 0).any():  # already in the CXL region: nothing to send
            todo = [i for i, slot in enumerate(cxl[1]) if slot < 0]
            result, message = yield from self.put([keys[i] for i in todo], [views[i] for i in todo],
                                                  [parents[i] for i in todo] if parents is not None else None)
            merged = [int(ErrorCode.ALREADY_EXISTS)] * len(keys)
            for i, code in zip(todo, result.codes):
                merged[i] = code
            return PutResult(merged), message
        codes: list[int] = []
        message = ""
        step = self.max_batch
        for start in range(0, len(keys), step):
            chunk = list(keys[start : start + step])
            reply = yield from self._reserve(chunk, views, parents, start)
            message = reply.message or message
            todo = [i for i, d in enumerate(reply.descriptors) if d is not None and reply.codes[i] == _OK]
            if self.transport == P.TRANSPORT_TCP:
                codes += yield from self._write_stream(chunk, reply, todo, views, start)
            else:
                codes += yield from self._fill_and_commit(chunk, reply, todo, views, start)
        return PutResult(codes), message

    def _fill_and_commit(self, chunk: list[bytes], reply: Any, todo: list[int], views: Sequence[memoryview],
                         start: int) -> Op[list[int]]:
        """Copy into the reserved slots (mapped, or one NIXL WRITE), then commit; the batch's codes."""
        yield from self.map_segments(reply.descriptors)
        try:
            if self.nixl is not None:
                yield Transfer("WRITE", *split([reply.descriptors[i] for i in todo], [views[start + i] for i in todo]))
            else:
                self._copy_in([reply.descriptors[i] for i in todo], [views[start + i] for i in todo])
            ready = [chunk[i] for i in todo]
        except BaseException:
            yield Call("abort", P.Abort(id=self._id(), keys=[chunk[i] for i in todo]))
            raise
        batch_codes = list(reply.codes)
        if ready:
            creply, _ = yield Call("commit", P.Commit(id=self._id(), keys=ready))
            failed = {k: c for k, c in zip(ready, creply.codes) if c != _OK}
            if failed:  # e.g. the reservation's lease ran out before the copy finished
                batch_codes = [failed.get(k, c) for k, c in zip(chunk, batch_codes)]
        return batch_codes

    def _write_stream(self, chunk: list[bytes], reply: Any, todo: list[int], views: Sequence[memoryview],
                      start: int) -> Op[list[int]]:
        """TCP byte stream: one ``write`` carrying the reserved keys' bytes, committed on arrival."""
        batch_codes = list(reply.codes)
        if todo:
            req = P.Write(id=self._id(), keys=[chunk[i] for i in todo], sizes=[views[start + i].nbytes for i in todo])
            wreply, _ = yield WriteCall(req, [part for i in todo for part in parts_of(views[start + i])])
            for i, code in zip(todo, wreply.codes):
                batch_codes[i] = code
        return batch_codes

    def _reserve(self, chunk: list[bytes], views: Sequence[memoryview], parents: Sequence[bytes | None] | None,
                 start: int) -> Op[Any]:
        """One reserve for ``chunk``, the keys from ``start`` on, sized by their views."""
        end = start + len(chunk)
        reply, _ = yield Call("reserve", P.Reserve(id=self._id(), keys=chunk, sizes=[v.nbytes for v in views[start:end]],
                                                   parents=list(parents[start:end]) if parents is not None else None))
        return reply

    def wait_for_writers(self, keys: Sequence[bytes], result: PutResult, timeout: float) -> Op[None]:
        """Poll, with backoff and a deadline, until keys another client was writing are committed.

        Yields ``Sleep`` steps that the driver performs (time.sleep or asyncio.sleep).
        """
        pending = [i for i, c in enumerate(result.codes) if c == ErrorCode.IN_PROGRESS]
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while pending and time.monotonic() < deadline:
            yield Sleep(delay)
            delay = min(delay * 2, 0.05)
            found = yield from self.lookup([keys[i] for i in pending])
            for i, tier in zip(list(pending), found.tiers):
                if tier:
                    result.codes[i] = ErrorCode.ALREADY_EXISTS
                    pending.remove(i)

    def acquire(self, keys: Sequence[bytes]) -> Op[tuple[list[int], list[P.Descriptor | None]]]:
        codes, descriptors, message = yield from self.keys_op("acquire", P.Acquire, keys)
        try:
            yield from self.map_segments(descriptors)
        except BaseException:
            yield from self.keys_op("release", P.Release, [k for k, d in zip(keys, descriptors) if d is not None])
            raise
        return codes, descriptors

    def get_into(self, keys: Sequence[bytes], outs: Sequence[Any], exact: bool = True) -> Op[GetResult]:
        """CXL hits are read from the region directly; the rest from the daemon's tiers. GPU buffers are
        filled from HBM copies (device to device) or mapped DRAM slots (host to device). Each buffer must be
        its block's size (``exact=False``: at least)."""
        if len(outs) != len(keys):
            raise ValueError("get_into: keys and out must have the same length")
        if self.layout is not None:
            for i, out in enumerate(outs):
                why = self.layout.mismatch(out, block_view(out).nbytes)
                if why:
                    raise SizeMismatch(ErrorCode.INVALID_SIZE, f"get_into: buffer {i}: {why}")
        if any_device(outs) or (outs and on_device(block_view(outs[0]))):
            return (yield from self._get_into_device(keys, outs, exact))
        if self.cxl is None:
            return (yield from self._get_into_daemon(keys, outs, exact))
        views = [block_view(out, writable=True) for out in outs]
        got = self._read_cxl(keys, views)
        nbytes = [n or 0 for n in got]
        for i, (n, view) in enumerate(zip(got, views)):
            if n is not None:
                check_fit(i, view.nbytes, n, exact)
        hits = [n is not None for n in got]
        rest = [i for i, hit in enumerate(hits) if not hit]
        touched = self.cxl_touched
        touched.extend(key for key, hit in zip(keys, hits) if hit)
        if touched:
            yield from self._report_touches()
        if rest:
            more = yield from self._get_into_daemon([keys[i] for i in rest], [outs[i] for i in rest], exact, rest)
            for i, hit, n in zip(rest, more, more.nbytes):
                hits[i] = hit
                nbytes[i] = n
        return GetResult(hits, nbytes)

    def _read_cxl(self, keys: Sequence[bytes], views: list[Any]) -> list[int | None]:
        """Read blocks from the CXL region into their buffers; a block given in pieces is read whole into a
        scratch buffer first (one extra copy: the region's reader fills one buffer per block)."""
        assert self.cxl is not None
        scratch = {i: bytearray(v.nbytes) for i, v in enumerate(views) if isinstance(v, PieceViews)}
        got = self.cxl.read_many(keys, [scratch.get(i, v) for i, v in enumerate(views)])
        for i, buf in scratch.items():
            if got[i] is not None:
                scatter(views[i], buf, 0, min(got[i] or 0, views[i].nbytes))
        return got

    def _report_touches(self) -> Op[None]:
        """Tell the daemon which region blocks this client read by itself, so the region's eviction order
        sees them: posted (no reply awaited), once ``TOUCH_BATCH`` keys or ``TOUCH_EVERY_S`` seconds gather."""
        now = time.monotonic()
        if not self.cxl_touched_since:
            self.cxl_touched_since = now
        if len(self.cxl_touched) < TOUCH_BATCH and now - self.cxl_touched_since < TOUCH_EVERY_S:
            return
        keys = list(dict.fromkeys(self.cxl_touched))
        self.cxl_touched.clear()
        self.cxl_touched_since = 0.0
        for start in self._chunks(len(keys)):
            self.touch_reports += 1
            yield Post("touch", P.Touch(id=self._id(), keys=keys[start : start + self.max_batch]))

    def _get_into_daemon(self, keys: Sequence[bytes], outs: Sequence[Any], exact: bool,
                         positions: Sequence[int] | None = None) -> Op[GetResult]:
        """Acquire, copy out, release; keys that found no DRAM room to be read from NVMe into (NO_SPACE)
        are asked again once this round's pins are gone, as long as each round makes progress.
        ``positions``: each key's index in the caller's batch, for error messages."""
        where = list(positions) if positions is not None else list(range(len(keys)))
        if self.transport == P.TRANSPORT_TCP:
            return (yield from self._get_stream(keys, [block_view(o, writable=True) for o in outs], False, exact, where))
        hits = [False] * len(keys)
        nbytes = [0] * len(keys)
        todo = list(range(len(keys)))
        while todo:
            sub = [keys[i] for i in todo]
            codes, descriptors = yield from self.acquire(sub)
            try:
                got = yield from self.copy_out(descriptors, [outs[i] for i in todo], exact, [where[i] for i in todo])
            finally:
                pinned = [k for k, d in zip(sub, descriptors) if d is not None]
                if pinned:
                    yield from self.release_soon(pinned)
            for i, hit, d in zip(todo, got, descriptors):
                hits[i] = hit
                nbytes[i] = d.length if d is not None else 0
            if not any(got):
                break
            todo = [i for i, code in zip(todo, codes) if code == P.ErrorCode.NO_SPACE]
        return GetResult(hits, nbytes)

    def _get_into_device(self, keys: Sequence[bytes], outs: Sequence[Any], exact: bool) -> Op[GetResult]:
        """Acquire (the reply names HBM copies), copy on the GPU's stream, wait, release."""
        if self.transport != P.TRANSPORT_SHM:
            raise ValueError(f"get_into: GPU buffers need a same-host client (transport shm), this one uses "
                             f"{self.transport}")
        views = [block_view(o, writable=True) for o in outs]
        if not all(on_device(v) for v in views):
            raise ValueError("get_into: pass all GPU buffers or all host buffers in one call")
        hits = [False] * len(keys)
        nbytes = [0] * len(keys)
        for start in self._chunks(len(keys)):
            sub = list(keys[start: start + self.max_batch])
            reply, _ = yield Call("acquire", P.Acquire(id=self._id(), keys=sub))
            descriptors = reply.descriptors
            pinned = [k for k, d in zip(sub, descriptors) if d is not None]
            try:
                for j, d in enumerate(descriptors):
                    if d is not None:
                        check_fit(start + j, views[start + j].nbytes, d.length, exact)
                yield from self.map_segments(descriptors)
                hbm = reply.hbm or [None] * len(sub)
                gpu = None
                for j, (d, h) in enumerate(zip(descriptors, hbm)):
                    if d is None:
                        continue
                    pos = 0
                    for part in parts_of(views[start + j]):
                        n = min(part.nbytes, d.length - pos)
                        if n <= 0:
                            break
                        gpu = gpu or Copier(part.device)
                        if h is not None and h.segment in self.hbm.handles:
                            gpu.device_to_device(part.ptr, self.hbm.pointer(h.segment) + h.offset + pos, n)
                        else:
                            gpu.host_to_device(part.ptr, host_address(self.segments.maps[d.segment], d.offset + pos, n),
                                               n)
                        pos += n
                    if h is not None and h.segment in self.hbm.handles:
                        self.hbm_reads += 1
                    hits[start + j] = True
                    nbytes[start + j] = d.length
                if gpu is not None:
                    gpu.wait()  # the pins end only once the copies are done
            finally:
                if pinned:
                    yield from self.release_soon(pinned)
        return GetResult(hits, nbytes)

    def _get_stream(self, keys: Sequence[bytes], outs: Sequence[Any], allocate: bool,
                    exact: bool = True, where: Sequence[int] | None = None) -> Op[Any]:
        """TCP byte stream: ``read`` requests whose replies carry the blocks; a ``GetResult``, or with
        ``allocate`` fresh buffers (None for misses). Keys that found no DRAM room to come back
        from NVMe (NO_SPACE) are asked again while each round makes progress."""
        got: list[Any] = [None if allocate else False] * len(keys)
        nbytes = [0] * len(keys)
        todo = list(range(len(keys)))
        misfit: list[tuple[int, int]] = []  # (key, block bytes) whose buffer does not fit: checked after the read
        while todo:
            retry = []
            progress = False
            for start in range(0, len(todo), self.max_batch):
                idx = todo[start: start + self.max_batch]

                def sinks(reply: Any, idx: list[int] = idx) -> list[memoryview]:
                    out = []
                    for j, n in zip(idx, reply.lengths):
                        if not n:
                            continue
                        view = outs[j] if not allocate else None
                        if view is None or view.nbytes < n or (exact and view.nbytes != n) or \
                                (isinstance(view, PieceViews) and view.nbytes != n):
                            if view is not None:  # the bytes must still be read off the stream
                                misfit.append((j, n))
                            view = memoryview(bytearray(n))
                            if allocate:
                                got[j] = view
                        if isinstance(view, PieceViews):
                            out.extend(view.parts)
                        else:
                            out.append(view[:n])
                    return out

                reply, _ = yield ReadCall(P.Read(id=self._id(), keys=[keys[j] for j in idx]), sinks)
                for j, n, code in zip(idx, reply.lengths, reply.codes):
                    if n:
                        progress = True
                        nbytes[j] = n
                        if not allocate:
                            got[j] = True
                    elif code == ErrorCode.NO_SPACE:
                        retry.append(j)
            for j, n in misfit:  # pieces are filled only when they add up to the block exactly
                check_fit(where[j] if where is not None else j, outs[j].nbytes, n,
                          exact or isinstance(outs[j], PieceViews))
            todo = retry if progress else []
        return got if allocate else GetResult(got, nbytes)

    def copies(self, keys: Sequence[bytes]) -> Op[list[memoryview | None]]:
        """Remote clients' ``get``: the blocks copied into fresh buffers (None for misses); no pins stay."""
        if self.transport == P.TRANSPORT_TCP:
            return (yield from self._get_stream(keys, [None] * len(keys), True))
        codes, descriptors = yield from self.acquire(keys)
        views: list[memoryview | None] = [None if d is None else memoryview(bytearray(d.length)) for d in descriptors]
        try:
            yield Transfer("READ", descriptors, views)
        finally:
            pinned = [k for k, d in zip(keys, descriptors) if d is not None]
            if pinned:
                yield from self.release_soon(pinned)
        return views

    def lease_views(self, keys: Sequence[bytes], descriptors: Sequence[P.Descriptor | None]
                    ) -> tuple[list[bytes], list[memoryview | None]]:
        pinned = [k for k, d in zip(keys, descriptors) if d is not None]
        return pinned, [None if d is None else self.view(d) for d in descriptors]

    def view(self, d: P.Descriptor) -> memoryview:
        """Read-only zero-copy view of a block in its mapped segment."""
        return memoryview(self.segments.maps[d.segment])[d.offset : d.offset + d.length].toreadonly()

    def copy_out(self, descriptors: Sequence[P.Descriptor | None], outs: Sequence[Any], exact: bool = True,
                 where: Sequence[int] | None = None) -> Op[list[bool]]:
        """Copy pinned blocks into caller buffers (from the mapped segments, or one NIXL READ); hit flags.
        Every buffer is checked against its block's size before any byte is copied."""
        views = [None if d is None else block_view(out, writable=True) for d, out in zip(descriptors, outs)]
        for j, (d, view) in enumerate(zip(descriptors, views)):
            if d is not None and view.nbytes != d.length:  # type: ignore[union-attr]
                check_fit(where[j] if where is not None else j, view.nbytes, d.length, exact)  # type: ignore[union-attr]
        if self.nixl is not None:
            yield Transfer("READ", *split(descriptors, views))
            return [d is not None for d in descriptors]
        maps = self.segments.maps
        streaming = sum(d.length for d in descriptors if d is not None) >= blocks.STREAM_GET_BYTES
        self.copy_pool.run([(scatter, (view, maps[d.segment], d.offset, d.length, streaming), d.length)
                            for d, view in zip(descriptors, views) if d is not None],
                           blocks.copies_run_unlocked(v for v in views if v is not None))
        return [d is not None for d in descriptors]

    def _copy_in(self, descriptors: Sequence[P.Descriptor], views: Sequence[Any]) -> None:
        """Copy a put's buffers into their reserved slots; device pieces go on the GPU's stream, waited for
        here: the bytes are in DRAM before the commit publishes them."""
        maps = self.segments.maps
        streaming = sum(v.nbytes for v in views) >= blocks.STREAM_PUT_BYTES
        if any(on_device(v) for v in views):
            gpu = None
            try:
                for d, view in zip(descriptors, views):
                    gpu = copy_in(maps[d.segment], d.offset, view, gpu, streaming)
            finally:  # queued device copies end before an abort can free their slots
                if gpu is not None:
                    gpu.wait()
            return
        self.copy_pool.run([(copy_in, (maps[d.segment], d.offset, view, None, streaming), view.nbytes)
                            for d, view in zip(descriptors, views)], blocks.copies_run_unlocked(views))


def check_put(result: PutResult, message: str, raise_on_error: bool) -> PutResult:
    if raise_on_error and result.failed:
        first = result.codes[result.failed[0]]
        raise error_for(first, message or f"{len(result.failed)} of {len(result.codes)} keys not stored", result.codes)
    return result
