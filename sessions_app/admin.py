"""Django admin: browse sessions and their history; the event log is read-only."""

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from sessions_app.models import AgentKey, Connection, Event, Message, Session
from sessions_app.services import create_agent_key


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


class ControllerFilter(admin.SimpleListFilter):
    """Who holds the session: nobody, or one operator (the controller is a JSON object)."""

    title = "controller"
    parameter_name = "controller"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        ids = (
            Session.objects.filter(controller__isnull=False)
            .values_list("controller__id", flat=True)
            .distinct()
        )
        return [("none", "Nobody"), *((str(i), str(i)) for i in ids if i)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Session]) -> QuerySet[Session]:
        value = self.value()
        if value == "none":
            return queryset.filter(controller__isnull=True)
        if value:
            return queryset.filter(controller__id=value)
        return queryset


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):
    list_display = ("id", "title", "status", "controller", "last_seq", "created_at", "updated_at")
    list_filter = ("status", ControllerFilter, "created_at", "updated_at")
    search_fields = ("id", "title", "messages__content")
    readonly_fields = (
        "id",
        "last_seq",
        "controller",
        "created_by",
        "created_at",
        "updated_at",
        "transcript",
    )
    inlines = [EventInline]

    def get_search_results(self, request: HttpRequest, queryset: Any, search_term: str) -> Any:
        results, _dupes = super().get_search_results(request, queryset, search_term)
        return results.distinct(), False

    @admin.display(description="Transcript")
    def transcript(self, obj: Session) -> str:
        """The materialized messages in order; every value is escaped by format_html."""
        rows = obj.messages.order_by("created_seq").values_list(
            "created_seq", "author_name", "author_id", "role", "status", "content"
        )
        if not rows:
            return "(no messages)"
        body = format_html_join(
            "",
            '<div style="margin:0 0 .6em"><small>#{}</small> <strong>{}</strong> ({}, {})'
            '<div style="white-space:pre-wrap">{}</div></div>',
            (
                (seq, name or aid, role, status, content)
                for seq, name, aid, role, status, content in rows
            ),
        )
        return format_html('<div class="baton-transcript">{}</div>', body)


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
    """Adding a key asks only for a name; the raw key is shown once, in a message, and never
    stored (only its hash is)."""

    list_display = ("name", "prefix", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "prefix")
    readonly_fields = ("prefix", "key_hash", "created_at", "last_used_at")

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ("name",)
        return ("name", "prefix", "key_hash", "created_at", "last_used_at", "revoked_at")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ()
        return ("name", *self.readonly_fields)

    def save_model(self, request: HttpRequest, obj: AgentKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        key, raw = create_agent_key(name=form.cleaned_data["name"])
        obj.pk = key.pk
        obj.prefix, obj.key_hash, obj.created_at = key.prefix, key.key_hash, key.created_at
        obj._state.adding = False
        messages.warning(
            request,
            format_html(
                "Agent key for {}: <code>{}</code> — copy it now; it is stored hashed and "
                "will not be shown again.",
                key.name,
                raw,
            ),
        )
