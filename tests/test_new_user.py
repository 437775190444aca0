"""What a new user met on a fresh clone, each pinned down: sizes that must match, the daemon search, results that
print names, the asyncio client as asyncio code expects, configuration mistakes said out loud, kvrack status."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from kvrack import address as A
from kvrack.bench.spawn import DaemonProcess
from kvrack.clients import (
    AsyncClient,
    Client,
    ClientClosed,
    DaemonUnreachable,
    ErrorCode,
    KvrackError,
    Layout,
    SizeMismatch,
    TierId,
)
from kvrack.clients.results import LookupResult, PutResult
from kvrack.daemon.settings import ConfigError, load_config

from .conftest import SMALL

LAYOUT = Layout(layers=4, kv_heads=2, head_dim=64, block_tokens=16)  # 32 KiB blocks
N = LAYOUT.block_nbytes


def kvrack_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvrack.cli.main", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


# ------------------------------------------------------------------ sizes

def test_a_block_of_another_size_under_a_stored_key_is_a_clear_per_key_error(daemon):
    with Client.connect(daemon.socket_path) as c:
        key = os.urandom(32)
        c.put([key], [np.ones(N // 2, np.uint8)])
        res = c.put([key, os.urandom(32)], [np.ones(N, np.uint8)] * 2, raise_on_error=False)
        assert res.codes == [ErrorCode.INVALID_SIZE, ErrorCode.OK], "not ALREADY_EXISTS: the sizes differ"
        with pytest.raises(SizeMismatch, match=f"stored with {N // 2} bytes; this put has {N}"):
            c.put([key], [np.ones(N, np.uint8)])
        assert c.put([key], [np.ones(N // 2, np.uint8)]).existing == 1, "the same size is still a no-op"


def test_get_into_a_buffer_of_another_size_never_reports_success(daemon):
    with Client.connect(daemon.socket_path) as c:
        key = os.urandom(32)
        data = np.arange(N // 2, dtype=np.uint8)
        c.put([key], [data])
        big = np.full(N, 7, np.uint8)
        with pytest.raises(SizeMismatch, match=f"buffer 0 of {N} bytes is larger than its {N // 2}-byte block"):
            c.get_into([key], [big])
        assert (big == 7).all(), "nothing was copied before the check"
        got = c.get_into([key], [big], exact=False)
        assert got == [True] and got.nbytes == [N // 2]
        assert np.array_equal(big[: N // 2], data) and (big[N // 2:] == 7).all()
        assert c.get([key]).views[0].nbytes == N // 2  # get's views always have the block's size


def test_a_client_that_knows_its_layout_refuses_blocks_of_another_size_or_dtype(daemon):
    with Client.connect(daemon.socket_path, layout=LAYOUT) as c:
        with pytest.raises(SizeMismatch, match=f"{N // 2} bytes, but a block of this layout has {N}"):
            c.put([os.urandom(32)], [np.ones(N // 2, np.uint8)])
        with pytest.raises(SizeMismatch, match="dtype float32, but the layout's dtype is bfloat16"):
            c.put([os.urandom(32)], [np.ones(N // 4, np.float32)])  # the right byte count, the wrong dtype
        assert c.stats()["ops"]["puts"] == 0, "nothing was sent"
        key = os.urandom(32)
        c.put([key], [np.ones(N, np.uint8)])
        with pytest.raises(SizeMismatch):
            c.get_into([key], [bytearray(N + 1)], exact=False)


def test_a_zero_byte_block_says_why(daemon):
    with Client.connect(daemon.socket_path) as c:
        with pytest.raises(KvrackError, match="a block must have at least 1 byte"):
            c.put([os.urandom(32)], [b""])


# ------------------------------------------------------- finding the daemon

def test_clients_and_the_cli_find_the_daemon_through_kvrack_address(daemon, monkeypatch):
    monkeypatch.setenv("KVRACK_ADDRESS", f"unix://{daemon.socket_path}")
    with Client.connect() as c:
        assert c.address == daemon.socket_path
    out = kvrack_cli("status", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["address"] == daemon.socket_path


def test_the_system_socket_comes_before_the_per_user_one(daemon, monkeypatch, tmp_path):
    monkeypatch.delenv("KVRACK_ADDRESS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # no per-user daemon here
    monkeypatch.setattr(A, "SYSTEM_SOCKET", daemon.socket_path)
    assert A.candidate_addresses() == [daemon.socket_path, str(tmp_path / "kvrack" / "kvrack.sock")]
    with Client.connect() as c:
        assert c.address == daemon.socket_path


def test_no_daemon_names_every_place_it_looked(monkeypatch, tmp_path):
    monkeypatch.delenv("KVRACK_ADDRESS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(A, "SYSTEM_SOCKET", str(tmp_path / "run" / "kvrack.sock"))
    with pytest.raises(DaemonUnreachable) as err:
        Client.connect()
    text = str(err.value)
    assert "$KVRACK_ADDRESS (unset)" in text and str(tmp_path / "run" / "kvrack.sock") + " (absent)" in text
    assert str(tmp_path / "kvrack" / "kvrack.sock") in text and isinstance(err.value, ConnectionError)
    monkeypatch.setenv("KVRACK_ADDRESS", str(tmp_path / "elsewhere.sock"))
    async def connect() -> None:
        await AsyncClient.connect()

    with pytest.raises(DaemonUnreachable, match="elsewhere.sock"):
        asyncio.run(connect())


def test_a_second_daemon_stops_before_allocating_anything(daemon):
    res = subprocess.run([sys.executable, "-m", "kvrack.daemon.main", "--socket", daemon.socket_path,
                          "--set", "dram.capacity_bytes=64MiB", "--set", "nvme.enabled=false"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "already listening" in res.stderr
    assert "dram tier" not in res.stderr, "it stopped before allocating its DRAM"


def test_a_stopped_daemon_leaves_no_temporary_directory():
    d = DaemonProcess(SMALL)
    where = os.path.dirname(d.socket_path)
    assert os.path.isdir(where)
    d.stop()
    assert not os.path.exists(where) and "kvrackd stopped" in d.log()


# ------------------------------------------------------ results and errors

def test_results_print_names_not_numbers():
    assert repr(PutResult([0, 302, 302, 400])) == "PutResult(OK=1, ALREADY_EXISTS=2, NO_SPACE=1)"
    shown = repr(LookupResult(1, bytes([TierId.DRAM, TierId.NONE, TierId.NVME])))
    assert shown == "LookupResult(prefix=1 of 3, tiers=[DRAM, NONE, NVME])"


def test_a_closed_client_says_it_is_closed(daemon):
    c = Client.connect(daemon.socket_path)
    c.close()
    c.close()  # twice is harmless
    with pytest.raises(ClientClosed, match="closed"):
        c.lookup([os.urandom(32)])
    with pytest.raises(ClientClosed):
        c.put([os.urandom(32)], [b"x"])


def test_a_lost_connection_is_a_kvrack_error_with_its_cause(daemon):
    c = Client.connect(daemon.socket_path)
    daemon.kill()
    with pytest.raises(KvrackError) as err:
        for _ in range(3):
            c.put([os.urandom(32)], [b"x" * 100])
    assert isinstance(err.value, ConnectionError)
    c.close()


# ---------------------------------------------------------- asyncio client

def test_the_async_client_behaves_as_asyncio_code_expects(daemon):
    async def main() -> None:
        async with AsyncClient.connect(daemon.socket_path) as kv:
            key = os.urandom(32)
            await kv.put([key], [b"x" * 100])
            async with kv.get([key]) as lease:
                assert bytes(lease.views[0]) == b"x" * 100
            lease = await kv.get([key])
            await lease.release()
        assert kv.closed
        kv2 = await AsyncClient.connect(daemon.socket_path)
        await kv2.close()
        with pytest.raises(ClientClosed):
            await kv2.lookup([key])

    asyncio.run(main())


# --------------------------------------------------------- configuration

def test_a_misspelt_environment_variable_is_warned_about():
    cfg = load_config(env={"KVRACK_DRAM_CAPACITY": "1GiB", "KVRACK_TOKEN": "x", "KVRACK_TEST_ANYTHING": "1"})
    assert len(cfg.warnings) == 1 and "KVRACK_DRAM_CAPACITY is not a kvrack setting" in cfg.warnings[0]
    assert "did you mean KVRACK_DRAM_CAPACITY_BYTES" in cfg.warnings[0]
    out = subprocess.run([sys.executable, "-m", "kvrack.daemon.main", "--print-config"], capture_output=True,
                         text=True, timeout=30, env={**os.environ, "KVRACK_DRAM_CAPACITY": "1GiB"})
    assert out.returncode == 0 and "KVRACK_DRAM_CAPACITY is not a kvrack setting" in out.stderr


def test_watermarks_the_wrong_way_round_are_refused():
    with pytest.raises(ConfigError, match="dram.evict_low_watermark .* is above dram.evict_high_watermark"):
        load_config(env={}, overrides={"dram.evict_high_watermark": "0.5", "dram.evict_low_watermark": "0.8"})


def test_more_dram_than_the_machine_has_is_refused():
    with pytest.raises(ConfigError, match="more than this machine's memory"):
        load_config(env={}, overrides={"dram.capacity_bytes": "64TiB"})


def test_the_start_up_line_names_overrides_and_print_config_the_size_in_use(tmp_path):
    with DaemonProcess({**SMALL, "log.level": "info"}) as d:
        first = d.log().splitlines()[0]
    assert "config: embedded defaults + " in first and "setting(s) from the command line" in first
    out = subprocess.run([sys.executable, "-m", "kvrack.daemon.main", "--print-config", "--set",
                          f"nvme.dir={tmp_path}"], capture_output=True, text=True, timeout=30)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("capacity_bytes = \"0\""))
    assert re.search(r"# from default; in use: [\d.]+ [KMGT]iB \(\d+ bytes\)$", line), line


# -------------------------------------------------------------- kvrack status

def test_status_fits_80_columns_and_says_used_in_the_capacity_unit(daemon):
    with Client.connect(daemon.socket_path) as c:
        c.put([os.urandom(32)], [bytes(512 * 1024)])
    out = kvrack_cli("status", "-a", daemon.socket_path, env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    assert max(len(line) for line in out.stdout.splitlines()) <= 80
    dram = next(line for line in out.stdout.splitlines() if "dram" in line)
    assert "8MiB" in dram and "0.5MiB 6%" in dram


def test_status_json_errors_are_json_and_version_prints(tmp_path):
    out = kvrack_cli("status", "--json", "-a", str(tmp_path / "none.sock"))
    assert out.returncode == 1
    err = json.loads(out.stdout)
    assert "no kvrackd listening" in err["error"] and err["code"] == 600
    assert kvrack_cli("--version").stdout.startswith("kvrack ")


def test_fragmentation_counts_only_segments_holding_blocks(daemon):
    with Client.connect(daemon.socket_path) as c:
        keys = [os.urandom(32) for _ in range(32)]
        c.put(keys, [bytes(256 * 1024)] * 32)  # fills the 8 segments of 1 MiB exactly
        c.delete(keys[:28])  # 7 segments empty, still assigned
        dram = c.stats()["tiers"][0]
    assert dram["fragmentation"] == 0.0, "the one segment holding blocks is full; the empty ones are free room"
