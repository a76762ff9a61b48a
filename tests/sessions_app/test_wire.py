"""The wire shapes' building blocks."""

from datetime import UTC, datetime

from sessions_app.wire import format_ts


def test_timestamps_are_utc_with_milliseconds_and_each_is_its_own():
    first = datetime(2026, 11, 29, 5, 4, 38, 123456, tzinfo=UTC)
    second = datetime(2026, 11, 29, 5, 4, 38, 124999, tzinfo=UTC)
    assert format_ts(first) == "2026-11-29T05:04:38.123Z"
    assert format_ts(first) == "2026-11-29T05:04:38.123Z"  # a batch's events share one
    assert format_ts(second) == "2026-11-29T05:04:38.124Z"
    assert format_ts(first.replace(second=39)) == "2026-11-29T05:04:39.123Z"
