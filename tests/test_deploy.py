"""The deployment files under deploy/: container image, Kubernetes manifest, Prometheus and Grafana.

Each is checked against what the daemon actually offers (its settings table, its metric names) and against the
tools that will read it (Kubernetes schemas through kubernetes_validate, promtool when installed), so a renamed
setting or metric, or a stale generated dashboard, fails here rather than in a cluster.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvrack.daemon.metrics import METRICS
from kvrack.daemon.settings_table import BY_ENV, BY_NAME, NAMESPACE_FIELDS
from kvrack.sizes import parse_size

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KV_PORT, ADMIN_PORT = 7433, 7434
SOCKET_DIR = "/run/kvrack"
GiB = 1024**3


# --- Kubernetes ------------------------------------------------------------------------------------------------

def k8s_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "kvrack.yaml").read_text()) if d is not None]


def k8s_doc(kind: str) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s/kvrack.yaml, found {len(found)}"
    return found[0]


def daemon_container() -> dict[str, Any]:
    containers = k8s_doc("DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def configmap_toml() -> dict[str, Any]:
    return tomllib.loads(k8s_doc("ConfigMap")["data"]["kvrack.toml"])


def quantity_bytes(q: str | int) -> int:
    """A Kubernetes memory quantity (18Gi, 500M, 1073741824) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(q))
    assert m and (m.group(2) in units or not m.group(2)), f"unexpected quantity {q!r}"
    return int(m.group(1)) * units.get(m.group(2), 1)


def k8s_version() -> str:
    import kubernetes_validate

    return kubernetes_validate.latest_version()


def test_k8s_documents_validate_strictly():
    import jsonschema
    import kubernetes_validate

    docs = k8s_docs()
    assert {d["kind"] for d in docs} == {"Namespace", "ConfigMap", "Secret", "DaemonSet", "Service"}
    version = k8s_version()
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except jsonschema.ValidationError as exc:  # kubernetes_validate raises it or its subclass
            pytest.fail(f"{doc['kind']} {doc['metadata'].get('name')}: {exc.message} at {list(exc.absolute_path)} "
                        f"(Kubernetes {version} schema, strict)", pytrace=False)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "kvrack", doc["kind"]


