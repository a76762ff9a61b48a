"""The durable session: the event log is the one source of truth; the rest is derived from it."""

from django.db import models
from django.db.models import Q

from sessions_app import event_types as et
from sessions_app.ids import new_connection_id, new_session_id


class Session(models.Model):
    STATUS_CHOICES = [(s, s.replace("_", " ")) for s in et.SESSION_STATUSES]

    id = models.CharField(primary_key=True, max_length=40, default=new_session_id, editable=False)
    title = models.CharField(max_length=200, blank=True, default="")
    metadata = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=20, choices=STATUS_CHOICES, default=et.STATUS_ACTIVE)
    # Who holds the session while a human has it: {"kind": "operator", "id": …, "name": …}.
    controller = models.JSONField(null=True, blank=True)
    # Highest allocated seq; the one counter every append increments under the row lock.
    last_seq = models.BigIntegerField(default=0)
    # Retention: the message.append/update events of every message created at or before this
    # seq were folded into the message's create event (`compact_sessions`). A resume from inside
    # (0, compacted_through) starts with a snapshot of the messages as of compacted_through.
    compacted_through = models.BigIntegerField(default=0)
    created_by = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "updated_at"])]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"


class Event(models.Model):
    VISIBILITY_CHOICES = [(v, v) for v in et.VISIBILITIES]

    id = models.CharField(primary_key=True, max_length=40, editable=False)
    # No index of its own: `event_session_seq_unique` starts with it and serves every lookup by
    # session; a second index only cost each insert another page write.
    session = models.ForeignKey(
        Session, on_delete=models.CASCADE, related_name="events", db_index=False
    )
    seq = models.BigIntegerField()
    type = models.CharField(max_length=100)
    message_id = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    author_kind = models.CharField(max_length=16)
    author_id = models.CharField(max_length=150)
    author_name = models.CharField(max_length=150, blank=True, default="")
    data = models.JSONField(default=dict)
    visibility = models.CharField(
        max_length=16, choices=VISIBILITY_CHOICES, default=et.VISIBILITY_ALL
    )
    client_ref = models.CharField(max_length=100, null=True, blank=True)  # noqa: DJ001
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["session", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["session", "seq"], name="event_session_seq_unique"),
            models.UniqueConstraint(
                fields=["session", "author_kind", "author_id", "client_ref"],
                condition=Q(client_ref__isnull=False),
                name="event_client_ref_unique",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.session_id}#{self.seq} {self.type}"


class Message(models.Model):
    """Materialized state of one message_id, updated in the transaction of the event changing it."""

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="messages")
    message_id = models.CharField(max_length=64)
    role = models.CharField(max_length=16)
    author_kind = models.CharField(max_length=16)
    author_id = models.CharField(max_length=150)
    author_name = models.CharField(max_length=150, blank=True, default="")
    content = models.TextField(blank=True, default="")
    parts = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=16, default=et.MESSAGE_STREAMING)
    reason = models.CharField(max_length=200, blank=True, default="")
    version = models.IntegerField(default=1)
    created_seq = models.BigIntegerField()
    last_seq = models.BigIntegerField()
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["session", "created_seq"]
        constraints = [
            models.UniqueConstraint(
                fields=["session", "message_id"], name="message_session_id_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{self.message_id} ({self.role}, {self.status})"


class Worker(models.Model):
    """One server process; its heartbeat lets survivors reap the connections of a dead one."""

    id = models.CharField(primary_key=True, max_length=40)
    hostname = models.CharField(max_length=200, blank=True, default="")
    pid = models.IntegerField(default=0)
    started_at = models.DateTimeField(auto_now_add=True)
    heartbeat_at = models.DateTimeField()
    # Its hub's channel-layer channel ("" on the in-memory layer): where other workers hand
    # publishes for it to commit when it is the committing worker.
    channel = models.CharField(max_length=200, blank=True, default="")

    def __str__(self) -> str:
        return f"{self.id} pid={self.pid}"


class Connection(models.Model):
    """One attached WebSocket (one device); presence is the set of client_ids with open ones."""

    id = models.CharField(
        primary_key=True, max_length=40, default=new_connection_id, editable=False
    )
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="connections")
    client_id = models.CharField(max_length=150)
    kind = models.CharField(max_length=16)
    name = models.CharField(max_length=150, blank=True, default="")
    counts_for_presence = models.BooleanField(default=True)
    worker_id = models.CharField(max_length=40, db_index=True)
    after = models.BigIntegerField(default=0)
    replayed = models.IntegerField(default=0)
    last_received_seq = models.BigIntegerField(null=True, blank=True)
    last_received_at = models.DateTimeField(null=True, blank=True)
    user_agent = models.CharField(max_length=300, blank=True, default="")
    opened_at = models.DateTimeField()
    closed_at = models.DateTimeField(null=True, blank=True)
    close_code = models.IntegerField(null=True, blank=True)
    close_reason = models.CharField(max_length=16, blank=True, default="")

    class Meta:
        ordering = ["-opened_at"]
        indexes = [models.Index(fields=["session", "closed_at"])]

    def __str__(self) -> str:
        return f"{self.id} {self.client_id}"


class PresenceLease(models.Model):
    """Presence for REST-only agents: a member until `expires_at` unless renewed."""

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="leases")
    client_id = models.CharField(max_length=150)
    kind = models.CharField(max_length=16)
    name = models.CharField(max_length=150, blank=True, default="")
    state = models.JSONField(null=True, blank=True)
    since = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["session", "client_id"], name="lease_unique")
        ]

    def __str__(self) -> str:
        return f"{self.client_id} until {self.expires_at}"


class AgentKey(models.Model):
    """An agent's API key; only its SHA-256 is stored (keys are 256-bit random, no KDF needed)."""

    name = models.CharField(max_length=100, unique=True)
    prefix = models.CharField(max_length=16)
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"
