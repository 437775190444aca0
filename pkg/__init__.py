"""kvrack: a per-rack daemon that pools the KV cache of LLM inference.

This folder is the root of the ``kvrack`` import name and holds what the daemon, the tiers and the clients
all import: the wire contract (``kvrack.protocol``), sizes (``kvrack.sizes``), where clients find the daemon
(``kvrack.address``) and the NIXL agent set-up (``kvrack.nixl_agent``). The rest lives in the top-level
folders ``daemon/``, ``tiers/``, ``native/``, ``clients/``, ``bench/`` and ``cli/``, installed as
``kvrack.daemon``, ``kvrack.tiers``, ``kvrack._native``, ``kvrack.clients``, ``kvrack.bench`` and
``kvrack.cli``.
"""

__version__ = "0.1.0"


def install_hint(extra: str) -> str:
    """How to add an optional extra: kvrack installs from a checkout or a built wheel, not from PyPI."""
    return f"pip install '/path/to/kvrack[{extra}]' (a checkout, or a wheel from `make wheel`; see the README)"
