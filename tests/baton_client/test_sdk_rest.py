"""The synchronous REST helper against the real API: paths, shapes, errors."""

from __future__ import annotations

import pytest

from baton_client import BatonError, BatonREST, PublishError, SessionNotFound


def test_publish_history_and_messages(rest: BatonREST):
    sid = rest.create_session(title="rest", metadata={"order": 7})["id"]
    assert rest.get_session(sid)["status"] == "active"
    (one,) = rest.publish(sid, {"type": "progress.step", "data": {"n": 0}})
    batch = rest.publish(
        sid,
        [
            {
                "type": "message.create",
                "message_id": "msg_r1",
                "data": {"role": "assistant", "status": "streaming"},
            },
            {"type": "message.append", "message_id": "msg_r1", "data": {"delta": "hi"}},
            {"type": "message.complete", "message_id": "msg_r1", "data": {"status": "complete"}},
        ],
    )
    assert [r["seq"] for r in batch] == [one["seq"] + 1, one["seq"] + 2, one["seq"] + 3]

    page = rest.history(sid, after=0, limit=2)
    assert len(page["events"]) == 2
    assert page["head"] >= batch[-1]["seq"]
    everything = list(rest.iter_history(sid))
    assert [e["seq"] for e in everything] == sorted({e["seq"] for e in everything})
    assert everything[-1]["seq"] == batch[-1]["seq"]
    only_messages = list(rest.iter_history(sid, types=["message.*"]))
    assert {e["type"] for e in only_messages} == {
        "message.create",
        "message.append",
        "message.complete",
    }

    snapshot = rest.messages(sid)
    (message,) = snapshot["messages"]
    assert message["content"] == "hi"
    assert message["status"] == "complete"
    assert snapshot["seq"] >= batch[-1]["seq"]


def test_presence_lease_and_token(rest: BatonREST):
    sid = rest.create_session(title="lease")["id"]
    rest.presence_lease(sid, ttl=30, client_id="cron-agent")
    assert "cron-agent" in {m["client_id"] for m in rest.presence(sid)}
    rest.presence_lease(sid, ttl=0, client_id="cron-agent")
    assert "cron-agent" not in {m["client_id"] for m in rest.presence(sid)}

    minted = rest.mint_token(sid, "user-9", kind="user", capabilities=["subscribe"], ttl=60)
    assert minted["token"].startswith("ct_")
    with BatonREST(rest.base_url, minted["token"]) as reader:
        assert reader.history(sid)["events"] is not None
        with pytest.raises(PublishError) as caught:  # no `publish` capability
            reader.publish(sid, {"type": "signal.custom", "data": {}})
        assert caught.value.status == 403


def test_errors_carry_code_and_status(rest: BatonREST):
    with pytest.raises(BatonError) as caught:
        rest.get_session("ses_missing")
    assert caught.value.status == 404
    assert not isinstance(caught.value, SessionNotFound)  # that one is for sockets
    sid = rest.create_session(title="errors")["id"]
    with pytest.raises(PublishError) as bad:
        rest.publish(sid, {"type": "nonsense", "data": {}})
    assert bad.value.code == "invalid_event"
    assert bad.value.status == 400
