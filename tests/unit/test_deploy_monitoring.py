"""deploy/prometheus and deploy/grafana: promtool checks and unit tests, and no invented metric names.

The metric names that exist are taken from the services' own metric classes, built on a fresh
registry, so a renamed metric breaks the dashboard or rule that still uses the old name.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "touchstream.json"
SERVICES = ("ingest", "identity", "scoring", "triggers", "console")

# Series Prometheus itself makes for every target.
PROMETHEUS_SERIES = {"up"}
METRIC = re.compile(r"\b(touchstream_[a-z0-9_]+|touchstream:[a-z0-9_:]+|up)\b(?!\s*\()")
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def exposed_series() -> set[str]:
    """Every series name the services can expose (counters with _total, histograms with _bucket/_sum/_count)."""
    from services.identity.metrics import IdentityMetrics
    from services.ingest.service import IngestMetrics
    from services.scoring.metrics import ScoringMetrics
    from services.triggers.metrics import TriggersMetrics
    from touchstream.metrics import ServiceMetrics
    from touchstream.streams import ConsumerLag

    # The console builds its own metrics inside build_app; its shared set is what the rules read.
    registries = [IngestMetrics().registry, ServiceMetrics("console", CollectorRegistry()).registry]
    for metrics_class in (IdentityMetrics, ScoringMetrics, TriggersMetrics):
        registry = CollectorRegistry()
        metrics_class(registry)
        registries.append(registry)
    # Every Faust service's /metrics carries its consumer lag (touchstream.streams.add_health_pages).
    for service in ("identity", "scoring", "triggers", "console"):
        registry = CollectorRegistry()
        registry.register(ConsumerLag(service))
        registries.append(registry)
    names: set[str] = set()
    for registry in registries:
        for family in registry.collect():
            names.add(family.name)
            if family.type == "counter":
                names.add(family.name + "_total")
            if family.type == "histogram":
                names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    return names


def load_rules() -> dict[str, Any]:
    return yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())


def recorded_series() -> set[str]:
    return {rule["record"] for group in load_rules()["groups"] for rule in group["rules"] if "record" in rule}


def metric_names(expr: str) -> set[str]:
    """Return the series names a PromQL expression reads (label values in quotes are not names).

    >>> sorted(metric_names('sum by (le) (rate(touchstream_a_b_bucket{topic="touchstream_x"}[5m])) > up'))
    ['touchstream_a_b_bucket', 'up']
    """
    return set(METRIC.findall(QUOTED.sub('""', expr)))


def dashboard_panels() -> list[dict[str, Any]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    flat = []
    for panel in panels:
        flat.append(panel)
        flat.extend(panel.get("panels", []))
    return flat


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `make test` installs it (Debian package prometheus)")
    return path


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=PROMETHEUS)


def test_promtool_accepts_the_rules_and_the_compose_scrape_config(promtool: str) -> None:
    rules = run(promtool, "check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = run(promtool, "check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_alert_unit_tests_pass(promtool: str) -> None:
    tested = run(promtool, "test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = {r["alert"] for g in load_rules()["groups"] for r in g["rules"] if "alert" in r}
    covered = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    main_alerts = {"TouchstreamPipelineStalled", "TouchstreamDeadLettersRising", "TouchstreamWebhookEndpointFailing",
                   "TouchstreamWebhookDeliveriesDeadLettered", "TouchstreamModelDrift", "TouchstreamServiceDown",
                   "TouchstreamScoringCheckpointRefused"}
    assert main_alerts <= alerts
    assert main_alerts <= covered, f"main alerts without a promtool unit test: {main_alerts - covered}"


def test_rules_read_only_metrics_the_services_expose() -> None:
    known = exposed_series() | recorded_series() | PROMETHEUS_SERIES
    for group in load_rules()["groups"]:
        for rule in group["rules"]:
            used = metric_names(rule["expr"])
            assert used, f"{rule.get('alert') or rule.get('record')} reads no touchstream metric"
            assert used <= known, f"{rule.get('alert') or rule.get('record')} reads unknown series {used - known}"


def test_the_console_scrapes_only_series_the_services_expose() -> None:
    from services.console.quality import PREFIX, QUALITY_SERIES
    from services.console.scraping import STAGES
    from touchstream.metrics import EVENT_TO_WEBHOOK_SECONDS

    read = {stage.metric for stage in STAGES} | {PREFIX + series for series in QUALITY_SERIES.values()}
    read |= {EVENT_TO_WEBHOOK_SECONDS + "_bucket"}
    assert all(stage.metric.startswith(f"touchstream_{stage.name}_") for stage in STAGES)
    assert read - exposed_series() == set()


def test_the_benchmarks_read_only_series_the_services_expose() -> None:
    """The names bench/ waits on come from the services' metric modules; a renamed or dropped metric
    must fail here, not leave a benchmark reading 0 (as the removed `scoring_rescores_total` did). The
    console's `READ_MODEL_UPDATES_TOTAL` is declared inside its build_app, from the same constant."""
    from services.identity.metrics import CUSTOMERS_CREATED_TOTAL
    from services.scoring.metrics import CROSSING_CHECKS_TOTAL, CROSSINGS_TOTAL
    from services.triggers.metrics import ACTIONS_TOTAL
    from touchstream.metrics import batch_size_events, consumer_lag_messages, events_in_total, events_out_total

    read = {CUSTOMERS_CREATED_TOTAL, CROSSING_CHECKS_TOTAL, CROSSINGS_TOTAL, ACTIONS_TOTAL}
    read |= {f(service) for service in SERVICES for f in (events_in_total, events_out_total)}
    read |= {batch_size_events(service) + "_count" for service in SERVICES if service != "ingest"}
    read |= {consumer_lag_messages(service) for service in SERVICES if service != "ingest"}
    assert read - exposed_series() == set()


