"""The Apache Kafka version is pinned once (deploy/kafka/pom.xml): compose runs the same one."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
POM_NS = {"m": "http://maven.apache.org/POM/4.0.0"}


def pinned_kafka_version() -> str:
    version = ET.parse(ROOT / "deploy" / "kafka" / "pom.xml").find("m:properties/m:kafka.version", POM_NS)
    assert version is not None and version.text
    return version.text.strip()


def test_compose_runs_the_kafka_version_the_embedded_broker_runs() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    images = {service["image"] for service in compose["services"].values() if "image" in service}
    kafka = [image for image in images if image.startswith("apache/kafka:")]
    assert kafka == [f"apache/kafka:{pinned_kafka_version()}"]


def test_the_pinned_version_is_a_3x_release() -> None:
    # Kafka 4.x removed protocol versions aiokafka and Faust still send (README, "Running it locally").
    assert re.fullmatch(r"3\.\d+\.\d+", pinned_kafka_version())
