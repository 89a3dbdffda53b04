"""What an event means to touchstream, read from its name: an order, a refund, a complaint, feedback, a
consent statement or an unsubscribe, or just a name rules may match.

Upstream SDKs send names, not meanings: Segment's and RudderStack's specs call a purchase `Order
Completed` with its amount in `properties.total`. This table turns such names into touchstream's
fields (`order`, `feedback`, `consent` of a TouchpointEvent) at ingest, so unchanged SDKs feed the
scores and rules, and it tells `touchstream rules validate` which event names exist. The defaults
cover the specs' names; a YAML file (`TOUCHSTREAM_EVENT_SEMANTICS_FILE`) adds names, changes a
meaning or the property names read, and can drop the defaults. Names are matched whatever their
case, spaces, underscores or hyphens (`order_completed` is `Order Completed`).

Pure, apart from `load_event_semantics` reading one file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from touchstream.yaml_lines import node_position, yaml_error_position

MAX_EVENT_NAME_CHARS = 200


class Meaning(StrEnum):
    """What an event name stands for."""

    ORDER = "order"  # a purchase: order.amount from the properties
    REFUND = "refund"  # money back: a negative order
    COMPLAINT = "complaint"
    FEEDBACK = "feedback"  # a rating; a complaint when at or below the name's threshold
    CONSENT = "consent"  # the categories the customer consents to now
    UNSUBSCRIBE = "unsubscribe"  # withdraws some categories, the rest stands
    KNOWN = "known"  # a name rules may match that carries none of the meanings above


@dataclass(frozen=True)
class EventMeaning:
    """One row of the table: an event name (as written in it) and its meaning."""

    name: str
    meaning: Meaning
    # feedback: a rating at or below this is a complaint (None: never).
    complaint_at_or_below: float | None = None
    # unsubscribe: the consent categories withdrawn when the event names none itself.
    withdraws: tuple[str, ...] = ()


@dataclass(frozen=True)
class PropertyNames:
    """Which `properties` keys hold what, tried in order (the first one present wins)."""

    amount: tuple[str, ...] = ("total", "revenue")
    currency: tuple[str, ...] = ("currency",)
    order_id: tuple[str, ...] = ("order_id",)
    items: tuple[str, ...] = ("products",)
    rating: tuple[str, ...] = ("rating",)
    text: tuple[str, ...] = ("text", "comment", "review_body", "message")
    categories: tuple[str, ...] = ("categories",)


@lru_cache(maxsize=4096)  # ingest looks a name up per event, and names repeat
def normalised_event_name(name: str) -> str:
    """Return the form names are compared in: case, spaces, underscores and hyphens do not matter.

    >>> normalised_event_name("  Order_Completed "), normalised_event_name("order-completed")
    ('order completed', 'order completed')
    """
    return " ".join(re.split(r"[\s_\-]+", name.strip().casefold())).strip()


@dataclass(frozen=True)
class EventSemantics:
    """The table in use: meanings by normalised name, and where properties are read."""

    by_name: Mapping[str, EventMeaning] = field(default_factory=dict)
    properties: PropertyNames = PropertyNames()

    def meaning_of(self, name: str | None) -> EventMeaning | None:
        """Return the row of event `name`, or None when the table does not know it.

        >>> default_event_semantics().meaning_of("order_completed").meaning
        <Meaning.ORDER: 'order'>
        """
        if not name:
            return None
        return self.by_name.get(normalised_event_name(name))

    def names(self) -> list[str]:
        """Return every name in the table, as written in it, sorted."""
        return sorted(row.name for row in self.by_name.values())


def _rows(meaning: Meaning, names: Iterable[str], **options: Any) -> list[EventMeaning]:
    return [EventMeaning(name, meaning, **options) for name in names]


# Segment's specs (e-commerce v2, email, B2B SaaS, mobile) and RudderStack's, which use the same
# names; then the CRM names touchstream's own rules and console use. Marketing categories
# withdrawn by an e-mail unsubscribe: the e-mail channel and marketing in general, the category
# the shipped rules ask for.
_DEFAULT_ROWS: tuple[EventMeaning, ...] = (
    *_rows(Meaning.ORDER, ["Order Completed", "Order Placed", "Checkout Completed", "Purchase"]),
    *_rows(Meaning.REFUND, ["Order Refunded"]),
    *_rows(Meaning.COMPLAINT, ["Complaint Submitted", "Complaint"]),
    *_rows(Meaning.FEEDBACK, ["Feedback Submitted", "Product Reviewed"], complaint_at_or_below=2.0),
    *_rows(Meaning.CONSENT, ["Segment Consent Preference Updated", "Consent Updated"]),
    *_rows(Meaning.UNSUBSCRIBE, ["Unsubscribed", "Email Unsubscribed", "Email Marked as Spam"],
           withdraws=("email", "marketing")),
    *_rows(Meaning.KNOWN, [
        # e-commerce v2
        "Products Searched", "Product List Viewed", "Product List Filtered", "Promotion Viewed",
        "Promotion Clicked", "Product Clicked", "Product Viewed", "Product Added", "Product Removed",
        "Cart Viewed", "Checkout Started", "Checkout Step Viewed", "Checkout Step Completed",
        "Payment Info Entered", "Order Updated", "Order Cancelled", "Coupon Entered", "Coupon Applied",
        "Coupon Denied", "Coupon Removed", "Product Added to Wishlist", "Product Removed from Wishlist",
        "Wishlist Product Added to Cart", "Product Shared", "Cart Shared",
        # email
        "Email Bounced", "Email Delivered", "Email Link Clicked", "Email Opened",
        # B2B SaaS
        "Signed Up", "Signed In", "Signed Out", "Account Created", "Account Deleted", "Invite Sent",
        "Account Added User", "Account Removed User", "Trial Started", "Trial Ended",
        # mobile
        "Application Installed", "Application Opened", "Application Updated", "Application Backgrounded",
        "Application Crashed", "Application Uninstalled", "Install Attributed", "Push Notification Received",
        "Push Notification Tapped", "Push Notification Bounced", "Deep Link Opened", "Deep Link Clicked",
        # CRM and service desk
        "Birthday", "Complaint Answered", "Complaint Resolved", "Ticket Resolved", "Ticket Closed",
        "Case Closed",
    ]),
)


def default_event_semantics() -> EventSemantics:
    """Return the shipped table (Segment's and RudderStack's spec names, touchstream's CRM names)."""
    return EventSemantics({normalised_event_name(row.name): row for row in _DEFAULT_ROWS}, PropertyNames())


class EventSemanticsError(ValueError):
    """A semantics file that cannot be used; `problems` are `source:line:column: message` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_FILE_KEYS = {"replace_defaults", "events", "properties"}
_ROW_KEYS = {"meaning", "complaint_at_or_below", "withdraws"}


def parse_event_semantics(text: str, source: str = "events", base: EventSemantics | None = None) -> EventSemantics:
    """Return `base` (the defaults) with a semantics file's YAML `text` applied; raise EventSemanticsError
    listing every problem with its line.

    >>> table = parse_event_semantics('''
    ... events:
    ...   Ticket Opened: complaint
    ...   NPS Answered: {meaning: feedback, complaint_at_or_below: 6}
    ... properties:
    ...   rating: [score, rating]
    ... ''')
    >>> table.meaning_of("ticket opened").meaning, table.meaning_of("NPS Answered").complaint_at_or_below
    (<Meaning.COMPLAINT: 'complaint'>, 6.0)
    >>> table.properties.rating, table.meaning_of("Order Completed").meaning
    (('score', 'rating'), <Meaning.ORDER: 'order'>)
    >>> parse_event_semantics("events:\\n  Ticket Opened: grumble\\n", "f.yaml")
    Traceback (most recent call last):
    ...
    touchstream.event_semantics.EventSemanticsError: f.yaml:2:18: events.Ticket Opened: unknown meaning 'grumble'; \
use one of order, refund, complaint, feedback, consent, unsubscribe, known
    """
    base = default_event_semantics() if base is None else base
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise EventSemanticsError([f"{source}:{yaml_error_position(exc)}: not valid YAML: "
                                   f"{getattr(exc, 'problem', None) or exc}"]) from None
    problems: list[str] = []

    def problem(path: list[Any], message: str) -> None:
        line, column = node_position(root, path)
        where = ".".join(str(p) for p in path)
        problems.append(f"{source}:{line}:{column}: {where + ': ' if where else ''}{message}")

    if document is None:
        return base
    if not isinstance(document, Mapping):
        raise EventSemanticsError([f"{source}:1:1: expected a mapping with 'events' and/or 'properties'"])
    for key in sorted(set(map(str, document)) - _FILE_KEYS):
        problem([key], f"unknown field; use {', '.join(sorted(_FILE_KEYS))}")
    replace_defaults = document.get("replace_defaults", False)
    if not isinstance(replace_defaults, bool):
        problem(["replace_defaults"], "must be true or false")
    rows = {} if replace_defaults is True else dict(base.by_name)
    events = document.get("events") or {}
    if not isinstance(events, Mapping):
        problem(["events"], "must map event names to meanings")
        events = {}
    spelled: dict[str, str] = {}
    for name, raw in events.items():
        row = _parse_row(name, raw, lambda message, n=name: problem(["events", n], message))
        if row is None:
            continue
        key = normalised_event_name(row.name)
        if key in spelled:
            problem(["events", name], f"names the same event as {spelled[key]!r} (case, spaces, _ and - do not "
                                      "count)")
            continue
        spelled[key] = row.name
        rows[key] = row
    properties = _parse_properties(document.get("properties") or {}, base.properties,
                                   lambda path, message: problem(["properties", *path], message))
    if problems:
        raise EventSemanticsError(problems)
    return EventSemantics(rows, properties)


def _parse_row(name: Any, raw: Any, problem: Any) -> EventMeaning | None:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_EVENT_NAME_CHARS:
        problem(f"an event name must be text of 1 to {MAX_EVENT_NAME_CHARS} characters")
        return None
    options: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {"meaning": raw}
    unknown = sorted(set(map(str, options)) - _ROW_KEYS)
    if unknown:
        problem(f"unknown field(s) {', '.join(unknown)}; use {', '.join(sorted(_ROW_KEYS))}")
        return None
    meaning_text = options.get("meaning")
    if meaning_text not in set(Meaning):
        problem(f"unknown meaning {meaning_text!r}; use one of {', '.join(m.value for m in Meaning)}")
        return None
    meaning = Meaning(meaning_text)
    threshold = options.get("complaint_at_or_below")
    if threshold is not None and (meaning is not Meaning.FEEDBACK or isinstance(threshold, bool)
                                  or not isinstance(threshold, int | float)):
        problem("complaint_at_or_below is a number, and only for meaning feedback")
        return None
    withdraws = options.get("withdraws", ())
    if withdraws and meaning is not Meaning.UNSUBSCRIBE:
        problem("withdraws is only for meaning unsubscribe")
        return None
    if not isinstance(withdraws, list | tuple) or not all(isinstance(c, str) and c.strip() for c in withdraws):
        problem("withdraws must be a list of consent category names")
        return None
    return EventMeaning(name.strip(), meaning, None if threshold is None else float(threshold),
                        tuple(c.strip() for c in withdraws))


def _parse_properties(raw: Any, base: PropertyNames, problem: Any) -> PropertyNames:
    if not isinstance(raw, Mapping):
        problem([], "must map amount, currency, ... to lists of property names")
        return base
    known = [f.name for f in fields(PropertyNames)]
    changes: dict[str, tuple[str, ...]] = {}
    for key, names in raw.items():
        if key not in known:
            problem([key], f"unknown property role; use {', '.join(known)}")
        elif isinstance(names, str):
            changes[key] = (names,)
        elif isinstance(names, list) and names and all(isinstance(n, str) and n for n in names):
            changes[key] = tuple(names)
        else:
            problem([key], "must be a property name or a non-empty list of them")
    return replace(base, **changes)


def load_event_semantics(path: Path | None) -> EventSemantics:
    """Return the defaults with the file at `path` applied (the defaults alone when `path` is None)."""
    if path is None:
        return default_event_semantics()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EventSemanticsError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    return parse_event_semantics(text, str(path))
