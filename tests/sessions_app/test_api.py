"""The REST API (`/api/v1/`): every endpoint, its credentials, its errors and what it stores."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from sessions_app import auth as auth_module
from sessions_app import event_types as et
from sessions_app.identity import SYSTEM, Author
from sessions_app.models import AgentKey, Event, Message, PresenceLease, Session
from sessions_app.services import (
    EventInput,
    append_events,
    create_session,
    open_connection,
)

pytestmark = pytest.mark.django_db

AGENT = Author(kind="agent", id="test-agent", name="test-agent")
OPERATOR = Author(kind="operator", id="olivia", name="Olivia")


# --------------------------------------------------------------------------- helpers


def url(session_id: str | None = None, suffix: str = "") -> str:
    if session_id is None:
        return "/api/v1/sessions"
    return f"/api/v1/sessions/{session_id}{suffix}"


def client_with(token: str, **headers: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", **headers)
    return client


def post(client: APIClient, path: str, body: Any, **extra: Any) -> Any:
    return client.post(path, data=json.dumps(body), content_type="application/json", **extra)


def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, str]:
    """Every error is `{"error": {"code", "message"}}` as JSON, with the right status."""
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = json.loads(response.content)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def state(session_id: str) -> tuple[int, int, int, int]:
    """What a refused request must leave as it was: head, events, messages, leases."""
    return (
        Session.objects.get(pk=session_id).last_seq,
        Event.objects.filter(session_id=session_id).count(),
        Message.objects.filter(session_id=session_id).count(),
        PresenceLease.objects.filter(session_id=session_id).count(),
    )


def system_append(session_id: str, author: Author, *types_: str) -> None:
    append_events(
        session_id=session_id,
        author=author,
        events=[EventInput(type=t, data={}) for t in types_],
        system=True,
    )


def publish_progress(api: APIClient, session_id: str, n: int) -> None:
    response = post(
        api,
        url(session_id, "/events"),
        {"events": [{"type": "progress.step", "data": {"i": i}} for i in range(n)]},
    )
    assert response.status_code == 201, response.content


@pytest.fixture
def operator_api(operator_user: Any) -> APIClient:
    client = APIClient()
    client.force_login(operator_user)
    return client


# --------------------------------------------------------------------------- sessions


def test_agent_creates_a_session(api):
    response = post(api, url(), {"title": "Support", "metadata": {"tier": "gold"}})
    assert response.status_code == 201
    body = response.json()
    assert body["id"].startswith("ses_")
    assert body["title"] == "Support"
    assert body["metadata"] == {"tier": "gold"}
    assert body["status"] == "active"
    assert body["controller"] is None
    assert body["last_seq"] == 0
    assert body["created_by"] == {"kind": "agent", "id": "test-agent", "name": "test-agent"}
    assert body["created_at"].endswith("Z")
    assert Session.objects.filter(pk=body["id"], title="Support").exists()


def test_create_session_with_empty_body(api):
    response = post(api, url(), {})
    assert response.status_code == 201
    assert (response.json()["title"], response.json()["metadata"]) == ("", {})


def test_operator_creates_a_session(operator_api):
    response = post(operator_api, url(), {"title": "by hand"})
    assert response.status_code == 201
    assert response.json()["created_by"] == {"kind": "operator", "id": "olivia", "name": "Olivia"}


@pytest.mark.parametrize(
    "body", [{"title": "x" * 201}, {"metadata": [1, 2]}, {"metadata": "x"}, {"title": None}]
)
def test_create_session_with_bad_input(api, body):
    assert_error(post(api, url(), body), 400)
    assert not Session.objects.exists()


def test_list_sessions_newest_first_and_by_status(api, make_session):
    a = make_session("a")
    b = make_session("b")
    c = make_session("c")
    system_append(b.id, SYSTEM, et.SESSION_CLOSED)
    Session.objects.filter(pk=a.id).update(created_at=timezone.now() - timezone.timedelta(hours=2))
    Session.objects.filter(pk=b.id).update(created_at=timezone.now() - timezone.timedelta(hours=1))

    response = api.get(url())
    assert response.status_code == 200
    assert [s["id"] for s in response.json()["sessions"]] == [c.id, b.id, a.id]

    closed = api.get(url(), {"status": "closed"}).json()["sessions"]
    assert [s["id"] for s in closed] == [b.id]
    assert closed[0]["status"] == "closed"
    active = api.get(url(), {"status": "active"}).json()["sessions"]
    assert [s["id"] for s in active] == [c.id, a.id]


def test_list_sessions_with_unknown_status(api, session):
    assert_error(api.get(url(), {"status": "sleeping"}), 400, "invalid_filter")


def test_operator_lists_sessions(operator_api, session):
    response = operator_api.get(url())
    assert response.status_code == 200
    assert [s["id"] for s in response.json()["sessions"]] == [session.id]


def test_client_token_cannot_create_or_list_sessions(session, make_token):
    client = client_with(make_token(session.id))
    assert_error(post(client, url(), {"title": "x"}), 403, "forbidden")
    assert_error(client.get(url()), 403, "forbidden")
    assert Session.objects.count() == 1


def test_get_session(api, session, make_token):
    append_events(
        session_id=session.id, author=AGENT, events=[EventInput(type="progress.x", data={})]
    )
    for client in (api, client_with(make_token(session.id, capabilities=["subscribe"]))):
        response = client.get(url(session.id))
        assert response.status_code == 200
        body = response.json()
        assert (body["id"], body["status"], body["last_seq"], body["title"]) == (
            session.id,
            "active",
            1,
            "test",
        )


def test_get_session_shows_controller(api, session):
    system_append(session.id, OPERATOR, et.HANDOVER_CLAIMED)
    body = api.get(url(session.id)).json()
    assert body["status"] == "with_human"
    assert body["controller"] == {"kind": "operator", "id": "olivia", "name": "Olivia"}


# --------------------------------------------------------------------------- publish


def test_publish_one_event(api, session):
    response = post(api, url(session.id, "/events"), {"type": "progress.tool", "data": {"a": 1}})
    assert response.status_code == 201
    (result,) = response.json()["events"]
    assert result["seq"] == 1
    assert result["id"].startswith("evt_")
    assert result["message_id"] is None
    assert result["duplicate"] is False
    row = Event.objects.get(session_id=session.id, seq=1)
    assert (row.type, row.data, row.author_kind, row.author_id) == (
        "progress.tool",
        {"a": 1},
        "agent",
        "test-agent",
    )


def test_publish_a_batch(api, session):
    body = {
        "events": [
            {"type": "message.create", "message_id": "m1", "data": {"role": "assistant"}},
            {"type": "message.append", "message_id": "m1", "data": {"delta": "Hel"}},
            {"type": "message.append", "message_id": "m1", "data": {"delta": "lo"}},
            {"type": "message.complete", "message_id": "m1", "data": {}},
            {"type": "message.create", "data": {"role": "assistant", "status": "complete"}},
        ]
    }
    response = post(api, url(session.id, "/events"), body)
    assert response.status_code == 201
    results = response.json()["events"]
    assert [r["seq"] for r in results] == [1, 2, 3, 4, 5]
    assert [r["message_id"] for r in results[:4]] == ["m1"] * 4
    assert results[4]["message_id"].startswith("msg_")
    m = Message.objects.get(session_id=session.id, message_id="m1")
    assert (m.content, m.status, m.version) == ("Hello", "complete", 4)
    assert Session.objects.get(pk=session.id).last_seq == 5


def test_agent_key_client_id_header_sets_the_author(agent_key, session):
    client = client_with(agent_key, HTTP_X_BATON_CLIENT_ID="worker-7")
    assert post(client, url(session.id, "/events"), {"type": "progress.x"}).status_code == 201
    row = Event.objects.get(session_id=session.id)
    assert (row.author_kind, row.author_id, row.author_name) == ("agent", "worker-7", "test-agent")


def test_user_token_publishes_as_its_client(session, make_token):
    client = client_with(make_token(session.id, client_id="dana"))
    response = post(
        client, url(session.id, "/events"), {"type": "message.create", "data": {"role": "user"}}
    )
    assert response.status_code == 201
    row = Event.objects.get(session_id=session.id)
    assert (row.author_kind, row.author_id, row.author_name) == ("user", "dana", "Dana")
    # A user cannot speak as the assistant.
    response = post(
        client,
        url(session.id, "/events"),
        {"type": "message.create", "data": {"role": "assistant"}},
    )
    assert_error(response, 403, "forbidden")
    assert state(session.id)[:2] == (1, 1)


def test_operator_publishes_with_cookie_and_writes_internal_notes(operator_api, session):
    response = post(
        operator_api,
        url(session.id, "/events"),
        {
            "events": [
                {"type": "note.internal", "data": {"text": "VIP"}},
                {"type": "message.create", "data": {"role": "operator", "content": "Hi"}},
            ]
        },
    )
    assert response.status_code == 201
    rows = list(Event.objects.filter(session_id=session.id).order_by("seq"))
    assert [(r.type, r.visibility, r.author_kind, r.author_id) for r in rows] == [
        ("note.internal", "operators", "operator", "olivia"),
        ("message.create", "all", "operator", "olivia"),
    ]


def test_client_ref_retry_returns_the_same_seq(api, session):
    body = {"type": "progress.x", "client_ref": "r-1"}
    first = post(api, url(session.id, "/events"), body).json()["events"][0]
    again = post(api, url(session.id, "/events"), body)
    assert again.status_code == 201
    (dup,) = again.json()["events"]
    assert (dup["seq"], dup["id"], dup["duplicate"]) == (first["seq"], first["id"], True)
    assert state(session.id)[:2] == (1, 1)


def test_idempotency_key_retry_returns_the_same_seqs_and_stores_nothing(api, session):
    publish_progress(api, session.id, 2)
    body = {
        "events": [
            {"type": "message.create", "data": {"role": "assistant"}},
            {"type": "progress.y"},
        ]
    }
    first = post(api, url(session.id, "/events"), body, HTTP_IDEMPOTENCY_KEY="op-42")
    assert first.status_code == 201
    assert [r["seq"] for r in first.json()["events"]] == [3, 4]
    before = state(session.id)

    again = post(api, url(session.id, "/events"), body, HTTP_IDEMPOTENCY_KEY="op-42")
    assert again.status_code == 201
    assert [(r["seq"], r["id"], r["message_id"]) for r in again.json()["events"]] == [
        (r["seq"], r["id"], r["message_id"]) for r in first.json()["events"]
    ]
    assert all(r["duplicate"] for r in again.json()["events"])
    assert state(session.id) == before

    # Another key is another operation.
    other = post(api, url(session.id, "/events"), body, HTTP_IDEMPOTENCY_KEY="op-43")
    assert [r["seq"] for r in other.json()["events"]] == [5, 6]


def test_idempotency_key_is_per_author(api, session, make_token):
    body = {"type": "progress.x"}
    post(api, url(session.id, "/events"), body, HTTP_IDEMPOTENCY_KEY="k")
    user = client_with(make_token(session.id))
    response = post(user, url(session.id, "/events"), body, HTTP_IDEMPOTENCY_KEY="k")
    assert response.status_code == 201
    (result,) = response.json()["events"]
    assert (result["seq"], result["duplicate"]) == (2, False)
    assert Session.objects.get(pk=session.id).last_seq == 2


@pytest.mark.parametrize("key", ["", "k" * 81])
def test_idempotency_key_length_is_checked(api, session, key):
    response = post(
        api, url(session.id, "/events"), {"type": "progress.x"}, HTTP_IDEMPOTENCY_KEY=key
    )
    assert_error(response, 400)
    assert state(session.id) == (0, 0, 0, 0)


# --------------------------------------------------------------------------- publish: bad input


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"type": "nonsense"}, "invalid_event"),
        ({"type": "progress."}, "invalid_event"),
        ({"data": {}}, "invalid_event"),
        ({"type": "progress.x", "data": [1, 2]}, "invalid_event"),
        ({"type": "progress.x", "data": "text"}, "invalid_event"),
        ({"type": "progress.x", "bogus": 1}, "invalid_event"),
        ({"type": "message.append", "data": {"delta": "x"}}, "invalid_event"),
        ({"type": "message.update", "data": {"content": "x"}}, "invalid_event"),
        ({"type": "message.complete", "data": {}}, "invalid_event"),
        ({"type": "message.create", "data": {"content": "no role"}}, "invalid_event"),
        ({"type": "signal.redirect", "data": {}}, "invalid_event"),
        ({"events": []}, "invalid_event"),
        ({"events": "x"}, "invalid_event"),
        ({"events": [{"type": "progress.x"}, {"type": "nope"}]}, "invalid_event"),
        ([{"type": "progress.x"}], "invalid_event"),
        ({"type": "progress.x", "client_ref": "r" * 101}, "invalid_event"),
        (
            {
                "events": [
                    {"type": "progress.x", "client_ref": "a"},
                    {"type": "progress.y", "client_ref": "a"},
                ]
            },
            "invalid_event",
        ),
    ],
)
def test_publish_ill_shaped_events_is_400_and_stores_nothing(api, session, body, code):
    publish_progress(api, session.id, 1)
    before = state(session.id)
    assert_error(post(api, url(session.id, "/events"), body), 400, code)
    assert state(session.id) == before


def test_publish_malformed_json_is_bad_json(api, session):
    response = api.post(
        url(session.id, "/events"), data="{not json", content_type="application/json"
    )
    assert_error(response, 400, "bad_json")
    assert state(session.id) == (0, 0, 0, 0)


def test_publish_oversized_event_is_413(api, session, settings):
    settings.BATON_MAX_EVENT_BYTES = 200
    ok = post(api, url(session.id, "/events"), {"type": "progress.x", "data": {"t": "a" * 150}})
    assert ok.status_code == 201
    before = state(session.id)
    response = post(
        api, url(session.id, "/events"), {"type": "progress.x", "data": {"t": "a" * 250}}
    )
    assert_error(response, 413, "payload_too_large")
    batch = {"events": [{"type": "progress.x"}, {"type": "progress.x", "data": {"t": "a" * 250}}]}
    assert_error(post(api, url(session.id, "/events"), batch), 413, "payload_too_large")
    assert state(session.id) == before


def test_publish_too_many_events_is_413(api, session, settings):
    settings.BATON_MAX_BATCH_EVENTS = 3
    publish_progress(api, session.id, 3)
    before = state(session.id)
    body = {"events": [{"type": "progress.x"}] * 4}
    assert_error(post(api, url(session.id, "/events"), body), 413, "payload_too_large")
    assert state(session.id) == before


def test_publish_body_over_the_upload_limit_is_413(api, session, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = {"type": "progress.x", "data": {"t": "a" * 2000}}
    assert_error(post(api, url(session.id, "/events"), body), 413, "payload_too_large")
    assert state(session.id) == (0, 0, 0, 0)


@pytest.mark.parametrize("event_type", sorted(et.SERVER_ONLY_TYPES))
def test_publish_server_only_types_is_forbidden(api, session, event_type):
    assert_error(post(api, url(session.id, "/events"), {"type": event_type}), 403, "forbidden")
    assert state(session.id) == (0, 0, 0, 0)
    assert Session.objects.get(pk=session.id).status == "active"


def test_agent_cannot_write_internal_notes(api, session):
    response = post(
        api, url(session.id, "/events"), {"type": "note.internal", "data": {"text": "x"}}
    )
    assert_error(response, 403, "forbidden")
    assert state(session.id) == (0, 0, 0, 0)


def test_publish_to_unknown_session_is_404(api):
    assert_error(post(api, url("ses_missing", "/events"), {"type": "progress.x"}), 404, "not_found")
    assert not Event.objects.exists()


def test_publish_to_closed_session_is_409(api, session, make_token):
    publish_progress(api, session.id, 1)
    system_append(session.id, SYSTEM, et.SESSION_CLOSED)
    before = state(session.id)
    assert_error(
        post(api, url(session.id, "/events"), {"type": "progress.x"}), 409, "session_closed"
    )
    user = client_with(make_token(session.id))
    body = {"type": "message.create", "data": {"role": "user"}}
    assert_error(post(user, url(session.id, "/events"), body), 409, "session_closed")
    assert state(session.id) == before


def test_message_conflicts_over_rest(api, session, make_token):
    body = {"type": "message.create", "message_id": "m1", "data": {"role": "assistant"}}
    assert post(api, url(session.id, "/events"), body).status_code == 201
    before = state(session.id)
    assert_error(post(api, url(session.id, "/events"), body), 409, "message_exists")
    append_ = {"type": "message.append", "message_id": "zz", "data": {"delta": "x"}}
    assert_error(post(api, url(session.id, "/events"), append_), 404, "message_not_found")
    user = client_with(make_token(session.id))
    foreign = {"type": "message.append", "message_id": "m1", "data": {"delta": "x"}}
    assert_error(post(user, url(session.id, "/events"), foreign), 403, "forbidden")
    done = {"type": "message.complete", "message_id": "m1", "data": {}}
    assert post(api, url(session.id, "/events"), done).status_code == 201
    before = state(session.id)
    mine = {"type": "message.append", "message_id": "m1", "data": {"delta": "x"}}
    assert_error(post(api, url(session.id, "/events"), mine), 409, "message_not_streaming")
    assert state(session.id) == before


def test_handover_over_rest(api, session, make_token):
    user = client_with(make_token(session.id))
    response = post(
        user, url(session.id, "/events"), {"type": "handover.requested", "data": {"reason": "help"}}
    )
    assert response.status_code == 201
    assert api.get(url(session.id)).json()["status"] == "awaiting_human"
    assert_error(
        post(user, url(session.id, "/events"), {"type": "handover.requested"}),
        409,
        "handover_pending",
    )
    system_append(session.id, OPERATOR, et.HANDOVER_CLAIMED)
    before = state(session.id)
    agent_msg = {"type": "message.create", "data": {"role": "assistant", "content": "me!"}}
    assert_error(post(api, url(session.id, "/events"), agent_msg), 409, "controlled_by_human")
    assert state(session.id) == before
    user_msg = {"type": "message.create", "data": {"role": "user", "content": "hello?"}}
    assert post(user, url(session.id, "/events"), user_msg).status_code == 201


# --------------------------------------------------------------------------- history


def test_history_pages_with_after_limit_next_after_and_head(api, session):
    publish_progress(api, session.id, 10)
    pages = []
    after = 0
    while True:
        response = api.get(url(session.id, "/events"), {"after": after, "limit": 4})
        assert response.status_code == 200
        body = response.json()
        assert body["head"] == 10
        pages.append([e["seq"] for e in body["events"]])
        if not body["events"]:
            assert body["next_after"] == after
            break
        after = body["next_after"]
        assert after == body["events"][-1]["seq"]
    assert pages == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10], []]


def test_history_page_exactly_at_the_end(api, session):
    publish_progress(api, session.id, 4)
    body = api.get(url(session.id, "/events"), {"limit": 4}).json()
    assert [e["seq"] for e in body["events"]] == [1, 2, 3, 4]
    assert (body["next_after"], body["head"]) == (4, 4)
    body = api.get(url(session.id, "/events"), {"after": 4}).json()
    assert (body["events"], body["next_after"], body["head"]) == ([], 4, 4)


def test_history_default_limit_is_100(api, session):
    publish_progress(api, session.id, 120)
    body = api.get(url(session.id, "/events")).json()
    assert [e["seq"] for e in body["events"]] == list(range(1, 101))
    assert (body["next_after"], body["head"]) == (100, 120)


def test_history_event_shape(api, session):
    post(
        api,
        url(session.id, "/events"),
        {
            "type": "message.create",
            "message_id": "m",
            "data": {"role": "assistant", "content": "hi"},
        },
    )
    (event,) = api.get(url(session.id, "/events")).json()["events"]
    assert set(event) == {
        "seq",
        "id",
        "session",
        "type",
        "message_id",
        "author",
        "data",
        "visibility",
        "ts",
    }
    assert (event["seq"], event["session"], event["type"], event["message_id"]) == (
        1,
        session.id,
        "message.create",
        "m",
    )
    assert event["author"] == {"kind": "agent", "id": "test-agent", "name": "test-agent"}
    assert event["data"] == {"role": "assistant", "content": "hi"}
    assert event["visibility"] == "all"
    assert event["ts"].endswith("Z") and len(event["ts"]) == len("2026-11-27T20:41:02.123Z")


def test_history_type_filters(api, session):
    body = {
        "events": [
            {"type": "message.create", "message_id": "m", "data": {"role": "assistant"}},
            {"type": "progress.tool", "data": {}},
            {"type": "message.append", "message_id": "m", "data": {"delta": "x"}},
            {"type": "signal.cancel", "data": {}},
            {"type": "signal.redirect", "data": {"text": "t"}},
            {"type": "progress.other", "data": {}},
        ]
    }
    assert post(api, url(session.id, "/events"), body).status_code == 201

    def seqs_for(types_: str) -> list[int]:
        response = api.get(url(session.id, "/events"), {"types": types_})
        assert response.status_code == 200, response.content
        assert response.json()["head"] == 6
        return [e["seq"] for e in response.json()["events"]]

    assert seqs_for("message.*") == [1, 3]
    assert seqs_for("progress.*,signal.cancel") == [2, 4, 6]
    assert seqs_for("signal.redirect") == [5]
    assert seqs_for("*") == [1, 2, 3, 4, 5, 6]
    assert seqs_for("handover.*") == []
    # A family glob matches whole dotted segments only.
    more = {"events": [{"type": "progress.tool.search"}, {"type": "progress.toolbox"}]}
    assert post(api, url(session.id, "/events"), more).status_code == 201
    response = api.get(url(session.id, "/events"), {"types": "progress.tool.*"})
    assert [e["type"] for e in response.json()["events"]] == ["progress.tool.search"]
    # Filters and paging compose: next_after moves past what the filter skipped.
    page = api.get(url(session.id, "/events"), {"types": "message.*", "limit": 1}).json()
    assert ([e["seq"] for e in page["events"]], page["next_after"]) == ([1], 1)
    page = api.get(
        url(session.id, "/events"), {"types": "message.*", "limit": 1, "after": 1}
    ).json()
    assert ([e["seq"] for e in page["events"]], page["next_after"]) == ([3], 3)
    page = api.get(
        url(session.id, "/events"), {"types": "message.*", "limit": 1, "after": 3}
    ).json()
    assert (page["events"], page["next_after"]) == ([], 8)


@pytest.mark.parametrize("types_", ["mess*", "*.create", "message.*x", ",".join(["a.b"] * 21)])
def test_history_bad_type_filter(api, session, types_):
    assert_error(api.get(url(session.id, "/events"), {"types": types_}), 400, "invalid_filter")


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"after": -1}, "bad_after"),
        ({"after": "x"}, "bad_after"),
        ({"after": "1.5"}, "bad_after"),
        ({"limit": 0}, "invalid"),
        ({"limit": 1001}, "invalid"),
        ({"limit": -5}, "invalid"),
        ({"limit": "ten"}, "invalid"),
    ],
)
def test_history_bad_paging_params(api, session, params, code):
    publish_progress(api, session.id, 2)
    assert_error(api.get(url(session.id, "/events"), params), 400, code)


def test_history_limit_bounds_are_inclusive(api, session):
    publish_progress(api, session.id, 3)
    assert [
        e["seq"] for e in api.get(url(session.id, "/events"), {"limit": 1}).json()["events"]
    ] == [1]
    assert len(api.get(url(session.id, "/events"), {"limit": 1000}).json()["events"]) == 3


def test_private_events_are_only_for_operators(api, session, make_token, operator_api):
    publish_progress(api, session.id, 1)  # 1
    post(
        operator_api,
        url(session.id, "/events"),
        {"type": "note.internal", "data": {"text": "refund pending"}},
    )  # 2
    open_connection(  # 3 presence.enter, 4 connection.opened
        session_id=session.id,
        author=Author("user", "user-1", "User-1"),
        worker_id="wrk_t",
        after=0,
        replayed=0,
        counts_for_presence=True,
    )
    publish_progress(api, session.id, 1)  # 5
    assert Session.objects.get(pk=session.id).last_seq == 5

    user = client_with(make_token(session.id))
    for client in (user, api):
        body = client.get(url(session.id, "/events")).json()
        assert [e["type"] for e in body["events"]] == [
            "progress.step",
            "presence.enter",
            "progress.step",
        ]
        assert all(e["visibility"] == "all" for e in body["events"])
        assert (body["head"], body["next_after"]) == (5, 5)
        # Asking for the private types explicitly does not reveal them either.
        body = client.get(
            url(session.id, "/events"), {"types": "note.internal,connection.*"}
        ).json()
        assert body["events"] == []

    body = operator_api.get(url(session.id, "/events")).json()
    assert [(e["type"], e["visibility"]) for e in body["events"]] == [
        ("progress.step", "all"),
        ("note.internal", "operators"),
        ("presence.enter", "all"),
        ("connection.opened", "diagnostics"),
        ("progress.step", "all"),
    ]


def test_history_of_unknown_session_is_404(api):
    assert_error(api.get(url("ses_missing", "/events")), 404, "not_found")


# --------------------------------------------------------------------------- messages


def test_messages_snapshot(api, session, make_token):
    user = client_with(make_token(session.id))
    post(
        user,
        url(session.id, "/events"),
        {
            "type": "message.create",
            "message_id": "u1",
            "data": {"role": "user", "content": "hi", "status": "complete"},
        },
    )
    post(
        api,
        url(session.id, "/events"),
        {
            "events": [
                {"type": "message.create", "message_id": "a1", "data": {"role": "assistant"}},
                {"type": "message.append", "message_id": "a1", "data": {"delta": "Hello"}},
                {"type": "progress.tool", "data": {}},
            ]
        },
    )
    for client in (api, user):
        response = client.get(url(session.id, "/messages"))
        assert response.status_code == 200
        body = response.json()
        assert body["seq"] == 4
        assert [m["message_id"] for m in body["messages"]] == ["u1", "a1"]
        u1, a1 = body["messages"]
        assert (u1["role"], u1["content"], u1["status"], u1["version"]) == (
            "user",
            "hi",
            "complete",
            1,
        )
        assert u1["author"] == {"kind": "user", "id": "user-1", "name": "User-1"}
        assert (a1["role"], a1["content"], a1["status"], a1["version"]) == (
            "assistant",
            "Hello",
            "streaming",
            2,
        )
        assert (a1["created_seq"], a1["last_seq"]) == (2, 3)


def test_messages_of_empty_and_unknown_session(api, session):
    assert api.get(url(session.id, "/messages")).json() == {"seq": 0, "messages": []}
    assert_error(api.get(url("ses_missing", "/messages")), 404, "not_found")


# --------------------------------------------------------------------------- presence


def test_presence_lease_over_rest(api, session):
    assert api.get(url(session.id, "/presence")).json() == {"members": []}

    response = post(api, url(session.id, "/presence"), {"ttl": 30})
    assert response.status_code == 200
    body = response.json()
    assert body["client_id"] == "test-agent"
    assert body["present"] is True
    assert body["expires_at"].endswith("Z")
    assert [m["client_id"] for m in body["members"]] == ["test-agent"]

    members = api.get(url(session.id, "/presence")).json()["members"]
    assert len(members) == 1
    assert (members[0]["client_id"], members[0]["kind"], members[0]["connections"]) == (
        "test-agent",
        "agent",
        0,
    )
    assert "lease_expires_at" in members[0]

    # Renew with state: presence.update; the state is visible in the member set.
    body = post(api, url(session.id, "/presence"), {"ttl": 60, "state": {"busy": True}}).json()
    assert body["members"][0]["state"] == {"busy": True}

    body = post(api, url(session.id, "/presence"), {"ttl": 0}).json()
    assert (body["present"], body["expires_at"], body["members"]) == (False, None, [])
    events = [
        (e.type, e.data.get("reason"))
        for e in Event.objects.filter(session_id=session.id).order_by("seq")
    ]
    assert events == [
        ("presence.enter", None),
        ("presence.update", None),
        ("presence.leave", "closed"),
    ]


def test_presence_lease_for_another_client_id(api, session, make_token):
    body = post(api, url(session.id, "/presence"), {"ttl": 30, "client_id": "helper-bot"}).json()
    assert body["client_id"] == "helper-bot"
    assert PresenceLease.objects.get(session_id=session.id).client_id == "helper-bot"
    # A client token holds presence only for itself.
    user = client_with(make_token(session.id, client_id="dana"))
    before = state(session.id)
    assert_error(
        post(user, url(session.id, "/presence"), {"ttl": 30, "client_id": "eve"}), 403, "forbidden"
    )
    assert state(session.id) == before
    body = post(user, url(session.id, "/presence"), {"ttl": 30}).json()
    assert body["client_id"] == "dana"
    assert sorted(m["client_id"] for m in body["members"]) == ["dana", "helper-bot"]


def test_presence_hides_expired_leases_before_they_are_reaped(api, session):
    post(api, url(session.id, "/presence"), {"ttl": 30})
    PresenceLease.objects.update(expires_at=timezone.now() - timezone.timedelta(seconds=1))
    assert api.get(url(session.id, "/presence")).json() == {"members": []}


def test_presence_shows_connections(api, session):
    for _ in range(2):
        open_connection(
            session_id=session.id,
            author=Author("user", "dana", "Dana"),
            worker_id="w",
            after=0,
            replayed=0,
            counts_for_presence=True,
        )
    (member,) = api.get(url(session.id, "/presence")).json()["members"]
    assert (member["client_id"], member["kind"], member["name"], member["connections"]) == (
        "dana",
        "user",
        "Dana",
        2,
    )


@pytest.mark.parametrize(
    "body", [{}, {"ttl": -1}, {"ttl": 3601}, {"ttl": "soon"}, {"ttl": 5, "state": [1]}]
)
def test_presence_bad_input(api, session, body):
    assert_error(post(api, url(session.id, "/presence"), body), 400)
    assert state(session.id) == (0, 0, 0, 0)


def test_presence_capability_is_required(session, make_token):
    client = client_with(make_token(session.id, capabilities=["subscribe", "publish"]))
    assert_error(post(client, url(session.id, "/presence"), {"ttl": 30}), 403, "forbidden")
    assert state(session.id) == (0, 0, 0, 0)
    # Reading presence needs subscribe only.
    assert client.get(url(session.id, "/presence")).status_code == 200
    presence_only = client_with(make_token(session.id, capabilities=["presence"]))
    assert_error(presence_only.get(url(session.id, "/presence")), 403, "forbidden")
    assert post(presence_only, url(session.id, "/presence"), {"ttl": 30}).status_code == 200


def test_presence_of_unknown_session_is_404(api):
    assert_error(api.get(url("ses_missing", "/presence")), 404, "not_found")
    assert_error(post(api, url("ses_missing", "/presence"), {"ttl": 5}), 404, "not_found")
    assert not PresenceLease.objects.exists()


# --------------------------------------------------------------------------- tokens


def test_mint_a_token_and_use_it(api, session):
    response = post(
        api,
        url(session.id, "/tokens"),
        {
            "client_id": "dana",
            "kind": "user",
            "name": "Dana",
            "capabilities": ["subscribe"],
            "ttl": 120,
        },
    )
    assert response.status_code == 201
    body = response.json()
    assert body["token"].startswith("ct_")
    assert (body["session"], body["client_id"]) == (session.id, "dana")
    assert body["expires_at"].endswith("Z")
    client = client_with(body["token"])
    assert client.get(url(session.id)).status_code == 200
    assert client.get(url(session.id, "/events")).status_code == 200
    assert_error(post(client, url(session.id, "/events"), {"type": "progress.x"}), 403, "forbidden")
    assert state(session.id) == (0, 0, 0, 0)


def test_minted_token_defaults_to_all_capabilities(operator_api, session):
    response = post(operator_api, url(session.id, "/tokens"), {"client_id": "dana"})
    assert response.status_code == 201
    client = client_with(response.json()["token"])
    assert post(client, url(session.id, "/events"), {"type": "progress.x"}).status_code == 201
    assert post(client, url(session.id, "/presence"), {"ttl": 5}).status_code == 200
    row = Event.objects.filter(session_id=session.id).order_by("seq").first()
    assert (row.author_kind, row.author_id) == ("user", "dana")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"client_id": ""},
        {"client_id": "x" * 151},
        {"client_id": "dana", "kind": "operator"},
        {"client_id": "dana", "kind": "system"},
        {"client_id": "dana", "capabilities": ["fly"]},
        {"client_id": "dana", "capabilities": []},
        {"client_id": "dana", "capabilities": "subscribe"},
        {"client_id": "dana", "ttl": 0},
        {"client_id": "dana", "ttl": -10},
        {"client_id": "dana", "ttl": "long"},
        {"client_id": "dana", "ttl": 7 * 24 * 3600 + 1},
    ],
)
def test_mint_token_bad_input(api, session, body):
    assert_error(post(api, url(session.id, "/tokens"), body), 400)


def test_mint_token_needs_a_global_credential_and_a_session(api, session, make_token):
    client = client_with(make_token(session.id))
    assert_error(post(client, url(session.id, "/tokens"), {"client_id": "x"}), 403, "forbidden")
    assert_error(post(api, url("ses_missing", "/tokens"), {"client_id": "x"}), 404, "not_found")


# --------------------------------------------------------------------------- credentials and scope


def test_token_of_another_session_is_forbidden_everywhere(make_session, make_token, api):
    a, b = make_session("a"), make_session("b")
    client = client_with(make_token(a.id))
    publish_progress(api, b.id, 1)
    before = state(b.id)
    assert_error(client.get(url(b.id)), 403, "forbidden")
    assert_error(client.get(url(b.id, "/events")), 403, "forbidden")
    assert_error(client.get(url(b.id, "/messages")), 403, "forbidden")
    assert_error(client.get(url(b.id, "/presence")), 403, "forbidden")
    assert_error(post(client, url(b.id, "/events"), {"type": "progress.x"}), 403, "forbidden")
    assert_error(post(client, url(b.id, "/presence"), {"ttl": 5}), 403, "forbidden")
    assert_error(
        post(client, url(b.id, "/events"), {"type": "message.create", "data": {"role": "user"}}),
        403,
        "forbidden",
    )
    assert state(b.id) == before
    # ...while it works on its own session.
    assert client.get(url(a.id)).status_code == 200


def test_subscribe_only_token_cannot_publish(session, make_token):
    client = client_with(make_token(session.id, capabilities=["subscribe"]))
    body = {"type": "message.create", "data": {"role": "user"}}
    assert_error(post(client, url(session.id, "/events"), body), 403, "forbidden")
    assert state(session.id) == (0, 0, 0, 0)


def test_any_token_of_the_session_can_read_the_session(session, make_token):
    """protocol.md, REST table: `GET /sessions/<id>` is allowed to "any credential for it"
    (the other read endpoints need `subscribe`). api.py SessionDetailView.get demands
    `subscribe`, so a publish- or presence-only token of this very session gets 403."""
    for caps in (["publish"], ["presence"]):
        client = client_with(make_token(session.id, capabilities=caps))
        response = client.get(url(session.id))
        assert response.status_code == 200, (caps, response.content)
        assert response.json()["id"] == session.id


def test_publish_only_token_cannot_read(session, make_token):
    client = client_with(make_token(session.id, capabilities=["publish"]))
    assert_error(client.get(url(session.id, "/events")), 403, "forbidden")
    assert_error(client.get(url(session.id, "/messages")), 403, "forbidden")
    assert post(client, url(session.id, "/events"), {"type": "signal.cancel"}).status_code == 201


def test_expired_token_is_unauthenticated(session, make_token, monkeypatch):
    token = make_token(session.id, ttl=1)
    client = client_with(token)
    assert client.get(url(session.id)).status_code == 200
    real = time.time
    monkeypatch.setattr(auth_module, "time", SimpleNamespace(time=lambda: real() + 5))
    assert_error(client.get(url(session.id)), 401, "unauthenticated")
    assert_error(
        post(client, url(session.id, "/events"), {"type": "progress.x"}), 401, "unauthenticated"
    )
    assert state(session.id) == (0, 0, 0, 0)


@pytest.mark.parametrize(
    "header",
    [
        "Bearer garbage",
        "Bearer ct_garbage",
        "Bearer bk_not-a-real-key",
        "Bearer ",
        "Basic dXNlcjpwdw==",
        "bk_without_scheme",
    ],
)
def test_bad_credentials_are_unauthenticated(session, header):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    assert_error(client.get(url(session.id)), 401, "unauthenticated")
    assert_error(
        post(client, url(session.id, "/events"), {"type": "progress.x"}), 401, "unauthenticated"
    )
    assert state(session.id) == (0, 0, 0, 0)


def test_tampered_token_is_unauthenticated(session, make_token):
    token = make_token(session.id)
    tampered = token[:-3] + ("aaa" if not token.endswith("aaa") else "bbb")
    assert_error(client_with(tampered).get(url(session.id)), 401, "unauthenticated")


def test_revoked_agent_key_is_unauthenticated(api, agent_key, session):
    assert api.get(url(session.id)).status_code == 200
    AgentKey.objects.filter(name="test-agent").update(revoked_at=timezone.now())
    assert_error(api.get(url(session.id)), 401, "unauthenticated")


def test_missing_credential_is_unauthenticated(anon_api, session):
    for path in (
        url(),
        url(session.id),
        url(session.id, "/events"),
        url(session.id, "/messages"),
        url(session.id, "/presence"),
    ):
        response = anon_api.get(path)
        assert_error(response, 401, "unauthenticated")
        assert response["WWW-Authenticate"].startswith("Bearer")
    assert_error(
        post(anon_api, url(session.id, "/events"), {"type": "progress.x"}), 401, "unauthenticated"
    )
    assert_error(post(anon_api, url(), {}), 401, "unauthenticated")
    assert Session.objects.count() == 1


def test_logged_in_non_operator_is_forbidden(session):
    user = User.objects.create_user("mallory", password="pw")
    client = APIClient()
    client.force_login(user)
    assert_error(client.get(url()), 403, "forbidden")
    assert_error(client.get(url(session.id, "/events")), 403, "forbidden")
    assert_error(post(client, url(session.id, "/events"), {"type": "progress.x"}), 403, "forbidden")
    assert state(session.id) == (0, 0, 0, 0)


def test_cookie_post_without_csrf_token_is_refused(operator_user, session):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(operator_user)
    # Safe methods need no token.
    assert client.get(url(session.id)).status_code == 200
    error = assert_error(
        post(client, url(session.id, "/events"), {"type": "progress.x"}), 403, "forbidden"
    )
    assert "CSRF" in error["message"]
    assert_error(post(client, url(), {"title": "x"}), 403, "forbidden")
    assert state(session.id) == (0, 0, 0, 0)
    assert Session.objects.count() == 1

    # With the cookie and the matching header it goes through.
    secret = "a1b2c3d4" * 4
    client.cookies["csrftoken"] = secret
    response = post(
        client, url(session.id, "/events"), {"type": "progress.x"}, HTTP_X_CSRFTOKEN=secret
    )
    assert response.status_code == 201, response.content
    # A wrong header is still refused.
    response = post(
        client, url(session.id, "/events"), {"type": "progress.x"}, HTTP_X_CSRFTOKEN="z" * 32
    )
    assert_error(response, 403, "forbidden")
    assert Session.objects.get(pk=session.id).last_seq == 1


def test_bearer_post_needs_no_csrf_token(agent_key, session):
    client = APIClient(enforce_csrf_checks=True)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {agent_key}")
    assert post(client, url(session.id, "/events"), {"type": "progress.x"}).status_code == 201


def test_unknown_session_is_404_for_global_credentials(api, operator_api):
    for client in (api, operator_api):
        assert_error(client.get(url("ses_missing")), 404, "not_found")


def test_unknown_session_with_a_token_of_another_session_is_403(session, make_token):
    client = client_with(make_token(session.id))
    assert_error(client.get(url("ses_missing")), 403, "forbidden")


# --------------------------------------------------------------------------- misc


def test_wrong_method_is_405_with_error_body(api, session):
    assert_error(api.delete(url(session.id)), 405, "method_not_allowed")
    assert_error(api.put(url(session.id, "/events"), {}, format="json"), 405, "method_not_allowed")
    assert_error(api.get(url(session.id, "/tokens")), 405, "method_not_allowed")


def test_unsupported_media_type(api, session):
    response = api.post(
        url(session.id, "/events"), data="type=progress.x", content_type="text/plain"
    )
    assert_error(response, 415, "unsupported_media_type")
    assert state(session.id) == (0, 0, 0, 0)


def test_unknown_api_endpoint_is_a_json_404(api):
    """protocol.md: every REST error is `{"error": {...}}`; project/urls.py has a JSON 404
    handler (`api_not_found`) that is never installed as `handler404`."""
    assert_error(api.get("/api/v1/nope"), 404, "not_found")


def test_openapi_schema(anon_api, db):
    response = anon_api.get("/api/schema/")
    assert response.status_code == 200
    text = response.content.decode()
    for path in (
        "/api/v1/sessions",
        "/api/v1/sessions/{session_id}/events",
        "/api/v1/sessions/{session_id}/messages",
        "/api/v1/sessions/{session_id}/presence",
        "/api/v1/sessions/{session_id}/tokens",
    ):
        assert path in text


# --------------------------------------------------------------------------- SSE (refusals only)
# The live tail itself is covered by the end-to-end tests; these are the cheap refusals that
# answer before any stream starts. SSE is an async view: its DB access goes through
# database_sync_to_async, which needs committed data.


@pytest.mark.django_db(transaction=True)
def test_sse_refusals(make_token, agent_key):
    session = create_session(created_by=AGENT, title="sse")
    other = create_session(created_by=AGENT, title="other")
    stream = url(session.id, "/events/stream")
    c = Client()
    assert_error(c.get(stream), 401, "unauthenticated")
    assert_error(c.get(stream, {"token": "garbage"}), 401, "unauthenticated")
    assert_error(c.get(stream, HTTP_AUTHORIZATION="Basic x"), 401, "unauthenticated")
    assert_error(c.get(stream, {"token": make_token(other.id)}), 403, "forbidden")
    assert_error(
        c.get(stream, {"token": make_token(session.id, capabilities=["publish"])}), 403, "forbidden"
    )
    assert_error(c.get(stream, {"token": agent_key, "after": "-1"}), 400, "bad_after")
    assert_error(c.post(stream, {"token": agent_key}), 405, "method_not_allowed")
