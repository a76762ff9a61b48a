"""The console's pages and JSON reads: who may see them, what they show, and escaping."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any

import pytest
from django.contrib.admin.utils import quote
from django.test import Client
from django.urls import reverse

from handover import services
from sessions_app.identity import Author
from sessions_app.models import Connection
from sessions_app.services import EventInput, append_events, create_session, open_connection
from tests.handover.conftest import AGENT, USER

pytestmark = pytest.mark.django_db

HOSTILE = "<img src=x onerror=alert(1)>"
STATIC = Path(__file__).resolve().parents[2] / "static" / "console"


def test_anonymous_is_sent_to_the_login_page(session):
    client = Client()
    for path in ("/console/", f"/console/sessions/{session.id}/", "/console/api/state"):
        response = client.get(path)
        assert response.status_code == 302
        assert response["Location"].startswith("/console/login/?next=")


def test_logged_in_non_operator_gets_403(session, plain_user):
    client = Client()
    client.force_login(plain_user)
    for path in (
        "/console/",
        f"/console/sessions/{session.id}/",
        "/console/api/state",
        "/console/api/search?q=x",
        f"/console/api/sessions/{session.id}/diagnostics",
    ):
        assert client.get(path).status_code == 403, path


def test_operator_logs_in_with_a_password_and_csrf(operator_user):
    client = Client(enforce_csrf_checks=True)
    page = client.get("/console/login/")
    assert page.status_code == 200
    token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page.content).group(1)
    refused = Client(enforce_csrf_checks=True).post(
        "/console/login/", {"username": "olivia", "password": "pw-olivia"}
    )
    assert refused.status_code == 403  # no CSRF token
    response = client.post(
        "/console/login/",
        {"username": "olivia", "password": "pw-olivia", "csrfmiddlewaretoken": token.decode()},
    )
    assert response.status_code == 302 and response["Location"] == "/console/"
    assert client.get("/console/").status_code == 200


def test_queue_is_oldest_first_with_reason_summary_and_presence(operator_client):
    first = create_session(created_by=AGENT, title="first")
    second = create_session(created_by=AGENT, title="second")
    create_session(created_by=AGENT, title="calm")
    services.request_handover(session_id=first.id, author=USER, reason="r1", summary="s1")
    services.request_handover(session_id=second.id, author=AGENT, reason="r2")
    open_connection(
        session_id=first.id,
        author=USER,
        worker_id="wrk_t",
        after=0,
        replayed=0,
        counts_for_presence=True,
    )
    state = operator_client.get("/console/api/state").json()
    queue = state["queue"]
    assert [q["id"] for q in queue] == [first.id, second.id]
    assert queue[0]["handover"]["reason"] == "r1"
    assert queue[0]["handover"]["summary"] == "s1"
    assert queue[0]["handover"]["requested_by"] == USER.as_dict()
    assert queue[0]["user_present"] is True and queue[1]["user_present"] is False
    assert {s["title"] for s in state["sessions"]} == {"first", "second", "calm"}

    services.claim(session_id=first.id, operator=Author("operator", "olivia", "Olivia"))
    assert [q["id"] for q in operator_client.get("/console/api/state").json()["queue"]] == [
        second.id
    ]


def test_search_by_session_id_user_id_and_text(operator_client):
    a = create_session(created_by=AGENT, title="alpha")
    b = create_session(created_by=AGENT, title="beta")
    append_events(
        session_id=b.id,
        author=Author("user", "customer-77", "Cus"),
        events=[EventInput("message.create", {"role": "user", "content": "My parcel is late"})],
    )

    def search(q: str) -> list[str]:
        return [
            s["id"] for s in operator_client.get(f"/console/api/search?q={q}").json()["sessions"]
        ]

    assert search(a.id) == [a.id]
    assert search("customer-77") == [b.id]
    assert search("parcel") == [b.id]
    assert search("nothing-like-this") == []


def test_diagnostics_lists_connections_with_lag(operator_client, session):
    conn = open_connection(
        session_id=session.id,
        author=USER,
        worker_id="wrk_t",
        after=0,
        replayed=0,
        counts_for_presence=True,
    )
    append_events(
        session_id=session.id,
        author=AGENT,
        events=[EventInput("progress.step", {}) for _ in range(5)],
    )
    Connection.objects.filter(pk=conn.pk).update(last_received_seq=3)
    diag = operator_client.get(f"/console/api/sessions/{session.id}/diagnostics").json()
    assert diag["head"] == 7  # presence.enter, connection.opened, five steps
    (row,) = diag["connections"]
    assert (row["id"], row["client_id"], row["open"], row["lag_events"]) == (
        conn.id,
        "user-1",
        True,
        4,
    )
    assert operator_client.get("/console/api/sessions/ses_x/diagnostics").status_code == 404


def test_pages_escape_hostile_content(operator_client):
    hostile = create_session(created_by=AGENT, title=HOSTILE)
    services.request_handover(session_id=hostile.id, author=USER, reason=HOSTILE, summary=HOSTILE)
    for path in ("/console/", f"/console/sessions/{hostile.id}/"):
        html = operator_client.get(path).content.decode()
        assert HOSTILE not in html  # json_script escapes < > & inside the data island
        assert "\\u003Cimg" in html
    assert operator_client.get("/console/sessions/ses_nope/").status_code == 404


def test_console_scripts_never_use_html_sinks():
    """Data reaches the DOM through textContent only (the browser test checks it live)."""
    for script in STATIC.glob("*.js"):
        source = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in source, f"{script.name} uses {sink}"


# --------------------------------------------------------------------------- admin


def admin_change_url(session: Any) -> str:
    """Quoted as the admin's own links are: it reads "_24" in a pk as "$"."""
    return reverse("admin:sessions_app_session_change", args=[quote(session.id)])


