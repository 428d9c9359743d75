"""deploy/ is well-formed and refers only to what exists: metrics and their labels, settings,
endpoints, files. promtool is used too when it is installed; nothing here needs Docker or a cluster."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import inspect
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

import relay.cli
from relay.config import Settings
from relay.observability.metrics import Metrics
from storage.recorder import SpoolRecorderFactory

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / "env.example"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"

# Labels Prometheus attaches to every scraped series (static configs; the operator's ServiceMonitors).
TARGET_LABELS = frozenset({"instance", "job", "namespace", "pod", "service", "container", "endpoint"})
# Series Prometheus makes itself for every target.
PROMETHEUS_SERIES: dict[str, frozenset[str]] = {"up": frozenset()}
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "unknown": ("",),
}
PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
     "bool", "inf", "nan", "atan2"}
)  # fmt: skip
# Settings the deploy files may name that relay/config.py does not read (none now).
PENDING_SETTINGS: frozenset[str] = frozenset()
SECRET_NAME = re.compile(r"SECRET|PASSWORD|API_KEY|ACCESS_KEY|TOKEN")
PLACEHOLDER = re.compile(r"change-me|REPLACE_ME")
# What the containers bind to (PARLEY_HOST), so that probes and Prometheus reach them.
ANY_ADDRESS = "0.0.0.0"  # noqa: S104


# -- what exists --------------------------------------------------------------------------------


@functools.cache
def catalogue() -> dict[str, frozenset[str]]:
    """Every series name ``Metrics().render()`` exposes, with the label names it can carry."""
    metrics = Metrics()
    # Declared label names are only on the (private) wrapper attributes: a labelled metric shows no
    # sample, hence no label, until a child exists.
    declared = {
        value._name: frozenset(value._labelnames)
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
    }
    series = dict(PROMETHEUS_SERIES)
    for family in text_string_to_metric_families(metrics.render().decode()):
        labels = declared.get(family.name, frozenset()) | {k for s in family.samples for k in s.labels}
        for suffix in SERIES_SUFFIXES[family.type]:
            series[family.name + suffix] = labels | {"le"} if suffix == "_bucket" else labels - {"le"}
    return series


@functools.cache
def known_settings() -> frozenset[str]:
    """The environment variables relay/config.py reads."""
    source = (ROOT / "relay" / "config.py").read_text(encoding="utf-8")
    return frozenset(re.findall(r'"((?:PARLEY|OPENAI)_[A-Z0-9_]+)"', source))


def default_drain_timeout_s() -> float:
    (field,) = (f for f in dataclasses.fields(Settings) if f.name == "drain_timeout_s")
    assert isinstance(field.default, float)
    return field.default


def shutdown_budget_s(drain_timeout_s: float) -> float:
    """SIGTERM to exit at worst: requests in flight, the drain, then the recordings' upload wait."""
    upload_wait = inspect.signature(SpoolRecorderFactory).parameters["upload_wait_s"].default
    assert isinstance(upload_wait, float)
    return relay.cli.SHUTDOWN_TIMEOUT_S + drain_timeout_s + upload_wait


# -- PromQL ---------------------------------------------------------------------------------------


