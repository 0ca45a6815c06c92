"""UTC timestamps in ISO 8601 and dstack's relative rendering (`11 mins ago`)."""

from __future__ import annotations

from datetime import datetime, timezone


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


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
