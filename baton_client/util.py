"""Small pure helpers: ids, glob filters, backoff."""

from __future__ import annotations

import fnmatch
import random
import uuid
from collections.abc import Iterable, Iterator


def new_client_ref() -> str:
    """A publish idempotency key: unique per publish, kept across re-sends of that publish."""
    return f"cr_{uuid.uuid4().hex}"


def new_message_id() -> str:
    """Message ids are chosen client-side so a re-sent `message.create` names the same message."""
    return f"msg_{uuid.uuid4().hex}"


def type_matches(event_type: str, patterns: Iterable[str] | None) -> bool:
    """Glob match (`message.*`) the way the server filters `types`; None matches everything."""
    if patterns is None:
        return True
    return any(fnmatch.fnmatchcase(event_type, p) for p in patterns)


def backoff_delays(
    base: float = 0.25, maximum: float = 10.0, factor: float = 2.0
) -> Iterator[float]:
    """Exponential backoff, jittered between half and all of each step, so clients that lost
    the same server do not all come back in the same instant."""
    attempt = 0
    while True:
        ceiling = min(maximum, base * factor**attempt)
        yield random.uniform(ceiling / 2, ceiling)
        attempt += 1