def test_k8s_validation_is_strict():
    """The check above would catch a misspelt field (strict schemas refuse unknown properties)."""
    import jsonschema
    import kubernetes_validate

    ds = k8s_doc("DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {"httpGet": {"path": "/healthz", "port": 1}}
    with pytest.raises(jsonschema.ValidationError, match="livenessprobe"):
        kubernetes_validate.validate(ds, k8s_version(), strict=True)


def test_daemonset_ports_and_probes():
    pod = k8s_doc("DaemonSet")["spec"]["template"]["spec"]
    c = daemon_container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert sorted(ports.values()) == [KV_PORT, ADMIN_PORT]

    def probe(name: str) -> tuple[str, int]:
        get = c[name]["httpGet"]
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        return get["path"], port

    assert probe("livenessProbe") == ("/healthz", ADMIN_PORT)
    assert probe("readinessProbe") == ("/readyz", ADMIN_PORT)
    if "startupProbe" in c:  # a startup probe must not wait on readiness (503 while draining restarts it)
        assert probe("startupProbe") == ("/healthz", ADMIN_PORT)
    assert not pod.get("hostNetwork", False)
    annotations = k8s_doc("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ADMIN_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_daemonset_volumes():
    pod = k8s_doc("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in daemon_container()["volumeMounts"]}
    # the sockets: a host directory, so client pods on the node can share it (memfd passing)
    sockets = volumes[mounts[SOCKET_DIR]]["hostPath"]
    assert sockets == {"path": SOCKET_DIR, "type": "DirectoryOrCreate"}
    conf = configmap_toml()
    assert Path(conf["server"]["socket_path"]).parent == Path(SOCKET_DIR)
    # the NVMe tier's files: a host directory too (they must outlive the pod), mounted at nvme.dir
    assert "hostPath" in volumes[mounts[conf["nvme"]["dir"]]]
    # the config the container is started with is the ConfigMap's key
    args = daemon_container()["args"]
    config_path = Path(args[args.index("--config") + 1])
    config_volume = volumes[mounts[str(config_path.parent)]]
    assert config_volume["configMap"]["name"] == k8s_doc("ConfigMap")["metadata"]["name"]
    assert config_path.name in k8s_doc("ConfigMap")["data"]


def test_configmap_settings_exist_and_parse():
    """Every setting in the ConfigMap is one of the daemon's, with a value it accepts."""
    conf = configmap_toml()
    namespaces = conf.pop("namespaces", [])
    for section, table in conf.items():
        for key, value in table.items():
            name = f"{section}.{key}"
            assert name in BY_NAME, f"ConfigMap kvrack.toml: {name} is not a kvrack setting"
            BY_NAME[name].coerce(value, "deploy/k8s/kvrack.yaml")
    known = {f.name for f in NAMESPACE_FIELDS}
    for ns in namespaces:
        assert set(ns) <= known, f"unknown namespace field(s) {set(ns) - known}"
    assert conf["tcp"]["enabled"] is True and conf["tcp"]["port"] == KV_PORT
    assert conf["admin"]["tcp_host"] == "0.0.0.0" and conf["admin"]["tcp_port"] == ADMIN_PORT


def test_configmap_loads_with_the_daemon_loader(tmp_path):
    """kvrackd's own loader takes the ConfigMap's file, token files and all (the Secret's values put in tmp)."""
    from kvrack.daemon.settings import load_config

    secret = k8s_doc("Secret")["stringData"]
    text = k8s_doc("ConfigMap")["data"]["kvrack.toml"]
    for key, value in secret.items():
        (tmp_path / key).write_text(value + "\n")
    for path in re.findall(r'token_file = "([^"]+)"', text):
        text = text.replace(path, str(tmp_path / Path(path).name))
    config = tmp_path / "kvrack.toml"
    config.write_text(text)
    # the DRAM size is checked against this machine's memory, which a test machine may not have
    cfg = load_config(config, env={}, overrides={"dram.capacity_bytes": "64MiB"})
    assert cfg.sources["admin.tcp_port"] == str(config)


def test_tokens_come_from_the_secret():
    conf = configmap_toml()
    secret = k8s_doc("Secret")
    pod = k8s_doc("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_dirs = {m["mountPath"] for m in daemon_container()["volumeMounts"]
                   if volumes[m["name"]].get("secret", {}).get("secretName") == secret["metadata"]["name"]}
    assert len(secret_dirs) == 1
    files = [conf["admin"]["token_file"]] + [ns["token_file"] for ns in conf.get("namespaces", []) if "token_file" in ns]
    for f in files:
        path = Path(f)
        assert str(path.parent) in secret_dirs, f"{f} is not in the Secret's mount {secret_dirs}"
        assert path.name in secret["stringData"], f"the Secret has no key {path.name}"
    for key, value in secret["stringData"].items():  # placeholders, but ones the daemon would accept
        assert len(value) >= 16 and not any(ch.isspace() for ch in value), key


def test_pod_outlives_the_drain_and_holds_the_dram_tier():
    conf = configmap_toml()
    pod = k8s_doc("DaemonSet")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > conf["server"]["drain_timeout_s"]
    limits = daemon_container()["resources"]["limits"]
    dram = parse_size(conf["dram"]["capacity_bytes"])
    if conf["dram"].get("hugepages"):
        assert quantity_bytes(limits["hugepages-2Mi"]) >= dram
    else:  # memfd pages are charged to the memory limit: the tier plus ~1 GiB for the daemon
        assert quantity_bytes(limits["memory"]) >= dram + GiB


def test_headless_service_reaches_every_daemon():
    svc = k8s_doc("Service")["spec"]
    assert svc["clusterIP"] == "None"
    assert sorted(p["port"] for p in svc["ports"]) == [KV_PORT, ADMIN_PORT]
    pod_labels = k8s_doc("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert svc["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p["containerPort"] for p in daemon_container()["ports"]}
    for p in svc["ports"]:
        assert ports.get(p["targetPort"], p["targetPort"]) == p["port"]


# --- Grafana ---------------------------------------------------------------------------------------------------

def dashboard_module():
    path = DEPLOY / "grafana" / "dashboard.py"
    spec = importlib.util.spec_from_file_location("kvrack_deploy_dashboard", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exported_series() -> dict[str, set[str]]:
    """Series name -> its labels, as prometheus-client exports METRICS (counters end in _total)."""
    out: dict[str, set[str]] = {}
    for name, (kind, _help, labels) in METRICS.items():
        if kind == "counter":
            out[name.removesuffix("_total") + "_total"] = set(labels)
        elif kind == "histogram":
            out[name + "_bucket"] = set(labels) | {"le"}
            out[name + "_sum"] = out[name + "_count"] = set(labels)
        else:
            out[name] = set(labels)
    return out


def test_dashboard_json_is_generated():
    on_disk = json.loads((DEPLOY / "grafana" / "kvrack-dashboard.json").read_text())
    assert on_disk == dashboard_module().build(), \
        "deploy/grafana/kvrack-dashboard.json is stale: run `.venv/bin/python deploy/grafana/dashboard.py`"


def test_dashboard_uses_only_exported_metrics_and_labels():
    module = dashboard_module()
    exprs = module.exprs(module.build())
    assert len(exprs) >= 10
    series = exported_series()
    counters = {n for n, (kind, _, _) in METRICS.items() if kind == "counter"}
    used: set[str] = set()
    for expr in exprs:
        allowed = {"instance", "job"}
        for m in re.finditer(r"\b(kvrack_[A-Za-z0-9_]+)\b(\{[^}]*\})?", expr):
            name, selector = m.group(1), m.group(2) or ""
            assert name in series, f"{name} (in {expr!r}) is not exported by kvrack.daemon.metrics.METRICS"
            labels = series[name] | {"instance", "job"}
            for key in re.findall(r'([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*"', selector):
                assert key in labels, f"{name} has no label {key!r} (in {expr!r})"
            allowed |= labels
            if name in counters:  # a counter's raw value means nothing on a graph
                assert re.search(r"\b(rate|increase|irate)\(\s*$", expr[:m.start()]), \
                    f"counter {name} not inside rate()/increase() in {expr!r}"
            used.add(name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count"))
        for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
            for label in filter(None, (x.strip() for x in clause.split(","))):
                assert label in allowed, f"label {label!r} in {expr!r} belongs to none of its metrics"
    # the panels the dashboard promises, by the metrics behind them
    for name in ("kvrack_hits_total", "kvrack_lookups_total", "kvrack_moved_bytes_total", "kvrack_transfer_bytes_total",
                 "kvrack_request_duration_seconds", "kvrack_tier_capacity_bytes", "kvrack_tier_used_bytes",
                 "kvrack_evictions_total", "kvrack_namespace_used_bytes", "kvrack_blocks", "kvrack_errors_total",
                 "kvrack_sessions", "kvrack_leases"):
        assert name in used, f"no panel uses {name}"


def test_dashboard_panels_are_consistent():
    d = dashboard_module().build()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = []
    for p in d["panels"]:
        ids.append(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert 'instance=~"$instance"' in t["expr"], p["title"]
            by = {x.strip() for c in re.findall(r"\bby\s*\(([^)]*)\)", t["expr"]) for x in c.split(",")}
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t["legendFormat"]):
                assert label in by, f"{p['title']}: legend {{{{{label}}}}} is not a label of {t['expr']!r}"
    assert len(ids) == len(set(ids))
    assert any(p["type"] == "heatmap" for p in d["panels"])


def test_dashboard_script_writes_the_json(tmp_path):
    out = tmp_path / "dash.json"
    subprocess.run([sys.executable, str(DEPLOY / "grafana" / "dashboard.py"), str(out)], check=True,
                   capture_output=True, timeout=120)
    assert json.loads(out.read_text()) == json.loads((DEPLOY / "grafana" / "kvrack-dashboard.json").read_text())


# --- Prometheus ------------------------------------------------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install "
                                    "prometheus, which puts it at /usr/bin/promtool)")


def promtool(*args: str) -> None:
    assert PROMTOOL is not None
    r = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}"


def test_prometheus_configs_scrape_the_admin_port():
    for name in ("prometheus.yml", "kvrack-test.yml"):
        conf = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
        jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
        job = jobs["kvrack"]
        assert job.get("metrics_path", "/metrics") == "/metrics", name
        targets = [t for sc in job["static_configs"] for t in sc["targets"]]
        assert targets, name
        if name == "prometheus.yml":
            assert targets == [f"localhost:{ADMIN_PORT}"]
            assert job.get("scrape_interval", conf["global"]["scrape_interval"]) == "15s"
        else:
            assert targets == ["KVRACK_ADMIN_TARGET"]
            assert job.get("scrape_interval", conf["global"]["scrape_interval"]) == "1s"


def commented_kubernetes_job() -> str:
    """prometheus.yml's commented kubernetes_sd job, uncommented."""
    lines = (DEPLOY / "prometheus" / "prometheus.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  # - job_name:"))
    block = []
    for line in lines[start:]:
        if not line.startswith("  # "):
            break
        block.append("  " + line[len("  # "):])
    text = "\n".join(block)
    assert "kubernetes_sd_configs" in text
    return text


@needs_promtool
def test_promtool_checks_the_configs(tmp_path):
    promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    test_conf = tmp_path / "kvrack-test.yml"
    test_conf.write_text((DEPLOY / "prometheus" / "kvrack-test.yml").read_text()
                         .replace("KVRACK_ADMIN_TARGET", f"127.0.0.1:{ADMIN_PORT}"))
    promtool("check", "config", str(test_conf))


def test_commented_kubernetes_job_is_a_scrape_config():
    job = yaml.safe_load(commented_kubernetes_job())[0]
    assert job["job_name"] == "kvrack" and job.get("metrics_path", "/metrics") == "/metrics"
    svc = k8s_doc("Service")["metadata"]
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [svc["namespace"]]
    keep = next(r for r in job["relabel_configs"] if r.get("action") == "keep")
    admin = next(p for p in k8s_doc("Service")["spec"]["ports"] if p["port"] == ADMIN_PORT)
    assert re.fullmatch(keep["regex"], f"{svc['name']};{admin['name']}")


@needs_promtool
def test_promtool_checks_the_kubernetes_example(tmp_path):
    """prometheus.yml's commented kubernetes_sd job, uncommented in place of the static one."""
    path = tmp_path / "kubernetes.yml"
    path.write_text("scrape_configs:\n" + commented_kubernetes_job() + "\n")
    r = subprocess.run([PROMTOOL, "check", "config", str(path)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0 and "field kubernetes_sd_configs not found" in r.stdout + r.stderr:
        # Debian's prometheus package is built without the Kubernetes service discovery
        pytest.skip(f"{PROMTOOL} was built without kubernetes_sd_configs (Debian's package is)")
    assert r.returncode == 0, f"promtool check config:\n{r.stdout}{r.stderr}"


@needs_promtool
def test_dashboard_expressions_parse(tmp_path):
    """Every dashboard query is valid PromQL once Grafana has filled in its variables."""
    module = dashboard_module()
    fill = {"$__rate_interval": "1m", "$__range": "1h", "$instance": ".*"}
    rules = []
    for i, expr in enumerate(module.exprs(module.build())):
        for var, value in fill.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"kvrack_dashboard_expr_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", str(path))


# --- Docker ----------------------------------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/docker/Dockerfile, continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "docker" / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_copies_what_exists_and_every_package():
    copied: set[str] = set()
    for word, args in dockerfile():
        if word != "COPY":
            continue
        parts = shlex.split(args)
        if any(p.startswith("--from") for p in parts):
            continue
        sources = [p for p in parts if not p.startswith("--")][:-1]
        assert sources, args
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile COPY source {src} is not in the repository"
            copied.add(src.rstrip("/"))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = set(pyproject["tool"]["setuptools"]["package-dir"].values()) | {"pyproject.toml", "setup.py"}
    needed |= {pyproject["project"]["readme"]}
    needed |= {src.split("/")[0] for src in re.findall(r'"(native/[^"]+\.c)"', (ROOT / "setup.py").read_text())}
    assert needed <= copied, f"`pip install .` in the image needs {sorted(needed - copied)} copied"


def test_dockerfile_ports_environment_and_volumes():
    instructions = dockerfile()
    exposed = {int(p.split("/")[0]) for w, a in instructions if w == "EXPOSE" for p in a.split()}
    assert {KV_PORT, ADMIN_PORT} <= exposed
    env: dict[str, str] = {}
    for w, a in instructions:
        if w == "ENV":
            for item in shlex.split(a):
                key, _, value = item.partition("=")
                env[key] = value
    assert env["KVRACK_ADMIN_TCP_PORT"] == str(ADMIN_PORT)
    assert env["KVRACK_ADMIN_TCP_HOST"] == "0.0.0.0"
    assert env["KVRACK_SERVER_SOCKET_PATH"] == f"{SOCKET_DIR}/kvrack.sock"
    assert env["KVRACK_NVME_DIR"] == "/var/lib/kvrack"
    kvrack_env = {k: v for k, v in env.items() if k.startswith("KVRACK_")}
    for key in kvrack_env:
        assert key in BY_ENV, f"Dockerfile ENV {key} is not a kvrack setting"
    from kvrack.daemon.settings import load_config

    cfg = load_config(None, env=kvrack_env)  # the daemon accepts them, without a warning
    assert not cfg.warnings, cfg.warnings
    assert cfg["admin.tcp_port"] == ADMIN_PORT
    volumes = {v for w, a in instructions if w == "VOLUME" for v in json.loads(a)}
    assert {SOCKET_DIR, "/var/lib/kvrack"} <= volumes
    health = " ".join(a for w, a in instructions if w == "HEALTHCHECK")
    assert "/healthz" in health and "urllib" in health and str(ADMIN_PORT) in health
    froms = [a for w, a in instructions if w in ("FROM", "ARG")]
    assert any("python:3.11-slim-bookworm" in a for a in froms)


def test_dockerfile_entrypoint_uses_a_mounted_config(tmp_path):
    """The entrypoint passes --config only when the config file exists (else: embedded defaults)."""
    entry = json.loads(next(a for w, a in dockerfile() if w == "ENTRYPOINT"))
    assert entry[:2] == ["/bin/sh", "-c"]
    script = entry[2]
    assert "/etc/kvrack/kvrack.toml" in script
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    kvrackd = fake_bin / "kvrackd"
    kvrackd.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    kvrackd.chmod(kvrackd.stat().st_mode | stat.S_IXUSR)
    config = tmp_path / "kvrack.toml"
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ.get('PATH', '')}"}

    def run(*args: str) -> list[str]:
        r = subprocess.run(["/bin/sh", "-c", script.replace("/etc/kvrack/kvrack.toml", str(config)), *entry[3:],
                            *args], capture_output=True, text=True, env=env, timeout=30, check=True)
        return r.stdout.splitlines()

    assert run("--set", "log.level=debug") == ["--set", "log.level=debug"]
    config.write_text("")
    assert run("--set", "log.level=debug") == ["--config", str(config), "--set", "log.level=debug"]
