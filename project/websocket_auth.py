"""`scope["user"]` for WebSockets from the Django session cookie, resolved only when asked.

Channels' AuthMiddlewareStack copies the scope three times, loads the user of every connection
up front and wraps every outgoing frame of the socket (to save a modified session). Baton's
sockets never modify the session and most of them authenticate with a token, so all of that is
per-socket memory and per-frame CPU for nothing. Here the user is a lazy object that our
consumers only touch from a sync thread (`database_sync_to_async`), where it loads once.
"""

from __future__ import annotations

from functools import partial
from importlib import import_module
from types import SimpleNamespace
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user
from django.contrib.auth.models import AnonymousUser
from django.http.cookie import parse_cookie
from django.utils.functional import SimpleLazyObject


def _header(scope: dict[str, Any], name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


def user_from_cookie(scope: dict[str, Any]) -> Any:
    """The user of the request's session cookie, or AnonymousUser. Sync: it reads the database."""
    session_key = parse_cookie(_header(scope, b"cookie")).get(settings.SESSION_COOKIE_NAME)
    if not session_key:
        return AnonymousUser()
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    return get_user(SimpleNamespace(session=store))  # type: ignore[arg-type]


class CookieUserMiddleware:
    """Adds a lazy `scope["user"]`; never wraps `send` or `receive`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        scope = {**scope, "user": SimpleLazyObject(partial(user_from_cookie, scope))}
        return await self.inner(scope, receive, send)
