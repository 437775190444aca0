"""The KV-event publisher: blocks stored and removed, per tier and namespace, out over ZMQ in vLLM's format
(kvrack.events) for prefix-aware routers.

The data loop only appends to a per-namespace list (a tuple per block); every ``events.interval_s`` it cuts
them into numbered batches (at most ``events.max_batch_events`` blocks each, per namespace) and hands them to
the publisher thread through a bounded queue. The thread builds the events, encodes and sends them (never blocking: a subscriber that does not read is ZMQ's high-water mark to
drop at, a queue past ``events.max_queued_batches`` drops new batches, both counted), keeps the last batches
for replay and answers replay requests. A slow or absent subscriber costs the data path nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import zmq

from kvrack import events as E

if TYPE_CHECKING:
    from kvrack.daemon.index import Entry

log = logging.getLogger("kvrack.events")
MEDIA = {1: "HBM", 2: "CXL", 3: "DRAM", 4: "NVME"}  # TierId -> medium
SUBSCRIBER_QUEUE_BYTES = 64 << 20
BLOCK_EVENT_BYTES = 224  # a block's share of an encoded batch at most (an unchained store: key, parent, fields)


def _open(sock: zmq.Socket[Any], endpoint: str) -> str:
    """Bind (the usual publisher side) where the endpoint is this host's; connect (to a collector that binds)
    where the address is not one of this host's. Which one it did."""
    if "[" in endpoint:  # an IPv6 address (tcp://[::]:PORT); without it, names and IPv4 addresses bind as IPv4
        sock.setsockopt(zmq.IPV6, 1)
    try:
        sock.bind(endpoint)
        return "bound"
    except zmq.ZMQError as exc:
        if not endpoint.startswith("tcp://") or exc.errno not in (errno.EADDRNOTAVAIL, errno.ENODEV):
            raise
    sock.connect(endpoint)
    return "connected"


