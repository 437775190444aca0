"""A prefix-aware index over several daemons' KV events: which daemon holds the longest cached prefix of a
request's blocks. The seed of routing across racks.

    index = PrefixIndex({"rack-a": "tcp://10.0.0.1:5557", "rack-b": ("tcp://10.0.0.2:5557", "tcp://10.0.0.2:5558")})
    index.pump(0.5)                                  # take in what the daemons published (and replayed)
    keys = KeyBuilder(salt, "llama-3-8b", layout).chain(tokens)
    index.longest_prefix(keys, "default")            # {"rack-a": 12, "rack-b": 0}
    index.best(keys, "default")                      # ("rack-a", 12)

Each daemon publishes with ``events.enabled`` (kvrack.events: vLLM's KV-event format over ZMQ). The index keeps,
per daemon and namespace, the keys held on any tier; a gap in a daemon's sequence numbers is filled from its
replay endpoint when it has one (and counted in ``gaps`` when it cannot be); a daemon that restarted (a new
``epoch`` in its events, numbers from 0 again) is followed from its new start (``restarts``). ``complete`` in ``stats``
says whether the index saw everything a daemon published in its current run: its first batch (live or replayed)
and no gap lost since. It needs pyzmq (``kvrack[router]``).
Not thread-safe: one thread pumps and queries (or guard it with a lock).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

try:
    import zmq
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError("kvrack.clients.router needs pyzmq: pip install 'kvrack[router]'") from exc

from kvrack import events as E

MEDIA_BITS = {"HBM": 1, "CXL": 2, "DRAM": 4, "NVME": 8}
Endpoints = str | tuple[str, str | None]


def _socket(ctx: zmq.Context[Any], kind: int, endpoint: str) -> zmq.Socket[Any]:
    """A socket connected to ``endpoint`` that closes without lingering (IPv6 for an address in brackets)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, int("[" in endpoint))
    sock.connect(endpoint)
    return sock


def _replayed(ctx: zmq.Context[Any], endpoint: str, start: int, timeout_s: float
              ) -> Iterator[tuple[bytes, int, bytes]]:
    """(topic, sequence, payload) of what a replay endpoint still keeps from ``start``, then ``(b"", -1, b"")``
    at its end marker; nothing more once ``timeout_s`` passes without a frame."""
    sock = _socket(ctx, zmq.DEALER, endpoint)
    try:
        sock.send_multipart([b"", E.seq_bytes(start)])
        while sock.poll(int(timeout_s * 1000)):
            frames = sock.recv_multipart()
            if len(frames) != 4:
                continue
            _, topic, seq_b, payload = frames
            seq = E.seq_of(seq_b)
            yield (b"", -1, b"") if seq < 0 else (topic, seq, payload)
            if seq < 0:
                return
    finally:
        sock.close(linger=0)


def _key(key: bytes | int) -> bytes:
    """A block hash as bytes (kvrack's keys are; a vLLM publisher's 64-bit hashes become 8 bytes)."""
    return key if isinstance(key, bytes) else key.to_bytes(8, "little")


class _Daemon:
    """One daemon's subscription and what it holds."""

    def __init__(self, ctx: zmq.Context[Any], name: str, endpoint: str, replay: str | None, topic: bytes) -> None:
        self.name = name
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 0)  # before connecting: it applies to the pipe the connection makes
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.IPV6, int("[" in endpoint))
        self.sub.connect(endpoint)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.replay_endpoint = replay
        self.next_seq: int | None = None  # the sequence number expected next (None: nothing seen yet)
        self.held: dict[str, dict[bytes, int]] = {}  # namespace -> key -> media bits
        self.batches = 0
        self.gaps = 0  # ranges lost for good: what this daemon holds may be off until it restarts
        self.run_gaps = 0  # of them, in the daemon's current run
        self.from_start = False  # the current run's first batch (number 0) was applied
        self.restarts = 0
        self.stored_blocks = 0  # block copies announced stored / removed, over all namespaces and tiers
        self.removed_blocks = 0
        self.epoch: int | None = None  # the daemon run whose batches were applied

    def close(self) -> None:
        self.sub.close(linger=0)


