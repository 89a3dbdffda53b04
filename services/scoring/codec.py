"""How the store writes a customer's state and silent path, stamped with the path layout they were made with.

A waiting example (`labels.PendingExample`) and a stored silent path hold the customer's
silent path as a plain vector whose meaning is `features.PATH_FIELDS`, position by position.
Reordering, adding or removing a field would make every stored vector mean something else:
learned as if it were the new layout it teaches the model garbage, and a vector of the old
length makes numpy fail on every batch that touches it (a worker that never gets past the
batch). So every stored example and path carries the layout's id (a checksum of the field
names), and what was stored under another layout is dropped on load: a waiting example of
another layout is forgotten (its label is lost, nothing else), a silent path of another
layout is treated as absent (the customer's silent examples stop until its next event
writes a new one).

This module lives beside the store rather than in `state.py`, because it needs the feature
module's layout and the feature module needs the state: the state stays pure and
import-free of features.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import fields
from typing import Any

import numpy as np
import orjson

from services.scoring.features import PATH_FIELDS
from services.scoring.labels import PendingExample
from services.scoring.state import DECAYED_WINDOW_FIELDS, CustomerState, DecayedWindows


def layout_id(path_fields: tuple[str, ...]) -> int:
    """Return the id of a path layout: a checksum of its field names in order.

    >>> layout_id(("a", "b")) == layout_id(("b", "a"))
    False
    """
    return zlib.crc32(",".join(path_fields).encode())


PATH_LAYOUT = layout_id(PATH_FIELDS)
# Examples and paths stored before layouts were stamped were made with this layout (the
# 36 fields of PATH_FIELDS when stamping began); a later layout drops them like any other.
UNSTAMPED_LAYOUT = 710_091_317

_WINDOW_FIELDS = DECAYED_WINDOW_FIELDS
_STATE_FIELDS = tuple(f.name for f in fields(CustomerState))
_KNOWN_FIELDS = frozenset(_STATE_FIELDS)
# A stored path: b"P" + the layout id (uint32, little-endian) + the vector as little-endian float64.
_PATH_MAGIC = b"P"
_PATH_HEADER = struct.Struct("<cI")


# The codec runs for every state a batch loads and saves, so it is written out by hand: no
# dataclasses.fields() per call, no keyword-argument dicts per waiting example.
def state_to_dict(state: CustomerState, layout: int = PATH_LAYOUT) -> dict[str, Any]:
    """Return `state` as plain JSON-ready data, its waiting examples stamped with `layout`."""
    # Written out rather than dataclasses.asdict, whose deep copies were most of a batch's time.
    data = {name: getattr(state, name) for name in _STATE_FIELDS}
    for name in _WINDOW_FIELDS:
        windows = getattr(state, name)
        data[name] = {"values": windows.values, "at_ms": windows.at_ms}
    data["pending"] = [
        {"t_ms": e.t_ms, "due_ms": e.due_ms, "path": e.path, "propensity": e.propensity, "positive": e.positive,
         "purchases": e.purchases, "layout": layout}
        for e in state.pending
    ]
    return data


def state_from_dict(data: dict[str, Any], layout: int = PATH_LAYOUT) -> CustomerState:
    """Rebuild a CustomerState from `state_to_dict` output; fields it lacks take their defaults.

    Waiting examples stored under a path layout other than `layout` are dropped.

    >>> state = CustomerState(purchase_count=2, pending=[PendingExample(1, 2, [1.0], 0.3)])
    >>> state_from_dict(state_to_dict(state)) == state
    True
    >>> state_from_dict(state_to_dict(state, layout=7)).pending
    []
    """
    # Older states carried fields since replaced (e.g. single decayed counts); they are dropped.
    values = {k: v for k, v in data.items() if k in _KNOWN_FIELDS}
    for name in _WINDOW_FIELDS:
        if name in values:
            values[name] = DecayedWindows(**values[name])
    # Examples stored by the 90-day model (model inputs, no path) cannot be learned by this one; they are dropped.
    # JSON has no NaN: a path's missing times were written as null.
    values["pending"] = [
        PendingExample(e["t_ms"], e["due_ms"], [math.nan if v is None else v for v in e["path"]], e["propensity"],
                       e.get("positive", False), e.get("purchases", 0))
        for e in values.get("pending", ())
        if "path" in e and e.get("layout", UNSTAMPED_LAYOUT) == layout
    ]
    return CustomerState(**values)


def encode_path(path: np.ndarray, layout: int = PATH_LAYOUT) -> bytes:
    """Return a silent path as stored: its layout's header, then the vector.

    >>> decode_path(encode_path(np.array([1.0, 2.0]), layout=5), layout=5, width=2)
    array([1., 2.])
    """
    return _PATH_HEADER.pack(_PATH_MAGIC, layout) + np.asarray(path, dtype="<f8").tobytes()


def decode_path(raw: bytes, layout: int = PATH_LAYOUT, width: int = len(PATH_FIELDS)) -> np.ndarray | None:
    """Return the stored path `raw` if it was written under `layout` with `width` fields, else None.

    A path stored before stamping (bare float64s) counts as UNSTAMPED_LAYOUT.

    >>> decode_path(encode_path(np.array([1.0, 2.0]), layout=5), layout=6, width=2) is None
    True
    >>> decode_path(np.array([1.0, 2.0]).tobytes(), layout=UNSTAMPED_LAYOUT, width=2)
    array([1., 2.])
    """
    stored_layout, body = UNSTAMPED_LAYOUT, raw
    if len(raw) % 8 == _PATH_HEADER.size and raw[:1] == _PATH_MAGIC:
        stored_layout = _PATH_HEADER.unpack_from(raw)[1]
        body = raw[_PATH_HEADER.size:]
    if stored_layout != layout or len(body) != 8 * width:
        return None
    return np.frombuffer(body, dtype="<f8")


# The compact state encoding (issue 15: Redis bytes per customer). A JSON object spent a third of a
# new customer's state on field names and its waiting examples' paths as decimal text; this is
# 0x02, the length of a JSON array, the array, then every waiting example's path as little-endian
# float64. The array holds the fields of STATE_POSITIONS by position, then a JSON object of any
# other field (a field added to CustomerState later is kept by name until it is given a position:
# append positions, never reorder them), then the waiting examples as
# [t_ms, due_ms, propensity, positive, purchases, path length, path layout id].
COMPACT_STATE = 2
_COMPACT_HEAD = struct.Struct("<BI")
STATE_POSITIONS = (
    "first_touch_ms", "last_touch_ms", "first_purchase_ms", "last_purchase_ms", "purchase_count", "monetary_total",
    "purchase_times", "complaints", "ratings_count", "ratings_sum", "channel_counts", "touches", "purchases", "spend",
    "complaints_recent", "last_example_day", "last_example_ms", "last_scored_propensity", "last_scored_stage",
    "last_scored_segment", "next_check_ms", "applied_ids", "consent", "consent_at_ms", "time_zone", "time_zone_at_ms",
    "sentiment_sum", "sentiment_count", "sentiment_last", "sentiment_last_ms",
)
_WINDOWS = frozenset(_WINDOW_FIELDS)


def encode_state(state: CustomerState, layout: int = PATH_LAYOUT) -> bytes:
    """Return `state` in the compact encoding (see COMPACT_STATE); `decode_state` reads it back.

    >>> from services.scoring.state import PendingExample
    >>> state = CustomerState(purchase_count=2, pending=[PendingExample(1, 2, [1.0, float("nan")], 0.3)])
    >>> decoded = decode_state(encode_state(state))
    >>> decoded.purchase_count, decoded.pending[0].t_ms, decoded.pending[0].path[0]
    (2, 1, 1.0)
    """
    data = state_to_dict(state, layout)
    pending = data.pop("pending")
    row: list[Any] = []
    for name in STATE_POSITIONS:
        value = data.pop(name)
        row.append([value["values"], value["at_ms"]] if name in _WINDOWS else value)
    row.append(data)  # fields without a position yet, by name
    row.append([[e["t_ms"], e["due_ms"], e["propensity"], e["positive"], e["purchases"], len(e["path"]), e["layout"]]
                for e in pending])
    head = orjson.dumps(row)
    paths = b"".join(np.asarray(e["path"], dtype="<f8").tobytes() for e in pending)
    return _COMPACT_HEAD.pack(COMPACT_STATE, len(head)) + head + paths


def decode_state(raw: bytes, layout: int = PATH_LAYOUT) -> CustomerState:
    """Read a state written by `encode_state`, or the JSON object scoring wrote before it."""
    if raw[:1] != bytes((COMPACT_STATE,)):
        return state_from_dict(orjson.loads(raw), layout)
    _, size = _COMPACT_HEAD.unpack_from(raw)
    start = _COMPACT_HEAD.size
    row = orjson.loads(raw[start:start + size])
    offset = start + size
    data: dict[str, Any] = dict(row[len(STATE_POSITIONS)])
    for name, value in zip(STATE_POSITIONS, row, strict=False):
        data[name] = {"values": value[0], "at_ms": value[1]} if name in _WINDOWS else value
    pending = []
    for t_ms, due_ms, propensity, positive, purchases, length, *stamp in row[len(STATE_POSITIONS) + 1]:
        path = np.frombuffer(raw, dtype="<f8", count=length, offset=offset).tolist()
        offset += length * 8
        pending.append({"t_ms": t_ms, "due_ms": due_ms, "path": path, "propensity": propensity,
                        "positive": positive, "purchases": purchases,
                        "layout": stamp[0] if stamp else UNSTAMPED_LAYOUT})
    data["pending"] = pending
    return state_from_dict(data, layout)
