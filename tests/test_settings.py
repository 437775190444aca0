"""The settings table drives the TOML loader, env overrides, --print-config and the example file."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kvrack.daemon.settings import SETTINGS, ConfigError, example_toml, load_config
from kvrack.sizes import SizeError, parse_size

ROOT = Path(__file__).resolve().parents[1]


def test_example_file_is_current():
    assert (ROOT / "deploy" / "kvrack.example.toml").read_text() == example_toml(), \
        "run `make example` to regenerate deploy/kvrack.example.toml"


def test_example_file_lists_every_setting_and_loads():
    text = example_toml()
    for s in SETTINGS:
        assert s.help in text and s.env in text
    parsed = tomllib.loads(text)
    assert parsed["namespaces"] == [{"name": "default", "uids": [], "gids": []}]


def test_defaults_need_no_file(monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    cfg = load_config(env={})
    assert cfg["server.socket_path"].endswith("kvrack/kvrack.sock")
    assert 0 < cfg["dram.capacity_bytes"] <= 2 * 1024**3
    assert [ns.name for ns in cfg.namespaces] == ["default"]


def test_file_then_env_then_overrides(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text('[dram]\ncapacity_bytes = "512MiB"\nsegment_bytes = "8MiB"\n'
                    '[[namespaces]]\nname = "team-a"\nuids = [1000]\nsalt = "00ff"\n')
    cfg = load_config(path, env={"KVRACK_DRAM_CAPACITY_BYTES": "1GiB"}, overrides={"log.level": "debug"})
    assert cfg["dram.capacity_bytes"] == 1024**3 and cfg.sources["dram.capacity_bytes"] == "KVRACK_DRAM_CAPACITY_BYTES"
    assert cfg["dram.segment_bytes"] == 8 * 1024**2 and cfg["log.level"] == "debug"
    assert cfg.namespaces[0].uids == (1000,) and cfg.namespaces[0].salt == b"\x00\xff"
    again = tomllib.loads(cfg.to_toml())
    assert again["dram"]["capacity_bytes"] == "1GiB"


@pytest.mark.parametrize("text, match", [
    ("[dram]\ncapacity = 1\n", "unknown setting"),
    ("[dram]\nsegment_bytes = 10\n", "below the minimum"),
    ("[log]\nlevel = \"loud\"\n", "one of"),
    ("[dram]\nhugepages = \"maybe\"\n", "true/false"),
    ("[[namespaces]]\nname = \"a b\"\n", "namespaces\\[0\\].name"),
    ("[[namespaces]]\nname = \"a\"\n[[namespaces]]\nname = \"a\"\n", "declared twice"),
    ("[[namespaces]]\nname = \"a\"\nsecret = 1\n", "unknown field"),
    ("not toml [", "not valid TOML"),
    ("[dram]\ncapacity_bytes = \"16MiB\"\nsegment_bytes = \"64MiB\"\n",
     "dram.capacity_bytes \\(16MiB, from .*bad.toml\\) is less than one dram.segment_bytes \\(64MiB"),
])
def test_bad_config_says_what_is_wrong(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path, env={})


def test_sizes():
    assert parse_size("64MiB") == 64 * 1024**2 and parse_size(4096) == 4096
    with pytest.raises(SizeError):
        parse_size("lots")


@pytest.mark.parametrize("text, value", [("2GiB", 2 * 2**30), ("2 GiB", 2 * 2**30), ("2GB", 2 * 10**9), ("2 GB", 2 * 10**9),
                                         ("1.5MiB", 3 * 2**19), ("512KB", 512_000), ("4Gi", 4 * 2**30), ("7", 7),
                                         ("7B", 7), ("1TiB", 2**40), ("1tb", 10**12)])
def test_sizes_are_read_as_written_si_and_iec(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["2G", "2 g", "64M", "1K", "3T"])
def test_a_bare_unit_letter_is_refused_with_both_readings(text):
    with pytest.raises(SizeError, match="ambiguous.*iB.*B for"):
        parse_size(text)


def test_a_setting_written_in_si_units_is_not_read_as_binary():
    cfg = load_config(None, env={"KVRACK_DRAM_CAPACITY_BYTES": "2 GB"})
    assert cfg["dram.capacity_bytes"] == 2 * 10**9


def test_kvrackd_print_config_and_bad_file(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kvrack.daemon.main", "--print-config", "--set", "dram.hugepages=true"],
                         capture_output=True, text=True, check=True).stdout
    assert tomllib.loads(out)["dram"]["hugepages"] is True
    res = subprocess.run([sys.executable, "-m", "kvrack.daemon.main", "--config", str(tmp_path / "missing.toml")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "cannot read config file" in res.stderr


def test_nvme_paths_from_toml_env_and_command_line(tmp_path):
    cfg = tmp_path / "k.toml"
    cfg.write_text('[nvme]\npaths = ["/dev/nvme1n1", "/mnt/a/kv.data=800GiB"]\n')
    assert load_config(cfg, env={})["nvme.paths"] == ["/dev/nvme1n1", "/mnt/a/kv.data=800GiB"]
    assert load_config(None, env={"KVRACK_NVME_PATHS": "/a=1GiB, /b=2GiB"})["nvme.paths"] == ["/a=1GiB", "/b=2GiB"]
    assert load_config(None, env={}, overrides={"nvme.paths": ""})["nvme.paths"] == []
    with pytest.raises(ConfigError, match="list of strings"):
        load_config(None, env={}, overrides={"nvme.paths": 5})


def test_nvme_path_specs_and_default_directory(tmp_path, monkeypatch):
    from kvrack.tiers.nvme import default_nvme_capacity, default_nvme_dir, parse_path_spec

    assert parse_path_spec("/mnt/x/kv.data=2GiB").capacity == 2 << 30
    assert parse_path_spec(str(tmp_path)).capacity == 0  # existing: its size (a device: all of it)
    with pytest.raises(ValueError, match="needs a size"):
        parse_path_spec(str(tmp_path / "new.data"))
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/kvrack:/var/lib/other")
    assert default_nvme_dir() == "/var/lib/kvrack"
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_nvme_dir() == str(tmp_path / "kvrack")
    cap = default_nvme_capacity(str(tmp_path / "kvrack" / "not-yet"))
    assert 0 < cap <= 10 << 30 and cap % 4096 == 0


def test_namespace_tokens(tmp_path):
    from kvrack.daemon.settings import ConfigError, load_config

    secret = "s3cret-token-0123456789abcdef"
    token_file = tmp_path / "token"
    token_file.write_text(secret + "\n")
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'[[namespaces]]\nname = "a"\ntoken = "{secret}"\n[[namespaces]]\nname = "b"\n'
                   f'token_file = "{token_file}"\n[[namespaces]]\nname = "c"\n')
    config = load_config(cfg, env={})
    assert [ns.token for ns in config.namespaces] == [secret, secret, ""]
    assert secret not in config.to_toml() and secret not in repr(config.namespaces)
    for bad, why in (('token = "short"', "at least 16"), (f'token = "{secret}"\ntoken_file = "{token_file}"', "not both"),
                     ('token_file = "/nonexistent/tok"', "cannot read")):
        cfg.write_text(f'[[namespaces]]\nname = "a"\n{bad}\n')
        with pytest.raises(ConfigError, match=why) as err:
            load_config(cfg, env={})
        assert secret not in str(err.value)


def test_policy_settings_offer_exactly_the_shipped_policies():
    from kvrack.daemon.policies import POLICIES
    from kvrack.daemon.settings import BY_NAME, POLICY_NAMES

    assert sorted(POLICY_NAMES) == sorted(POLICIES)
    for name in ("dram.policy", "cxl.policy"):
        assert BY_NAME[name].choices == POLICY_NAMES
    assert BY_NAME["nvme.policy"].choices == ("clock", *POLICY_NAMES)


def test_typed_settings_view_is_current_and_typed():
    from kvrack.daemon.settings import render_view

    assert (ROOT / "daemon" / "settings_view.py").read_text() == render_view(), \
        "run `make example` to regenerate daemon/settings_view.py"
    cfg = load_config(env={}, overrides={"dram.capacity_bytes": "64MiB", "dram.policy": "sieve"})
    assert cfg.dram.capacity_bytes == 64 * 1024**2 and cfg.dram.policy == "sieve" and cfg.nvme.enabled is True
    for s in SETTINGS:
        section, key = s.name.split(".", 1)
        assert getattr(getattr(cfg, section), key) == cfg[s.name]
