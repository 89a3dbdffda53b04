"""Pure helpers of the ingest app: record keys, partitioning, Basic auth parsing, startup checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools

import pytest
from aiokafka.partitioner import DefaultPartitioner

from services.ingest.app import build_app
from services.ingest.http_api import basic_user
from services.ingest.producer import CachedPartitioner, record_key
from services.ingest.settings import IngestSettings
from touchstream.identifiers import KNOWN_TYPES, Identifier, partition_key, raw_topic_key
from touchstream.settings import CoreSettings


def test_record_key_follows_the_core_partition_key_rule() -> None:
    for kinds in itertools.chain.from_iterable(itertools.combinations(KNOWN_TYPES, n) for n in range(3)):
        identifiers = [{"type": kind, "value": f"v-{kind}"} for kind in kinds]
        expected = partition_key([Identifier(i["type"], i["value"]) for i in identifiers], "m-1")
        assert record_key({"identifiers": identifiers, "message_id": "m-1"}, b"pii-key") == (
            raw_topic_key(expected, b"pii-key"))


def test_record_key_is_a_keyed_hash_that_only_the_first_identifier_decides() -> None:
    ann = [{"type": "email", "value": "ann@example.com"}]
    key = record_key({"identifiers": ann, "message_id": "m-1"}, b"pii-key")
    # An unkeyed sha256 of "email:<clear>" is reversed by hashing a list of e-mails.
    assert key != hashlib.sha256(b"email:ann@example.com").hexdigest().encode()
    assert key == hmac.new(b"pii-key", b"email:ann@example.com", hashlib.sha256).hexdigest().encode()
    assert key != record_key({"identifiers": ann, "message_id": "m-1"}, b"another-key")
    # Same first strong identifier, same key (so the same partition), whatever else the event carries.
    with_device = [*ann, {"type": "device_id", "value": "d-9"}]
    assert record_key({"identifiers": with_device, "message_id": "m-2"}, b"pii-key") == key
    with_user = [{"type": "user_id", "value": "u-1"}, *ann]
    assert record_key({"identifiers": with_user, "message_id": "m-3"}, b"pii-key") == (
        record_key({"identifiers": [{"type": "user_id", "value": "u-1"}], "message_id": "m-4"}, b"pii-key"))


def test_cached_partitioner_agrees_with_kafkas_default() -> None:
    cached = CachedPartitioner(size=50)
    partitions = [0, 1, 2, 3, 4, 5]
    keys = [f"key-{n}".encode() for n in range(200)] * 2  # repeats hit the cache, overflow clears it
    for key in keys:
        assert cached(key, partitions, partitions) == DefaultPartitioner()(key, partitions, partitions)
    assert cached(None, partitions, [3]) == 3


def test_basic_user() -> None:
    assert basic_user("Basic " + base64.b64encode(b"k:secret").decode()) == "k"
    assert basic_user("Basic " + base64.b64encode(b":").decode()) is None
    assert basic_user("Bearer abc") is None
    assert basic_user("Basic !!!") is None
    assert basic_user("Basic " + base64.b64encode(b"\xff:").decode()) is None


@pytest.mark.parametrize("environment", ["prod", "PROD", " Prod "])
def test_prod_refuses_the_dev_write_key(environment: str) -> None:
    with pytest.raises(ValueError, match="dev write key"):
        build_app(CoreSettings(environment=environment, pii_hash_key="real-secret"), IngestSettings())
    build_app(CoreSettings(environment="prod", pii_hash_key="real-secret"), IngestSettings(write_keys={}))
    build_app(CoreSettings(), IngestSettings())
