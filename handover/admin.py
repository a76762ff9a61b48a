"""Handover records in the admin: an audit of who asked, who claimed, how it ended."""

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from handover.models import Handover


@admin.register(Handover)
class HandoverAdmin(admin.ModelAdmin):
    list_display = ("session", "reason", "requested_at", "claimed_by", "claimed_at", "outcome")
    list_filter = ("outcome", "requested_at", "claimed_by")
    search_fields = ("session__id", "reason", "summary")
    list_select_related = ("session", "claimed_by")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
