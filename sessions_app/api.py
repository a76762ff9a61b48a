"""REST API for agents (DRF). Views parse, authorize, call one service or selector, serialize."""

from typing import Any

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import exceptions, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler

from sessions_app import event_types as et
from sessions_app import selectors, services
from sessions_app.auth import mint_client_token
from sessions_app.consumers import parse_after
from sessions_app.errors import BatonError, forbidden, not_found, too_large
from sessions_app.identity import Author, Principal
from sessions_app.streams import compacted_snapshot_frame
from sessions_app.wire import format_ts, message_to_wire, session_to_wire

MAX_HISTORY_PAGE = 1000
DEFAULT_HISTORY_PAGE = 100

_DRF_CODES = {
    exceptions.ParseError: "bad_json",
    exceptions.AuthenticationFailed: "unauthenticated",
    exceptions.NotAuthenticated: "unauthenticated",
    exceptions.PermissionDenied: "forbidden",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.Throttled: "rate_limited",
    exceptions.ValidationError: "invalid",
}


def _flatten(detail: Any) -> str:
    if isinstance(detail, dict):
        return "; ".join(f"{k}: {_flatten(v)}" for k, v in detail.items())
    if isinstance(detail, list):
        return " ".join(_flatten(v) for v in detail)
    return str(detail)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Every error is `{"error": {"code", "message"}}` with the right status."""
    if isinstance(exc, BatonError):
        return Response({"error": exc.as_dict()}, status=exc.status)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    code = next((c for t, c in _DRF_CODES.items() if isinstance(exc, t)), "error")
    detail = getattr(exc, "detail", str(exc))
    response.data = {"error": {"code": code, "message": _flatten(detail)}}
    return response


def principal_of(request: Request) -> Principal:
    return request.user  # type: ignore[return-value]


def authorize(request: Request, session_id: str, capability: str) -> Principal:
    """The caller must hold `capability` on this session, and the session must exist."""
    principal = principal_of(request)
    if not principal.can(capability, session_id):
        raise forbidden(f"This credential cannot {capability} on this session.")
    return principal


def require_global(request: Request) -> Principal:
    principal = principal_of(request)
    if not principal.is_global:
        raise forbidden("Only agent keys and operators can do this.")
    return principal


class SessionCreateSerializer(serializers.Serializer):
    title = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    metadata = serializers.DictField(required=False, default=dict)


class TokenSerializer(serializers.Serializer):
    client_id = serializers.CharField(max_length=150)
    kind = serializers.ChoiceField(choices=["user", "agent"], default="user")
    name = serializers.CharField(max_length=150, required=False, allow_blank=True, default="")
    capabilities = serializers.ListField(
        child=serializers.ChoiceField(choices=list(et.CAPABILITIES)),
        required=False,
        default=lambda: list(et.CAPABILITIES),
        allow_empty=False,
    )
    ttl = serializers.IntegerField(min_value=1, default=3600)


class LeaseSerializer(serializers.Serializer):
    client_id = serializers.CharField(max_length=150, required=False)
    ttl = serializers.FloatField(min_value=0, max_value=3600)
    state = serializers.DictField(required=False, allow_null=True, default=None)


SESSION_SCHEMA = OpenApiTypes.OBJECT


class SessionListView(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("status", str, enum=list(et.SESSION_STATUSES))],
        responses=SESSION_SCHEMA,
    )
    def get(self, request: Request) -> Response:
        require_global(request)
        sessions = selectors.list_sessions(status=request.query_params.get("status") or None)
        return Response({"sessions": [session_to_wire(s) for s in sessions]})

    @extend_schema(request=SessionCreateSerializer, responses={201: SESSION_SCHEMA})
    def post(self, request: Request) -> Response:
        principal = require_global(request)
        body = SessionCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        session = services.create_session(created_by=principal.author, **body.validated_data)
        return Response(session_to_wire(session), status=status.HTTP_201_CREATED)


class SessionDetailView(APIView):
    @extend_schema(responses=SESSION_SCHEMA)
    def get(self, request: Request, session_id: str) -> Response:
        principal = principal_of(request)
        if not any(principal.can(cap, session_id) for cap in et.CAPABILITIES):
            raise forbidden("This credential is for another session.")
        return Response(session_to_wire(selectors.get_session(session_id)))


class SessionEventsView(APIView):
    @extend_schema(
        parameters=[
            OpenApiParameter("after", int, description="Return events with seq > after."),
            OpenApiParameter("limit", int, description=f"1..{MAX_HISTORY_PAGE}"),
            OpenApiParameter("types", str, description="Comma-separated globs: message.*,…"),
        ],
        responses=inline_serializer(
            "EventPage",
            {
                "events": serializers.ListField(child=serializers.DictField()),
                "next_after": serializers.IntegerField(),
                "head": serializers.IntegerField(),
            },
        ),
    )
    def get(self, request: Request, session_id: str) -> Response:
        principal = authorize(request, session_id, et.CAP_SUBSCRIBE)
        after = parse_after(request.query_params.get("after"))
        try:
            limit = int(request.query_params.get("limit", DEFAULT_HISTORY_PAGE))
        except ValueError:
            raise BatonError("invalid", "'limit' must be an integer.") from None
        if not 1 <= limit <= MAX_HISTORY_PAGE:
            raise BatonError("invalid", f"'limit' must be between 1 and {MAX_HISTORY_PAGE}.")
        types = selectors.parse_type_patterns(request.query_params.get("types"))
        positions = selectors.get_positions(session_id)
        if positions is None:
            raise not_found()
        head, compacted = positions
        if after > head:
            raise BatonError("bad_after", f"'after' is {after} but the session head is {head}.")
        snapshot = None
        if 0 < after < compacted:
            # The tokens of this range were compacted: the messages as of its end, then on.
            messages = selectors.get_compacted_snapshot(session_id=session_id, through=compacted)
            snapshot = compacted_snapshot_frame(compacted, messages)
            after = compacted
        events = selectors.list_wire_events(
            session_id=session_id,
            after=after,
            upto=head,
            limit=limit,
            types=types,
            include_private=principal.sees_private,
        )
        next_after = events[-1]["seq"] if len(events) == limit else max(after, head or 0)
        body = {
            "events": events,
            "next_after": next_after,
            "head": head,
        }
        if snapshot is not None:
            del snapshot["op"]
            body["snapshot"] = snapshot
        return Response(body)

    @extend_schema(
        request=OpenApiTypes.OBJECT,
        parameters=[OpenApiParameter("Idempotency-Key", str, location=OpenApiParameter.HEADER)],
        responses={201: OpenApiTypes.OBJECT},
    )
    def post(self, request: Request, session_id: str) -> Response:
        principal = authorize(request, session_id, et.CAP_PUBLISH)
        length = int(request.META.get("CONTENT_LENGTH") or 0)
        if length > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            raise too_large("The request body is over the size limit.")
        key = request.headers.get("Idempotency-Key")
        if key is not None and not 1 <= len(key) <= 80:
            raise BatonError("invalid", "Idempotency-Key must be 1 to 80 characters.")
        items = services.parse_event_batch(request.data, idempotency_key=key)
        results = services.append_events(
            session_id=session_id, author=principal.author, events=items
        )
        return Response({"events": [r.as_dict() for r in results]}, status=status.HTTP_201_CREATED)


class SessionMessagesView(APIView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request, session_id: str) -> Response:
        authorize(request, session_id, et.CAP_SUBSCRIBE)
        seq, messages = selectors.get_message_snapshot(session_id=session_id)
        return Response({"seq": seq, "messages": [message_to_wire(m) for m in messages]})


class SessionPresenceView(APIView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request, session_id: str) -> Response:
        authorize(request, session_id, et.CAP_SUBSCRIBE)
        selectors.get_session(session_id)
        return Response({"members": selectors.list_presence(session_id=session_id)})

    @extend_schema(request=LeaseSerializer, responses=OpenApiTypes.OBJECT)
    def post(self, request: Request, session_id: str) -> Response:
        principal = authorize(request, session_id, et.CAP_PRESENCE)
        body = LeaseSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        client_id = body.validated_data.get("client_id") or principal.id
        if client_id != principal.id and principal.credential == "client_token":
            raise forbidden("A client token can only hold presence for its own client_id.")
        author = Author(kind=principal.kind, id=client_id, name=principal.name)
        lease = services.set_presence_lease(
            session_id=session_id,
            author=author,
            ttl=body.validated_data["ttl"],
            state=body.validated_data["state"],
        )
        return Response(
            {
                "client_id": client_id,
                "present": lease is not None,
                "expires_at": format_ts(lease.expires_at) if lease else None,
                "members": selectors.list_presence(session_id=session_id),
            }
        )


class SessionTokensView(APIView):
    @extend_schema(request=TokenSerializer, responses={201: OpenApiTypes.OBJECT})
    def post(self, request: Request, session_id: str) -> Response:
        require_global(request)
        selectors.get_session(session_id)
        body = TokenSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        token, expires_at = mint_client_token(session_id=session_id, **body.validated_data)
        return Response(
            {
                "token": token,
                "expires_at": format_ts(expires_at),
                "session": session_id,
                "client_id": body.validated_data["client_id"],
            },
            status=status.HTTP_201_CREATED,
        )