class PrefixIndex:
    """Keys held per daemon and namespace, kept current from KV events."""

    def __init__(self, daemons: dict[str, Endpoints], topic_prefix: str = "kvrack.", replay_timeout_s: float = 5.0
                 ) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context.instance()
        self.topic_prefix = topic_prefix
        self.replay_timeout_s = replay_timeout_s
        self.daemons: dict[str, _Daemon] = {}
        for name, where in daemons.items():
            endpoint, replay = (where, None) if isinstance(where, str) else where
            self.daemons[name] = _Daemon(self.ctx, name, endpoint, replay, topic_prefix.encode())
        self.poller = zmq.Poller()
        for d in self.daemons.values():
            self.poller.register(d.sub, zmq.POLLIN)
        self._by_socket = {d.sub: d for d in self.daemons.values()}

    # ------------------------------------------------------------------ events in
    def catch_up(self) -> None:
        """Ask every daemon with a replay endpoint for all it still keeps (a start, or after a restart of ours)."""
        for d in self.daemons.values():
            if d.replay_endpoint and not self._replay(d, 0) and d.from_start:
                d.gaps += 1  # it kept the run's first batch but not all after it: some range is lost
                d.run_gaps += 1

    def pump(self, quiet_s: float = 0.2, max_s: float = 30.0) -> int:
        """Take in published batches until none came for ``quiet_s`` (at most ``max_s``); how many."""
        n = 0
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            ready = dict(self.poller.poll(int(quiet_s * 1000)))
            if not ready:
                break
            for sock in ready:
                d = self._by_socket[sock]
                while True:
                    try:
                        topic, seq, payload = sock.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._receive(d, E.seq_of(seq), payload)
                    n += 1
        return n

    def _receive(self, d: _Daemon, seq: int, payload: bytes) -> None:
        batch = E.decoder.decode(payload)
        self._check_run(d, batch)
        if d.next_seq is not None and seq < d.next_seq:
            return  # already applied (from a replay)
        if d.next_seq is not None and seq > d.next_seq:
            if not (d.replay_endpoint and self._replay(d, d.next_seq, seq)):
                d.gaps += 1  # lost, and no replay could fill it: what this daemon holds may be off
                d.run_gaps += 1
        self._take(d, seq, batch)

    def _check_run(self, d: _Daemon, batch: E.KVEventBatch) -> bool:
        """Note the daemon's run (``epoch``); a new one is a restart: forget what the old run held and expect
        numbers from 0 (what the new run published before this batch comes from its replay, as a gap). Whether
        it was a new run."""
        epoch = _epoch(batch)
        if epoch is None:
            return False
        if d.epoch is None or epoch == d.epoch:
            d.epoch = epoch
            return False
        d.epoch = epoch
        d.restarts += 1
        d.held.clear()
        d.next_seq = 0
        d.from_start = False
        d.run_gaps = 0
        return True

    def _take(self, d: _Daemon, seq: int, batch: E.KVEventBatch) -> None:
        self._apply(d, batch)
        d.next_seq = seq + 1
        if seq == 0:
            d.from_start = True

    def _replay(self, d: _Daemon, start: int, stop: int | None = None) -> bool:
        """Batches ``start`` .. ``stop`` - 1 (or all it keeps from ``start``) from the daemon's replay socket;
        whether the range came whole."""
        assert d.replay_endpoint is not None
        expected = start
        whole = True
        for _topic, seq, payload in _replayed(self.ctx, d.replay_endpoint, start, self.replay_timeout_s):
            if seq < 0:
                return whole and (stop is None or expected >= stop)
            if stop is not None and seq >= stop:
                continue
            if seq != expected:
                whole = False  # the daemon no longer keeps some of the range
            batch = E.decoder.decode(payload)
            if stop is not None and d.epoch is not None and _epoch(batch) not in (None, d.epoch):
                return False  # the daemon restarted since the batch that asked: its next live one starts over
            if self._check_run(d, batch):  # a catch-up that finds a new run: start over from its first
                whole = seq == 0
            if d.next_seq is None or seq >= d.next_seq:
                self._take(d, seq, batch)
            expected = seq + 1
        return False

    def _apply(self, d: _Daemon, batch: E.KVEventBatch) -> None:
        d.batches += 1
        for ev in batch.events:
            if isinstance(ev, E.AllBlocksCleared):
                if ev.namespace is None:
                    d.held.clear()
                else:
                    d.held.pop(ev.namespace, None)
                continue
            held = d.held.setdefault(ev.namespace or "", {})
            bit = MEDIA_BITS.get(ev.medium or "", 16)
            if isinstance(ev, E.BlockStored):
                d.stored_blocks += len(ev.block_hashes)
                for key in ev.block_hashes:
                    k = _key(key)
                    held[k] = held.get(k, 0) | bit
            else:
                d.removed_blocks += len(ev.block_hashes)
                for key in ev.block_hashes:
                    k = _key(key)
                    left = held.get(k, 0) & ~bit
                    if left:
                        held[k] = left
                    else:
                        held.pop(k, None)

    # ------------------------------------------------------------------ questions
    def holds(self, daemon: str, namespace: str, key: bytes) -> list[str]:
        """The tiers of ``daemon`` holding ``key`` (empty: none)."""
        bits = self.daemons[daemon].held.get(namespace, {}).get(bytes(key), 0)
        return [m for m, b in MEDIA_BITS.items() if bits & b]

    def longest_prefix(self, keys: Sequence[bytes], namespace: str = "default") -> dict[str, int]:
        """Per daemon, how many of ``keys`` from the first it holds in a row (on any tier)."""
        out = {}
        for name, d in self.daemons.items():
            held = d.held.get(namespace, {})
            n = 0
            for key in keys:
                if bytes(key) not in held:
                    break
                n += 1
            out[name] = n
        return out

    def best(self, keys: Sequence[bytes], namespace: str = "default") -> tuple[str | None, int]:
        """The daemon with the longest cached prefix, and its length in blocks (None, 0 when none holds any)."""
        prefixes = self.longest_prefix(keys, namespace)
        name = max(prefixes, key=lambda k: prefixes[k], default=None)
        if name is None or prefixes[name] == 0:
            return None, 0
        return name, prefixes[name]

    def stats(self) -> dict[str, dict[str, Any]]:
        return {name: {"batches": d.batches, "gaps": d.gaps, "restarts": d.restarts, "next_seq": d.next_seq,
                       "stored_blocks": d.stored_blocks, "removed_blocks": d.removed_blocks,
                       "complete": d.from_start and not d.run_gaps, "blocks": {ns: len(h) for ns, h in d.held.items()}}
                for name, d in self.daemons.items()}

    def close(self) -> None:
        for d in self.daemons.values():
            d.close()

    def __enter__(self) -> PrefixIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _epoch(batch: E.KVEventBatch) -> int | None:
    """The publishing daemon's run, from the batch's first event (None from a publisher that does not say)."""
    return getattr(batch.events[0], "epoch", None) if batch.events else None


