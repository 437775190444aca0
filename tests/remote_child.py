"""A remote client process that dies in the middle of a transfer (tests/test_remote.py kills it).

``python -m tests.remote_child ADDRESS TOKEN MODE`` where MODE is
``write`` (reserve, then send half of a write's bytes), ``pin`` (acquire over
TCP, left pinned), ``nixl-pin`` (acquire for a NIXL read and stop before
releasing) or ``nixl-write`` (reserve, WRITE half the blocks, never commit). Prints ``ready`` when it is stuck where
the test wants it, then sleeps until killed.
"""

from __future__ import annotations

import sys
import time

from kvrack import protocol as P
from kvrack.clients import Client

BLOCK = 1 << 20
KEYS = [bytes([i]) * 32 for i in range(1, 5)]


def main() -> None:
    address, token, mode = sys.argv[1:4]
    if mode == "nixl-pin":
        c = Client.connect(address, namespace="a", token=token, transport="nixl")
        c._run(c._core.acquire(KEYS))  # pinned, never released
    elif mode == "nixl-write":
        c = Client.connect(address, namespace="a", token=token, transport="nixl")
        fresh = [bytes([0x80 + i]) * 32 for i in range(4)]
        reply, _ = c._channel.call("reserve", P.encode_frame(P.Reserve(id=c._core._id(), keys=fresh, sizes=[BLOCK] * 4)))
        assert all(code == 0 for code in reply.codes), reply.codes
        c._run(c._core.map_segments(reply.descriptors))
        c._core.nixl.transfer("WRITE", reply.descriptors[:2], [memoryview(bytes(BLOCK))] * 2)  # half, no commit
    else:
        c = Client.connect(address, namespace="a", token=token, transport="tcp")
        core, channel = c._core, c._channel
        if mode == "write":
            fresh = [bytes([0x80 + i]) * 32 for i in range(4)]
            reply, _ = channel.call("reserve", P.encode_frame(P.Reserve(id=core._id(), keys=fresh, sizes=[BLOCK] * 4)))
            assert all(code == 0 for code in reply.codes), reply.codes
            frame = P.encode_frame(P.Write(id=core._id(), keys=fresh, sizes=[BLOCK] * 4))
            channel.sock.sendall(frame + bytes(2 * BLOCK))  # half the payload, then stop
        else:
            reply, _ = channel.call("acquire", P.encode_frame(P.Acquire(id=core._id(), keys=KEYS)))
            assert all(code == 0 for code in reply.codes), reply.codes
    print("ready", flush=True)
    time.sleep(60)


if __name__ == "__main__":
    main()
