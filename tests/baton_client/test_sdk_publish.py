"""Exactly-once publishing: client_ref on every publish, re-sent unchanged after a reconnect."""

from __future__ import annotations

import asyncio

import pytest

from baton_client import BatonClient, BatonREST, PublishError


def stored(rest: BatonREST, session_id: str, event_type: str) -> list[dict]:
    return [e for e in rest.iter_history(session_id) if e["type"] == event_type]


async def test_same_client_ref_twice_stores_one_event(agent: BatonClient, rest: BatonREST):
    info = await agent.create_session(title="idempotent")
    session = await agent.connect(info["id"])
    first = await session.publish("signal.custom", {"n": 1}, client_ref="ref-1")
    second = await session.publish("signal.custom", {"n": 1}, client_ref="ref-1")
    assert not first.duplicate
    assert second.duplicate
    assert second.seq == first.seq
    assert len(stored(rest, info["id"], "signal.custom")) == 1
    await session.close()


async def test_rest_idempotency_key_retry_stores_once(agent: BatonClient, rest: BatonREST):
    info = await agent.create_session(title="rest-idempotent")
    batch = [{"type": "progress.a", "data": {}}, {"type": "progress.b", "data": {}}]
    first = rest.publish(info["id"], batch, idempotency_key="job-42")
    retry = rest.publish(info["id"], batch, idempotency_key="job-42")
    assert [r["seq"] for r in retry] == [r["seq"] for r in first]
    assert all(r["duplicate"] for r in retry)
    assert len(stored(rest, info["id"], "progress.a")) == 1


async def test_every_publish_gets_a_fresh_client_ref(agent: BatonClient, rest: BatonREST):
    """Two identical publishes without explicit refs are two events, not a dedupe."""
    info = await agent.create_session(title="fresh-refs")
    session = await agent.connect(info["id"])
    a = await session.progress("tick", {"n": 1})
    b = await session.progress("tick", {"n": 1})
    assert b.seq == a.seq + 1 or b.seq > a.seq
    assert not a.duplicate and not b.duplicate
    await session.close()


async def test_in_flight_publish_is_resent_with_same_client_ref(
    baton_server, proxy, rest: BatonREST, eventually
):
    """The publish reaches the server but its ack is lost with the connection: the SDK
    re-sends it after reconnecting, the server answers `duplicate`, one event is stored."""
    async with BatonClient(proxy.url, baton_server.agent_key, client_id="agent") as client:
        info = await client.create_session(title="in-flight")
        session = await client.connect(info["id"], backoff_base=0.05, backoff_max=0.2)
        proxy.blackhole = True  # server → client bytes vanish: the ack will never arrive
        publishing = asyncio.create_task(session.publish("signal.custom", {"once": True}))
        await eventually(lambda: len(stored(rest, info["id"], "signal.custom")) == 1)
        assert not publishing.done()
        proxy.blackhole = False
        proxy.drop()
        async with asyncio.timeout(10):
            ack = await publishing
        assert ack.duplicate
        (event,) = stored(rest, info["id"], "signal.custom")
        assert ack.seq == event["seq"]
        assert session.reconnects >= 1
        await session.close()


async def test_publishes_queued_while_disconnected_keep_their_order(
    baton_server, proxy, rest: BatonREST
):
    async with BatonClient(proxy.url, baton_server.agent_key, client_id="agent") as client:
        info = await client.create_session(title="queued")
        session = await client.connect(info["id"], backoff_base=0.3, backoff_max=0.3)
        proxy.drop()
        acks = await asyncio.gather(*(session.progress("n", {"i": i}) for i in range(10)))
        assert [a.seq for a in acks] == sorted(a.seq for a in acks)
        order = [e["data"]["i"] for e in stored(rest, info["id"], "progress.n")]
        assert order == list(range(10))
        await session.close()


async def test_server_refusal_maps_to_publish_error(agent: BatonClient):
    info = await agent.create_session(title="refusal")
    session = await agent.connect(info["id"])
    with pytest.raises(PublishError) as caught:
        await session.publish("message.append", {"delta": "x"}, message_id="msg_nope")
    assert caught.value.code == "message_not_found"
    # The session keeps working after a refused publish.
    assert (await session.progress("ok")).seq > 0
    await session.close()