def _blank_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: not functions, keywords, labels, durations or numbers."""
    text = _blank_strings(expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # range vectors and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        if match.group(2) is None and match.group(1) not in PROMQL_KEYWORDS:
            names.add(match.group(1))
    return names


def selector_labels(expr: str) -> list[tuple[str, str]]:
    """(metric, label) for every label matcher written on a metric selector."""
    text = _blank_strings(expr)
    pairs = []
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^{}]*)\}", text):
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", match.group(2)):
            pairs.append((match.group(1), label))
    return pairs


def grouping_labels(expr: str) -> set[str]:
    """Labels named in by/without/on/ignoring/group_left/group_right clauses."""
    text = _blank_strings(expr)
    labels: set[str] = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", text):
        labels.update(part.strip() for part in clause.split(",") if part.strip())
    return labels


def call_arguments(expr: str, function: str) -> list[str]:
    """The argument text of every call of ``function`` (balanced parentheses)."""
    found = []
    for match in re.finditer(rf"\b{function}\s*\(", expr):
        depth, start = 1, match.end()
        for i in range(start, len(expr)):
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            if depth == 0:
                found.append(expr[start:i])
                break
    return found


def expression_problems(expr: str) -> list[str]:
    """Everything in ``expr`` that refers to a metric or label /metrics does not have."""
    series = catalogue()
    names = metric_names(expr)
    problems = [f"unknown metric {name}" for name in sorted(names - series.keys())]
    for metric, label in selector_labels(expr):
        if metric in series and label not in series[metric] | TARGET_LABELS:
            problems.append(f"{metric} has no label {label!r}")
    available = set(TARGET_LABELS).union(*(series.get(n, frozenset()) for n in names))
    problems += [f"no metric here has label {label!r}" for label in grouping_labels(expr) - available]
    for argument in call_arguments(expr, "histogram_quantile"):
        if not any(name.endswith("_bucket") for name in metric_names(argument)):
            problems.append("histogram_quantile over something that is not a _bucket series")
        for clause in re.findall(r"\bby\s*\(([^()]*)\)", _blank_strings(argument)):
            if "le" not in {part.strip() for part in clause.split(",")}:
                problems.append("histogram_quantile aggregates the buckets without keeping le")
    return problems


def test_promql_checker_finds_metrics_and_rejects_unknown_names_and_labels() -> None:
    """The expression checker itself: names come out of functions, matchers, clauses and numbers,
    and a misspelt metric, a wrong label or a histogram without ``le`` is reported."""
    expr = (
        "histogram_quantile(0.95, sum by (instance, le) (rate(parley_first_response_seconds_bucket"
        '{turn=~"first|later"}[5m] offset 1h))) > 1.5e0 * 2 '
        'and on (instance) sum by (instance) (rate(parley_http_requests_total{route="/v1/{x}/y"}[5m])) '
        '/ ignoring (kind) group_left sum(rate(parley_playout_frames_total{kind="sent"}[$__rate_interval]))'
    )
    assert metric_names(expr) == {
        "parley_first_response_seconds_bucket", "parley_http_requests_total", "parley_playout_frames_total"
    }  # fmt: skip
    assert expression_problems(expr) == []
    assert expression_problems("rate(parley_session_outcome_total[5m])") == [
        "unknown metric parley_session_outcome_total"
    ]
    assert expression_problems('parley_upstream_reconnects_total{status="failed"}') == [
        "parley_upstream_reconnects_total has no label 'status'"
    ]
    assert expression_problems("sum by (reason) (parley_spool_bytes)") == [
        "no metric here has label 'reason'"
    ]
    assert expression_problems(
        "histogram_quantile(0.9, sum by (instance) (rate(parley_event_loop_lag_seconds_bucket[5m])))"
    ) == ["histogram_quantile aggregates the buckets without keeping le"]


# -- alert rules ----------------------------------------------------------------------------------


def load_alerts() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_alert_rules_have_the_prometheus_rule_file_structure() -> None:
    """groups -> rules, each with alert, expr, for, a severity label and summary + description."""
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert set(data) == {"groups"}
    groups = data["groups"]
    assert groups and len({g["name"] for g in groups}) == len(groups)
    names = []
    for group in groups:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"], group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
            names.append(rule["alert"])
            assert re.fullmatch(r"Parley[A-Z][A-Za-z]+", rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
            assert rule["annotations"]["summary"].strip() and len(rule["annotations"]["description"]) > 80
    assert len(names) == len(set(names))
    if shutil.which("promtool"):
        result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("rule", load_alerts(), ids=lambda rule: rule["alert"])
def test_alert_expression_uses_only_existing_metrics_and_labels(rule: dict[str, Any]) -> None:
    """Every metric and label an alert names is exposed by relay/observability/metrics.py."""
    assert metric_names(rule["expr"]), "an alert on no metric"
    assert expression_problems(rule["expr"]) == []


def test_alerts_cover_what_an_operator_must_act_on() -> None:
    """Sessions failing, first response, upstream, spool, uploads, dead letters, queue depth,
    loop lag, dependencies and scrape targets each have an alert."""
    used = set().union(*(metric_names(rule["expr"]) for rule in load_alerts()))
    for metric in (
        "parley_http_requests_total", "parley_session_outcomes_total", "parley_first_response_seconds_bucket",
        "parley_upstream_reconnects_total", "parley_spool_bytes", "parley_upload_oldest_pending_seconds",
        "parley_upload_lag_seconds_bucket", "parley_jobs", "parley_event_loop_lag_seconds_bucket",
        "parley_dependency_up", "up",
    ):  # fmt: skip
        assert metric in used, metric


# -- dashboard ------------------------------------------------------------------------------------


def dashboard_targets() -> Iterator[tuple[str, dict[str, Any]]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield f"{panel['id']}-{target['refId']}", target


def test_dashboard_panels_have_a_datasource_and_targets(tmp_path: Path) -> None:
    """The JSON parses; every panel but a row has a datasource and queries, on a 24-column grid."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["datasource"]["type"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and target["expr"].strip() and target["datasource"], panel["title"]
        for variable in re.findall(r"\$\{?(\w+)", json.dumps(panel)):
            assert variable in variables or variable.startswith("__"), (panel["title"], variable)
    promtool = shutil.which("promtool")
    if promtool:  # optional: the queries as recording rules, for promtool's PromQL parser
        rules = [
            {"record": f"dashboard:q{i}", "expr": t["expr"].replace("$__rate_interval", "5m")}
            for i, (_, t) in enumerate(dashboard_targets())
        ]
        path = tmp_path / "dashboard-rules.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
        result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("ref", "target"), list(dashboard_targets()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_dashboard_expression_uses_only_existing_metrics_and_labels(ref: str, target: dict[str, Any]) -> None:
    """Every metric and label a dashboard query names is exposed by relay/observability/metrics.py."""
    assert metric_names(target["expr"]), ref
    assert expression_problems(target["expr"]) == []


def test_dashboard_shows_what_an_operator_looks_at() -> None:
    """Sessions, outcomes, latencies, playout, loop lag, GC, spool, uploads, jobs, HTTP, dependencies."""
    used = set().union(*(metric_names(t["expr"]) for _, t in dashboard_targets()))
    for metric in (
        "parley_sessions_active", "parley_session_outcomes_total", "parley_first_response_seconds_bucket",
        "parley_inbound_latency_seconds_bucket", "parley_playout_frames_total",
        "parley_event_loop_lag_seconds_bucket", "parley_gc_pause_seconds_bucket", "parley_spool_bytes",
        "parley_upload_lag_seconds_bucket", "parley_jobs", "parley_job_outcomes_total",
        "parley_job_dead_letters_total", "parley_http_requests_total",
        "parley_http_request_duration_seconds_bucket", "parley_dependency_up",
    ):  # fmt: skip
        assert metric in used, metric


def test_grafana_provisioning_loads_the_dashboard_from_where_compose_mounts_it() -> None:
    """The provider's path is where compose mounts dashboard.json; the datasource is Prometheus."""
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/parley.yaml").read_text(encoding="utf-8")
    )
    datasources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text(encoding="utf-8")
    )
    path = provider["providers"][0]["options"]["path"]
    grafana = load_compose()["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"] if v.startswith("./")}
    assert mounts["./grafana/dashboard.json"].startswith(path.rstrip("/") + "/")
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


