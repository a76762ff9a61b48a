"""The demo chat page: a session and a client token minted server-side, as a real app would."""

import secrets

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET

from sessions_app.auth import mint_client_token
from sessions_app.errors import BatonError
from sessions_app.identity import Author
from sessions_app.selectors import get_session
from sessions_app.services import create_session

DEMO_TOKEN_TTL = 12 * 3600


def _demo_user(request: HttpRequest) -> str:
    """One client_id per browser (cookie session), shared by its tabs: several devices, one user."""
    client_id = request.session.get("demo_client_id")
    if not client_id:
        client_id = f"user-{secrets.token_hex(3)}"
        request.session["demo_client_id"] = client_id
    return client_id


@require_GET
def demo_index(request: HttpRequest) -> HttpResponse:
    """Start a new demo conversation."""
    session = create_session(
        created_by=Author(kind="user", id=_demo_user(request), name="Demo user"),
        title="Demo conversation",
        metadata={"demo": True},
    )
    return redirect("demo-session", session_id=session.id)


@require_GET
def demo_session(request: HttpRequest, session_id: str) -> HttpResponse:
    try:
        session = get_session(session_id)
    except BatonError:
        return render(request, "demo_missing.html", status=404)
    client_id = request.GET.get("as") or _demo_user(request)
    token, expires_at = mint_client_token(
        session_id=session.id,
        client_id=client_id[:150],
        kind="user",
        name="You" if client_id == _demo_user(request) else client_id,
        ttl=DEMO_TOKEN_TTL,
    )
    return render(
        request,
        "demo.html",
        {
            "session": session,
            "token": token,
            "client_id": client_id,
            "expires_at": expires_at,
            "debug": settings.DEBUG,
        },
    )