def test_rules_alert_on_every_service_job() -> None:
    down = next(r for g in load_rules()["groups"] for r in g["rules"] if r.get("alert") == "TouchstreamServiceDown")
    jobs = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]
    assert set(SERVICES) <= {job["job_name"] for job in jobs}
    assert all(service in down["expr"] for service in SERVICES)


def test_dashboard_queries_only_known_metrics() -> None:
    known = exposed_series() | recorded_series() | PROMETHEUS_SERIES
    queried: set[str] = set()
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            used = metric_names(target["expr"])
            assert used, f"panel {panel['title']!r} query reads no metric: {target['expr']}"
            assert used <= known, f"panel {panel['title']!r} reads unknown series {used - known}"
            queried |= used
    # What ops asked to see: each stage's throughput, end-to-end latency, merges, model, actions, deliveries.
    for wanted in ("touchstream_ingest_events_out_total", "touchstream_identity_events_in_total",
                   "touchstream_scoring_events_in_total", "touchstream_triggers_events_in_total",
                   "touchstream_triggers_event_to_webhook_seconds_bucket", "touchstream_identity_merges_total",
                   "touchstream_scoring_prequential_roc_auc_ratio", "touchstream_scoring_drift_alarms_total",
                   "touchstream_triggers_actions_total", "touchstream_triggers_deliveries_total",
                   "touchstream:events_failed:rate5m"):
        assert wanted in queried, f"the dashboard does not show {wanted}"


def test_dashboard_panels_use_the_provisioned_datasource_and_do_not_overlap() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasources["datasources"][0]["uid"]
    cells: set[tuple[int, int]] = set()
    ids = set()
    for panel in dashboard_panels():
        assert panel["id"] not in ids
        ids.add(panel["id"])
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid
            assert all(t["datasource"]["uid"] == uid for t in panel["targets"])


def test_dashboard_provider_reads_the_folder_compose_mounts() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "touchstream.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_k8s_scrape_config_matches_the_pod_labels_and_ports() -> None:
    """promtool from Debian is built without Kubernetes discovery, so check the relabelling against the manifests."""
    config = yaml.safe_load((PROMETHEUS / "prometheus-k8s.yml").read_text())
    [job] = config["scrape_configs"]
    assert config["rule_files"] == ["alerts.yml"]
    keep = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    [job_label] = [r for r in job["relabel_configs"] if r.get("target_label") == "job"]
    assert job_label["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    deployments = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "base" / "deployments.yaml").read_text())
                   if d and d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {f"touchstream-{s}" for s in SERVICES}
    for deployment in deployments:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == keep[("__meta_kubernetes_pod_label_app_kubernetes_io_part_of",)]
        assert labels["app.kubernetes.io/name"] in SERVICES
        ports = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert keep[("__meta_kubernetes_pod_container_port_name",)] in ports


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses each panel query as a recording rule (Grafana's $__rate_interval as 1m)."""
    rules = [{"record": f"dashboard:panel_{panel['id']}:{target['refId']}",
              "expr": target["expr"].replace("$__rate_interval", "1m")}
             for panel in dashboard_panels() if panel["type"] != "row" for target in panel["targets"]]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    broken = tmp_path / "broken.yml"
    unbalanced = {"record": "a:b", "expr": "sum(rate(x[1m])"}
    broken.write_text(yaml.safe_dump({"groups": [{"name": "b", "rules": [unbalanced]}]}))
    assert subprocess.run([promtool, "check", "rules", str(broken)], capture_output=True, timeout=60).returncode != 0
