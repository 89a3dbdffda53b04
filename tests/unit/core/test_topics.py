"""Names on the broker: TOUCHSTREAM_TOPIC_PREFIX begins every topic, consumer group and Faust app id of a deployment."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from touchstream.metrics import ServiceMetrics
from touchstream.settings import CoreSettings
from touchstream.streams import Readiness, StreamKernel, make_app
from touchstream.topics import ALL_TOPICS, SCORES, TOPIC_PREFIX_SETTING, prefixed, topic_prefix
from touchstream_cli.local import StackState, service_env

CATALOGUE_NAMES = ["touchpoints.raw", "touchpoints.resolved", "identity.merges", "scores", "actions",
                   "actions.deliveries", "deadletter", "customers.deletions"]


def test_without_a_prefix_the_names_are_the_catalogues(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOPIC_PREFIX_SETTING, raising=False)
    assert [spec.name for spec in ALL_TOPICS] == CATALOGUE_NAMES
    assert topic_prefix() == ""


def test_a_prefix_begins_every_topic_and_group_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOPIC_PREFIX_SETTING, "ci-42.")
    assert [spec.name for spec in ALL_TOPICS] == [f"ci-42.{name}" for name in CATALOGUE_NAMES]
    kernel = StreamKernel("scoring", CoreSettings(), (), ServiceMetrics("scoring", CollectorRegistry()), Readiness())
    assert kernel.group_id == "ci-42.touchstream-scoring"
    # Another stack's names, asked for by a tool of this process, are that stack's.
    assert SCORES.name_with("other_") == "other_scores"
    assert prefixed("touchstream-triggers", prefix="") == "touchstream-triggers"


def test_the_faust_app_and_so_its_internal_topics_carry_the_prefix(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.setenv(TOPIC_PREFIX_SETTING, "stack-b-")
    app = make_app("identity", CoreSettings(state_dir=tmp_path), web_port=6066)
    assert app.conf.id == "stack-b-touchstream-identity-worker"


@pytest.mark.parametrize(("prefix", "reason"), [
    ("a b", "' '"), ("tenant/1.", "'/'"), ("café.", "'é'"), ("x" * 151, "151 characters"),
])
def test_a_prefix_kafka_cannot_name_is_refused_naming_the_setting(monkeypatch: pytest.MonkeyPatch, prefix: str,
                                                                  reason: str) -> None:
    with pytest.raises(ValidationError, match=f"{TOPIC_PREFIX_SETTING}.*{reason}"):
        CoreSettings(topic_prefix=prefix)
    monkeypatch.setenv(TOPIC_PREFIX_SETTING, prefix)
    with pytest.raises(ValidationError, match=TOPIC_PREFIX_SETTING):
        CoreSettings()
    with pytest.raises(ValueError, match=f"{TOPIC_PREFIX_SETTING}.*{reason}"):
        _ = SCORES.name


def test_a_local_stack_hands_its_prefix_to_every_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOPIC_PREFIX_SETTING, "the-tests-own.")
    state = StackState(run_dir="/nonexistent", partitions=2, topic_prefix="stack-1.",
                       ports=dict.fromkeys(("broker", "redis", "ingest", "identity", "scoring", "triggers", "console",
                                                 "receiver"), 1))
    assert service_env(state)[TOPIC_PREFIX_SETTING] == "stack-1."
    assert service_env(StackState(run_dir="/nonexistent", partitions=2, ports=state.ports))[TOPIC_PREFIX_SETTING] == ""
