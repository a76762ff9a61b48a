"""The handover REST endpoints and the NDJSON export."""

from __future__ import annotations

import json
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from rest_framework.test import APIClient

from handover.models import Handover
from sessions_app.models import Event, Session
from sessions_app.services import EventInput, append_events
from tests.handover.conftest import OLIVIA

pytestmark = pytest.mark.django_db


def url(session_id: str, action: str) -> str:
    return f"/api/v1/sessions/{session_id}/{action}"


def post(client: APIClient, path: str, body: dict[str, Any] | None = None) -> Any:
    return client.post(path, body or {}, format="json")


def error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code


def bearer(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def count(session_id: str) -> int:
    return Event.objects.filter(session_id=session_id).count()


def test_user_token_requests_a_human(session, make_token):
    user = bearer(make_token(session.id))
    response = post(user, url(session.id, "handover"), {"reason": "stuck", "summary": "Loop"})
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["seq"] == 1
    assert body["session"]["status"] == "awaiting_human"
    event = Event.objects.get(session=session)
    assert (event.type, event.author_kind, event.data) == (
        "handover.requested",
        "user",
        {"reason": "stuck", "summary": "Loop"},
    )
    assert Handover.objects.filter(session=session, reason="stuck").exists()


def test_handover_request_needs_publish_and_a_user_or_agent(session, make_token, operator_api):
    read_only = bearer(make_token(session.id, capabilities=["subscribe"]))
    error(post(read_only, url(session.id, "handover"), {"reason": "x"}), 403, "forbidden")
    error(post(operator_api, url(session.id, "handover"), {"reason": "x"}), 403, "forbidden")
    error(post(APIClient(), url(session.id, "handover"), {"reason": "x"}), 401, "unauthenticated")
    error(post(read_only, url(session.id, "handover"), {"reason": "x" * 600}), 403, "forbidden")
    assert count(session.id) == 0


def test_bad_body_and_unknown_session(api, session):
    error(post(api, url(session.id, "handover"), {"reason": "x" * 600}), 400, "invalid")
    error(post(api, url("ses_missing", "handover"), {"reason": "x"}), 404, "not_found")
    assert count(session.id) == 0


def test_claim_release_are_for_operators(api, session, make_token, operator_api):
    post(api, url(session.id, "handover"), {"reason": "x"})
    user = bearer(make_token(session.id))
    for client in (api, user):
        error(post(client, url(session.id, "claim")), 403, "forbidden")
        error(post(client, url(session.id, "release")), 403, "forbidden")
    response = post(operator_api, url(session.id, "claim"))
    assert response.status_code == 200, response.content
    assert response.json()["session"]["status"] == "with_human"
    assert response.json()["session"]["controller"] == OLIVIA.as_dict()
    error(post(operator_api, url(session.id, "claim")), 409, "already_claimed")


def test_publish_after_claim_is_refused_over_rest_and_release_lets_the_agent_back(
    api, session, operator_api
):
    post(api, url(session.id, "handover"), {"reason": "x"})
    post(operator_api, url(session.id, "claim"))
    message = {"type": "message.create", "data": {"role": "assistant", "content": "me again"}}
    before = count(session.id)
    error(post(api, f"/api/v1/sessions/{session.id}/events", message), 409, "controlled_by_human")
    assert count(session.id) == before

    response = post(operator_api, url(session.id, "release"), {"reason": "solved"})
    assert response.status_code == 200
    assert response.json()["session"]["status"] == "active"
    assert post(api, f"/api/v1/sessions/{session.id}/events", message).status_code == 201
    error(post(operator_api, url(session.id, "release")), 409, "not_claimed")


def test_close_by_agent_or_operator_but_not_by_user(api, make_session, make_token, operator_api):
    first, second = make_session(), make_session()
    error(post(bearer(make_token(first.id)), url(first.id, "close")), 403, "forbidden")
    assert post(api, url(first.id, "close"), {"reason": "done"}).status_code == 200
    assert Session.objects.get(pk=first.id).status == "closed"
    error(post(api, url(first.id, "close")), 409, "session_closed")
    agent_token = bearer(make_token(second.id, client_id="bot", kind="agent"))
    assert post(agent_token, url(second.id, "close")).status_code == 200
    assert Event.objects.get(session=second).author_id == "bot"
    third = make_session()
    assert post(operator_api, url(third.id, "close")).status_code == 200


def test_operator_actions_need_csrf(operator_user, session):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(operator_user)
    response = post(client, url(session.id, "claim"))
    error(response, 403, "forbidden")
    assert "CSRF" in response.json()["error"]["message"]
    assert count(session.id) == 0


def _seed(session_id: str) -> None:
    from sessions_app.identity import Author

    agent = Author(kind="agent", id="test-agent", name="test-agent")
    append_events(
        session_id=session_id,
        author=agent,
        events=[
            EventInput("message.create", {"role": "assistant", "content": "Hi"}, "m1"),
            EventInput("progress.tool", {"name": "search"}),
            EventInput("message.complete", {"status": "complete"}, "m1"),
        ],
    )
    append_events(
        session_id=session_id,
        author=OLIVIA,
        events=[EventInput("note.internal", {"text": "<b>vip</b>"})],
    )


def ndjson(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200
    assert response["Content-Type"] == "application/x-ndjson"
    assert response.is_async  # ASGI streams it page by page

    async def collect() -> list[bytes]:
        return [chunk async for chunk in response.streaming_content]

    body = b"".join(async_to_sync(collect)()).decode()
    assert body.endswith("\n")
    return [json.loads(line) for line in body.splitlines()]


def test_export_is_ndjson_of_the_full_log_for_operators(session, operator_api):
    _seed(session.id)
    lines = ndjson(operator_api.get(url(session.id, "export")))
    assert [(e["seq"], e["type"], e["visibility"]) for e in lines] == [
        (1, "message.create", "all"),
        (2, "progress.tool", "all"),
        (3, "message.complete", "all"),
        (4, "note.internal", "operators"),
    ]
    assert lines[3]["author"] == OLIVIA.as_dict()
    assert lines[3]["data"] == {"text": "<b>vip</b>"}
    assert lines[0]["author"]["kind"] == "agent" and lines[0]["message_id"] == "m1"


def test_export_for_agent_keys_is_the_full_audit_log(api, session, make_token):
    _seed(session.id)
    lines = ndjson(api.get(url(session.id, "export")))
    assert [(e["type"], e["visibility"]) for e in lines] == [
        ("message.create", "all"),
        ("progress.tool", "all"),
        ("message.complete", "all"),
        ("note.internal", "operators"),
    ]
    error(bearer(make_token(session.id)).get(url(session.id, "export")), 403, "forbidden")
    error(api.get(url("ses_missing", "export")), 404, "not_found")


def test_export_pages_through_a_long_log(api, session, monkeypatch):
    from handover import selectors

    monkeypatch.setattr(selectors, "EXPORT_PAGE", 7)
    from sessions_app.identity import Author

    agent = Author(kind="agent", id="test-agent", name="test-agent")
    append_events(
        session_id=session.id,
        author=agent,
        events=[EventInput("progress.step", {"i": i}) for i in range(30)],
    )
    lines = ndjson(api.get(url(session.id, "export")))
    assert [e["seq"] for e in lines] == list(range(1, 31))
