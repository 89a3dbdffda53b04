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
