"""Identity resolution rules without Redis or a broker."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from services.identity.domain import (
    GraphLayout,
    GraphRules,
    IdentityMerged,
    MergeRefused,
    Resolution,
    identity_merge_record,
    lookup_identifier,
    new_customer_id,
    parse_resolution,
    prepare_identifiers,
    refusal_log_lines,
    rejection_reason,
    resolution_request,
    resolved_touchpoint_record,
    script_call,
)
from services.identity.metrics import IdentityMetrics
from touchstream import avro
from touchstream.identifiers import DEFAULT_BLOCKLIST, Identifier, InvalidIdentifier, normalise, pseudonymise

KEY = b"test-key"


def touchpoint(*identifiers: tuple[str, str], message_id: str = "msg-1") -> dict[str, object]:
    return {
        "message_id": message_id,
        "type": "track",
        "event": "Order Completed",
        "channel": "web",
        "source": "shop",
        "timestamp_ms": 1_700_000_000_000,
        "received_at_ms": 1_700_000_000_500,
        "identifiers": [{"type": kind, "value": value} for kind, value in identifiers],
        "order": None,
        "feedback": None,
        "consent": [],
        "properties_json": None,
    }


def prepare(*identifiers: tuple[str, str]) -> tuple[Identifier, ...]:
    raw = [{"type": kind, "value": value} for kind, value in identifiers]
    return prepare_identifiers(raw, KEY, "US", DEFAULT_BLOCKLIST).hashed


def test_spellings_of_one_email_hash_to_one_identifier() -> None:
    hashed = prepare(("email", "John.Doe@gmail.com"), ("email", " johndoe+promo@GMAIL.com"))

    assert hashed == (pseudonymise(Identifier("email", "johndoe@gmail.com"), KEY),)


def test_no_clear_value_survives_preparation() -> None:
    hashed = prepare(("email", "ann@example.org"), ("phone", "(415) 555-2671"))

    assert all(len(i.value) == 64 and "@" not in i.value and "415" not in i.value for i in hashed)


def test_rejected_identifiers_are_reported_by_type_and_reason_only() -> None:
    prepared = prepare_identifiers(
        [{"type": "email", "value": "test@test.com"}, {"type": "phone", "value": "12"},
         {"type": "shoe_size", "value": " "}, {"type": "user_id", "value": "42"}],
        KEY, "US", DEFAULT_BLOCKLIST,
    )

    assert [i.type for i in prepared.hashed] == ["user_id"]
    assert {(r.type_label, r.reason) for r in prepared.rejected} == {
        ("email", "blocklisted"), ("phone", "malformed"), ("other", "empty"),
    }


def test_rejection_reasons_follow_the_core_messages() -> None:
    def reason(kind: str, value: str) -> str:
        try:
            normalise(Identifier(kind, value))
        except InvalidIdentifier as exc:
            return rejection_reason(exc)
        raise AssertionError("expected a rejection")

    assert (reason("email", "unknown@x"), reason("device_id", "unknown"), reason("email", "")) == (
        "malformed", "blocklisted", "empty",
    )


def test_new_customer_id_comes_from_the_most_stable_identifier_whatever_the_order() -> None:
    one = prepare(("device_id", "d1"), ("email", "a@b.co"), ("user_id", "42"))
    other = prepare(("user_id", "42"), ("device_id", "d9"))

    assert new_customer_id(one) == new_customer_id(other) == new_customer_id(tuple(reversed(one)))
    assert new_customer_id(one).startswith("c_") and len(new_customer_id(one)) == 26


def test_script_call_pairs_each_identifier_key_with_its_reference() -> None:
    hashed = prepare(("email", "a@b.co"), ("user_id", "42"))
    request = resolution_request(touchpoint(), hashed, "touchpoints.raw:1:42")

    rules = GraphRules(frozenset({"wechat_unionid", "user_id"}), {"user_id": 1}, 5, 3)
    keys, args = script_call(request, GraphLayout("p:"), rules, 60)

    refs = [f"{i.type}:{i.value}" for i in hashed]
    assert keys == [f"p:ident:{ref}" for ref in refs]
    assert args == ["p:", rules.to_json(), "msg-1", "1700000000000", "60", "touchpoints.raw:1:42",
                    request.new_customer_id, *refs]
    assert json.loads(args[1]) == {"strong": ["user_id", "wechat_unionid"], "limits": {"user_id": 1},
                                   "default_limit": 5, "shared_max": 3}


def test_parse_resolution_reads_merges_with_their_linking_identifiers() -> None:
    answer = json.dumps({
        "customer_id": "c_old", "created": False, "replayed": False,
        "merges": [{"merge_id": "m_1", "merged_id": "c_new", "identifiers": ["email:ab12"]}],
        "refused": [{"customer_id": "c_other", "reason": "conflicting_strong_id"}],
    })

    resolution = parse_resolution(answer)

    assert resolution.merges == (IdentityMerged("m_1", "c_old", "c_new", (Identifier("email", "ab12"),)),)
    assert resolution.refused == (MergeRefused("c_other", "conflicting_strong_id"),)


def test_resolved_touchpoint_carries_hashes_and_keeps_received_at() -> None:
    event = touchpoint(("email", "ann@example.org"), ("email", "unknown"))
    hashed = prepare(("email", "ann@example.org"))
    resolution = Resolution("c_1", True, False, (), ())

    encoded = avro.encode("ResolvedTouchpoint", resolved_touchpoint_record(event, resolution, hashed, 42))

    decoded = avro.decode("ResolvedTouchpoint", encoded)
    assert decoded["customer_id"] == "c_1" and decoded["resolved_at_ms"] == 42
    assert decoded["event"]["received_at_ms"] == 1_700_000_000_500
    assert decoded["event"]["identifiers"] == [{"type": "email", "value": hashed[0].value}]
    assert b"ann@example.org" not in encoded and b"unknown" not in encoded


def test_identity_merge_record_is_valid_avro_naming_its_cause() -> None:
    merge = IdentityMerged("m_1", "c_old", "c_new", (Identifier("email", "ab12"),))

    decoded = avro.decode("IdentityMerge", avro.encode("IdentityMerge", identity_merge_record(merge, touchpoint())))

    assert decoded["caused_by"] == "msg-1" and decoded["reason"] == "shared_identifier"
    assert (decoded["survivor_id"], decoded["merged_id"], decoded["kind"]) == ("c_old", "c_new", "merge")


def test_metrics_count_changes_once_and_replays_apart() -> None:
    metrics = IdentityMetrics(CollectorRegistry())
    merge = IdentityMerged("m_1", "c_old", "c_new", ())
    refusal = MergeRefused("c_x", "conflicting_strong_id")

    metrics.count_resolution(Resolution("c_old", False, False, (merge,), (refusal,)))
    metrics.count_resolution(Resolution("c_old", False, True, (merge,), (refusal,)))
    metrics.count_resolution(Resolution("c_new", True, False, (), ()))

    registry = metrics.service.registry
    assert registry.get_sample_value("touchstream_identity_merges_total") == 1
    assert registry.get_sample_value("touchstream_identity_customers_created_total") == 1
    assert registry.get_sample_value("touchstream_identity_events_replayed_total") == 1
    assert registry.get_sample_value(
        "touchstream_identity_merges_refused_total", {"reason": "conflicting_strong_id"}) == 1


def test_refused_identifiers_are_counted_by_type_and_merges_by_reason() -> None:
    metrics = IdentityMetrics(CollectorRegistry())
    left_off = MergeRefused("", "type_limit", (Identifier("email", "ab12"),))
    tablet = MergeRefused("c_first", "shared_identifier", (Identifier("device_id", "cd34"),))
    probabilistic = IdentityMerged("m_2", "c_old", "c_new", (), reason="probabilistic", score=14.0)

    metrics.count_resolution(Resolution("c_new", True, False, (probabilistic,), (left_off, tablet)))

    registry = metrics.service.registry
    assert registry.get_sample_value(
        "touchstream_identity_identifiers_refused_total", {"type": "email", "reason": "type_limit"}) == 1
    assert registry.get_sample_value(
        "touchstream_identity_merges_refused_total", {"reason": "shared_identifier"}) == 1
    assert registry.get_sample_value("touchstream_identity_merges_refused_total", {"reason": "type_limit"}) == 0
    assert registry.get_sample_value("touchstream_identity_probabilistic_merges_total") == 1


def test_refusal_log_lines_give_the_reason_and_hash_prefixes_only() -> None:
    [email] = prepare(("email", "ann@example.org"))
    resolution = Resolution("c_new", True, False, (), (
        MergeRefused("c_other", "conflicting_strong_id", (email,)), MergeRefused("", "type_limit", (email,))))

    lines = refusal_log_lines("msg-9", resolution)

    assert lines[0] == (f"identity: refused merging c_other into c_new for event msg-9: conflicting_strong_id "
                        f"(via email:{email.value[:12]})")
    assert lines[1].endswith("for event msg-9: type_limit")
    assert all("ann" not in line and email.value not in line for line in lines)


def test_probabilistic_and_unmerge_records_carry_kind_reason_and_score() -> None:
    answer = json.dumps({"customer_id": "c_old", "created": True, "replayed": False, "refused": {}, "merges": [
        {"merge_id": "u_1", "kind": "unmerge", "survivor_id": "c_old", "merged_id": "c_split",
         "reason": "operator", "identifiers": ["email:ab12"]}]})
    [split] = parse_resolution(answer).merges
    probabilistic = IdentityMerged("m_2", "c_old", "c_new", (), reason="probabilistic", score=14.5)

    records = [avro.decode("IdentityMerge", avro.encode("IdentityMerge", identity_merge_record(m, touchpoint())))
               for m in (split, probabilistic)]

    assert [(r["kind"], r["reason"], r["score"]) for r in records] == [
        ("unmerge", "operator", None), ("merge", "probabilistic", 14.5)]
    assert records[0]["identifiers"] == [{"type": "email", "value": "ab12"}]


def test_lookup_hashes_a_clear_identifier_as_the_pipeline_does() -> None:
    [piped] = prepare(("phone", "(415) 555-2671"))

    assert lookup_identifier("phone", "+1 415 555 2671", KEY, "US", DEFAULT_BLOCKLIST) == piped
