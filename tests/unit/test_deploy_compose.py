"""docker-compose.yml and Dockerfile, checked without Docker: the compose schema, health gates, real settings.

`docker compose config` needs a Docker engine; instead the file is validated against the
Compose Specification schema (check-jsonschema's vendored copy, offline) and its contents
are checked against the code: every TOUCHSTREAM_* variable is a field of a settings class,
and the settings classes accept the whole environment each service gets.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from services.console.settings import ConsoleSettings
from services.identity.settings import IdentitySettings
from services.ingest.settings import IngestSettings
from services.scoring.settings import ScoringSettings
from services.triggers.settings import TriggersSettings
from touchstream.settings import CoreSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SERVICE_SETTINGS: dict[str, type[BaseSettings]] = {
    "ingest": IngestSettings, "identity": IdentitySettings, "scoring": ScoringSettings, "triggers": TriggersSettings,
    "console": ConsoleSettings,
}
# Read by something other than touchstream's settings: Python.
FOREIGN_ENV = {"PYTHONUNBUFFERED"}
# One-shot jobs that others wait for with service_completed_successfully instead of a healthcheck.
ONE_SHOT = {"kafka-init"}
INTERPOLATION = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(value: str) -> str:
    """Resolve ${NAME:-default} as compose does with NAME unset; a bare ${NAME} must not be needed.

    >>> interpolate("a ${X:-b} c")
    'a b c'
    """
    def default(match: re.Match[str]) -> str:
        if match[2] is None:
            raise AssertionError(f"{match[0]} has no default; `make up` would need it set")
        return match[2]

    return INTERPOLATION.sub(default, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "use the mapping form of environment"
    return {name: interpolate(str(value)) for name, value in env.items()}


def env_names(settings_class: type[BaseSettings]) -> set[str]:
    prefix = settings_class.model_config.get("env_prefix", "")
    return {f"{prefix}{field}".upper() for field in settings_class.model_fields}


def test_compose_file_matches_the_compose_specification() -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    assert checker.exists(), "check-jsonschema is missing: it is in the dev extra (`make install`)"
    result = subprocess.run([str(checker), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_catches_a_broken_file(tmp_path: Path) -> None:
    """The schema check above is not vacuous: a misspelt key fails it."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("healthcheck:", "healthchek:", 1))
    checker = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run([str(checker), "--builtin-schema", "vendor.compose-spec", str(broken)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


def test_every_long_running_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name in ONE_SHOT:
            assert service["restart"] == "no"
            continue
        check = service.get("healthcheck")
        assert check and check["test"], f"{name} has no healthcheck"


def test_every_dependency_waits_for_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: use depends_on with conditions"
        for target, rule in depends_on.items():
            expected = "service_completed_successfully" if target in ONE_SHOT else "service_healthy"
            assert rule["condition"] == expected, f"{name} -> {target}: {rule['condition']}"
            assert target in services


def test_the_services_share_one_image_with_a_command_each(compose: dict[str, Any]) -> None:
    images = set()
    for name in SERVICE_SETTINGS:
        service = compose["services"][name]
        images.add(service["image"])
        assert service["build"] == "."
        assert service["command"] == ["python", "-m", f"services.{name}"]
        assert (ROOT / "services" / name / "__main__.py").exists()
        assert {"kafka-init", "redis"} <= set(service["depends_on"])
    assert len(images) == 1


def test_environment_names_are_real_settings_fields(compose: dict[str, Any]) -> None:
    for name, settings_class in SERVICE_SETTINGS.items():
        known = env_names(CoreSettings) | env_names(settings_class) | FOREIGN_ENV
        unknown = set(environment(compose["services"][name])) - known
        assert not unknown, f"{name}: no settings field reads {sorted(unknown)}"


@pytest.mark.parametrize("name", list(SERVICE_SETTINGS))
def test_settings_accept_the_compose_environment(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = environment(compose["services"][name])
    for variable in [v for v in os.environ if v.startswith("TOUCHSTREAM_")]:
        monkeypatch.delenv(variable)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    core = CoreSettings()
    settings: Any = SERVICE_SETTINGS[name]()
    assert core.idempotent_producer is True
    assert core.kafka_bootstrap == "kafka:9092" and core.redis_url.startswith("redis://redis:")
    # The port the healthcheck probes and Prometheus scrapes is the one the service listens on.
    port = settings.web_port
    assert f"127.0.0.1:{port}/readyz" in " ".join(compose["services"][name]["healthcheck"]["test"])
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    [job] = [j for j in scrape if j["job_name"] == name]
    assert job["dns_sd_configs"][0] == {"names": [name], "type": "A", "port": port}
    # Reachable from other containers, not only from inside its own.
    assert settings.web_host == "0.0.0.0"
    assert "WEB_BIND" not in env, "Faust's WEB_BIND is ignored; the service's own web_host setting is the one"
    if name == "triggers":
        # The demo receiver's compose address is private: only its endpoint may reach private
        # networks, and only the ones Docker hands out (never loopback or link-local).
        assert settings.allow_networks == ()
        assert {str(n) for n in settings.endpoints["marketing"].allow_networks} == {
            "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"}
        assert set(settings.endpoints) == {"marketing"}
        secret = environment(compose["services"]["receiver"])["WEBHOOK_SECRET"]
        assert settings.endpoints["marketing"].secret.get_secret_value() == secret
    if name in ("triggers", "console"):
        # The image copies deploy/rules to /app/deploy/rules (Dockerfile).
        assert settings.rules_file == Path("/app/deploy/rules/default.yaml")
        assert (ROOT / "deploy" / "rules" / "default.yaml").exists()
    if name == "console":
        # The console reads the other services by their compose names and ports.
        assert settings.scoring_metrics_url == "http://scoring:6068/metrics"
        assert settings.triggers_metrics_url == "http://triggers:6069/metrics"
        assert settings.ingest_metrics_url == "http://ingest:6066/metrics"
        assert settings.identity_metrics_url == "http://identity:6067/metrics"
        assert settings.identity_url == "http://identity:6067"


def published_ports(compose: dict[str, Any]) -> dict[str, list[str]]:
    """Return each service's published ports, in compose's short form ("[host_ip:]host:container")."""
    published: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: use the short form of ports, with the host address"
            published.setdefault(name, []).append(port)
    return published


def test_published_ports_listen_on_loopback_only(compose: dict[str, Any]) -> None:
    # Dev keys, the dev write key and an anonymous Grafana: nothing another machine may reach.
    published = published_ports(compose)
    assert {"ingest", "console", "receiver", "prometheus", "grafana"} <= set(published)
    for name, ports in published.items():
        for port in ports:
            assert port.startswith("127.0.0.1:") and port.count(":") == 2, f"{name} publishes {port!r}"


def test_kafka_runs_in_kraft_mode_and_redis_keeps_an_aof(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert not any("zookeeper" in name for name in services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    assert kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    redis = services["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert {"prometheus", "grafana"} <= set(services)
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]


def test_dockerfile_installs_the_package_on_python_slim() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    [base] = [line for line in lines if line.startswith("FROM ")]
    assert re.fullmatch(r"FROM python:3\.1[1-9]-slim", base)
    copied = {line.split()[1] for line in lines if line.startswith("COPY ")}
    # What the code reads at run time besides its packages.
    assert {"pyproject.toml", "touchstream", "services", "schemas", "deploy/rules"} <= copied
    assert any(re.match(r"RUN pip install (-e )?\.", line) for line in lines)
    assert any(line.startswith("USER ") and "root" not in line for line in lines)


def test_make_up_and_down_drive_compose() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^up:.*## ", makefile, re.M) and re.search(r"^down:.*## ", makefile, re.M)
    assert "docker compose up" in makefile and "docker compose down" in makefile
