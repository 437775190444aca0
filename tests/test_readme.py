"""The README's Python program runs as pasted against a daemon found the way it says (here: $KVRACK_ADDRESS)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from kvrack.bench.spawn import DaemonProcess

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_the_readme_program_runs_as_pasted_cold_and_warm():
    program = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    with DaemonProcess({"dram.capacity_bytes": "64MiB", "nvme.enabled": "false"}) as d:
        env = {**os.environ, "KVRACK_ADDRESS": f"unix://{d.socket_path}"}
        outs = [subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, env=env)
                for _ in range(2)]
    for out in outs:
        assert out.returncode == 0, out.stderr
    assert "4 blocks of 2097152 bytes, 0 were cached" in outs[0].stdout
    assert "4 blocks of 2097152 bytes, 4 were cached" in outs[1].stdout
