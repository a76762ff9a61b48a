"""REST endpoints of the handover: request, claim, release, close, export. Thin: authorize, call
one service or selector, serialize. Errors are the project's `{"error": {"code", "message"}}`."""

from collections.abc import AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from handover import selectors, services
from sessions_app import event_types as et
from sessions_app.api import authorize, principal_of
from sessions_app.errors import forbidden
from sessions_app.identity import Principal
from sessions_app.selectors import get_session
from sessions_app.wire import session_to_wire, wire_json


class HandoverRequestSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")
    summary = serializers.CharField(
        max_length=10_000, required=False, allow_blank=True, default="", trim_whitespace=False
    )


class ReasonSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")


def _transition_response(session_id: str, seq: int, code: int = status.HTTP_200_OK) -> Response:
    return Response({"seq": seq, "session": session_to_wire(get_session(session_id))}, status=code)


def require_operator(request: Request) -> Principal:
    principal = principal_of(request)
    if not principal.is_operator:
        raise forbidden("Only operators can do this.")
    return principal


class HandoverRequestView(APIView):
    @extend_schema(request=HandoverRequestSerializer, responses={201: OpenApiTypes.OBJECT})
    def post(self, request: Request, session_id: str) -> Response:
        principal = authorize(request, session_id, et.CAP_PUBLISH)
        if principal.kind not in (et.KIND_USER, et.KIND_AGENT):
            raise forbidden("Only users and agents request a human; operators claim.")
        body = HandoverRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        result = services.request_handover(
            session_id=session_id, author=principal.author, **body.validated_data
        )
        return _transition_response(session_id, result.seq, status.HTTP_201_CREATED)


class ClaimView(APIView):
    @extend_schema(request=None, responses=OpenApiTypes.OBJECT)
    def post(self, request: Request, session_id: str) -> Response:
        principal = require_operator(request)
        result = services.claim(
            session_id=session_id, operator=principal.author, user_id=principal.user_id
        )
        return _transition_response(session_id, result.seq)


class ReleaseView(APIView):
    @extend_schema(request=ReasonSerializer, responses=OpenApiTypes.OBJECT)
    def post(self, request: Request, session_id: str) -> Response:
        principal = require_operator(request)
        body = ReasonSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        result = services.release(
            session_id=session_id, operator=principal.author, **body.validated_data
        )
        return _transition_response(session_id, result.seq)


class CloseView(APIView):
    @extend_schema(request=ReasonSerializer, responses=OpenApiTypes.OBJECT)
    def post(self, request: Request, session_id: str) -> Response:
        principal = principal_of(request)
        if not principal.is_operator:
            principal = authorize(request, session_id, et.CAP_PUBLISH)
            if principal.kind != et.KIND_AGENT:
                raise forbidden("Only operators and agents close a session.")
        body = ReasonSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        result = services.close(
            session_id=session_id, author=principal.author, **body.validated_data
        )
        return _transition_response(session_id, result.seq)


class ExportView(APIView):
    """NDJSON of the whole log, for audit: every event with its visibility and authorship.
    Only back-end credentials (operators, agent keys) export; live user and agent connections
    still never receive internal notes or diagnostics."""

    @extend_schema(responses={(200, "application/x-ndjson"): OpenApiTypes.STR})
    def get(self, request: Request, session_id: str) -> Any:
        principal = principal_of(request)
        if not principal.is_global:
            raise forbidden("Only operators and agent keys export a session.")
        get_session(session_id)  # 404 before the stream starts
        response = StreamingHttpResponse(
            _ndjson(session_id, include_private=True),
            content_type="application/x-ndjson",
        )
        response["Content-Disposition"] = f'attachment; filename="{session_id}.ndjson"'
        return response


async def _ndjson(session_id: str, *, include_private: bool) -> AsyncIterator[bytes]:
    """Async, so ASGI streams page by page instead of buffering the log in memory."""
    pages = selectors.export_pages(session_id=session_id, include_private=include_private)
    sentinel: list[dict[str, Any]] = []
    while True:
        page = await sync_to_async(next, thread_sensitive=True)(pages, sentinel)
        if page is sentinel:
            return
        yield "".join(wire_json(e) + "\n" for e in page).encode()
