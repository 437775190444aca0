"""Mooncake Store as its users deploy it, on loopback: a master, a store node holding the memory, a client.

- ``mooncake_master`` with its built-in HTTP metadata server (no etcd);
- ``mooncake_client``, the standalone store node: it contributes ``memory`` bytes (its global segment) and
  holds no local buffer;
- this process as the client, contributing no segment: every put and get moves its bytes over Mooncake's TCP
  transfer engine between the caller's buffers and the store node (``batch_put_from`` / ``batch_get_into``,
  Mooncake's zero-copy calls).

Mooncake evicts on its own above 90 % of its memory (its defaults: ``--eviction_high_watermark_ratio`` 0.9,
``--eviction_ratio`` 0.05); a key read in the last 10 s holds a lease and is not evicted; a put that finds no
room fails (-200) rather than waiting. PyPI's ``mooncake-transfer-engine-non-cuda`` (the ``mooncake`` extra)
imports without CUDA; it needs Debian's ``libibverbs1`` loaded, RDMA or not.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from kvrack.bench.spawn import _die_with_parent, free_port, terminate


def missing(python: str | None = None) -> str | None:
    """None when Mooncake Store can run here, else why not."""
    probe = subprocess.run([python or sys.executable, "-c", "from mooncake.store import MooncakeDistributedStore"],
                           capture_output=True, text=True, timeout=120, check=False)
    if probe.returncode == 0:
        if _binary("mooncake_master") is None or _binary("mooncake_client") is None:
            return "mooncake_master / mooncake_client not found beside the mooncake package"
        return None
    err = probe.stderr.strip().splitlines()
    reason = err[-1] if err else f"exit {probe.returncode}"
    if "No module named" in reason:
        return ("Mooncake Store is not installed (pip install 'kvrack[mooncake]': PyPI's "
                "mooncake-transfer-engine-non-cuda; `make bench-peers` does it)")
    if "libibverbs" in reason:
        return f"Mooncake Store does not import: {reason} (apt-get install libibverbs1)"
    return f"Mooncake Store does not import here: {reason}"


def _binary(name: str) -> str | None:
    found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if found:
        return found
    import mooncake

    local = os.path.join(os.path.dirname(mooncake.__file__), name)
    return local if os.access(local, os.X_OK) else None


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"mooncake-transfer-engine-non-cuda": version("mooncake-transfer-engine-non-cuda")}


class MooncakeStore:
    """Master + store node started here; this process is a client with no segment of its own."""

    name = "mooncake-tcp"

    def __init__(self, memory: int, timeout: float = 60.0) -> None:
        from mooncake.store import MooncakeDistributedStore

        self._tmp = tempfile.mkdtemp(prefix="kvrack-bench-mooncake-")
        self.procs: list[subprocess.Popen[bytes]] = []
        rpc, meta, self.metrics_port, node = free_port(), free_port(), free_port(), free_port()
        master = f"127.0.0.1:{rpc}"
        metadata = f"http://127.0.0.1:{meta}/metadata"
        try:
            self._start("master", [_binary("mooncake_master") or "mooncake_master", f"--rpc_port={rpc}",
                                   "--rpc_address=127.0.0.1", "--enable_http_metadata_server=true",
                                   "--http_metadata_server_host=127.0.0.1", f"--http_metadata_server_port={meta}",
                                   "--metrics_host=127.0.0.1", f"--metrics_port={self.metrics_port}",
                                   "--logtostderr"])
            self._wait(lambda: json.loads(self._http("/health")).get("service_ready") is True, timeout, "master")
            self._start("store-node", [_binary("mooncake_client") or "mooncake_client", "--host=127.0.0.1",
                                       f"--port={node}", f"--global_segment_size={memory}", "--local_buffer_size=0",
                                       "--protocol=tcp", f"--master_server_address={master}",
                                       f"--metadata_server={metadata}", "--logtostderr"])
            self._wait(lambda: self.metric("master_total_capacity_bytes") >= memory, timeout, "store node")
            self.store = MooncakeDistributedStore()
            rc = self.store.setup("127.0.0.1", metadata, 0, 16 << 20, "tcp", "", master)
            if rc != 0:
                raise RuntimeError(f"Mooncake client setup failed ({rc}); logs in {self._tmp}")
        except BaseException:
            self.close()
            raise

    def _start(self, label: str, args: list[str]) -> None:
        log = open(os.path.join(self._tmp, f"{label}.log"), "ab")
        try:
            self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               cwd=self._tmp, preexec_fn=_die_with_parent))
        finally:
            log.close()

    def _http(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as resp:
            return str(resp.read().decode())

    def metric(self, name: str) -> float:
        for line in self._http("/metrics").splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def _wait(self, ready: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a Mooncake process exited while starting the {what}: {self._logs()}")
            with contextlib.suppress(OSError, ValueError):
                if ready():
                    return
            time.sleep(0.1)
        raise TimeoutError(f"Mooncake's {what} did not come up in {timeout} s: {self._logs()}")

    def _logs(self) -> str:
        text = []
        for name in sorted(os.listdir(self._tmp)):
            with open(os.path.join(self._tmp, name), errors="replace") as fh:
                text.append(f"{name}: {fh.read()[-800:]}")
        return "\n".join(text)

    def put(self, keys: Sequence[bytes], blocks: Sequence[np.ndarray]) -> None:
        codes = self.store.batch_put_from([k.hex() for k in keys], [int(b.ctypes.data) for b in blocks],
                                          [b.nbytes for b in blocks])
        self.put_failures = getattr(self, "put_failures", 0) + sum(1 for c in codes if c != 0)

    def get(self, keys: Sequence[bytes], out: Sequence[np.ndarray]) -> list[bool]:
        got = self.store.batch_get_into([k.hex() for k in keys], [int(b.ctypes.data) for b in out],
                                        [b.nbytes for b in out])
        return [n == b.nbytes for n, b in zip(got, out)]

    def delete(self, keys: Sequence[bytes]) -> None:
        for s in range(0, len(keys), 4096):
            self.store.batch_remove([k.hex() for k in keys[s: s + 4096]], True)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def held_blocks(self) -> int | None:
        return int(self.metric("master_key_count"))

    def close(self) -> None:
        store = getattr(self, "store", None)
        if store is not None:
            store.close()
        for proc in reversed(self.procs):  # the store node first, then the master
            terminate(proc, 15)
        shutil.rmtree(self._tmp, ignore_errors=True)


@contextlib.contextmanager
def opened(memory: int) -> Iterator[MooncakeStore]:
    store = MooncakeStore(memory)
    try:
        yield store
    finally:
        store.close()
