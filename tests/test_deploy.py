"""The deployment recipe in ``deploy/`` and ``docker-compose.yml``, checked without a cluster.

* Every YAML file parses; the Kubernetes objects fit together (selectors, names, ports),
  probe the right routes, drain within their grace period, run non-root on a read-only
  root file system; every relay setting they name is a real one and parses.
* The alert rules and the Grafana dashboard name only metrics a running relay exports:
  a relay (with TLS and node probes, so that every family appears) is scraped and its
  families, with their ``_total``/``_bucket`` series, are the reference.
* ``haproxy.cfg`` passes ``haproxy -c`` (with its commented TLS line switched on too).
  Without HAProxy (``scripts/setup-haproxy.sh`` installs it) that test skips, or fails
  when ``RELAY_REQUIRE_HAPROXY=1``, as CI sets it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ghostcloak_relay.config import OPTIONS, ConfigError, load_settings
from ghostcloak_relay.devnode import DevNode
from ghostcloak_relay.server import RelayServer

from .conftest import ROOT, RelayFactory, TlsFiles, eventually

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "relay-dashboard.json"
COMPOSE = ROOT / "docker-compose.yml"

YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml"), COMPOSE])
RELAY_ENV = {opt.env for opt in OPTIONS}
#: Series that Prometheus itself makes, not the relay.
SYNTHETIC_SERIES = {"up"}


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load_one(path: Path) -> Any:
    docs = load_all(path)
    assert len(docs) == 1, f"{path} should hold one document"
    return docs[0]


def k8s_objects() -> dict[str, dict[str, Any]]:
    """Kind -> object, for the files kustomization.yaml lists."""
    kustomization = load_one(K8S / "kustomization.yaml")
    objects: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in load_all(K8S / name):
            assert doc["kind"] not in objects, f"two {doc['kind']} objects"
            objects[doc["kind"]] = doc
    return objects


def require_haproxy() -> str:
    # Debian installs it in /usr/sbin, which a non-login PATH may lack
    path = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/local/sbin:/usr/sbin")
    if path is None:
        reason = "haproxy not installed (scripts/setup-haproxy.sh installs it)"
        if os.environ.get("RELAY_REQUIRE_HAPROXY") == "1":
            pytest.fail(f"RELAY_REQUIRE_HAPROXY=1: {reason}")
        pytest.skip(reason)
    return path


# -- YAML ---------------------------------------------------------------------------------


def test_the_recipe_files_exist() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in YAML_FILES}
    for want in (
        "docker-compose.yml",
        "deploy/prometheus/alerts.yml",
        *(
            f"deploy/kubernetes/{n}.yaml"
            for n in (
                "deployment",
                "service",
                "configmap",
                "secret-tls",
                "pdb",
                "hpa",
                "kustomization",
            )
        ),
    ):
        assert want in names
    assert HAPROXY_CFG.is_file()
    assert DASHBOARD.is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_yaml_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict)


# -- Kubernetes ---------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_one(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    objects = k8s_objects()
    assert set(objects) == {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }
    deployment = objects["Deployment"]
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.split(":")[0] in {i["name"] for i in kustomization["images"]}


def relay_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def container_env(objects: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The relay's environment: the ConfigMap it loads plus its own ``env``."""
    container = relay_container(objects["Deployment"])
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name == objects["ConfigMap"]["metadata"]["name"]
        env.update(objects["ConfigMap"]["data"])
    for item in container.get("env", []):
        env[item["name"]] = item["value"]
    return env


