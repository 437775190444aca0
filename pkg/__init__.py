"""kvrack: a per-rack daemon that pools the KV cache of LLM inference.

This folder is the root of the ``kvrack`` import name; the code lives in the
top-level folders ``daemon/``, ``tiers/``, ``native/`` and ``clients/``,
installed as ``kvrack.daemon``, ``kvrack.tiers``, ``kvrack._native`` and
``kvrack.clients``.
"""

__version__ = "0.1.0"
