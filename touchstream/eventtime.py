"""Bounds on event time: how far past its receive time an event may be stamped, and the most a
watermark may run ahead of the wall clock. Pure: callers pass the clock's reading.

An event time is the client's claim; one stamped years ahead (a typo, seconds sent as
milliseconds) would drag every forward-only watermark along, so the pipeline refuses such events
where they enter it and caps every watermark at `event_time_ceiling_ms`.
"""

from __future__ import annotations

# CoreSettings.event_time_tolerance_s's default, for the services' constructors too.
DEFAULT_EVENT_TIME_TOLERANCE_S = 300.0
# Event times are epoch milliseconds; TTLs and settings in days are seconds. Defined once here.
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
DAY_S = 86_400


def event_time_ceiling_ms(now_ms: int, tolerance_s: float) -> int:
    """Return the latest event time accepted at wall-clock time `now_ms`.

    >>> event_time_ceiling_ms(1_000_000, 300)
    1300000
    """
    return now_ms + round(tolerance_s * 1000)


def capped_watermark(candidate_ms: int, now_ms: int, tolerance_s: float) -> int:
    """Return `candidate_ms`, or the ceiling if it lies beyond it (a watermark poisoned earlier is pulled back too).

    >>> capped_watermark(4_070_908_800_000, 1_000_000, 300), capped_watermark(900_000, 1_000_000, 300)
    (1300000, 900000)
    """
    return min(candidate_ms, event_time_ceiling_ms(now_ms, tolerance_s))


def too_far_ahead(event_time_ms: int, received_at_ms: int, tolerance_s: float) -> str | None:
    """Say why an event stamped `event_time_ms`, received at `received_at_ms`, is refused; None if it is not.

    >>> too_far_ahead(1_000_000 + 301_000, 1_000_000, 300)
    'is 301 s after the time it was received; at most 300 s is accepted (event_time_tolerance_s)'
    >>> too_far_ahead(1_000_000 + 300_000, 1_000_000, 300) is None
    True
    """
    if event_time_ms <= event_time_ceiling_ms(received_at_ms, tolerance_s):
        return None
    ahead_s = (event_time_ms - received_at_ms) // 1000
    return (f"is {ahead_s} s after the time it was received; at most {tolerance_s:g} s is accepted "
            "(event_time_tolerance_s)")
