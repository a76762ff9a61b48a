"""Handover records: one row per request for a human, for the console's queue and the audit."""

from django.conf import settings
from django.db import models

from sessions_app.models import Session


class Handover(models.Model):
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="handovers")
    reason = models.CharField(max_length=500, blank=True, default="")
    summary = models.TextField(blank=True, default="")
    requested_by = models.JSONField(default=dict)
    requested_at = models.DateTimeField()
    requested_seq = models.BigIntegerField()
    claimed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    claimed_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=20, blank=True, default="")

    class Meta:
        ordering = ["requested_at"]
        permissions = [("operate", "Can operate the handover console")]

    def __str__(self) -> str:
        return f"{self.session_id} requested {self.requested_at:%Y-%m-%d %H:%M}"
