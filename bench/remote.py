"""``kvrack bench remote``: remote get/put over NIXL and the TCP byte stream, against raw baselines.

In one run, between the same two endpoints (loopback unless ``--host`` names
another address of this host):

* raw TCP socket: a server process answers each request for a batch with that
  many bytes from its memory; the client ``recv_into``s them block by block
  (the same socket options kvrack uses);
* raw NIXL: a target process registers memory of the kind the DRAM tier is
  made of (a shared memfd mapping) and the client READs the batch's blocks
  from it with one transfer request (the same agent settings as kvrack's: UCX
  backend, target progress thread, initiator polling). For reference it also
  reads private memory, which numpy backs with transparent huge pages: on the
  same host UCX reads with process_vm_readv (CMA), whose cost is per 4 KiB
  page pinned, so huge pages read about 5x faster there; shared memfd
  segments cannot have them unless shmem THP or hugetlbfs is enabled;
* kvrack over NIXL (``acquire`` + one READ per batch + ``release``) and over
  the TCP byte stream (one ``read`` per batch), then puts both ways.

Each figure is the best of ``repeats`` passes over a working set in random
order, passes interleaved so that drift in the machine affects all alike.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import random
import select
import socket
import struct
import tempfile
import textwrap
import time
from collections.abc import Callable
from typing import Any

import blake3
import numpy as np

from kvrack import nixl_agent
from kvrack.bench.spawn import DaemonProcess, free_port, wait_until_paged_in
from kvrack.clients.client import Client
from kvrack.clients.remote import tcp_socket

MiB = 1 << 20
SIZES = {"2MiB": 2 * MiB, "64KiB": 64 * 1024}
BATCH_BYTES = 32 * MiB  # bytes per request: 16 blocks of 2 MiB, 512 of 64 KiB
TOKEN = "kvrack-bench-remote-token-0123456789"
_REQ = struct.Struct("<QQQ")  # raw socket request: offset, bytes, block size


# ------------------------------------------------------------ baselines
def _socket_server(port_pipe: Any, host: str, nbytes: int) -> None:
    data = np.random.default_rng(5).integers(0, 256, nbytes, dtype=np.uint8)
    view = memoryview(data.data)
    lsock = socket.socket()
    lsock.bind((host, 0))
    lsock.listen(1)
    port_pipe.send(lsock.getsockname()[1])
    conn, _ = lsock.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writable = select.poll()
    writable.register(conn, select.POLLOUT)
    while True:
        conn.setblocking(True)
        head = conn.recv(_REQ.size, socket.MSG_WAITALL)
        if len(head) < _REQ.size:
            break
        off, n, block = _REQ.unpack(head)
        # as the daemon sends: gathering non-blocking sendmsg of the blocks, poll when the socket is full
        conn.setblocking(False)
        parts = [view[o: o + block] for o in range(off, off + n, block)]
        while parts:
            try:
                sent = conn.sendmsg(parts[:512])
            except BlockingIOError:
                writable.poll()
                continue
            while parts and sent >= len(parts[0]):
                sent -= len(parts[0])
                parts.pop(0)
            if sent:
                parts[0] = parts[0][sent:]
    conn.close()


def _nixl_target(pipe: Any, nbytes: int, idle_delay_us: int) -> None:
    """Registers memory of the kind the DRAM tier uses (a shared memfd mapping, populated), and for
    reference private anonymous memory, which numpy backs with transparent huge pages."""
    agent = nixl_agent.make_agent(f"bench-target-{os.getpid()}", progress_thread=True, idle_delay_us=idle_delay_us)
    fd = os.memfd_create("kvrack-bench-nixl-target")
    os.ftruncate(fd, nbytes)
    shared = mmap.mmap(fd, nbytes, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    np.frombuffer(shared, dtype=np.uint8)[:] = 6
    private = np.random.default_rng(6).integers(0, 256, nbytes, dtype=np.uint8)
    pins = [nixl_agent.Pinned(shared), nixl_agent.Pinned(private)]
    regs = [agent.register_memory([(p.addr, nbytes, 0, "")], "DRAM") for p in pins]
    both = agent.get_reg_descs([(p.addr, nbytes, 0, "") for p in pins], "DRAM")
    pipe.send((agent.get_partial_agent_metadata(both, True), pins[0].addr, pins[1].addr))
    pipe.recv()  # until the client is done
    for reg in regs:
        agent.deregister_memory(reg)


def _passes(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    best = dict.fromkeys(fns, 0.0)
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = max(best[name], fn())
    return best


def _batches(order: list[int], per_batch: int) -> list[list[int]]:
    return [order[i: i + per_batch] for i in range(0, len(order), per_batch)]


# ----------------------------------------------------------------- run
def _one_size(name: str, n: int, repeats: int, clients: dict[str, Client], raw_sock: socket.socket, largest: int,
              raw: tuple[Any, Any, int, int] | None, progress: Callable[[str], None]) -> dict[str, Any]:
    """Every figure for one block size."""
    raw_agent, target_name, target_addr, private_addr = raw if raw is not None else (None, None, 0, 0)
    size = SIZES[name]
    per_batch = max(1, BATCH_BYTES // size)
    order = list(range(n))
    random.Random(7).shuffle(order)
    batches = _batches(order, per_batch)
    keys = [blake3.blake3(f"bench-remote-{name}-{i}".encode()).digest() for i in range(n)]
    blob = np.random.default_rng(8).integers(0, 256, size, dtype=np.uint8)
    dst = np.zeros((per_batch, size), dtype=np.uint8)
    nbytes = size * n
    figures: dict[str, float] = {}

    progress(f"{name}: puts")
    for tname, client in clients.items():
        client.register([dst])
        put_keys = [blake3.blake3(f"bench-remote-put-{tname}-{name}-{i}".encode()).digest() for i in range(n)]
        t = time.perf_counter()
        for batch in batches:
            client.put([put_keys[i] for i in batch], [blob] * len(batch))
        figures[f"kvrack_{tname}_put_gbs"] = nbytes / (time.perf_counter() - t) / 1e9
        client.delete(put_keys)
    clients["tcp"].put(keys, [blob] * n)

    def raw_socket_pass() -> float:
        t = time.perf_counter()
        for batch in batches:
            raw_sock.sendall(_REQ.pack(min(batch[0] * size, largest - len(batch) * size), len(batch) * size, size))
            for j in range(len(batch)):
                view = memoryview(dst[j])
                got = 0
                while got < size:
                    got += raw_sock.recv_into(view[got:])
        return nbytes / (time.perf_counter() - t) / 1e9

    def kvrack_pass(client: Client) -> Callable[[], float]:
        def run_pass() -> float:
            t = time.perf_counter()
            for batch in batches:
                hits = client.get_into([keys[i] for i in batch], list(dst[: len(batch)]))
                if not all(hits):
                    raise RuntimeError(f"bench remote: {hits.count(False)} misses in a batch")
            return nbytes / (time.perf_counter() - t) / 1e9
        return run_pass

    passes: dict[str, Callable[[], float]] = {"raw_socket_gbs": raw_socket_pass,
                                              "kvrack_tcp_get_gbs": kvrack_pass(clients["tcp"])}
    if raw_agent is not None:
        local = raw_agent.get_xfer_descs([(int(dst.ctypes.data) + j * size, size, 0) for j in range(per_batch)],
                                         "DRAM")
        reg = raw_agent.register_memory([(int(dst.ctypes.data), dst.nbytes, 0, "")], "DRAM")

        def raw_nixl_pass(base: int) -> Callable[[], float]:
            def run_pass() -> float:
                t = time.perf_counter()
                for batch in batches:
                    remote = raw_agent.get_xfer_descs([(base + (i % (largest // size)) * size, size, 0)
                                                       for i in batch], "DRAM")
                    here_descs = local if len(batch) == per_batch else raw_agent.get_xfer_descs(
                        [(int(dst.ctypes.data) + j * size, size, 0) for j in range(len(batch))], "DRAM")
                    h = raw_agent.initialize_xfer("READ", here_descs, remote, target_name)
                    state = raw_agent.transfer(h)
                    while state == "PROC":
                        state = raw_agent.check_xfer_state(h)
                    raw_agent.release_xfer_handle(h)
                    if state != "DONE":
                        raise RuntimeError(f"raw NIXL READ failed: {state}")
                return nbytes / (time.perf_counter() - t) / 1e9
            return run_pass

        passes["raw_nixl_gbs"] = raw_nixl_pass(target_addr)
        passes["raw_nixl_private_thp_gbs"] = raw_nixl_pass(private_addr)
        passes["kvrack_nixl_get_gbs"] = kvrack_pass(clients["nixl"])
    progress(f"{name}: gets ({repeats} passes)")
    for fn in passes.values():  # warm-up: connections, registrations, page faults
        fn()
    figures.update(_passes(passes, repeats))
    if raw_agent is not None:
        raw_agent.deregister_memory(reg)
    figures["tcp_get_vs_raw_socket"] = figures["kvrack_tcp_get_gbs"] / figures["raw_socket_gbs"]
    if "raw_nixl_gbs" in figures:
        figures["nixl_get_vs_raw_nixl"] = figures["kvrack_nixl_get_gbs"] / figures["raw_nixl_gbs"]
    figures.update(blocks=n, batch_blocks=per_batch)
    clients["tcp"].delete(keys)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


def run(names: list[str], working_set: int, repeats: int, host: str = "127.0.0.1",
        progress: Callable[[str], None] = lambda label: None) -> dict[str, Any]:
    counts = {name: max(16, working_set // SIZES[name]) for name in names}
    total = sum(counts[n] * SIZES[n] for n in names)
    nixl_missing = nixl_agent.available()
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="kvrack-bench-remote-") as tmp:
        cfg = os.path.join(tmp, "kvrack.toml")
        with open(cfg, "w") as fh:
            fh.write(textwrap.dedent(f'[[namespaces]]\nname = "bench"\ntoken = "{TOKEN}"\n'))
        port = free_port(host)
        progress("starting kvrackd")
        daemon = DaemonProcess({"dram.capacity_bytes": 2 * total + 256 * MiB, "dram.segment_bytes": "64MiB",
                                "nvme.enabled": "false", "tcp.enabled": "true", "tcp.host": host, "tcp.port": port},
                               config_path=cfg)
        try:
            result = _measure(names, counts, repeats, host, port, ctx, nixl_missing, progress)
        finally:
            daemon.stop()
    return result


def _measure(names: list[str], counts: dict[str, int], repeats: int, host: str, port: int, ctx: Any,
             nixl_missing: str | None, progress: Callable[[str], None]) -> dict[str, Any]:
    address = f"tcp://{host}:{port}"
    largest = max(counts[n] * SIZES[n] for n in names)
    # raw socket server
    here, there = ctx.Pipe()
    sock_server = ctx.Process(target=_socket_server, args=(there, host, largest), daemon=True)
    sock_server.start()
    raw_sock = tcp_socket(host, here.recv(), 60.0, None)
    # raw NIXL target and initiator
    target = raw_agent = None
    if nixl_missing is None:
        target_pipe, target_end = ctx.Pipe()
        target = ctx.Process(target=_nixl_target, args=(target_end, largest, 1000), daemon=True)
        target.start()
        metadata, target_addr, private_addr = target_pipe.recv()
        raw_agent = nixl_agent.make_agent(f"bench-init-{os.getpid()}", progress_thread=False)
        target_name = raw_agent.add_remote_agent(metadata)
    clients = {"tcp": Client.connect(address, "bench", token=TOKEN, transport="tcp", timeout=120)}
    if nixl_missing is None:
        clients["nixl"] = Client.connect(address, "bench", token=TOKEN, transport="nixl", timeout=120)
    wait_until_paged_in(clients["tcp"])
    out: dict[str, Any] = {}
    try:
        for name in names:
            out[name] = _one_size(name, counts[name], repeats, clients, raw_sock, largest,
                                  (raw_agent, target_name, target_addr, private_addr) if raw_agent is not None else None,
                                  progress)
    finally:
        for client in clients.values():
            client.close()
        raw_sock.close()
        sock_server.join(5)
        if target is not None:
            target_pipe.send(1)
            target.join(5)
    headline = out.get("2MiB", out[names[0]])  # the targets are set at 2 MiB
    return {
        "address": address, "sizes": out, "repeats": repeats, "batch_bytes": BATCH_BYTES,
        "ucx": {k: v for k, v in os.environ.items() if k.startswith("UCX_")},
        "tcp_get_vs_raw_socket": headline["tcp_get_vs_raw_socket"],
        "nixl_get_vs_raw_nixl": headline.get("nixl_get_vs_raw_nixl"),
        "nixl_unavailable": nixl_missing,
    }
