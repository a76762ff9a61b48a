"""Group commit across workers: a worker hands its publishes to the committing worker, and
whatever goes wrong on the way (no answer, a lost answer, a failed send), each publish is
stored exactly once and in the order it was made."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import msgpack
import pytest
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from sessions_app.errors import BatonError
from sessions_app.hub import get_hub
from sessions_app.identity import Author
from sessions_app.models import Event, Worker
from sessions_app.selectors import get_committing_worker
from sessions_app.services import AppendResult, EventInput, append_events, heartbeat_worker
from sessions_app.writer import EventWriter, Forwarder

pytestmark = pytest.mark.django_db(transaction=True)

AGENT = Author(kind="agent", id="test-agent", name="test-agent")


def _step(i: int) -> EventInput:
    return EventInput(type="progress.step", data={"i": i})


class Wire:
    """A stand-in channel layer between writers in one process: messages go through msgpack as
    on Redis; a channel can be made to hold its messages (a stalled worker) or to lose them."""

    def __init__(self) -> None:
        self.writers: dict[str, EventWriter] = {}
        self.held: dict[str, list[dict[str, Any]]] = {}
        self.lost: set[str] = set()
        self.broken = False
        self.delay = 0.0

    def add(self, channel: str, writer: EventWriter) -> EventWriter:
        forwarder = writer.forwarder = Forwarder(writer, send=self.send, origin=channel)
        forwarder.reply_to = channel
        self.writers[channel] = writer
        return writer

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        if self.broken:
            raise ConnectionError("layer down")
        await asyncio.sleep(self.delay)
        message = msgpack.unpackb(msgpack.packb(message))
        if channel in self.lost:
            return
        if channel in self.held:
            self.held[channel].append(message)
            return
        self.deliver(channel, message)

    def deliver(self, channel: str, message: dict[str, Any]) -> None:
        forwarder = self.writers[channel].forwarder
        assert forwarder is not None
        if message["type"] == "baton.commit":
            forwarder.serve(message)
        else:
            forwarder.on_answers(message)

    def release(self, channel: str) -> None:
        for message in self.held.pop(channel, []):
            self.deliver(channel, message)


@dataclass
class Pair:
    wire: Wire
    committer: EventWriter
    follower: EventWriter
    broadcast: list[int]  # the seqs broadcast after commits, whoever committed them

    def committed(self) -> dict[str, int]:
        """Requests each writer committed in its own batches (served ones included)."""
        return {
            "committer": self.committer.stats["requests"],
            "follower": self.follower.stats["requests"],
        }


@pytest.fixture
async def pair(settings, monkeypatch) -> Any:
    """A committing writer and one that hands its publishes to it."""
    settings.BATON_FORWARD_TIMEOUT_SECONDS = 0.3
    loop = asyncio.get_running_loop()
    wire = Wire()
    broadcast: list[int] = []

    def record(session_id: str, events: list[dict[str, Any]]) -> None:
        broadcast.extend(e["seq"] for e in events)

    # The loop lane (SQLite) broadcasts through the writer; the database thread through this.
    monkeypatch.setattr(
        "sessions_app.services.publish_after_commit",
        lambda session_id, events: transaction.on_commit(lambda: record(session_id, events)),
    )
    committer = wire.add("committer", EventWriter(loop, publish=record))
    follower = wire.add("follower", EventWriter(loop, publish=record))
    assert follower.forwarder is not None
    follower.forwarder.target = "committer"
    yield Pair(wire, committer, follower, broadcast)
    for writer in (committer, follower):
        await writer.close()


async def _publish(writer: EventWriter, session_id: str, steps: range) -> list[list[AppendResult]]:
    futures = [writer.submit(session_id=session_id, author=AGENT, events=[_step(i)]) for i in steps]
    return list(await asyncio.gather(*futures))


async def _until(check: Callable[[], bool | Awaitable[bool]], timeout: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        outcome = check()
        if outcome if isinstance(outcome, bool) else await outcome:
            return
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@database_sync_to_async
def _stored(session_id: str) -> list[tuple[int, str, int]]:
    return list(
        Event.objects.filter(session_id=session_id)
        .order_by("seq")
        .values_list("seq", "id", "data__i")
    )


async def test_a_follower_hands_its_publishes_to_the_committer(make_session, pair):
    session = await database_sync_to_async(make_session)()
    results = await _publish(pair.follower, session.id, range(30))
    assert [r[0].seq for r in results] == list(range(1, 31))
    stored = await _stored(session.id)
    assert [(seq, i) for seq, _, i in stored] == [(n + 1, n) for n in range(30)]
    assert [r[0].id for r in results] == [event_id for _, event_id, _ in stored]
    assert pair.committed() == {"committer": 30, "follower": 0}
    assert (
        pair.follower.forwarder.stats["forwarded"]
        == pair.follower.forwarder.stats["answered"]
        == 30
    )
    assert pair.broadcast == list(range(1, 31))


async def test_a_refusal_comes_back_as_the_same_error(make_session, pair):
    session = await database_sync_to_async(make_session)()
    bad = EventInput(type="message.append", data={"delta": "x"}, message_id="msg_nope")
    with pytest.raises(BatonError) as refused:
        await pair.follower.submit(session_id=session.id, author=AGENT, events=[bad])
    assert (refused.value.code, refused.value.status) == ("message_not_found", 404)


async def test_an_unanswered_publish_is_committed_here_exactly_once(make_session, pair):
    """The committing worker stalls; the follower commits the publishes itself; when the
    stalled worker wakes up and commits them too, the primary key keeps one copy each."""
    session = await database_sync_to_async(make_session)()
    pair.wire.held["committer"] = []
    results = await _publish(pair.follower, session.id, range(5))
    assert [r[0].seq for r in results] == [1, 2, 3, 4, 5]
    assert pair.follower.forwarder.stats["reclaimed"] == 5
    assert pair.committed() == {"committer": 0, "follower": 5}
    pair.wire.release("committer")  # the stalled worker wakes up with the old publishes
    await _until(lambda: pair.committer.stats["requests"] == 5 and not pair.committer.queue)
    await asyncio.sleep(0.1)
    stored = await _stored(session.id)
    assert [(seq, i) for seq, _, i in stored] == [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]
    assert [r[0].id for r in results] == [event_id for _, event_id, _ in stored]
    assert pair.broadcast == [1, 2, 3, 4, 5]  # the late commits stored and broadcast nothing


async def test_a_lost_answer_returns_what_the_committer_stored(make_session, pair):
    session = await database_sync_to_async(make_session)()
    pair.wire.lost.add("follower")  # the answers never arrive
    results = await _publish(pair.follower, session.id, range(4))
    stored = await _stored(session.id)
    assert [(seq, i) for seq, _, i in stored] == [(1, 0), (2, 1), (3, 2), (4, 3)]
    assert [(r[0].seq, r[0].id) for r in results] == [(seq, eid) for seq, eid, _ in stored]
    assert not any(r[0].duplicate for r in results)
    assert pair.follower.forwarder.stats["reclaimed"] == 4
    assert pair.committed() == {"committer": 4, "follower": 4}  # the follower's found them
    assert pair.broadcast == [1, 2, 3, 4]


async def test_a_failed_send_commits_here_at_once(make_session, pair):
    session = await database_sync_to_async(make_session)()
    pair.wire.broken = True
    started = asyncio.get_running_loop().time()
    results = await _publish(pair.follower, session.id, range(3))
    assert asyncio.get_running_loop().time() - started < 0.3  # no wait for the timeout
    assert [r[0].seq for r in results] == [1, 2, 3]
    assert pair.committed() == {"committer": 0, "follower": 3}
    assert pair.broadcast == [1, 2, 3]


async def test_a_committer_shutting_down_hands_publishes_back_at_once(make_session, pair, settings):
    """A rolling restart stops the committing worker with publishes queued there: it tells
    their worker, which commits them without waiting for the hand-over timeout."""
    session = await database_sync_to_async(make_session)()
    settings.BATON_FORWARD_TIMEOUT_SECONDS = 30
    pair.wire.held["committer"] = []
    pending = asyncio.ensure_future(_publish(pair.follower, session.id, range(3)))
    await _until(lambda: len(pair.wire.held["committer"]) == 1)
    pair.wire.release("committer")  # queued there, not yet committed ...
    await pair.committer.close()  # ... when it stops
    results = await asyncio.wait_for(pending, 5)
    assert [r[0].seq for r in results] == [1, 2, 3]
    assert pair.committed() == {"committer": 0, "follower": 3}
    assert pair.follower.forwarder.stats["reclaimed"] == 3


async def test_after_a_reclaim_the_committer_is_avoided_for_a_while(make_session, pair, settings):
    session = await database_sync_to_async(make_session)()
    pair.wire.lost.add("committer")
    await _publish(pair.follower, session.id, range(2))
    assert pair.follower.forwarder.route() is None
    await _publish(pair.follower, session.id, range(2, 4))
    assert pair.follower.forwarder.stats["forwarded"] == 2  # the later two never left
    assert pair.committed() == {"committer": 0, "follower": 4}
    pair.follower.forwarder.avoid_until = 0.0
    pair.wire.lost.clear()
    await _publish(pair.follower, session.id, range(4, 6))
    assert pair.committed() == {"committer": 2, "follower": 4}
    assert pair.broadcast == [1, 2, 3, 4, 5, 6]


async def test_own_publishes_never_overtake_those_in_flight(make_session, pair):
    """Publishes in flight to a worker that stalls, then this worker becomes the committer
    itself: the later publishes are committed after the earlier ones are taken back."""
    session = await database_sync_to_async(make_session)()
    pair.wire.held["committer"] = []
    early = [
        pair.follower.submit(session_id=session.id, author=AGENT, events=[_step(i)])
        for i in range(3)
    ]
    await _until(lambda: pair.follower.forwarder.stats["forwarded"] == 3)
    pair.follower.forwarder.target = None  # re-elected: now it commits its own
    late = [
        pair.follower.submit(session_id=session.id, author=AGENT, events=[_step(i)])
        for i in range(3, 6)
    ]
    results = await asyncio.gather(*early, *late)
    assert [r[0].seq for r in results] == [1, 2, 3, 4, 5, 6]
    stored = await _stored(session.id)
    assert [i for _, _, i in stored] == [0, 1, 2, 3, 4, 5]


async def test_own_publishes_made_during_a_hand_over_wait_for_the_next(make_session, pair):
    """While its publishes are on their way, a worker commits what others handed to it; its
    own newer publishes must not slip into that local batch ahead of those on the way."""
    a, b = [await database_sync_to_async(make_session)() for _ in range(2)]
    pair.wire.delay = 0.05
    pair.wire.lost.add("third")
    pair.follower.forwarder.serve(
        {
            "type": "baton.commit",
            "o": "third",
            "r": "third",
            "q": [
                [
                    0,
                    b.id,
                    ["agent", "other", "other"],
                    [["progress.step", {"i": 9}, None, None, None]],
                ]
            ],
        }
    )
    first = pair.follower.submit(session_id=a.id, author=AGENT, events=[_step(0)])
    await asyncio.sleep(0.02)  # the first is on its way
    second = pair.follower.submit(session_id=a.id, author=AGENT, events=[_step(1)])
    assert [r[0].seq for r in await asyncio.gather(first, second)] == [1, 2]
    assert [i for _, _, i in await _stored(a.id)] == [0, 1]
    assert pair.committed() == {"committer": 2, "follower": 1}  # the follower: b's event


async def test_the_committer_serves_publishes_beside_its_own(make_session, pair):
    a, b = [await database_sync_to_async(make_session)() for _ in range(2)]
    theirs, ours = await asyncio.gather(
        _publish(pair.follower, a.id, range(10)), _publish(pair.committer, b.id, range(10))
    )
    assert [r[0].seq for r in theirs] == [r[0].seq for r in ours] == list(range(1, 11))
    assert pair.committer.stats["requests"] == 20
    assert pair.committer.stats["batches"] < 20  # both workers' publishes shared commits


def test_pre_identified_events_are_stored_once(make_session):
    """The service side of a reclaim: the same request committed twice stores it once and
    answers with the original seqs and ids."""
    session = make_session()
    events = [
        EventInput(type="progress.step", data={"i": i}, event_id=f"evt_pre{i}") for i in range(3)
    ]
    first = append_events(session_id=session.id, author=AGENT, events=events)
    again = append_events(session_id=session.id, author=AGENT, events=events)
    assert [(r.seq, r.id) for r in first] == [(1, "evt_pre0"), (2, "evt_pre1"), (3, "evt_pre2")]
    assert again == first
    assert Event.objects.filter(session=session).count() == 3


def test_a_pre_identified_request_with_a_repeated_client_ref_is_answered_the_same(make_session):
    """A reclaimed request one of whose events was a client_ref duplicate when it was first
    committed: the same answer again, the duplicate pointing at the original."""
    session = make_session()
    first = append_events(
        session_id=session.id,
        author=AGENT,
        events=[EventInput(type="progress.step", data={"i": 0}, client_ref="ref-0")],
    )
    events = [
        EventInput(type="progress.step", data={"i": 0}, client_ref="ref-0", event_id="evt_dup"),
        EventInput(type="progress.step", data={"i": 1}, event_id="evt_new"),
    ]
    handed = append_events(session_id=session.id, author=AGENT, events=events)
    again = append_events(session_id=session.id, author=AGENT, events=events)
    assert again == handed
    assert [(r.seq, r.id, r.duplicate) for r in handed] == [
        (1, first[0].id, True),
        (2, "evt_new", False),
    ]
    assert Event.objects.filter(session=session).count() == 2


def test_the_committing_worker_is_the_oldest_live_one_with_a_channel(db):
    # On Postgres a server process of another test may be beating into the same database: ours
    # are started in the past, so they are older than any worker it (re)creates.
    Worker.objects.all().delete()
    now = timezone.now()
    ours = ["wrk_mute", "wrk_old", "wrk_mid", "wrk_new"]
    heartbeat_worker(worker_id="wrk_old", channel="chan.old")
    heartbeat_worker(worker_id="wrk_mid", channel="chan.mid")
    heartbeat_worker(worker_id="wrk_new", channel="chan.new")
    heartbeat_worker(worker_id="wrk_mute", channel="")
    for offset, worker_id in enumerate(ours):
        Worker.objects.filter(pk=worker_id).update(
            started_at=now - timedelta(hours=1) + timedelta(seconds=offset)
        )
    assert get_committing_worker().id == "wrk_old"
    Worker.objects.filter(pk="wrk_old").update(heartbeat_at=now - timedelta(minutes=5))
    assert get_committing_worker().id == "wrk_mid"  # the oldest stopped beating
    Worker.objects.filter(pk__in=ours).update(channel="")
    committing = get_committing_worker()
    assert committing is None or committing.id not in ours


async def test_a_worker_that_fills_batches_on_its_own_commits_them_itself(
    make_session, pair, settings
):
    """Handing over saves commits only for publishes that would commit in small batches."""
    session = await database_sync_to_async(make_session)()
    forwarder = pair.follower.forwarder
    fills = settings.BATON_GROUP_COMMIT_BATCH / settings.BATON_GROUP_COMMIT_WINDOW  # per second
    loop = asyncio.get_running_loop()

    def rate_was(per_second: float) -> str | None:
        forwarder.own, forwarder.counted_at = int(per_second), loop.time() - 1.0
        return forwarder.route()

    assert rate_was(0.65 * fills) is None  # most of a batch per window: commit here
    await _publish(pair.follower, session.id, range(3))
    assert pair.committed() == {"committer": 0, "follower": 3}
    assert rate_was(0.5 * fills) is None  # not yet quiet enough to hand over again
    assert rate_was(0.4 * fills) == "committer"
    await _publish(pair.follower, session.id, range(3, 6))
    assert pair.committed() == {"committer": 3, "follower": 3}


async def test_a_slow_answer_leaves_the_committer_alone_for_a_while(make_session, pair, settings):
    session = await database_sync_to_async(make_session)()
    settings.BATON_FORWARD_TIMEOUT_SECONDS = 5  # late, not lost
    pair.wire.held["follower"] = []
    pending = asyncio.ensure_future(_publish(pair.follower, session.id, range(2)))
    await _until(lambda: len(pair.wire.held.get("follower", [])) > 0)
    assert pair.follower.forwarder.route() == "committer"
    await asyncio.sleep(4 * settings.BATON_GROUP_COMMIT_WINDOW)
    pair.wire.release("follower")
    assert [r[0].seq for r in await pending] == [1, 2]
    assert pair.follower.forwarder.route() is None
    await _publish(pair.follower, session.id, range(2, 4))
    assert pair.committed() == {"committer": 2, "follower": 2}


@pytest.mark.skipif(not settings.REDIS_URL, reason="the hub serves hand-overs on a remote layer")
@pytest.mark.usefixtures("hub_cleanup")
async def test_the_hub_serves_hand_overs_and_survives_malformed_ones(make_session):
    """Through Redis: a malformed hand-over is dropped without stopping the hub's receive loop,
    and the next one is committed and answered."""
    session = await database_sync_to_async(make_session)()
    hub = get_hub()
    await hub.ensure_started()
    assert hub.channel_name is not None and hub.writer.forwarder is not None
    layer = hub.layer
    reply_to = await layer.new_channel("test.reply.")
    await layer.send(hub.channel_name, {"type": "baton.commit", "o": "other", "r": reply_to})
    await layer.send(
        hub.channel_name, {"type": "baton.commit", "o": "other", "r": reply_to, "q": [["bad"]]}
    )
    item = ["progress.step", {"i": 1}, None, None, "evt_handed1"]
    await layer.send(
        hub.channel_name,
        {
            "type": "baton.commit",
            "o": "other",
            "r": reply_to,
            "q": [[7, session.id, ["agent", "other", "Other"], [item]]],
        },
    )
    answer = await asyncio.wait_for(layer.receive(reply_to), 5)
    assert answer["type"] == "baton.committed"
    assert answer["a"] == [[7, [[1, "evt_handed1", None, False]], None, None, None]]
    assert (await _stored(session.id)) == [(1, "evt_handed1", 1)]
