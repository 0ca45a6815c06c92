"""UTC timestamps in ISO 8601 and dstack's relative rendering (`11 mins ago`).

Written to the millisecond with a `Z` suffix, `2026-12-03T18:20:01.123Z` (dstack's JSON gives
its times in UTC with a `Z` too, to the microsecond); read in any ISO 8601 form, so the
whole-second values of older state files (`2026-12-03T18:20:01Z`) still parse.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone


def iso_utc(moment: datetime) -> str:
    """`moment` as `2026-12-03T18:20:01.123Z` (the millisecond truncated)."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> str:
    return iso_utc(datetime.now(timezone.utc))


def utc_at(epoch: float) -> str:
    """A Unix time as `iso_utc` writes it, rounded up to the millisecond: read back, it is never
    earlier than `epoch` (a delay counted from it does not end early)."""
    milliseconds = math.ceil(epoch * 1000)
    whole = datetime.fromtimestamp(milliseconds // 1000, timezone.utc)
    return iso_utc(whole + timedelta(milliseconds=milliseconds % 1000))


def parse_utc(text: str) -> datetime:
    """A time this module wrote, in any resolution; one without an offset is taken as UTC."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def ago(text: str | None, now: datetime | None = None) -> str:
    """dstack's SUBMITTED column: `now`, `12 sec ago`, `1 min ago`, `11 mins ago`, `1 hour ago`."""
    if not text:
        return ""
    seconds = int(((now or datetime.now(timezone.utc)) - parse_utc(text)).total_seconds())
    if seconds < 5:
        return "now"
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "min")):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return f"{seconds} sec ago"
