"""Credentials: agent keys, signed client tokens, and operators' Django sessions.

REST uses `BatonAuthentication`; WebSockets and SSE call `authenticate_scope` /
`authenticate_bearer` directly. Both end in the same `Principal`.
"""

import time
from datetime import UTC, datetime
from importlib import import_module
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

from django.conf import settings
from django.contrib.auth import get_user
from django.contrib.auth.models import AnonymousUser
from django.core import signing
from django.http.cookie import parse_cookie
from django.http.request import validate_host
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, CSRFCheck
from rest_framework.permissions import BasePermission

from sessions_app import event_types as et
from sessions_app.errors import BatonError, invalid
from sessions_app.identity import Principal
from sessions_app.selectors import find_agent_key
from sessions_app.services import hash_agent_key

AGENT_KEY_PREFIX = "bk_"
CLIENT_TOKEN_PREFIX = "ct_"
TOKEN_SALT = "baton.client-token.v1"
OPERATE_PERMISSION = "handover.operate"
TOKEN_KINDS = (et.KIND_USER, et.KIND_AGENT)
MAX_CLIENT_ID = 150


class AuthError(BatonError):
    """Unauthenticated (401 / close 4401) or not allowed (403 / close 4403)."""

    def __init__(self, message: str, *, forbidden: bool = False) -> None:
        code = "forbidden" if forbidden else "unauthenticated"
        super().__init__(code, message, 403 if forbidden else 401)

    @property
    def close_code(self) -> int:
        return 4403 if self.status == 403 else 4401


def mint_client_token(
    *,
    session_id: str,
    client_id: str,
    kind: str,
    name: str = "",
    capabilities: list[str] | None = None,
    ttl: int = 3600,
) -> tuple[str, datetime]:
    """A signed, expiring, session-scoped token for a browser or a scoped agent."""
    if not isinstance(client_id, str) or not client_id or len(client_id) > MAX_CLIENT_ID:
        raise invalid(f"'client_id' must be a string of 1 to {MAX_CLIENT_ID} characters.")
    if kind not in TOKEN_KINDS:
        raise invalid(f"'kind' must be one of {', '.join(TOKEN_KINDS)}.")
    caps = list(et.CAPABILITIES) if capabilities is None else capabilities
    if not isinstance(caps, list) or not caps or any(c not in et.CAPABILITIES for c in caps):
        raise invalid(f"'capabilities' must be a non-empty subset of {list(et.CAPABILITIES)}.")
    if not isinstance(ttl, int) or isinstance(ttl, bool):
        raise invalid("'ttl' must be an integer number of seconds.")
    if not 1 <= ttl <= settings.BATON_CLIENT_TOKEN_MAX_TTL:
        raise invalid(f"'ttl' must be between 1 and {settings.BATON_CLIENT_TOKEN_MAX_TTL} seconds.")
    expires = int(time.time()) + ttl
    payload = {
        "s": session_id,
        "c": client_id,
        "k": kind,
        "n": (name or client_id)[:MAX_CLIENT_ID],
        "p": sorted(set(caps)),
        "e": expires,
    }
    token = CLIENT_TOKEN_PREFIX + signing.dumps(payload, salt=TOKEN_SALT, compress=True)
    return token, datetime.fromtimestamp(expires, tz=UTC)


def principal_from_client_token(raw: str) -> Principal:
    try:
        payload = signing.loads(raw[len(CLIENT_TOKEN_PREFIX) :], salt=TOKEN_SALT)
    except signing.BadSignature:
        raise AuthError("Invalid client token.") from None
    if not isinstance(payload, dict) or payload.get("e", 0) < time.time():
        raise AuthError("The client token has expired.")
    return Principal(
        kind=payload["k"],
        id=payload["c"],
        name=payload.get("n", payload["c"]),
        credential="client_token",
        capabilities=frozenset(payload["p"]),
        session_id=payload["s"],
    )


def principal_from_agent_key(raw: str, client_id: str | None = None) -> Principal:
    key = find_agent_key(key_hash=hash_agent_key(raw))
    if key is None:
        raise AuthError("Invalid or revoked agent key.")
    if client_id is not None and (not client_id or len(client_id) > MAX_CLIENT_ID):
        raise AuthError(f"'client_id' must be 1 to {MAX_CLIENT_ID} characters.")
    return Principal(
        kind=et.KIND_AGENT,
        id=client_id or key.name,
        name=key.name,
        credential="agent_key",
    )