def test_deployment_probes_drain_and_tls() -> None:
    objects = k8s_objects()
    deployment = objects["Deployment"]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = relay_container(deployment)
    env = container_env(objects)
    assert spec["replicas"] == 3
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert list(ports.values()) == [8443]
    assert env["PORT"] == "8443"
    port_name = next(iter(ports))

    # TLS: files from the kubernetes.io/tls Secret, mounted as a directory.
    secret = objects["Secret"]
    assert secret["type"] == "kubernetes.io/tls"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    tls_volume = next(v for v in volumes.values() if "secret" in v)
    assert tls_volume["secret"]["secretName"] == secret["metadata"]["name"]
    tls_mount = mounts[tls_volume["name"]]
    assert tls_mount.get("readOnly") is True
    assert "subPath" not in tls_mount  # a subPath mount never sees a renewed certificate
    for var, key in (("RELAY_TLS_CERT", "tls.crt"), ("RELAY_TLS_KEY", "tls.key")):
        assert env[var] == f"{tls_mount['mountPath']}/{key}"
        assert key in secret["stringData"]

    # Probes: liveness is /health, readiness is /ready, over HTTPS since TLS is on.
    live, ready = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    assert live["path"] == "/health"
    assert ready["path"] == "/ready"
    for probe in (live, ready):
        assert probe["port"] in (port_name, 8443)
        assert probe["scheme"] == "HTTPS"

    # Drain: preStop sleep, then SIGTERM and up to RELAY_SHUTDOWN_TIMEOUT, all inside
    # the grace period (else SIGKILL cuts the drain short).
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert 1 <= pre_stop <= 30
    shutdown = float(env["RELAY_SHUTDOWN_TIMEOUT"])
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > pre_stop + shutdown, (grace, pre_stop, shutdown)

    # Resources and a locked-down, non-root process.
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    pod_security, security = pod["securityContext"], container["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # The certificate reload writes a scratch file under /tmp: writable despite the
    # read-only root.
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]


def test_relay_settings_in_the_manifests_are_real_and_valid() -> None:
    """A typo in a variable name would be ignored by the relay: catch it here."""
    env = container_env(k8s_objects())
    compose_env = load_one(COMPOSE)["services"]["relay"]["environment"]
    for source in (env, compose_env):
        unknown = set(source) - RELAY_ENV
        assert not unknown, f"not relay settings: {unknown}"
        try:
            settings = load_settings({k: str(v) for k, v in source.items()})
        except ConfigError as err:
            pytest.fail(str(err))
        assert settings.port == 8443
    assert load_settings(env).tls_enabled


