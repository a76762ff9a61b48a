"""Group commit: many publishers share one transaction without weakening any guarantee."""

from __future__ import annotations

import asyncio
import threading

import pytest
from channels.db import database_sync_to_async
from django.db import connection

from sessions_app.errors import BatonError
from sessions_app.hub import get_hub
from sessions_app.identity import Author
from sessions_app.models import Event, Message, Session
from sessions_app.services import AppendRequest, EventInput, append_many
from sessions_app.writer import BatchSizer

pytestmark = pytest.mark.django_db(transaction=True)

AGENT = Author(kind="agent", id="test-agent", name="test-agent")


def _step(i: int) -> EventInput:
    return EventInput(type="progress.step", data={"i": i})


def test_a_refused_request_does_not_fail_its_batch(make_session):
    a, b = make_session(), make_session()
    outcomes = append_many(
        [
            AppendRequest(session_id=a.id, author=AGENT, events=[_step(1)]),
            AppendRequest(
                session_id=b.id,
                author=AGENT,
                events=[
                    _step(2),
                    EventInput(type="message.append", data={"delta": "x"}, message_id="nope"),
                ],
            ),
            AppendRequest(session_id=a.id, author=AGENT, events=[_step(3)]),
            AppendRequest(session_id="ses_missing", author=AGENT, events=[_step(4)]),
        ]
    )
    assert [r.seq for r in outcomes[0]] == [1]
    assert isinstance(outcomes[1], BatonError)
    assert outcomes[1].code == "message_not_found"
    assert [r.seq for r in outcomes[2]] == [2]
    assert isinstance(outcomes[3], BatonError)
    assert outcomes[3].code == "not_found"
    assert Session.objects.get(pk=b.id).last_seq == 0  # the refused batch consumed nothing
    assert Event.objects.filter(session=b).count() == 0
    assert list(Event.objects.filter(session=a).values_list("seq", flat=True)) == [1, 2]


def test_opposite_lock_orders_do_not_deadlock(make_session):
    """Two batches touching the same sessions in opposite orders, at the same time."""
    a, b = make_session(), make_session()
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def writer(first: Session, second: Session) -> None:
        try:
            start.wait()
            for i in range(30):
                outcomes = append_many(
                    [
                        AppendRequest(session_id=first.id, author=AGENT, events=[_step(i)]),
                        AppendRequest(session_id=second.id, author=AGENT, events=[_step(i)]),
                    ]
                )
                assert not any(isinstance(o, BatonError) for o in outcomes)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=writer, args=pair) for pair in ((a, b), (b, a))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for s in (a, b):
        seqs = list(Event.objects.filter(session=s).values_list("seq", flat=True))
        assert seqs == list(range(1, 61))


@pytest.mark.usefixtures("hub_cleanup")
async def test_concurrent_publishers_share_commits(make_session, settings):
    # This process's hub alone (with Redis it would hand its publishes to the live server's).
    settings.BATON_FORWARD_COMMITS = False
    sessions = [await database_sync_to_async(make_session)() for _ in range(4)]
    writer = get_hub().writer
    for s in sessions:
        await writer.append(
            session_id=s.id,
            author=AGENT,
            events=[EventInput(type="message.create", data={"role": "assistant"}, message_id="m")],
        )
    before = dict(writer.stats)

    async def stream(session_id: str) -> list[int]:
        seqs = []
        for i in range(50):
            results = await writer.append(
                session_id=session_id,
                author=AGENT,
                events=[EventInput(type="message.append", data={"delta": f"{i},"}, message_id="m")],
            )
            seqs.append(results[0].seq)
        return seqs

    all_seqs = await asyncio.gather(*(stream(s.id) for s in sessions))
    requests = writer.stats["requests"] - before["requests"]
    batches = writer.stats["batches"] - before["batches"]
    assert requests == 200
    assert batches < requests / 2  # four concurrent streams really share commits
    for s, seqs in zip(sessions, all_seqs, strict=True):
        assert seqs == list(range(2, 52))
        message = await database_sync_to_async(Message.objects.get)(session=s, message_id="m")
        assert message.content == "".join(f"{i}," for i in range(50))


