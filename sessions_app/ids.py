"""Prefixed random identifiers (`ses_…`, `evt_…`), safe in URLs and channel-layer group names."""

import secrets


def new_id(prefix: str, nbytes: int = 12) -> str:
    return f"{prefix}_{secrets.token_hex(nbytes)}"


def new_session_id() -> str:
    return new_id("ses")


def new_event_id() -> str:
    return new_id("evt")


def new_message_id() -> str:
    return new_id("msg")


def new_connection_id() -> str:
    return new_id("conn")


def new_worker_id() -> str:
    return new_id("wrk", 8)
