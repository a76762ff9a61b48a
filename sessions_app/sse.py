"""Server-Sent Events live tail: the same Subscription as the WebSocket, over plain HTTP."""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse

from sessions_app import event_types as et
from sessions_app.auth import AuthError, authenticate_bearer, principal_from_user
from sessions_app.consumers import parse_after
from sessions_app.errors import BatonError
from sessions_app.identity import Principal
from sessions_app.selectors import parse_type_patterns
from sessions_app.streams import Subscription

KEEPALIVE_SECONDS = 15.0


def _authenticate(request: HttpRequest) -> Principal:
    token = request.GET.get("token")
    header = request.headers.get("Authorization", "")
    if token is None and header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthError("Authorization must be 'Bearer <token>'.")
        token = value.strip()
    if token is not None:
        return authenticate_bearer(token, request.headers.get("X-Baton-Client-Id"))
    principal = principal_from_user(request.user)
    if principal is None:
        raise AuthError("No credential: pass ?token=, an Authorization header, or log in.")
    return principal


def _error(exc: BatonError) -> JsonResponse:
    return JsonResponse({"error": exc.as_dict()}, status=exc.status)


def _sse_events(events: list[Any]) -> str:
    return "".join(f"id: {e.seq}\ndata: {e.json}\n\n" for e in events)


async def event_stream(request: HttpRequest, session_id: str) -> HttpResponse:
    if request.method != "GET":
        return _error(BatonError("method_not_allowed", "Use GET.", 405))
    try:
        principal = await database_sync_to_async(_authenticate)(request)
        if not principal.can(et.CAP_SUBSCRIBE, session_id):
            raise AuthError("This credential cannot subscribe here.", forbidden=True)
        after = parse_after(request.headers.get("Last-Event-ID") or request.GET.get("after"))
        types = parse_type_patterns(request.GET.get("types"))
        subscription = Subscription(
            session_id=session_id,
            after=after,
            types=types,
            include_private=principal.sees_private,
        )
        head = await subscription.open()
    except BatonError as exc:
        return _error(exc)

    async def body() -> AsyncIterator[str]:
        waiter: asyncio.Task[Any] | None = None
        try:
            yield "retry: 2000\n\n"
            if subscription.snapshot is not None:
                yield f"event: snapshot\ndata: {json.dumps(subscription.snapshot)}\n\n"
            async for page in subscription.history():
                yield _sse_events(page)
            attached = {"head": head, "replayed": subscription.replayed}
            yield f"event: attached\ndata: {json.dumps(attached)}\n\n"
            while True:
                waiter = waiter or asyncio.ensure_future(subscription.next_live())
                done, _ = await asyncio.wait({waiter}, timeout=KEEPALIVE_SECONDS)
                if not done:
                    yield ": keepalive\n\n"
                    continue
                events, _ephemeral = waiter.result()
                waiter = None
                if events:
                    yield _sse_events(events)
        finally:
            if waiter is not None:
                waiter.cancel()
                with contextlib.suppress(BaseException):
                    await waiter
            subscription.close()

    response = StreamingHttpResponse(body(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response