class EventPublisher:
    """Collects events on the data loop; a thread publishes them."""

    def __init__(self, endpoint: str, replay_endpoint: str = "", topic_prefix: str = "kvrack.",
                 interval_s: float = 0.05, max_batch_events: int = 4096, max_queued_batches: int = 10000,
                 replay_batches: int = 10000, max_blocks_per_s: int = 0) -> None:
        self.topic_prefix = topic_prefix
        self.interval_s = interval_s
        self.max_batch_events = max_batch_events
        self.max_queued_batches = max_queued_batches
        self.max_blocks_per_s = max_blocks_per_s
        # a token bucket of block events: a second's worth deep (a full batch at least)
        self.bucket = float(max(max_blocks_per_s, max_batch_events))
        self.allowance = self.bucket
        self.refilled = time.monotonic()
        self.ctx: zmq.Context[Any] = zmq.Context.instance()
        self.pub = self.ctx.socket(zmq.PUB)
        # what ZMQ holds for a subscriber that reads slowly or not at all, at most about SUBSCRIBER_QUEUE_BYTES
        # (full batches); past it that subscriber loses batches (a gap it fills from the replay endpoint)
        self.pub.setsockopt(zmq.SNDHWM, max(16, SUBSCRIBER_QUEUE_BYTES // (max_batch_events * BLOCK_EVENT_BYTES)))
        self.pub.setsockopt(zmq.LINGER, 0)
        self.endpoint_mode = _open(self.pub, endpoint)
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint
        log.info("events: publishing on %s (%s)%s", self.endpoint, self.endpoint_mode,
                 "" if self.endpoint_mode == "bound" else ": not an address of this host, so a collector there binds")
        self.replay: zmq.Socket[Any] | None = None
        self.replay_endpoint = ""
        if replay_endpoint:
            self.replay = self.ctx.socket(zmq.ROUTER)
            self.replay.setsockopt(zmq.LINGER, 0)
            if "[" in replay_endpoint:
                self.replay.setsockopt(zmq.IPV6, 1)
            self.replay.bind(replay_endpoint)
            self.replay_endpoint = self.replay.getsockopt_string(zmq.LAST_ENDPOINT) or replay_endpoint
        # per namespace, the events not yet batched: ("S", medium, key, parent, nbytes) | ("R", medium, key) | ("C",)
        self.pending: dict[str, list[tuple[Any, ...]]] = {}
        self.pending_blocks = 0
        # (sequence number, topic, namespace, time, the pending tuples): built into a batch by the thread
        self.queue: collections.deque[tuple[int, bytes, str, float, list[tuple[Any, ...]]]] = collections.deque()
        self.buffer: collections.deque[tuple[int, bytes, bytes]] = collections.deque(maxlen=replay_batches)
        self.wake = threading.Event()
        self.running = True
        self.epoch = int.from_bytes(os.urandom(8), "big") >> 1  # this run's: subscribers tell a restart by it
        self.seq = 0  # the next batch's sequence number (given on the data loop, so that a dropped batch is a gap)
        self.published_batches = 0
        self.published_events = 0
        self.published_blocks = 0
        self.dropped_batches = 0  # queue full: not handed to the thread (their numbers are gaps subscribers see)
        self.dropped_blocks = 0
        self.rate_limited_batches = 0  # past events.max_blocks_per_s (numbered too: gaps subscribers see)
        self.rate_limited_blocks = 0
        self.unsent_batches = 0  # the PUB socket refused (every subscriber at its high-water mark)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.thread = threading.Thread(target=self._run, name="kvrack-events", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------- the data loop's side
    def stored(self, e: Entry, tier: int) -> None:
        """``e`` has a copy on ``tier`` now."""
        self._add(e.ns.name, ("S", MEDIA[tier], e.key, e.parent, e.nbytes))

    def removed(self, e: Entry, tier: int) -> None:
        """``e``'s copy on ``tier`` is gone."""
        self._add(e.ns.name, ("R", MEDIA[tier], e.key))

    def removed_key(self, namespace: str, key: bytes, tier: int) -> None:
        """A copy on ``tier`` that no index entry names any longer is gone (CXL, HBM)."""
        self._add(namespace, ("R", MEDIA[tier], bytes(key)))

    def cleared(self, namespace: str) -> None:
        """Subscribers should forget what they know of ``namespace`` (a start: recovered blocks follow)."""
        self._add(namespace, ("C",), blocks=0)

    def _add(self, namespace: str, event: tuple[Any, ...], blocks: int = 1) -> None:
        events = self.pending.get(namespace)
        if events is None:
            events = self.pending[namespace] = []
        events.append(event)
        self.pending_blocks += blocks

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.timer = loop.call_later(self.interval_s, self._flush)

    def _flush(self) -> None:
        """Everything pending onto the thread's queue, in batches of at most ``max_batch_events`` blocks per
        namespace; then again later."""
        assert self.loop is not None
        self.batch_pending()
        self.timer = self.loop.call_later(self.interval_s, self._flush)

    def batch_pending(self) -> None:
        """Everything pending onto the thread's queue now, numbered."""
        if not self.pending:
            return
        now = time.time()
        if self.max_blocks_per_s:
            tick = time.monotonic()
            self.allowance = min(self.bucket, self.allowance + (tick - self.refilled) * self.max_blocks_per_s)
            self.refilled = tick
        pending, self.pending, self.pending_blocks = self.pending, {}, 0
        for namespace, events in pending.items():
            topic = (self.topic_prefix + namespace).encode()
            for start in range(0, len(events), self.max_batch_events):
                take = events[start: start + self.max_batch_events]
                seq = self.seq
                self.seq += 1
                blocks = sum(1 for ev in take if ev[0] != "C")
                if len(self.queue) >= self.max_queued_batches:
                    self.dropped_batches += 1
                    self.dropped_blocks += blocks
                    continue
                if self.max_blocks_per_s and blocks > self.allowance:
                    self.rate_limited_batches += 1
                    self.rate_limited_blocks += blocks
                    continue
                self.allowance -= blocks
                self.queue.append((seq, topic, namespace, now, take))
        self.wake.set()

    # ------------------------------------------------------------- the publisher thread
    def _run(self) -> None:
        poller = zmq.Poller()
        if self.replay is not None:
            poller.register(self.replay, zmq.POLLIN)
        while self.running or self.queue:
            if self.replay is not None and poller.poll(0):
                self._serve_replay()
            if not self.queue:
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            seq, topic, namespace, ts, pending = self.queue.popleft()
            batch = E.KVEventBatch(ts, _events(namespace, pending, self.epoch))
            payload = E.encoder.encode(batch)
            frames = (topic, E.seq_bytes(seq), payload)
            try:
                self.pub.send_multipart(frames, flags=zmq.NOBLOCK)
                self.published_batches += 1
                self.published_events += len(batch.events)
                self.published_blocks += sum(len(getattr(ev, "block_hashes", ())) for ev in batch.events)
            except zmq.Again:
                self.unsent_batches += 1
            except zmq.ZMQError as exc:
                if not self.running:
                    break
                log.warning("events: cannot publish batch %d: %s", seq, exc)
                self.unsent_batches += 1
            self.buffer.append((seq, topic, payload))  # replayable either way

    def _serve_replay(self) -> None:
        assert self.replay is not None
        try:
            frames = self.replay.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        if len(frames) != 3:
            log.warning("events: a replay request of %d frames (expected 3: identity, empty, start sequence)",
                        len(frames))
            return
        client, _, start = frames
        first = E.seq_of(start)
        for seq, topic, payload in list(self.buffer):
            if seq >= first:
                self.replay.send_multipart((client, b"", topic, E.seq_bytes(seq), payload))
        self.replay.send_multipart((client, b"", b"", E.END_SEQ, b""))

    # ------------------------------------------------------------------------ upkeep
    def stats(self, namespace: str | None = None) -> dict[str, Any]:
        if namespace is not None:
            return {}
        return {"endpoint": self.endpoint, "endpoint_mode": self.endpoint_mode, "epoch": self.epoch, "replay_endpoint": self.replay_endpoint or None, "next_seq": self.seq,
                "published_batches": self.published_batches, "published_events": self.published_events,
                "published_blocks": self.published_blocks, "pending_blocks": self.pending_blocks,
                "queued_batches": len(self.queue), "dropped_batches": self.dropped_batches,
                "dropped_blocks": self.dropped_blocks, "rate_limited_batches": self.rate_limited_batches,
                "rate_limited_blocks": self.rate_limited_blocks, "unsent_batches": self.unsent_batches}

    def close(self, flush: bool = True) -> None:
        """Publish everything pending (``flush``; the thread gets 10 s to send it), stop the thread, close the
        sockets. Closing twice is harmless."""
        if not self.running:
            return
        if self.timer is not None:
            self.timer.cancel()
        if flush:
            self.batch_pending()
        self.running = False
        self.wake.set()
        self.thread.join(10)
        if self.thread.is_alive():
            log.warning("events: %d batches not published at shutdown", len(self.queue))
        self.pub.close(linger=1000)  # what is sent but still in ZMQ's pipes goes out (a reading subscriber's)
        if self.replay is not None:
            self.replay.close(linger=0)
        # ZMQ removes a bound ipc:// socket file from its I/O thread, which a process that exits next may not
        # wait for: remove them here
        for endpoint, bound in ((self.endpoint, self.endpoint_mode == "bound"), (self.replay_endpoint, True)):
            if bound and endpoint.startswith("ipc://"):
                with contextlib.suppress(OSError):
                    os.unlink(endpoint.removeprefix("ipc://"))


def _events(namespace: str, pending: list[tuple[Any, ...]], epoch: int | None = None
            ) -> list[E.BlockStored | E.BlockRemoved | E.AllBlocksCleared]:
    """The pending tuples as events: consecutive stores on one medium that form a chain become one BlockStored
    (as vLLM groups a request's blocks), consecutive removals on one medium one BlockRemoved."""
    out: list[E.BlockStored | E.BlockRemoved | E.AllBlocksCleared] = []
    last: Any = None
    for ev in pending:
        kind = ev[0]
        if kind == "S":
            _, medium, key, parent, nbytes = ev
            if (isinstance(last, E.BlockStored) and last.medium == medium
                    and parent is not None and parent == last.block_hashes[-1]):
                last.block_hashes.append(key)
                last.block_bytes.append(nbytes)  # type: ignore[union-attr]
                continue
            last = E.BlockStored(block_hashes=[key], parent_block_hash=parent, token_ids=[], block_size=0, lora_id=None,
                                 medium=medium, lora_name=None, namespace=namespace, block_bytes=[nbytes],
                                 epoch=epoch)
        elif kind == "R":
            _, medium, key = ev
            if isinstance(last, E.BlockRemoved) and last.medium == medium:
                last.block_hashes.append(key)
                continue
            last = E.BlockRemoved(block_hashes=[key], medium=medium, namespace=namespace, epoch=epoch)
        else:
            last = E.AllBlocksCleared(namespace=namespace, epoch=epoch)
        out.append(last)
    return out
