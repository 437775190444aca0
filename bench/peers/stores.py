"""Each byte store of the benchmark behind its own normal client, started and stopped here.

Every store is opened with a memory limit (its own notion of it: kvrack's DRAM tier capacity, Redis's
``maxmemory``) and gives the workload put/get/delete of batches of blocks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from kvrack.bench.spawn import DaemonProcess, _die_with_parent, free_port, terminate, wait_until_paged_in

TOKEN = "kvrack-bench-peers-token-0123456789"


class KvrackStore:
    """A private kvrackd (DRAM tier alone) read and written by ``kvrack.Client`` over one transport: ``shm``
    (same host: blocks copied straight between the caller's buffers and the mapped tier), ``tcp`` (the byte
    stream a remote client uses, here over loopback) or ``nixl`` (one-sided reads and writes, UCX on loopback)."""

    def __init__(self, transport: str, memory: int, settings: dict[str, object] | None = None) -> None:
        from kvrack.clients.client import Client

        self.name = f"kvrack-{transport}"
        self.transport = transport
        self._tmp = tempfile.mkdtemp(prefix="kvrack-bench-peers-")
        config = os.path.join(self._tmp, "kvrack.toml")
        with open(config, "w") as fh:
            fh.write(f'[[namespaces]]\nname = "bench"\ntoken = "{TOKEN}"\n')
        settings = {"dram.capacity_bytes": memory, "dram.segment_bytes": min(memory, 64 << 20), "nvme.enabled": "false",
                    **(settings or {})}
        if transport == "shm":
            address = None
        else:
            port = free_port()
            settings.update({"tcp.enabled": "true", "tcp.host": "127.0.0.1", "tcp.port": port})
            address = f"tcp://127.0.0.1:{port}"
        try:
            self.daemon = DaemonProcess(settings, config_path=config)
            self.client = Client.connect(address or self.daemon.socket_path, "bench", "kvrack-bench-peers",
                                         timeout=120, token=TOKEN, transport=transport)
            wait_until_paged_in(self.client)
        except BaseException:
            self.close()
            raise

    def put(self, keys: Sequence[bytes], blocks: Sequence[np.ndarray]) -> None:
        self.client.put(list(keys), list(blocks))

    def get(self, keys: Sequence[bytes], out: Sequence[np.ndarray]) -> list[bool]:
        return list(self.client.get_into(list(keys), list(out)))

    def delete(self, keys: Sequence[bytes]) -> None:
        for s in range(0, len(keys), 16384):
            self.client.delete(list(keys[s: s + 16384]))

    def pids(self) -> list[int]:
        return [self.daemon.pid]

    def held_blocks(self) -> int | None:
        return int(self.client.stats()["tiers"][0]["blocks"])

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        daemon = getattr(self, "daemon", None)
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)


def redis_missing() -> str | None:
    """None when Redis can run here, else why not."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (Debian: apt-get install redis-server; `make bench-peers` does it)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed (pip install 'kvrack[peers]')"
    return None


def redis_versions() -> dict[str, str]:
    import redis

    server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False).stdout
    try:
        import hiredis

        parser = f"hiredis {hiredis.__version__}"
    except ImportError:
        parser = "python parser"
    return {"redis-server": server.strip(), "redis-py": f"{redis.__version__} ({parser})"}


class RedisStore:
    """Debian's redis-server started here (persistence off, ``maxmemory`` with ``allkeys-lru``) on a Unix socket
    and on TCP loopback; redis-py talks to it over ``via`` ("unix" or "tcp"): a pipeline of SETs per batch,
    one MGET per batch read, each value then copied into the caller's buffer."""

    def __init__(self, via: str, memory: int) -> None:
        import redis

        self.name = f"redis-{via}"
        self._tmp = tempfile.mkdtemp(prefix="kvrack-bench-redis-")
        self.unix = os.path.join(self._tmp, "redis.sock")
        self.port = free_port()
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--unixsocket", self.unix,
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", self._tmp,
                "--maxmemory", str(memory), "--maxmemory-policy", "allkeys-lru", "--daemonize", "no",
                "--logfile", os.path.join(self._tmp, "redis.log")]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        try:
            kwargs: dict[str, Any] = ({"unix_socket_path": self.unix} if via == "unix" else
                                      {"host": "127.0.0.1", "port": self.port})
            self.client = redis.Redis(socket_timeout=120, **kwargs)
            deadline = time.monotonic() + 30
            while True:
                try:
                    self.client.ping()
                    break
                except redis.exceptions.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start: {self._log()}") from None
                    time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    def _log(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self._tmp, "redis.log")) as fh:
            return fh.read()[-2000:]
        return ""

    def put(self, keys: Sequence[bytes], blocks: Sequence[np.ndarray]) -> None:
        if len(keys) == 1:
            self.client.set(keys[0], memoryview(blocks[0].data))
            return
        pipe = self.client.pipeline(transaction=False)
        for key, block in zip(keys, blocks):
            pipe.set(key, memoryview(block.data))
        pipe.execute()

    def get(self, keys: Sequence[bytes], out: Sequence[np.ndarray]) -> list[bool]:
        values = [self.client.get(keys[0])] if len(keys) == 1 else self.client.mget(list(keys))
        hits = []
        for value, buf in zip(values, out):
            if not isinstance(value, bytes) or len(value) != buf.nbytes:
                hits.append(False)
                continue
            np.copyto(buf, np.frombuffer(value, dtype=np.uint8))
            hits.append(True)
        return hits

    def delete(self, keys: Sequence[bytes]) -> None:
        for s in range(0, len(keys), 4096):
            self.client.delete(*keys[s: s + 4096])

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def held_blocks(self) -> int | None:
        return int(self.client.dbsize())

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        terminate(self.proc, 30)
        shutil.rmtree(self._tmp, ignore_errors=True)


@contextlib.contextmanager
def opened(kind: str, memory: int) -> Iterator[Any]:
    """``kind``: kvrack-shm, kvrack-tcp, kvrack-nixl, redis-unix, redis-tcp."""
    system, via = kind.split("-", 1)
    store: Any = KvrackStore(via, memory) if system == "kvrack" else RedisStore(via, memory)
    try:
        yield store
    finally:
        store.close()
