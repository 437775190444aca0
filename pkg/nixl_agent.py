"""NIXL agents for the daemon and remote clients (optional extra ``kvrack[nixl]``).

Both sides need the same three things: load the package (or say why not),
make an agent whose progress thread does not spin a core while idle, and
turn a Python buffer into the address NIXL registers. The stock Python
wrapper fixes the progress thread's idle delay at 0 µs, which keeps a core
at 100% in an idle daemon; ``make_agent`` builds the agent with a delay.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import numpy as np

from kvrack import install_hint

# UCX over TCP moves 8 KiB segments by default; 1 MiB segments triple loopback throughput
# (0.66 -> 1.7-2.2 GB/s for 2 MiB blocks here). Set before the first agent; an operator's
# own UCX_* environment wins.
UCX_DEFAULTS = {"UCX_TCP_TX_SEG_SIZE": "1m", "UCX_TCP_RX_SEG_SIZE": "1m"}


class NixlUnavailable(RuntimeError):
    """The nixl package is not installed or cannot create a UCX agent here."""


@functools.cache
def load() -> Any:
    """The ``nixl_cu12._api`` module; raises ``NixlUnavailable`` with the reason."""
    for key, value in UCX_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        from nixl_cu12 import _api
    except ImportError as exc:
        raise NixlUnavailable(f"the nixl package is not installed ({exc}); {install_hint('nixl')}") from None
    except OSError as exc:  # a shared library of the wheel does not load
        raise NixlUnavailable(f"the nixl package does not load: {exc}") from None
    if "NIXL_LOG_LEVEL" not in os.environ:  # its INFO lines on every agent are noise in a daemon's log
        logging.getLogger("nixl").setLevel(logging.WARNING)
    return _api


def available() -> str | None:
    """None when NIXL can be used, else why not."""
    try:
        load()
    except NixlUnavailable as exc:
        return str(exc)
    return None


def make_agent(name: str, progress_thread: bool, idle_delay_us: int = 1000) -> Any:
    """A ``nixl_agent`` with the UCX backend.

    The daemon needs a progress thread (over TCP, UCX emulates one-sided reads with
    messages the target must progress); a client progresses its own transfers when it
    polls them, so it runs without one.
    """
    api = load()
    bind = api.nixlBind
    cfg = bind.nixlAgentConfig()
    cfg.useProgThread = progress_thread
    cfg.useListenThread = False
    cfg.listenPort = 0
    cfg.syncMode = api.nixl_thread_sync_t.NIXL_THREAD_SYNC_RW.value
    cfg.pthrDelay = idle_delay_us
    cfg.lthrDelay = 100000
    cfg.captureTelemetry = False
    try:
        native = bind.nixlAgent(name, cfg)
    except Exception as exc:
        raise NixlUnavailable(f"cannot create a NIXL agent: {exc}") from None
    # the wrapper's methods over our natively built agent (its __init__ would fix pthrDelay at 0)
    agent = object.__new__(api.nixl_agent)
    agent.agent = native
    agent.name = name
    agent._leaked_xfer_handles = []
    agent.notifs = {}
    agent.backends = {}
    agent.backend_mems = {}
    agent.backend_options = {}
    agent.plugin_list = native.getAvailPlugins()
    agent.plugin_b_options = {}
    agent.plugin_mem_types = {}
    agent.nixl_mems = {"DRAM": bind.DRAM_SEG, "VRAM": bind.VRAM_SEG, "FILE": bind.FILE_SEG}
    agent.nixl_ops = {"WRITE": bind.NIXL_WRITE, "READ": bind.NIXL_READ}
    if "UCX" not in agent.plugin_list:
        raise NixlUnavailable(f"the NIXL UCX plugin is missing (plugins: {', '.join(agent.plugin_list)})")
    try:
        agent.create_backend("UCX", {})
    except Exception as exc:
        raise NixlUnavailable(f"NIXL cannot start its UCX backend ({exc}); check UCX_TLS (it needs tcp for "
                              "connection set-up, e.g. UCX_TLS=tcp,cma,self or leave it unset)") from None
    return agent


class Pinned:
    """A buffer's address, valid while this object lives (it holds the buffer's export)."""

    __slots__ = ("array", "addr", "nbytes")

    def __init__(self, buf: Any) -> None:
        self.array = np.frombuffer(buf, dtype=np.uint8)
        self.addr = int(self.array.ctypes.data)
        self.nbytes = int(self.array.nbytes)

    def release(self) -> None:
        self.array = None  # type: ignore[assignment]
