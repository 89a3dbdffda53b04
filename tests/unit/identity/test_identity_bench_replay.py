"""The FEBRL benchmark sends the service records without their link labels: no rec_id, no soc_sec_id."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd

from touchstream import avro
from touchstream.topics import TOUCHPOINTS_RAW


def _bench_module() -> ModuleType:
    # bench/ is a folder of scripts, not a package: load the benchmark from its file.
    path = Path(__file__).resolve().parents[3] / "bench" / "bench_identity_febrl.py"
    spec = importlib.util.spec_from_file_location("bench_identity_febrl", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _bench_module()
Dataset, Source, TRAITS = bench.Dataset, bench.Source, bench.TRAITS
load_dataset, prepared, touchpoints = bench.load_dataset, bench.prepared, bench.touchpoints

ROWS = [
    ("rec-7-org", "ann", "lee", "12", "main street", "", "canberra", "2600", "act", "19900102", "5304218"),
    ("rec-7-dup-0", "ann", "lea", "12", "main street", "", "canberra", "2606", "act", "19900102", "5304218"),
    ("rec-8-org", "bob", "ng", "3", "high street", "unit 2", "sydney", "2000", "nsw", "19700305", "4066625"),
]


def frame(index: list[str]) -> pd.DataFrame:
    columns = ["given_name", "surname", "street_number", "address_1", "address_2", "suburb", "postcode", "state",
               "date_of_birth", "soc_sec_id"]
    return pd.DataFrame([row[1:] for row in ROWS], index=pd.Index(index, name="rec_id"), columns=columns)


def dataset(index: list[str]) -> bench.Dataset:
    return Dataset("tiny", (Source("a", "crm", frame(index)),), frozenset())


def test_what_is_sent_does_not_depend_on_the_record_labels() -> None:
    labelled = touchpoints(dataset([row[0] for row in ROWS]), shuffle=True)
    relabelled = touchpoints(dataset(["x", "y", "z"]), shuffle=True)

    assert labelled.raws == relabelled.raws  # byte for byte: nothing of rec_id reaches the service
    assert sorted(labelled.record_of.values()) == sorted(f"a:{row[0]}" for row in ROWS)  # kept here, for scoring


def test_no_label_or_social_security_number_is_sent_into_the_service_path() -> None:
    replay = touchpoints(dataset([row[0] for row in ROWS]), shuffle=False)

    for raw in replay.raws:
        event = avro.decode(TOUCHPOINTS_RAW.schema, raw)
        item = prepared(raw, matching=True)
        sent = f"{event} {item}"
        assert "rec-" not in sent and "soc_sec" not in sent
        assert not any(row[-1] in sent for row in ROWS)
        assert item.person is not None
    traits = avro.decode(TOUCHPOINTS_RAW.schema, replay.raws[2])["properties_json"]
    assert set(json.loads(traits)["traits"]) == set(TRAITS)


def test_the_real_febrl_replay_carries_neither_labels_nor_social_security_numbers() -> None:
    data = load_dataset("febrl1")
    replay = touchpoints(data, shuffle=False)
    numbers = set(data.sources[0].frame["soc_sec_id"].dropna())

    sent = b"".join(replay.raws)
    assert b"rec-" not in sent
    assert not any(number.encode() in sent for number in numbers if len(number) >= 7)
    assert len(replay.raws) == data.records == 1000