def test_service_pdb_and_hpa_point_at_the_relay_pods() -> None:
    objects = k8s_objects()
    deployment = objects["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = relay_container(deployment)
    port_names = {p["name"] for p in container["ports"]}

    service = objects["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in port_names | {8443}

    pdb = objects["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert ("maxUnavailable" in pdb["spec"]) != ("minAvailable" in pdb["spec"])

    hpa = objects["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= deployment["spec"]["replicas"] - 1
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


def test_tls_secret_is_a_template_without_key_material() -> None:
    secret = k8s_objects()["Secret"]
    assert "data" not in secret  # base64 data would be real material
    for value in secret["stringData"].values():
        body = [line for line in value.splitlines() if not line.startswith("-----")]
        assert all("REPLACE" in line for line in body), value


# -- docker compose -----------------------------------------------------------------------


def test_compose_runs_the_relay_with_a_node() -> None:
    compose = load_one(COMPOSE)
    relay, node = compose["services"]["relay"], compose["services"]["node"]
    assert relay["build"] == "."
    assert relay["environment"]["MIDNIGHT_NODE"] == "ws://node:9944"
    assert relay["depends_on"]["node"]["condition"] == "service_healthy"
    assert node["image"].startswith(("midnightntwrk/midnight-node:", "parity/"))
    assert "9944" in [str(p) for p in node.get("expose", [])]
    assert "ports" not in node  # node RPC is not published: the relay is the public face
    for service in (relay, node):
        assert service["healthcheck"]["test"]
    assert relay["healthcheck"]["test"][-1] == "ghostcloak_relay.healthcheck"
    grace = float(relay["stop_grace_period"].rstrip("s"))
    assert grace > float(relay["environment"]["RELAY_SHUTDOWN_TIMEOUT"])


# -- metric names ---------------------------------------------------------------------------

_PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
}
_TOKEN = re.compile(
    r"(?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?[smhdwy]?)|(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)"
)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions,
    keywords, label names, numbers or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"'(?:[^'\\]|\\.)*'", "''", text)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in _TOKEN.finditer(text):
        name = match.group("name")
        if name is None or name.lower() in _PROMQL_WORDS:
            continue
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function
        names.add(name)
    return names


def test_promql_metric_names_extractor() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{job=~"$job"}'
        "[$__rate_interval]))) > 2 and on (instance) b == 0 unless c offset 5m"
        " or d / 1e-9 > 14 * 86400 - time()"
    )
    assert promql_metric_names(expr) == {"a_bucket", "b", "c", "d"}
    assert promql_metric_names("ghostcloak_relay_sesions_total") == {
        "ghostcloak_relay_sesions_total"
    }


def alert_rules() -> list[dict[str, Any]]:
    doc = load_one(ALERTS)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    value = json.loads(DASHBOARD.read_text())
    assert isinstance(value, dict)
    return value


def all_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dash["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # inside collapsed rows
    return panels


def dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in all_panels(dash) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
        assert match, query
        exprs.append(match.group(1))
    return exprs


def exported_series(metrics_text: str) -> set[str]:
    """Every series name a query may use: samples, plus the names of families that
    have no sample yet (counters as ``_total``, histograms as ``_bucket``/``_sum``/``_count``)."""
    names = set()
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count", ""),
        "gauge": ("",),
    }
    for family in text_string_to_metric_families(metrics_text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def scrape(url: str, context: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=10, context=context) as resp:
        body: bytes = resp.read()
    return body.decode()


@pytest.fixture
async def metrics_text(relay_factory: RelayFactory, devnode: DevNode, tls_files: TlsFiles) -> str:
    """/metrics of a relay serving TLS, with node probes and one relayed request, so that
    families that appear only then (certificate expiry, best block, RTT) are there."""
    relay: RelayServer = await relay_factory(
        node=(devnode.url,),
        tls_cert=str(tls_files.cert),
        tls_key=str(tls_files.key),
        probe_nodes=True,
        node_probe_interval=0.2,
    )
    ctx = tls_files.client_context()
    url = f"https://127.0.0.1:{relay.port}/metrics"

    async def probed() -> bool:
        text = await asyncio.to_thread(scrape, url, ctx)
        return 'ghostcloak_relay_node_healthy{node="0"} 1.0' in text

    await eventually(probed, what="node probed healthy")
    return await asyncio.to_thread(scrape, url, ctx)


async def test_alerts_and_dashboard_use_only_metrics_the_relay_exports(
    metrics_text: str,
) -> None:
    exported = exported_series(metrics_text)
    assert "ghostcloak_relay_tls_certificate_expiry_timestamp_seconds" in exported
    assert "ghostcloak_relay_upstream_rtt_seconds_bucket" in exported
    assert "process_resident_memory_bytes" in exported

    alert_names = set().union(*(promql_metric_names(str(r["expr"])) for r in alert_rules()))
    dash_names = set().union(*(promql_metric_names(e) for e in dashboard_exprs(dashboard())))
    assert alert_names - exported - SYNTHETIC_SERIES == set(), "alerts.yml"
    assert dash_names - exported == set(), "relay-dashboard.json"

    # and they cover what operators need
    for name in (
        "ghostcloak_relay_ready",
        "ghostcloak_relay_draining",
        "ghostcloak_relay_node_healthy",
        "ghostcloak_relay_upstream_failures_total",
        "ghostcloak_relay_refused_total",
        "ghostcloak_relay_upstream_rtt_seconds_bucket",
        "process_resident_memory_bytes",
        "ghostcloak_relay_tls_certificate_expiry_timestamp_seconds",
    ):
        assert name in alert_names, name
    for name in (
        "ghostcloak_relay_sessions_active",
        "ghostcloak_relay_sessions_started_total",
        "ghostcloak_relay_sessions_ended_total",
        "ghostcloak_relay_connections_active",
        "ghostcloak_relay_messages_total",
        "ghostcloak_relay_bytes_total",
        "ghostcloak_relay_refused_total",
        "ghostcloak_relay_node_healthy",
        "ghostcloak_relay_upstream_rtt_seconds_bucket",
        "process_resident_memory_bytes",
        "ghostcloak_relay_asyncio_tasks",
    ):
        assert name in dash_names, name


# -- alert rules ----------------------------------------------------------------------------


def test_alert_rules_are_complete() -> None:
    doc = load_one(ALERTS)
    assert doc["groups"]
    names = set()
    for group in doc["groups"]:
        assert group["name"]
        assert group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["alert"] not in names, f"duplicate {rule['alert']}"
            names.add(rule["alert"])
            assert rule["expr"]
            assert re.fullmatch(r"\d+[smh]", str(rule["for"])), rule["alert"]
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert rule["annotations"]["summary"]
            assert rule["annotations"]["description"]
            assert str(rule["expr"]).count("(") == str(rule["expr"]).count(")")
    expressions = " ".join(str(r["expr"]) for r in alert_rules())
    assert "histogram_quantile(0.99" in expressions
    assert "- time() < 14 * 86400" in expressions


def test_alert_rules_pass_promtool_when_available() -> None:
    unpacked = ROOT / ".tools" / "prometheus" / "usr" / "bin" / "promtool"  # setup-promtool.sh
    promtool = shutil.which("promtool") or (str(unpacked) if unpacked.is_file() else None)
    if promtool is None:
        if os.environ.get("RELAY_REQUIRE_PROMTOOL") == "1":
            pytest.fail("RELAY_REQUIRE_PROMTOOL=1 but scripts/setup-promtool.sh found no promtool")
        pytest.skip("promtool not installed (Debian package prometheus); structure checked above")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- Grafana --------------------------------------------------------------------------------


def test_dashboard_has_the_panels_operators_need() -> None:
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"]
    assert dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    datasource = next(v for v in variables.values() if v["type"] == "datasource")
    assert datasource["query"] == "prometheus"
    ds_ref = "${" + datasource["name"] + "}"
    panels = all_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in panels}
    for want in (
        "Active sessions",
        "Sessions started by endpoint",
        "Sessions ended by reason",
        "Connections by endpoint",
        "Messages per second by direction",
        "Bytes per second by direction",
        "Refusals by reason",
        "Node health per node",
        "Upstream RTT p50 / p99",
        "Process memory (RSS)",
        "asyncio tasks",
    ):
        assert want in titles, want
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == ds_ref, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == ds_ref
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0
        assert grid["x"] + grid["w"] <= 24
    rtt = next(p for p in panels if p["title"] == "Upstream RTT p50 / p99")
    quantiles = sorted(t["expr"].split(",")[0] for t in rtt["targets"])
    assert quantiles == ["histogram_quantile(0.5", "histogram_quantile(0.99"]


# -- HAProxy --------------------------------------------------------------------------------


def haproxy_lines() -> list[str]:
    """Configuration lines without comments."""
    lines = []
    for raw in HAPROXY_CFG.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(" ".join(line.split()))
    return lines


def test_haproxy_cfg_is_websocket_and_drain_aware() -> None:
    lines = haproxy_lines()
    for want in (
        "mode http",
        "timeout tunnel 1h",
        "option httpchk",
        "http-check expect status 200",
        "balance leastconn",
    ):
        assert want in lines, want
    for want in ("timeout client-fin", "timeout server-fin", "timeout connect"):
        assert any(line.startswith(want + " ") for line in lines), want
    assert any(
        line.startswith("http-check send meth GET uri /ready ver HTTP/1.1") for line in lines
    )
    assert any(line.startswith("bind :8443") for line in lines)
    text = "\n".join(lines)
    assert "forwardfor" not in text  # the relay never needs the client's address
    assert "on-marked-down" not in text  # draining relays keep their open tunnels
    assert "option httplog" not in text
    assert "option tcplog" not in text
    # the TLS termination example is there, commented
    assert re.search(r"^\s*#\s*bind :8443 ssl crt \S+", HAPROXY_CFG.read_text(), re.M)


def test_haproxy_accepts_the_config(tmp_path: Path, tls_files: TlsFiles) -> None:
    haproxy = require_haproxy()
    result = subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # the commented TLS termination line, switched on with a real certificate
    pem = tmp_path / "relay.pem"
    pem.write_bytes(tls_files.cert.read_bytes() + tls_files.key.read_bytes())
    text = HAPROXY_CFG.read_text()
    example = re.search(r"^\s*#\s*(bind :8443 ssl crt )\S+(.*)$", text, re.M)
    assert example
    text, count = re.subn(
        r"^\s*bind :8443\s*$", f"    {example[1]}{pem}{example[2]}", text, flags=re.M
    )
    assert count == 1
    tls_cfg = tmp_path / "haproxy-tls.cfg"
    tls_cfg.write_text(text)
    result = subprocess.run(
        [haproxy, "-c", "-f", str(tls_cfg)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