@pytest.fixture
def linger(settings):
    settings.BATON_GROUP_COMMIT_BATCH = 3
    settings.BATON_GROUP_COMMIT_BATCH_MAX = 3  # a busy test machine must not grow it
    settings.BATON_GROUP_COMMIT_WINDOW = 30.0  # "forever": only a full batch or a lull ends it
    return settings


async def _two_at_once(writer, session_id: str) -> None:
    """A batch of two: evidence of concurrency, so the next batch lingers."""
    await asyncio.gather(
        *(writer.append(session_id=session_id, author=AGENT, events=[_step(i)]) for i in (1, 2))
    )
    assert writer.last_batch_size == 2


async def _trickle(writer, session_id: str, steps: range) -> list[list[int]]:
    """One publish per step, 10 ms apart: each arrival inside the lull keeps the batch open."""
    futures = []
    for i in steps:
        if futures:
            await asyncio.sleep(0.01)
        futures.append(writer.submit(session_id=session_id, author=AGENT, events=[_step(i)]))
    return [[r.seq for r in res] for res in await asyncio.wait_for(asyncio.gather(*futures), 10)]


@pytest.mark.usefixtures("hub_cleanup")
async def test_a_lingering_batch_commits_as_soon_as_it_is_full(make_session, linger):
    session = await database_sync_to_async(make_session)()
    writer = get_hub().writer
    await _two_at_once(writer, session.id)
    batches = writer.stats["batches"]

    seqs = await _trickle(writer, session.id, range(3, 6))
    assert seqs == [[3], [4], [5]]
    assert writer.stats["batches"] == batches + 1  # one commit for the three


@pytest.mark.usefixtures("hub_cleanup")
async def test_a_lull_ends_the_linger_for_publishers_waiting_on_acks(make_session, linger):
    linger.BATON_GROUP_COMMIT_WINDOW = 4.0  # lull 1 s
    session = await database_sync_to_async(make_session)()
    writer = get_hub().writer
    await _two_at_once(writer, session.id)
    loop = asyncio.get_running_loop()
    started = loop.time()
    (result,) = await writer.append(session_id=session.id, author=AGENT, events=[_step(3)])
    assert result.seq == 3
    # Alone after a batch of two: it lingered one lull, not the whole window, and not forever.
    assert writer.last_batch_size == 1
    assert loop.time() - started < 4.0


class _Meter:
    """A fake clock and CPU counter: `run(seconds, busy)` spends `busy` of a core per second."""

    def __init__(self) -> None:
        self.now = 0.0
        self.spent = 0.0

    def run(self, seconds: float, busy: float) -> None:
        self.now += seconds
        self.spent += seconds * busy


def _sizer(meter: _Meter) -> BatchSizer:
    return BatchSizer(interval=0.5, clock=lambda: meter.now, cpu=lambda: meter.spent)


def _saturated_sizer(meter: _Meter, *, intervals: int) -> BatchSizer:
    """A sizer that has seen a saturated process for this many intervals."""
    sizer = _sizer(meter)
    for _ in range(intervals):
        meter.run(0.5, busy=1.0)
        sizer.current(base=24, ceiling=384)
    return sizer


@pytest.mark.usefixtures("hub_cleanup")
async def test_a_busy_process_holds_bigger_batches(make_session, linger):
    linger.BATON_GROUP_COMMIT_BATCH_MAX = 6
    session = await database_sync_to_async(make_session)()
    writer = get_hub().writer
    meter = _Meter()
    writer.sizer = _sizer(meter)
    await _two_at_once(writer, session.id)
    batches = writer.stats["batches"]
    meter.run(0.5, busy=1.0)  # the next lingering batch sees a saturated process: 3 -> 6

    seqs = await _trickle(writer, session.id, range(3, 9))
    assert seqs == [[3], [4], [5], [6], [7], [8]]
    assert writer.batch_size == 6
    assert writer.stats["batches"] == batches + 1  # one commit for the six, not two of three