# -- compose --------------------------------------------------------------------------------------


@functools.cache
def _compose_text() -> str:
    return COMPOSE.read_text(encoding="utf-8")


def load_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(_compose_text())
    return data


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?message} and $$."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        current = env.get(name, "")
        if op == ":-" and not current:
            return arg or ""
        if op == ":?" and not current:
            raise KeyError(f"{name}: {arg}")
        return current

    value = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", one, value)
    return value.replace("$$", "$")


def one_shot_services(compose: dict[str, Any]) -> set[str]:
    """Services others wait for to complete, not to be healthy."""
    return {
        name
        for service in compose["services"].values()
        for name, wait in (service.get("depends_on") or {}).items()
        if wait["condition"] == "service_completed_successfully"
    }


def test_compose_services_have_healthchecks_except_one_shot_jobs() -> None:
    """Every long-running service has a health check; one-shot jobs (migrate, bucket set-up) do not
    restart."""
    compose = load_compose()
    one_shots = one_shot_services(compose)
    assert {"migrate", "minio-init"} <= one_shots
    for name, service in compose["services"].items():
        if name in one_shots:
            assert service["restart"] == "no", name
        else:
            assert service["healthcheck"]["test"], name


def test_compose_waits_for_health_and_for_one_shot_jobs() -> None:
    """depends_on always has a condition: healthy for services, completed for one-shot jobs;
    relays and the worker start after the migration and the bucket set-up."""
    compose = load_compose()
    services = compose["services"]
    one_shots = one_shot_services(compose)
    for name, service in services.items():
        for dependency, wait in (service.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if dependency in one_shots else "service_healthy"
            assert wait["condition"] == expected, (name, dependency)
            if expected == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
    for name, service in services.items():
        if service.get("command", [None])[0] in ("serve", "worker"):
            assert {"migrate", "minio-init", "postgres", "minio"} <= set(service["depends_on"]), name


def test_compose_holds_no_literal_secrets() -> None:
    """Secret-looking settings, credentials inside URLs and secret flags come from ${...} only,
    and a secret variable never has a non-empty default written in the file."""
    text = _compose_text()
    for name, default in re.findall(r"\$\{([A-Za-z0-9_]+):-([^}]*)\}", text):
        if SECRET_NAME.search(name):
            assert default == "", f"{name} has a default in compose.yaml"

    def check(where: str, key: str, value: Any) -> None:
        value = str(value)
        if SECRET_NAME.search(key) and value:
            assert re.fullmatch(r"\$\{[A-Za-z0-9_]+(?::[-?][^}]*)?\}", value), where
        credentials = re.search(r"://([^/@\s]*)@", value)
        if credentials:
            assert re.fullmatch(r"(\$\{[^}]+\}|[a-z]+):\$\{[^}]+\}", credentials.group(1)), where
        if re.search(r"secret=|password=", value, re.IGNORECASE):
            assert re.search(r"(?:secret|password)=\$\{", value, re.IGNORECASE), where

    for name, service in load_compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            check(f"{name}.environment.{key}", key, value)
        for arg in service.get("command") or []:
            check(f"{name}.command", "", arg)


def test_compose_variables_are_in_env_example_with_placeholder_secrets() -> None:
    """Every variable compose requires is in env.example, whose secrets are obvious placeholders."""
    example = env_example()
    required = set(re.findall(r"\$\{([A-Za-z0-9_]+)(?::\?[^}]*)?\}", _compose_text()))
    assert required <= example.keys(), required - example.keys()
    for key, value in example.items():
        if SECRET_NAME.search(key) and value:
            assert PLACEHOLDER.search(value), key


@pytest.mark.parametrize("service", ["relay-1", "relay-2", "worker", "migrate"])
def test_compose_environment_is_accepted_by_settings(service: str, tmp_path: Path) -> None:
    """With env.example's values, each Parley service's environment is valid for Settings, and
    names only settings relay/config.py reads (or the announced TURN ones)."""
    environment = load_compose()["services"][service]["environment"]
    env = {key: interpolate(str(value), env_example()) for key, value in environment.items()}
    unknown = {key for key in env if key not in known_settings() | PENDING_SETTINGS}
    assert not unknown
    settings = Settings.from_env({**env, "PARLEY_DATA_DIR": str(tmp_path)}, dotenv=None)
    assert settings.database_url.startswith("postgresql+asyncpg://")
    assert settings.object_store_url.startswith("s3://")
    if service.startswith("relay"):
        assert settings.host == ANY_ADDRESS and settings.rtc_host_addresses
        assert settings.workers_in_process == 0


def test_compose_relays_get_time_to_drain() -> None:
    """stop_grace_period of every relay covers requests in flight, the drain and the recording flush,
    and each relay advertises its own fixed media address."""
    services = load_compose()["services"]
    relays = {n: s for n, s in services.items() if s.get("command", [None])[0] == "serve"}
    assert len(relays) >= 2
    addresses = set()
    for name, service in relays.items():
        match = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
        assert match, name
        drain = float(interpolate(str(service["environment"]["PARLEY_DRAIN_TIMEOUT"]), env_example()))
        assert int(match.group(1)) >= shutdown_budget_s(drain), name
        address = service["environment"]["PARLEY_RTC_HOST_ADDRESSES"]
        assert service["networks"]["parley"]["ipv4_address"] == address
        addresses.add(address)
    assert len(addresses) == len(relays)


def test_prometheus_scrapes_every_parley_process_and_loads_the_rules() -> None:
    """prometheus.yml scrapes each relay and the worker on their ports as jobs parley-*, and loads
    alerts.yml from where compose mounts it."""
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    targets = {
        target: job["job_name"]
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    services = load_compose()["services"]
    for name, service in services.items():
        command = service.get("command") or [None]
        if command[0] == "serve":
            assert targets.get(f"{name}:8080") == "parley-relay", name
        elif command[0] == "worker":
            port = command[command.index("--metrics-port") + 1]
            assert targets.get(f"{name}:{port}") == "parley-worker", name
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"] if v.startswith("./"))
    assert mounts["./prometheus/alerts.yml"] in config["rule_files"]
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"


# -- Kubernetes -----------------------------------------------------------------------------------


@functools.cache
def k8s_documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                docs.append((path.name, doc))
    return tuple(docs)


def k8s(kind: str, name: str) -> dict[str, Any]:
    matches = [d for _, d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, (kind, name)
    return matches[0]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for _, doc in k8s_documents():
        if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def parley_config() -> dict[str, str]:
    data: dict[str, str] = k8s("ConfigMap", "parley-config")["data"]
    return data


def test_k8s_documents_parse_and_kustomization_lists_every_file() -> None:
    """Every manifest has apiVersion, kind and a name; kustomization.yaml lists exactly the files."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    for filename, doc in k8s_documents():
        if filename == "kustomization.yaml":
            continue
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], filename
    kinds = {doc["kind"] for _, doc in k8s_documents()}
    expected = {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "Job",
    }
    assert expected <= kinds
    if shutil.which("kubectl"):
        result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_k8s_relay_deployment_is_ready_on_readyz_and_drains_within_its_grace_period() -> None:
    """Readiness on /readyz, liveness on /healthz, a preStop sleep, and a grace period that covers
    the sleep, requests in flight, PARLEY_DRAIN_TIMEOUT and the recording flush."""
    deployment = k8s("Deployment", "parley-relay")
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # One process per pod (sized for one core), reached by other pods at its own IP.
    assert container["args"] == ["serve", "--workers", "1"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PARLEY_NODE_URL"]["value"] == "http://$(POD_IP):8080"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    drain = float(parley_config().get("PARLEY_DRAIN_TIMEOUT", default_drain_timeout_s()))
    assert drain >= default_drain_timeout_s()
    assert pod["terminationGracePeriodSeconds"] >= int(sleep[1]) + shutdown_budget_s(drain)
    env = {e["name"]: e for e in container["env"]}
    assert env["PARLEY_RTC_HOST_ADDRESSES"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert "cpu" not in container["resources"].get("limits", {}), "CPU limits throttle the event loop"


def test_k8s_pods_run_as_non_root_with_a_read_only_root_and_a_writable_data_dir() -> None:
    """Every pod is non-root with a read-only root filesystem; Parley's data dir and /tmp are volumes."""
    data_dir = parley_config()["PARLEY_DATA_DIR"]
    for name, pod in pod_specs():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"].get("runAsUser", 1) != 0, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            if container["image"].startswith("parley"):
                assert {data_dir, "/tmp"} <= mounts, name


def test_k8s_selectors_and_ports_match() -> None:
    """Services, the PodDisruptionBudget and the ServiceMonitors select existing pods and named ports."""
    pods = {}
    for _, doc in k8s_documents():
        if doc["kind"] == "Deployment":
            template = doc["spec"]["template"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
            ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
            pods[doc["metadata"]["name"]] = (template["metadata"]["labels"], ports)

    def selected(selector: dict[str, str]) -> list[set[str]]:
        return [ports for labels, ports in pods.values() if selector.items() <= labels.items()]

    services = {}
    for _, doc in k8s_documents():
        if doc["kind"] == "Service":
            matches = selected(doc["spec"]["selector"])
            assert matches, doc["metadata"]["name"]
            for port in doc["spec"]["ports"]:
                assert all(port["targetPort"] in ports for ports in matches), port
            services[doc["metadata"]["name"]] = doc
    assert selected(k8s("PodDisruptionBudget", "parley-relay")["spec"]["selector"]["matchLabels"])
    monitored: set[str] = set()
    for _, doc in k8s_documents():
        if doc["kind"] == "ServiceMonitor":
            selector = doc["spec"]["selector"]["matchLabels"]
            chosen = [s for s in services.values() if selector.items() <= s["metadata"]["labels"].items()]
            assert chosen, doc["metadata"]["name"]
            for endpoint in doc["spec"]["endpoints"]:
                assert endpoint["path"] == "/metrics"
                assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in chosen)
            monitored.update(s["metadata"]["name"] for s in chosen)
    # The alerts' up{job=~"parley-.*"} and job="parley-relay" rely on these job (Service) names.
    assert {"parley-relay", "parley-worker"} <= monitored


def test_k8s_secret_holds_only_placeholders() -> None:
    """The Secret manifest carries no real value: each is empty or an obvious placeholder."""
    secret = k8s("Secret", "parley-secrets")
    assert "data" not in secret
    for key, value in secret["stringData"].items():
        assert value == "" or PLACEHOLDER.search(value), key


def test_k8s_configuration_is_accepted_by_settings(tmp_path: Path) -> None:
    """ConfigMap + Secret + the pod IP make valid Settings and name only known settings."""
    env = {**parley_config(), **k8s("Secret", "parley-secrets")["stringData"]}
    assert set(env) <= known_settings() | PENDING_SETTINGS, set(env) - known_settings() - PENDING_SETTINGS
    env = {**env, "PARLEY_DATA_DIR": str(tmp_path), "PARLEY_RTC_HOST_ADDRESSES": "10.1.2.3"}
    settings = Settings.from_env(env, dotenv=None)
    assert settings.workers_in_process == 0 and settings.host == ANY_ADDRESS


def test_k8s_prometheus_rule_is_the_alert_file() -> None:
    """The PrometheusRule carries exactly the groups of deploy/prometheus/alerts.yml."""
    rule = k8s("PrometheusRule", "parley")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]


# -- image ----------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_runs_parley_as_non_root_from_a_slim_python_311() -> None:
    """Slim Python 3.11 base, a non-root USER, no dev extras, parley serve, /healthz health check."""
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", args["PYTHON_IMAGE"])
    assert len([a for op, a in instructions if op == "FROM"]) >= 2, "multi-stage"
    users = [a for op, a in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert json.loads(next(a for op, a in instructions if op == "ENTRYPOINT")) == ["parley"]
    assert json.loads(next(a for op, a in instructions if op == "CMD")) == ["serve"]
    health = next(a for op, a in instructions if op == "HEALTHCHECK")
    assert "/healthz" in health and "healthcheck.py" in health
    assert "8080/tcp" in next(a for op, a in instructions if op == "EXPOSE")
    assert any(op == "VOLUME" and "/var/lib/parley" in a for op, a in instructions)
    assert not any("[dev]" in a for _, a in instructions)


def test_dockerignore_keeps_what_the_image_copies_and_drops_local_state() -> None:
    """The build context has every COPY source and none of .venv, .env, data or node_modules."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        verdict = False
        parts = path.split("/")
        for pattern in patterns:
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!").rstrip("/")
            for i in range(1, len(parts) + 1):
                prefix = "/".join(parts[:i])
                if fnmatchcase(prefix, pattern) or (
                    pattern.startswith("**/") and fnmatchcase(parts[i - 1], pattern[3:])
                ):
                    verdict = not negate
                    break
        return verdict

    sources = [
        source
        for op, arg in dockerfile_instructions()
        if op == "COPY" and "--from" not in arg
        for source in arg.split()[:-1]
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source.rstrip("/")), source
    for local in (".venv", ".env", "data", "web/node_modules", "web/test", ".git", "relay/__pycache__"):
        assert ignored(local), local


def test_healthcheck_script_exits_0_on_2xx_and_1_otherwise() -> None:
    """deploy/healthcheck.py: 0 for a 200, 1 for a 503 and for nothing listening."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = str(server.server_address[1])

        def run(*args: str) -> int:
            env = {"PARLEY_HOST": ANY_ADDRESS, "PARLEY_PORT": port}
            script = str(DEPLOY / "healthcheck.py")
            return subprocess.run([sys.executable, script, *args], env=env, capture_output=True).returncode

        assert run() == 0
        assert run("/readyz") == 1
    finally:
        server.shutdown()
        server.server_close()
    assert run("/healthz") == 1
