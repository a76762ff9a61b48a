"""Every event type, visibility, author kind and status Baton knows, in one place."""

from typing import Final

# Messages (materialized into Message rows).
MESSAGE_CREATE: Final = "message.create"
MESSAGE_APPEND: Final = "message.append"
MESSAGE_UPDATE: Final = "message.update"
MESSAGE_COMPLETE: Final = "message.complete"
MESSAGE_TYPES: Final = frozenset({MESSAGE_CREATE, MESSAGE_APPEND, MESSAGE_UPDATE, MESSAGE_COMPLETE})

# Open families: any suffix is allowed.
PROGRESS_PREFIX: Final = "progress."
SIGNAL_PREFIX: Final = "signal."
SIGNAL_CANCEL: Final = "signal.cancel"
SIGNAL_REDIRECT: Final = "signal.redirect"

PRESENCE_ENTER: Final = "presence.enter"
PRESENCE_LEAVE: Final = "presence.leave"
PRESENCE_UPDATE: Final = "presence.update"

HANDOVER_REQUESTED: Final = "handover.requested"
HANDOVER_CLAIMED: Final = "handover.claimed"
HANDOVER_RELEASED: Final = "handover.released"
SESSION_CLOSED: Final = "session.closed"

NOTE_INTERNAL: Final = "note.internal"

CONNECTION_OPENED: Final = "connection.opened"
CONNECTION_RESUMED: Final = "connection.resumed"
CONNECTION_CLOSED: Final = "connection.closed"

# Types only the server itself may append.
SERVER_ONLY_TYPES: Final = frozenset(
    {
        PRESENCE_ENTER,
        PRESENCE_LEAVE,
        PRESENCE_UPDATE,
        HANDOVER_CLAIMED,
        HANDOVER_RELEASED,
        SESSION_CLOSED,
        CONNECTION_OPENED,
        CONNECTION_RESUMED,
        CONNECTION_CLOSED,
    }
)
KNOWN_TYPES: Final = MESSAGE_TYPES | SERVER_ONLY_TYPES | {HANDOVER_REQUESTED, NOTE_INTERNAL}
OPEN_PREFIXES: Final = (PROGRESS_PREFIX, SIGNAL_PREFIX)

# Visibility of an event.
VISIBILITY_ALL: Final = "all"
VISIBILITY_OPERATORS: Final = "operators"
VISIBILITY_DIAGNOSTICS: Final = "diagnostics"
VISIBILITIES: Final = (VISIBILITY_ALL, VISIBILITY_OPERATORS, VISIBILITY_DIAGNOSTICS)

# Author kinds.
KIND_USER: Final = "user"
KIND_AGENT: Final = "agent"
KIND_OPERATOR: Final = "operator"
KIND_SYSTEM: Final = "system"
AUTHOR_KINDS: Final = (KIND_USER, KIND_AGENT, KIND_OPERATOR, KIND_SYSTEM)

# Message roles each author kind may create.
ROLES_BY_KIND: Final = {
    KIND_USER: frozenset({"user"}),
    KIND_AGENT: frozenset({"assistant", "system"}),
    KIND_OPERATOR: frozenset({"operator"}),
    KIND_SYSTEM: frozenset({"system"}),
}
MESSAGE_STREAMING: Final = "streaming"
MESSAGE_COMPLETE_STATUS: Final = "complete"
MESSAGE_FINAL_STATUSES: Final = frozenset({"complete", "cancelled", "failed"})

# Session status.
STATUS_ACTIVE: Final = "active"
STATUS_AWAITING_HUMAN: Final = "awaiting_human"
STATUS_WITH_HUMAN: Final = "with_human"
STATUS_CLOSED: Final = "closed"
SESSION_STATUSES: Final = (STATUS_ACTIVE, STATUS_AWAITING_HUMAN, STATUS_WITH_HUMAN, STATUS_CLOSED)

# presence.leave reasons.
LEAVE_CLOSED: Final = "closed"
LEAVE_LOST: Final = "lost"
LEAVE_TIMEOUT: Final = "timeout"

# Capabilities of a client token.
CAP_SUBSCRIBE: Final = "subscribe"
CAP_PUBLISH: Final = "publish"
CAP_PRESENCE: Final = "presence"
CAPABILITIES: Final = (CAP_SUBSCRIBE, CAP_PUBLISH, CAP_PRESENCE)


def is_known_type(event_type: str) -> bool:
    """A type is known if it is listed or belongs to an open family with a non-empty name."""
    if event_type in KNOWN_TYPES:
        return True
    return any(
        event_type.startswith(prefix) and len(event_type) > len(prefix) for prefix in OPEN_PREFIXES
    )