@pytest.fixture
def admin_client(db: None) -> Client:
    from django.contrib.auth.models import User

    client = Client()
    client.force_login(User.objects.create_superuser("root", password="pw"))
    return client


@pytest.fixture
def escaped_id_session(make_session: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A session whose id holds "_24", which the admin would misread as "$" if left unquoted."""
    token_hex = secrets.token_hex
    monkeypatch.setattr(secrets, "token_hex", lambda nbytes: "24" + token_hex(nbytes)[2:])
    session = make_session()
    assert session.id.startswith("ses_24")
    return session


def test_admin_session_pages_filters_and_escaped_transcript(admin_client, escaped_id_session):
    session = escaped_id_session
    append_events(
        session_id=session.id,
        author=USER,
        events=[EventInput("message.create", {"role": "user", "content": HOSTILE})],
    )
    services.claim(session_id=session.id, operator=Author("operator", "olivia", "Olivia"))
    listing = admin_client.get("/admin/sessions_app/session/?status=with_human&controller=olivia")
    assert listing.status_code == 200 and session.id in listing.content.decode()
    assert (
        session.id
        not in admin_client.get("/admin/sessions_app/session/?controller=none").content.decode()
    )
    found = admin_client.get("/admin/sessions_app/session/?q=onerror")
    assert session.id in found.content.decode()
    response = admin_client.get(admin_change_url(session))
    page = response.content.decode()
    assert response.status_code == 200, (response.status_code, response.get("Location"))
    assert "Transcript" in page
    assert HOSTILE not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    events = admin_client.get(
        "/admin/sessions_app/event/?type=handover.claimed&author_kind=operator"
    )
    assert events.status_code == 200
    assert admin_client.get("/admin/sessions_app/event/add/").status_code == 403
    assert admin_client.get("/admin/sessions_app/message/").status_code == 200


def test_admin_creates_agent_keys_and_shows_the_raw_key_once(admin_client):
    from sessions_app.auth import principal_from_agent_key
    from sessions_app.models import AgentKey

    response = admin_client.post(
        "/admin/sessions_app/agentkey/add/", {"name": "support-bot"}, follow=True
    )
    assert response.status_code == 200
    text = response.content.decode()
    raw = re.search(r"<code>(bk_[A-Za-z0-9_\-]+)</code>", text).group(1)
    key = AgentKey.objects.get(name="support-bot")
    assert raw.startswith(key.prefix) and raw not in key.key_hash
    assert principal_from_agent_key(raw).id == "support-bot"
    again = admin_client.get(f"/admin/sessions_app/agentkey/{key.pk}/change/").content.decode()
    assert raw not in again


def test_demo_operator_uses_the_console_and_reads_the_admin(session):
    """`make run` creates `operator` with `create_operator --staff`: console and read-only admin."""
    import io

    from django.core.management import call_command

    call_command(
        "create_operator", "operator", password="operator", staff=True, stdout=io.StringIO()
    )
    client = Client()
    assert client.login(username="operator", password="operator")
    assert client.get("/console/").status_code == 200
    assert client.get("/admin/sessions_app/session/").status_code == 200
    assert client.get(admin_change_url(session)).status_code == 200
    assert client.get("/admin/sessions_app/agentkey/add/").status_code == 403