def test_batches_grow_while_the_process_is_near_a_core_and_shrink_back():
    meter = _Meter()
    sizer = _sizer(meter)
    sizes = []
    for _ in range(6):
        meter.run(0.5, busy=1.0)
        sizes.append(sizer.current(base=24, ceiling=200))
    assert sizes == [48, 96, 192, 200, 200, 200]  # doubles, capped at the ceiling
    meter.run(0.5, busy=0.75)  # between the thresholds: hold
    assert sizer.current(base=24, ceiling=200) == 200
    sizes = []
    for _ in range(5):
        meter.run(0.5, busy=0.3)
        sizes.append(sizer.current(base=24, ceiling=200))
    assert sizes == [192, 96, 48, 24, 24]  # halves back, never below the base


def test_under_steady_load_the_size_comes_back_down_from_a_busy_spike():
    """Between the thresholds the sizer tries half the size after `probe_after` calm intervals,
    so one spike cannot hold every later batch to the whole window."""
    meter = _Meter()
    sizer = _saturated_sizer(meter, intervals=2)
    assert sizer.current(base=24, ceiling=384) == 96
    sizes = []
    for _ in range(10):
        meter.run(0.5, busy=0.8)
        sizes.append(sizer.current(base=24, ceiling=384))
    assert sizes == [96, 96, 96, 48, 48, 48, 48, 24, 24, 24]


def test_a_size_that_proves_too_small_is_tried_again_only_later():
    meter = _Meter()
    sizer = _sizer(meter)
    meter.run(0.5, busy=1.0)
    assert sizer.current(base=24, ceiling=384) == 48
    sizes = []
    # 48 holds the load at 0.8 of a core; 24 would saturate the process.
    for _ in range(20):
        size = sizer.current(base=24, ceiling=384)
        meter.run(0.5, busy=0.8 if size >= 48 else 1.0)
        sizes.append(size)
    tries = [i for i, size in enumerate(sizes) if size == 24]
    assert tries == [4, 13]  # after 4 calm intervals, then after 8: the wait doubled
    assert sizes[5] == 48 and sizes[14] == 48  # each failed try doubles straight back


def test_after_a_quiet_spell_the_size_is_back_at_the_base():
    meter = _Meter()
    sizer = _saturated_sizer(meter, intervals=4)
    assert sizer.current(base=24, ceiling=384) == 384
    meter.run(1.0, busy=0.3)  # two intervals: two halvings
    assert sizer.current(base=24, ceiling=384) == 96
    meter.run(10.0, busy=0.0)  # nobody published for a while
    assert sizer.current(base=24, ceiling=384) == 24


def test_the_batch_size_is_read_once_per_interval():
    meter = _Meter()
    sizer = _sizer(meter)
    meter.run(0.2, busy=1.0)
    assert sizer.current(base=24, ceiling=384) == 24  # too soon to judge
    meter.run(0.3, busy=1.0)
    assert sizer.current(base=24, ceiling=384) == 48
    assert sizer.current(base=24, ceiling=384) == 48  # same instant: no second doubling


def test_an_interval_of_zero_reads_no_rate_from_no_time():
    meter = _Meter()
    sizer = BatchSizer(interval=0.0, clock=lambda: meter.now, cpu=lambda: meter.spent)
    assert sizer.current(base=24, ceiling=384) == 24  # no time passed: no division by zero
    meter.run(0.1, busy=1.0)
    assert sizer.current(base=24, ceiling=384) == 48


def test_a_ceiling_at_the_base_pins_the_size():
    meter = _Meter()
    sizer = _sizer(meter)
    meter.run(1.0, busy=1.0)
    assert sizer.current(base=24, ceiling=24) == 24
    assert sizer.current(base=24, ceiling=10) == 24  # a ceiling below the base means no growth
