"""Public datasets the demo and benchmarks replay, read from the packages that ship them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Purchase:
    customer: str
    date: str  # YYYYMMDD
    quantity: int
    amount: float
    line: int

    @cached_property
    def timestamp_ms(self) -> int:
        # CDNOW has day resolution; spread a day's lines over its seconds so order is stable.
        return _day_start_ms(self.date) + 12 * 3600 * 1000 + self.line % 86_400


@lru_cache(maxsize=4096)
def _day_start_ms(date: str) -> int:
    """Midnight UTC of a YYYYMMDD day, parsed once per day (CDNOW's 70k lines fall on ~550 days; the
    benchmarks and tests read every purchase's time several times).

    >>> _day_start_ms("19700102")
    86400000
    """
    return int(datetime.strptime(date, "%Y%m%d").replace(tzinfo=UTC).timestamp() * 1000)


def cdnow_path() -> Path:
    """Return the CDNOW master file inside the installed `lifetimes` package."""
    import lifetimes.datasets

    path = Path(lifetimes.datasets.__file__).parent / "CDNOW_master.txt"
    if not path.exists():
        raise FileNotFoundError(f"lifetimes is installed but has no CDNOW_master.txt at {path}")
    return path


def parse_cdnow_line(line: str, number: int) -> Purchase | None:
    """Parse one CDNOW line (customer, YYYYMMDD, CDs bought, dollars); None for blank and header lines.

    >>> parse_cdnow_line("   00001 19970101  1  11.77", 0)
    Purchase(customer='00001', date='19970101', quantity=1, amount=11.77, line=0)
    """
    parts = line.split()
    if not parts or parts[0] == "customer_id":
        return None
    if len(parts) != 4:
        raise ValueError(f"CDNOW line {number + 1}: expected 4 columns, got {len(parts)}")
    customer, date, quantity, amount = parts
    return Purchase(customer, date, int(quantity), float(amount), number)


def cdnow_purchases(path: Path | None = None) -> list[Purchase]:
    """All CDNOW purchases in event-time order."""
    with open(path or cdnow_path()) as handle:
        purchases = [p for n, line in enumerate(handle) if (p := parse_cdnow_line(line, n)) is not None]
    purchases.sort(key=lambda p: (p.timestamp_ms, p.line))
    return purchases


def purchase_to_track_call(purchase: Purchase) -> dict[str, Any]:
    """Turn a purchase into a Segment-style track call as an upstream shop would send it."""
    return {
        "type": "track",
        "event": "Order Completed",
        "messageId": f"cdnow-{purchase.line}",
        "userId": f"cdnow-{purchase.customer}",
        "timestamp": datetime.fromtimestamp(purchase.timestamp_ms / 1000, UTC).isoformat(),
        "channel": "web",
        "order": {"order_id": f"cdnow-{purchase.line}", "amount": purchase.amount, "currency": "USD",
                  "items": [{"sku": "cd", "quantity": purchase.quantity}]},
    }


def iter_track_calls(purchases: list[Purchase]) -> Iterator[tuple[int, dict[str, Any]]]:
    for purchase in purchases:
        yield purchase.timestamp_ms, purchase_to_track_call(purchase)