def principal_from_user(user: Any) -> Principal | None:
    """A Django user is a principal only as an operator."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return None
    if not user.has_perm(OPERATE_PERMISSION):
        return None
    return Principal(
        kind=et.KIND_OPERATOR,
        id=user.get_username(),
        name=user.get_full_name() or user.get_username(),
        credential="session",
        user_id=user.pk,
    )


def authenticate_bearer(raw: str, client_id: str | None = None) -> Principal:
    raw = raw.strip()
    if raw.startswith(AGENT_KEY_PREFIX):
        return principal_from_agent_key(raw, client_id)
    if raw.startswith(CLIENT_TOKEN_PREFIX):
        return principal_from_client_token(raw)
    raise AuthError("Unrecognized credential.")


def _bearer_from_header(value: str) -> str | None:
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization must be 'Bearer <token>'.")
    return token.strip()


def scope_user(scope: dict[str, Any]) -> Any:
    """The Django user of a socket's session cookie (sync: it reads the database).

    Read here, when a consumer authenticates, rather than by Channels' AuthMiddlewareStack:
    that stack copies the scope three times and loads the user for every socket, and wraps every
    outgoing frame to save a session our sockets never modify — per-socket memory and per-frame
    CPU for the token-authenticated majority. A `user` already in the scope wins.
    """
    if "user" in scope:
        return scope["user"]
    cookies = parse_cookie(scope_header(scope, "cookie"))
    session_key = cookies.get(settings.SESSION_COOKIE_NAME)
    if not session_key:
        return AnonymousUser()
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    return get_user(SimpleNamespace(session=store))  # type: ignore[arg-type]


def scope_header(scope: dict[str, Any], name: str) -> str:
    """One request header of an ASGI scope ("" when absent); names match case-insensitively."""
    wanted = name.encode()
    for key, value in scope.get("headers", ()):
        if key.lower() == wanted:
            return value.decode("latin-1")
    return ""


def authenticate_scope(scope: dict[str, Any]) -> Principal:
    """WebSocket/SSE: `?token=`, `Authorization: Bearer`, or an operator's session cookie."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    client_id = (query.get("client_id") or [None])[0] or headers.get("x-baton-client-id")
    token = (query.get("token") or [None])[0]
    if token is None and "authorization" in headers:
        token = _bearer_from_header(headers["authorization"])
    if token is not None:
        return authenticate_bearer(token, client_id)
    user = scope_user(scope)
    if getattr(user, "is_authenticated", False):
        if scope.get("type") == "websocket":
            check_origin(headers)
        principal = principal_from_user(user)
        if principal is None:
            raise AuthError("This account is not an operator.", forbidden=True)
        return principal
    raise AuthError("No credential: pass ?token=, an Authorization header, or log in.")


def check_origin(headers: dict[str, str]) -> None:
    """Cookie-authenticated sockets must come from our own pages (no cross-site hijacking)."""
    origin = headers.get("origin")
    if not origin:
        raise AuthError("A cookie-authenticated WebSocket needs an Origin header.", forbidden=True)
    host = urlsplit(origin).netloc.rsplit("@", 1)[-1]
    hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    allowed = settings.ALLOWED_HOSTS or ["localhost", "127.0.0.1", "[::1]"]
    if host != headers.get("host") and not validate_host(hostname, allowed):
        raise AuthError(f"Origin {origin} is not allowed.", forbidden=True)


class BatonAuthentication(BaseAuthentication):
    """DRF: bearer agent keys and client tokens; operators by session cookie (with CSRF)."""

    def authenticate(self, request: Any) -> tuple[Principal, None] | None:
        header = request.META.get("HTTP_AUTHORIZATION")
        if header:
            try:
                token = _bearer_from_header(header)
                principal = authenticate_bearer(
                    token or "", request.META.get("HTTP_X_BATON_CLIENT_ID")
                )
            except AuthError as exc:
                raise exceptions.AuthenticationFailed(exc.message) from None
            return principal, None
        user = getattr(request._request, "user", None)
        principal = principal_from_user(user)
        if principal is None:
            if getattr(user, "is_authenticated", False):
                raise exceptions.PermissionDenied("This account is not an operator.")
            return None
        self._enforce_csrf(request)
        return principal, None

    def _enforce_csrf(self, request: Any) -> None:
        check = CSRFCheck(lambda req: None)
        check.process_request(request)
        reason = check.process_view(request, None, (), {})
        if reason:
            raise exceptions.PermissionDenied(f"CSRF failed: {reason}")

    def authenticate_header(self, request: Any) -> str:
        return 'Bearer realm="baton"'


class IsAuthenticatedPrincipal(BasePermission):
    def has_permission(self, request: Any, view: Any) -> bool:
        return isinstance(request.user, Principal)
