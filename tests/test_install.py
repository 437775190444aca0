"""kvrack installs beside an engine's own numpy: the client into a minimal environment at the lowest versions
pyproject.toml allows (and another numpy than constraints.txt pins), without the daemon's dependencies; then the
daemon extra at its lowest versions. Both talk to each other and to a daemon of the main environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from kvrack.bench.spawn import DaemonProcess

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DAEMON_ONLY = ("lmdb", "uvloop", "sdnotify", "typer", "rich", "torch")


def lowest(requirements: list[str]) -> list[str]:
    """``name>=X`` as ``name==X``: the lower bounds pyproject.toml promises work."""
    pins = []
    for req in requirements:
        name, _, bound = req.partition(">=")
        assert bound, f"{req}: every library requirement is a range with a lower bound"
        pins.append(f"{name.strip()}=={bound.split(',')[0].strip()}")
    return pins


def source_copy(dest: Path) -> Path:
    """The files of this checkout that git tracks or would (not the ignored ones), so the build leaves nothing
    in the checkout and sees what a fresh clone would."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    return dest


def run(cmd: list[str], timeout: float = 600, **kw) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res.stdout


ROUND_TRIP = textwrap.dedent("""
    import sys, numpy as np
    from kvrack.clients import Client, KeyBuilder, Layout
    layout = Layout(layers=2, kv_heads=2, head_dim=64, dtype="float16", block_tokens=16)
    with Client.connect(sys.argv[1], layout=layout) as kv:
        keys = KeyBuilder(kv.namespace_salt, "m", layout).chain(list(range(64)))
        blocks = [np.full(layout.block_nbytes // 2, i, np.float16) for i in range(len(keys))]
        kv.put(keys, blocks, KeyBuilder.parents(keys))
        out = [np.zeros_like(b) for b in blocks]
        assert kv.get_into(keys, out) == [True] * 4 and all(np.array_equal(a, b) for a, b in zip(out, blocks))
        assert kv.lookup(keys).prefix == 4
    print(np.__version__)
""")


@pytest.mark.timeout(900)
def test_the_client_installs_at_its_lowest_versions_without_the_daemon_and_the_daemon_too(tmp_path):
    src = source_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    client_pins = lowest(PYPROJECT["project"]["dependencies"])
    run([*pip, str(src), *client_pins])
    absent = run([py, "-c", f"import importlib.util as u, kvrack.clients; "
                            f"print([m for m in {DAEMON_ONLY!r} if u.find_spec(m)])"])
    assert absent.strip() == "[]", f"the client install pulled daemon dependencies: {absent}"
    with DaemonProcess({"dram.capacity_bytes": "64MiB", "nvme.enabled": "false"}) as d:
        numpy_version = run([py, "-c", ROUND_TRIP, d.socket_path]).strip()
    assert numpy_version == next(p.split("==")[1] for p in client_pins if p.startswith("numpy"))

    run([*pip, f"{src}[daemon]", *client_pins, *lowest(PYPROJECT["project"]["optional-dependencies"]["daemon"])])
    sock = str(tmp_path / "kvrack.sock")
    env = {**os.environ, "KVRACK_NVME_DIR": str(tmp_path / "nvme"), "KVRACK_NVME_CAPACITY_BYTES": "128MiB"}
    daemon = subprocess.Popen([str(venv / "bin" / "kvrackd"), "--socket", sock, "--set", "dram.capacity_bytes=64MiB"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        up = subprocess.run([py, "-c", "import sys, time\nfrom kvrack.bench.spawn import is_listening\nt = time.time()\n"
                                       "while not is_listening(sys.argv[1]) and time.time() - t < 60: time.sleep(0.05)\n"
                                       "sys.exit(0 if is_listening(sys.argv[1]) else 1)", sock], timeout=120)
        if up.returncode:
            daemon.terminate()
            pytest.fail(f"kvrackd of the lowest versions did not start:\n{daemon.communicate(timeout=30)[0]}")
        run([py, "-c", ROUND_TRIP, sock])
        status = run([str(venv / "bin" / "kvrack"), "status", "--address", sock])
        assert "dram" in status and "nvme" in status
    finally:
        daemon.terminate()
        out, _ = daemon.communicate(timeout=30)
    assert daemon.returncode == 0 and "Traceback" not in out, out