def follow(endpoint: str, replay: str | None = None, start: int | None = None, topic: bytes = b"",
           timeout_s: float | None = None) -> Iterator[tuple[bytes, int, E.KVEventBatch]]:
    """(topic, sequence, batch) as a daemon publishes them (replayed from ``start`` first, when given); ends
    after ``timeout_s`` without one. A restarted daemon (a new ``epoch``) is followed from its new numbers."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sub = _socket(ctx, zmq.SUB, endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    last = -1
    epoch: int | None = None
    try:
        if replay and start is not None:
            for t, seq, payload in _replayed(ctx, replay, start, 5.0):
                if seq < 0:
                    break
                if t.startswith(topic):
                    last = seq
                    batch = E.decoder.decode(payload)
                    epoch = _epoch(batch) or epoch
                    yield t, seq, batch
        while sub.poll(None if timeout_s is None else int(timeout_s * 1000)):
            t, seq_b, payload = sub.recv_multipart()
            seq = E.seq_of(seq_b)
            batch = E.decoder.decode(payload)
            run = _epoch(batch)
            if run is not None and run != epoch:
                epoch, last = run, -1  # a new run of the daemon: its numbers start again
            if seq > last:
                last = seq
                yield t, seq, batch
    finally:
        sub.close(linger=0)
