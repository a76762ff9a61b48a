"""Django admin: browse sessions and their history; the event log is read-only."""

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from sessions_app.models import AgentKey, Connection, Event, Message, Session


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class EventInline(admin.TabularInline):
    model = Event
    fields = ("seq", "type", "author_kind", "author_id", "message_id", "data", "visibility")
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("seq",)
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):
    list_display = ("id", "title", "status", "last_seq", "created_at", "updated_at")
    list_filter = ("status", "created_at", "updated_at")
    search_fields = ("id", "title")
    readonly_fields = ("id", "last_seq", "controller", "created_by", "created_at", "updated_at")
    inlines = [EventInline]


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = (
        "session",
        "seq",
        "type",
        "author_kind",
        "author_id",
        "visibility",
        "created_at",
    )
    list_filter = ("type", "author_kind", "visibility")
    search_fields = ("session__id", "id", "message_id", "author_id")
    list_select_related = ("session",)


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ("message_id", "session", "role", "status", "version", "last_seq")
    list_filter = ("role", "status")
    search_fields = ("message_id", "session__id", "content")


@admin.register(Connection)
class ConnectionAdmin(ReadOnlyAdmin):
    list_display = ("id", "session", "client_id", "kind", "opened_at", "closed_at", "close_code")
    list_filter = ("kind", "close_reason")
    search_fields = ("id", "session__id", "client_id")


@admin.register(AgentKey)
class AgentKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "prefix", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("prefix", "key_hash", "created_at", "last_used_at")
