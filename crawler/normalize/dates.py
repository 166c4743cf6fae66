"""Source timestamps."""

from __future__ import annotations

from datetime import UTC, datetime


def parse_datetime(value: object) -> datetime | None:
    """ISO-8601 (``2023-05-05T06:46:05.656Z``) → aware UTC datetime; ``None`` when absent or malformed."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip().replace("Z", "+00:00")
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
