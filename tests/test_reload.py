"""Settings labelled "changeable at runtime" change at runtime (SIGHUP re-reads the config), one by one; the
others are refused with a message that a restart is needed; the label and the behaviour agree."""

from __future__ import annotations

import os
import signal
import textwrap

import pytest

from kvrack.bench.spawn import DaemonProcess
from kvrack.clients import Client
from kvrack.clients.admin import AdminApiError, AdminClient
from kvrack.daemon.reload import APPLIERS
from kvrack.daemon.settings import SETTINGS

from .conftest import eventually

BASE = """
[dram]
capacity_bytes = "16MiB"
segment_bytes = "1MiB"
evict_high_watermark = 0.95
evict_low_watermark = 0.90
policy = "lru"
[nvme]
enabled = false
[leases]
reserve_timeout_s = 30.0
pin_timeout_s = 300.0
[log]
level = "info"
"""


def test_every_runtime_label_has_an_applier_and_nothing_else_does():
    labelled = {s.name for s in SETTINGS if s.runtime}
    assert labelled == set(APPLIERS), "a setting labelled runtime must be applied at runtime, and only those"


def hello(address: str) -> dict:
    with Client.connect(address) as c:
        return {"reserve": c._core.reserve_lease_s, "pin": c._core.pin_lease_s, "dram": c.stats()["tiers"][0]}


def reload(d: DaemonProcess, path, text: str) -> None:
    path.write_text(textwrap.dedent(text))
    marker = d.log().count("reload") + d.log().count("settings changed")
    os.kill(d.pid, signal.SIGHUP)
    assert eventually(lambda: d.log().count("reload") + d.log().count("settings changed") > marker)


def test_sighup_applies_each_runtime_setting_and_refuses_the_others(tmp_path):
    path = tmp_path / "kvrack.toml"
    path.write_text(BASE)
    with DaemonProcess(config_path=str(path), settings={"nvme.enabled": "false"}) as d:
        before = hello(d.socket_path)
        assert before["reserve"] == 30.0 and before["pin"] == 300.0
        cap = before["dram"]["capacity_bytes"]
        assert before["dram"]["evict_high_water_bytes"] == int(cap * 0.95)

        reload(d, path, BASE.replace("reserve_timeout_s = 30.0", "reserve_timeout_s = 7.0"))
        assert hello(d.socket_path)["reserve"] == 7.0
        reload(d, path, BASE.replace("pin_timeout_s = 300.0", "pin_timeout_s = 9.0"))
        after = hello(d.socket_path)
        assert after["pin"] == 9.0 and after["reserve"] == 30.0, "the file is the truth: 7.0 was undone"
        reload(d, path, BASE.replace("evict_high_watermark = 0.95", "evict_high_watermark = 0.5")
               .replace("evict_low_watermark = 0.90", "evict_low_watermark = 0.25"))
        dram = hello(d.socket_path)["dram"]
        assert dram["evict_high_water_bytes"] == int(cap * 0.5) and dram["evict_low_water_bytes"] == int(cap * 0.25)
        reload(d, path, BASE.replace('level = "info"', 'level = "debug"'))
        hello(d.socket_path)
        assert eventually(lambda: " DEBUG " in d.log()), "debug lines appear once log.level is debug"

        reload(d, path, BASE.replace('policy = "lru"', 'policy = "sieve"'))
        assert "dram.policy changed to 'sieve' but needs a restart; the running value stays 'lru'" in d.log()
        reload(d, path, BASE.replace("evict_low_watermark = 0.90", "evict_low_watermark = 0.99"))
        assert "reload: the configuration is not valid, nothing changed" in d.log()
        assert hello(d.socket_path)["dram"]["evict_low_water_bytes"] == int(cap * 0.90)

        reload(d, path, BASE + "[admin]\nmetrics_max_namespaces = 3\n")  # read at each scrape
        setting = d.admin().config()["settings"]["admin.metrics_max_namespaces"]
        assert setting["value"] == 3 and setting["source"].startswith("reload of")
        reload(d, path, BASE + "[admin]\nread_auth = true\n")
        with pytest.raises(AdminApiError) as err:
            AdminClient(d.admin_path, "").stats()
        assert err.value.status == 401
        assert d.admin().stats()["daemon"]["config_reloads"] >= 6
    assert d.returncode == 0
