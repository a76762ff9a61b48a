"""The embedded writer's loop lane: fast batches commit on the event loop, on a connection of
the writer's own, and anything it cannot take at once goes to the database thread unharmed."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import threading
from pathlib import Path

import pytest
from channels.db import database_sync_to_async
from django.db import connection
from django.db.backends.signals import connection_created

from sessions_app import writer as writer_module
from sessions_app.errors import BatonError
from sessions_app.hub import get_hub
from sessions_app.identity import Author
from sessions_app.models import Event, Message
from sessions_app.services import EventInput, checkpoint_sqlite_wal
from sessions_app.writer import LoopLane

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("hub_cleanup")]
# The lane exists only on SQLite (pass 1 of CI); on Postgres (pass 2) the tests below that do
# not carry this mark check that no lane is opened and batches still commit.
sqlite_only = pytest.mark.skipif(connection.vendor != "sqlite", reason="the loop lane is SQLite's")

AGENT = Author(kind="agent", id="test-agent", name="test-agent")


def _step(i: int) -> EventInput:
    return EventInput(type="progress.step", data={"i": i})


async def _session_with_message(make_session) -> str:
    session = await database_sync_to_async(make_session)()
    await get_hub().writer.append(
        session_id=session.id,
        author=AGENT,
        events=[EventInput(type="message.create", data={"role": "assistant"}, message_id="m")],
    )
    return session.id


def _lane() -> LoopLane:
    lane = get_hub().writer.lane
    assert lane is not None, "the loop lane should be open on a SQLite file in WAL mode"
    return lane


@sqlite_only
async def test_tokens_commit_on_the_loop_lane_and_are_delivered(make_session):
    session_id = await _session_with_message(make_session)
    hub = get_hub()
    delivered: list[dict] = []
    original = hub.publish
    hub.writer.publish = lambda sid, events: (delivered.extend(events), original(sid, events))
    before = _lane().stats["batches"]
    results = await asyncio.gather(
        *(
            hub.writer.append(
                session_id=session_id,
                author=AGENT,
                events=[EventInput(type="message.append", data={"delta": f"{i},"}, message_id="m")],
            )
            for i in range(30)
        )
    )
    assert [r[0].seq for r in results] == list(range(2, 32))
    assert _lane().stats["batches"] > before
    assert [e["seq"] for e in delivered] == list(range(2, 32))
    message = await database_sync_to_async(Message.objects.get)(session_id=session_id)
    assert message.content == "".join(f"{i}," for i in range(30))
    assert message.version == 31


@sqlite_only
async def test_a_refusal_is_answered_by_the_general_path_with_nothing_half_written(make_session):
    session_id = await _session_with_message(make_session)
    writer = get_hub().writer
    handed = _lane().stats["handed_over"]
    good = writer.submit(session_id=session_id, author=AGENT, events=[_step(1)])
    bad = writer.submit(
        session_id=session_id,
        author=AGENT,
        events=[EventInput(type="message.append", data={"delta": "x"}, message_id="nope")],
    )
    (ok,) = await good
    with pytest.raises(BatonError) as refused:
        await bad
    assert refused.value.code == "message_not_found"
    assert ok.seq == 2
    assert _lane().stats["handed_over"] > handed
    seqs = await database_sync_to_async(
        lambda: list(Event.objects.filter(session_id=session_id).values_list("seq", flat=True))
    )()
    assert seqs == [1, 2]  # the refused publish consumed no seq, the lane's rollback left none


@sqlite_only
async def test_a_held_write_lock_sends_the_batch_to_the_thread_without_blocking_the_loop(
    make_session,
):
    session_id = await _session_with_message(make_session)
    writer = get_hub().writer
    busy = _lane().stats["busy"]
    locked, release = threading.Event(), threading.Event()

    def hold_the_write_lock() -> None:
        other = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(10)
        other.execute("COMMIT")
        other.close()

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    assert await asyncio.to_thread(locked.wait, 10)
    append = writer.submit(session_id=session_id, author=AGENT, events=[_step(1)])
    ticks = 0
    for _ in range(10):  # the loop keeps running while the batch waits in the thread
        await asyncio.sleep(0.02)
        ticks += 1
    assert not append.done()
    release.set()
    (result,) = await asyncio.wait_for(append, 10)
    await asyncio.to_thread(holder.join, 10)
    assert ticks == 10
    assert result.seq == 2
    assert _lane().stats["busy"] == busy + 1


@sqlite_only
async def test_the_lane_leaves_checkpoints_to_a_thread_of_its_own(make_session, monkeypatch):
    """Not on the loop, and not in Django's database thread, where the copy would hold up
    every query queued behind it."""
    session_id = await _session_with_message(make_session)
    writer = get_hub().writer
    lane = _lane()
    (autocheckpoint,) = lane.conn.execute("PRAGMA wal_autocheckpoint").fetchone()
    assert autocheckpoint == 0
    threads = []

    def spy(*, conn: sqlite3.Connection) -> tuple[int, int]:
        threads.append(threading.current_thread().name)
        return checkpoint_sqlite_wal(conn=conn)

    monkeypatch.setattr(writer_module, "checkpoint_sqlite_wal", spy)
    monkeypatch.setattr(LoopLane, "CHECKPOINT_SECONDS", 0.0)
    checkpoints = lane.stats["checkpoints"]
    for i in range(3):
        await writer.append(session_id=session_id, author=AGENT, events=[_step(i)])
    assert lane.checkpoint_task is not None
    await lane.checkpoint_task
    assert lane.stats["checkpoints"] > checkpoints
    assert threads and all(name.startswith("baton-checkpoint") for name in threads)


@sqlite_only
async def test_a_stuck_checkpoint_holds_a_batch_no_longer_than_the_fence_allows(
    make_session, monkeypatch
):
    session_id = await _session_with_message(make_session)
    writer = get_hub().writer
    lane = _lane()
    loop = asyncio.get_running_loop()
    stuck, release = asyncio.Event(), threading.Event()
    calls = []

    def second_pass_sticks(*, conn: sqlite3.Connection) -> tuple[int, int]:
        calls.append(1)
        if len(calls) == 2:  # the pass the lane waits for
            loop.call_soon_threadsafe(stuck.set)
            release.wait(10)
        return checkpoint_sqlite_wal(conn=conn)

    monkeypatch.setattr(writer_module, "checkpoint_sqlite_wal", second_pass_sticks)
    monkeypatch.setattr(LoopLane, "REWIND_FRAMES", 0)
    monkeypatch.setattr(LoopLane, "CHECKPOINT_SECONDS", 0.0)
    await writer.append(session_id=session_id, author=AGENT, events=[_step(0)])
    await asyncio.wait_for(stuck.wait(), 5)
    monkeypatch.setattr(LoopLane, "CHECKPOINT_SECONDS", 3600.0)
    try:
        # Far less than the 10 s the pass is stuck for: the batch commits once the fence's
        # time is up.
        (result,) = await asyncio.wait_for(
            writer.append(session_id=session_id, author=AGENT, events=[_step(1)]), 2
        )
        assert result.seq == 3
        assert lane.fence is not None  # still stuck
    finally:
        release.set()
    assert lane.checkpoint_task is not None
    await lane.checkpoint_task


def _wal_frames() -> int:
    """Frames in the WAL now, read off the wal-index header (mxFrame, a native-endian u32 at
    offset 16: https://sqlite.org/walformat.html) without touching the database: asking
    SQLite would take a read lock or run a checkpoint, and change what is measured."""
    header = Path(f"{connection.settings_dict['NAME']}-shm").read_bytes()[:20]
    return int.from_bytes(header[16:20], sys.byteorder)


@sqlite_only
async def test_the_wal_starts_over_while_the_lane_keeps_writing(make_session, monkeypatch):
    """SQLite rewinds the WAL only at a write that finds it all copied back: checkpoints that
    race the lane's commits would let it grow for as long as the writes go on."""
    session_id = await _session_with_message(make_session)
    writer = get_hub().writer
    lane = _lane()
    monkeypatch.setattr(LoopLane, "CHECKPOINT_SECONDS", 3600.0)
    monkeypatch.setattr(LoopLane, "REWIND_FRAMES", 100)
    for i in range(40):
        await writer.append(session_id=session_id, author=AGENT, events=[_step(i)])
    grown = _wal_frames()
    assert grown >= 40

    async def keep_writing() -> None:  # a publish every few ms, as under streaming load
        for i in range(500):
            await writer.append(session_id=session_id, author=AGENT, events=[_step(i)])
            if lane.stats["rewinds"]:
                return
            await asyncio.sleep(0.002)

    writing = asyncio.create_task(keep_writing())
    await asyncio.sleep(0.02)
    monkeypatch.setattr(LoopLane, "CHECKPOINT_SECONDS", 0.0)
    await writing
    monkeypatch.setattr(LoopLane, "CHECKPOINT_SECONDS", 3600.0)
    assert lane.stats["rewinds"] > 0, "the lane never copied the WAL's tail back"
    await writer.append(session_id=session_id, author=AGENT, events=[_step(-1)])
    # Rewound: the WAL holds only the commits since, not the ones before.
    assert _wal_frames() < grown / 4


async def test_the_lane_can_be_switched_off(make_session, settings):
    settings.BATON_SQLITE_LOOP_WRITES = False
    session = await database_sync_to_async(make_session)()
    writer = get_hub().writer
    (result,) = await writer.append(session_id=session.id, author=AGENT, events=[_step(1)])
    assert result.seq == 1
    assert writer.lane is None


@sqlite_only
async def test_the_lane_connection_is_announced_like_any_django_connection(make_session):
    """Receivers of `connection_created` (pragmas, instrumentation such as the bench's commit
    probe) see the lane's connection too."""
    seen: list[object] = []

    def receiver(sender, connection, **kwargs) -> None:
        seen.append(connection.connection)

    connection_created.connect(receiver)
    try:
        session = await database_sync_to_async(make_session)()
        await get_hub().writer.append(session_id=session.id, author=AGENT, events=[_step(1)])
    finally:
        connection_created.disconnect(receiver)
    assert _lane().conn in seen


@sqlite_only
async def test_the_lane_takes_each_sessions_leading_run_and_the_thread_the_rest_in_order(
    make_session,
):
    """A `message.update` (not fast-lane work) does not send its whole batch to the thread:
    the lane commits what comes before it in its session, and every other session's run; the
    thread then writes the rest, so each session keeps its submission order."""
    a = await _session_with_message(make_session)
    b = (await database_sync_to_async(make_session)()).id
    writer = get_hub().writer
    lane = _lane()
    batches, left = lane.stats["batches"], lane.stats["left"]
    token = EventInput(type="message.append", data={"delta": "hi"}, message_id="m")
    rewrite = EventInput(type="message.update", data={"content": "hello"}, message_id="m")
    futures = [
        writer.submit(session_id=a, author=AGENT, events=[token]),
        writer.submit(session_id=b, author=AGENT, events=[_step(1)]),
        writer.submit(session_id=a, author=AGENT, events=[rewrite]),
        writer.submit(session_id=a, author=AGENT, events=[_step(2)]),
        writer.submit(session_id=b, author=AGENT, events=[_step(3)]),
    ]
    results = await asyncio.gather(*futures)
    assert [r[0].seq for r in results] == [2, 1, 3, 4, 2]
    assert lane.stats["batches"] == batches + 1
    assert lane.stats["left"] == left + 2  # a's rewrite and the step after it
    types = await database_sync_to_async(
        lambda: list(
            Event.objects.filter(session_id=a).order_by("seq").values_list("type", flat=True)
        )
    )()
    assert types == ["message.create", "message.append", "message.update", "progress.step"]
    message = await database_sync_to_async(Message.objects.get)(session_id=a, message_id="m")
    assert (message.content, message.status, message.version) == ("hello", "streaming", 3)


@sqlite_only
async def test_an_answer_ends_and_the_next_begins_on_the_lane(make_session):
    """The end of one answer and the start of the next commit with the tokens around them, on
    the loop: nothing is left for the thread, whose wait held every session's tokens."""
    a = await _session_with_message(make_session)
    writer = get_hub().writer
    lane = _lane()
    batches, left = lane.stats["batches"], lane.stats["left"]
    events = [
        EventInput(type="message.append", data={"delta": "a"}, message_id="m"),
        EventInput(type="message.complete", data={}, message_id="m"),
        EventInput(type="message.create", data={"role": "assistant"}, message_id="n"),
        EventInput(type="message.append", data={"delta": "b"}, message_id="n"),
    ]
    results = await asyncio.gather(
        *(writer.submit(session_id=a, author=AGENT, events=[e]) for e in events)
    )
    assert [r[0].seq for r in results] == [2, 3, 4, 5]
    assert (lane.stats["batches"], lane.stats["left"]) == (batches + 1, left)
    rows = await database_sync_to_async(
        lambda: list(
            Message.objects.filter(session_id=a)
            .order_by("created_seq")
            .values_list("message_id", "content", "status", "last_seq")
        )
    )()
    assert rows == [("m", "a", "complete", 3), ("n", "b", "streaming", 5)]


async def test_a_lane_opens_only_on_a_sqlite_file_in_wal_mode(make_session):
    session = await database_sync_to_async(make_session)()
    writer = get_hub().writer
    (result,) = await writer.append(session_id=session.id, author=AGENT, events=[_step(1)])
    assert result.seq == 1
    assert (writer.lane is not None) == (connection.vendor == "sqlite")
    stored = await database_sync_to_async(
        lambda: list(Event.objects.filter(session_id=session.id).values_list("seq", flat=True))
    )()
    assert stored == [1]
