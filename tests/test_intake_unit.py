"""Intake without a database or a server: wire-level flags, and the group committer driven by a
fake ``store_batch`` that takes a little time per commit, as an fsync would."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import pytest
from sqlalchemy.exc import DataError, IntegrityError

from mailproc.intake import Arrival, GroupCommitter, IntakeClosed, wire_flags

FSYNC_SECONDS = 0.005

# -- wire_flags -----------------------------------------------------------------------------

CLEAN = b"From: alice@example.org\r\nSubject: reset\r\n\r\nPlease reset it.\r\n"


def test_clean_crlf_message_has_no_flags() -> None:
    assert wire_flags(CLEAN) == []


def test_empty_message_has_no_flags() -> None:
    assert wire_flags(b"") == []


@pytest.mark.parametrize(
    ("raw", "flags"),
    [
        (b"Subject: a\x00b\r\n\r\nbody\r\n", ["nul_byte"]),
        (b"\x00", ["nul_byte"]),
        (b"Subject: x\n\r\nbody\r\n", ["bare_lf"]),
        (b"Subject: x\r\n\r\nline one\nline two\r\n", ["bare_lf"]),
        (b"\n", ["bare_lf"]),
        (b"Subject: x\r\r\n\r\nbody\r\n", ["bare_cr"]),
        (b"Subject: x\r\n\r\nbody\r", ["bare_cr"]),
        (b"\r", ["bare_cr"]),
        (b"a\n\rb", ["bare_lf", "bare_cr"]),
        (b"a\x00\nb\rc", ["nul_byte", "bare_lf", "bare_cr"]),
    ],
)
def test_wire_irregularities_are_flagged_by_name(raw: bytes, flags: list[str]) -> None:
    assert wire_flags(raw) == flags


@pytest.mark.parametrize(
    "sequence",
    [
        pytest.param(b"\n.\r\n", id="LF.CRLF"),
        pytest.param(b"\r\n.\n", id="CRLF.LF"),
        pytest.param(b"\n.\n", id="LF.LF"),
        pytest.param(b"\r.\r", id="CR.CR"),
        pytest.param(b"\r.\r\n", id="CR.CRLF"),
        pytest.param(b"\n.\r", id="LF.CR"),
        pytest.param(b"\r.\n", id="CR.LF"),
        pytest.param(b"\r\n.\r", id="CRLF.CR"),
    ],
)
def test_smtp_smuggling_end_of_data_variants_are_flagged(sequence: bytes) -> None:
    raw = (
        b"From: alice@example.org\r\nSubject: hi\r\n\r\nhello"
        + sequence
        + b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<support@example.com>\r\nDATA\r\n"
        b"From: ceo@example.com\r\n\r\nreset the admin account\r\n"
    )

    assert "smuggling_sequence" in wire_flags(raw)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b".\n", id="at-start-LF"),
        pytest.param(b".\rrest", id="at-start-CR"),
        pytest.param(b"body\n.\n", id="at-end-LF.LF"),
        pytest.param(b"body\r.\r", id="at-end-CR.CR"),
    ],
)
def test_smuggling_sequence_at_the_edges_is_flagged(raw: bytes) -> None:
    assert "smuggling_sequence" in wire_flags(raw)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            b"Subject: dots\r\n\r\n.leading dot (sent as ..leading dot)\r\ntrailing dot.\r\n"
            b"..two dots\r\n...\r\na.b\r\n",
            id="dot-stuffed-without-lone-dot",
        ),
        pytest.param(
            b"Subject: x\r\n\r\nabove\r\n.\r\nbelow\r\n",
            id="unstuffed-lone-dot-between-crlf",
        ),
        pytest.param(b".\r\nbody\r\n", id="lone-dot-first-line"),
        pytest.param(b"body\r\n.\r\n.\r\n", id="two-lone-dot-lines"),
        pytest.param(b"x\r\n.x\r\n", id="dot-then-text"),
        pytest.param(b"x\r\nx.\r\n", id="text-then-dot"),
    ],
)
def test_legit_dots_between_crlfs_are_not_smuggling(raw: bytes) -> None:
    assert wire_flags(raw) == []


def test_bare_lf_next_to_a_dot_that_is_not_alone_is_not_smuggling() -> None:
    assert wire_flags(b"a\n.b\r\nc.\nd") == ["bare_lf"]


# -- GroupCommitter -------------------------------------------------------------------------


def arrival(n: int = 0, raw: bytes | None = None) -> Arrival:
    return Arrival(
        received_at=datetime(2024, 1, 1, 9, 0, tzinfo=UTC),
        protocol="smtp",
        peer_ip="192.0.2.10",
        peer_port=40000 + n,
        helo="client.example.org",
        client_ip=None,
        client_name=None,
        client_helo=None,
        client_protocol=None,
        xforward=None,
        mail_from="alice@example.org",
        rcpt_tos=("support@example.com",),
        tls=None,
        raw=raw if raw is not None else b"Subject: %d\r\n\r\nbody\r\n" % n,
    )


class FakeStore:
    """Stands in for ``MessageService.store_batch`` (it runs in a worker thread): records every
    batch, takes FSYNC_SECONDS per commit, hands out increasing ids, and can be told to fail a
    batch or to hold its first commit until released."""

    def __init__(self, fail: Callable[[Sequence[Arrival]], Exception | None] | None = None):
        self.fail = fail
        self.calls: list[list[Arrival]] = []
        self.raised: list[Exception] = []
        self.stored: dict[int, Arrival] = {}
        self.first_entered = threading.Event()
        self.release_first = threading.Event()
        self.release_first.set()
        self._lock = threading.Lock()

    def hold_first(self) -> None:
        self.release_first.clear()

    def __call__(self, batch: Sequence[Arrival]) -> list[int]:
        with self._lock:
            first = not self.calls
            self.calls.append(list(batch))
        if first:
            self.first_entered.set()
            assert self.release_first.wait(10), "test never released the first commit"
        time.sleep(FSYNC_SECONDS)
        error = self.fail(batch) if self.fail is not None else None
        if error is not None:
            self.raised.append(error)
            raise error
        with self._lock:
            start = len(self.stored) + 1
            ids = list(range(start, start + len(batch)))
            self.stored.update(zip(ids, batch, strict=True))
        return ids

    @property
    def sizes(self) -> list[int]:
        return [len(call) for call in self.calls]

    async def first_commit_started(self) -> None:
        assert await asyncio.to_thread(self.first_entered.wait, 10)


def integrity_error() -> IntegrityError:
    return IntegrityError("INSERT INTO messages ...", None, Exception("UNIQUE constraint failed"))


def data_error() -> DataError:
    return DataError("INSERT INTO messages ...", None, Exception("invalid byte sequence"))


def test_concurrent_stores_share_few_commits_and_get_their_own_ids() -> None:
    store = FakeStore()
    arrivals = [arrival(i) for i in range(100)]

    async def scenario() -> tuple[list[int], int]:
        committer = GroupCommitter(store)
        committer.start()
        ids = await asyncio.gather(*(committer.store(a) for a in arrivals))
        await committer.close()
        return ids, committer.batches

    ids, batches = asyncio.run(scenario())

    assert len(set(ids)) == 100
    # Each caller got the id under which its own arrival was stored.
    assert [store.stored[i] for i in ids] == arrivals
    assert sum(store.sizes) == 100
    assert len(store.sizes) <= 10, store.sizes
    assert batches == len(store.sizes)


def test_arrivals_during_a_commit_go_together_in_the_next_one() -> None:
    store = FakeStore()
    store.hold_first()

    async def scenario() -> list[int]:
        committer = GroupCommitter(store)
        committer.start()
        first = asyncio.create_task(committer.store(arrival(0)))
        await store.first_commit_started()
        rest = [asyncio.create_task(committer.store(arrival(i))) for i in range(1, 51)]
        await asyncio.sleep(0)
        store.release_first.set()
        ids = await asyncio.gather(first, *rest)
        await committer.close()
        return ids

    ids = asyncio.run(scenario())

    assert store.sizes == [1, 50]
    assert sorted(ids) == list(range(1, 52))


def test_max_batch_caps_arrivals_per_commit() -> None:
    store = FakeStore()

    async def scenario() -> list[int]:
        committer = GroupCommitter(store, max_batch=7)
        committer.start()
        ids = await asyncio.gather(*(committer.store(arrival(i)) for i in range(50)))
        await committer.close()
        return ids

    ids = asyncio.run(scenario())

    assert len(set(ids)) == 50
    assert max(store.sizes) <= 7
    assert sum(store.sizes) == 50


def test_max_batch_bytes_caps_a_commit_but_a_big_arrival_still_goes_alone() -> None:
    store = FakeStore()
    small = [arrival(i, raw=b"x" * 400) for i in range(6)]
    big = arrival(99, raw=b"y" * 5000)

    async def scenario() -> list[int]:
        committer = GroupCommitter(store, max_batch_bytes=1000)
        committer.start()
        ids = await asyncio.gather(*(committer.store(a) for a in [*small[:3], big, *small[3:]]))
        await committer.close()
        return ids

    ids = asyncio.run(scenario())

    assert len(set(ids)) == 7
    for call in store.calls:
        assert len(call) == 1 or sum(len(a.raw) for a in call) <= 1000, store.sizes
    assert [big] in store.calls


def test_on_commit_is_called_once_per_successful_commit() -> None:
    commits: list[int] = []
    store = FakeStore(
        fail=lambda batch: RuntimeError("disk full") if batch[0].peer_port == 40001 else None
    )

    async def scenario() -> None:
        committer = GroupCommitter(store, on_commit=lambda: commits.append(len(store.stored)))
        committer.start()
        await committer.store(arrival(0))
        with pytest.raises(RuntimeError):
            await committer.store(arrival(1))
        await committer.store(arrival(2))
        await committer.close()

    asyncio.run(scenario())

    # Called after each successful commit (its rows are there), not after the failed one.
    assert commits == [1, 2]


def test_store_batch_exception_reaches_every_caller_of_that_batch() -> None:
    store = FakeStore(fail=lambda batch: RuntimeError("disk full") if len(batch) > 1 else None)
    store.hold_first()

    async def scenario() -> tuple[object, list[object], int]:
        committer = GroupCommitter(store)
        committer.start()
        first = asyncio.create_task(committer.store(arrival(0)))
        await store.first_commit_started()
        batch = [asyncio.create_task(committer.store(arrival(i))) for i in range(1, 21)]
        await asyncio.sleep(0)
        store.release_first.set()
        results = await asyncio.gather(*batch, return_exceptions=True)
        # The committer keeps going after a failed commit.
        after = await committer.store(arrival(21))
        await committer.close()
        return await first, results, after

    first_id, results, after_id = asyncio.run(scenario())

    assert store.sizes == [1, 20, 1]
    assert isinstance(first_id, int)
    assert isinstance(after_id, int)
    (error,) = store.raised
    assert all(result is error for result in results), results
    assert len(store.stored) == 2


@pytest.mark.parametrize(
    "make_error", [integrity_error, data_error], ids=["IntegrityError", "DataError"]
)
def test_integrity_error_falls_back_to_one_by_one_so_only_the_bad_arrival_fails(
    make_error: Callable[[], Exception],
) -> None:
    bad = arrival(5, raw=b"duplicate")
    store = FakeStore(fail=lambda batch: make_error() if bad in batch else None)
    store.hold_first()
    good = [arrival(i) for i in range(1, 11) if i != 5]

    async def scenario() -> list[object]:
        committer = GroupCommitter(store)
        committer.start()
        first = asyncio.create_task(committer.store(arrival(0)))
        await store.first_commit_started()
        tasks = [asyncio.create_task(committer.store(a)) for a in [*good[:4], bad, *good[4:]]]
        await asyncio.sleep(0)
        store.release_first.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await first
        await committer.close()
        return results

    results = asyncio.run(scenario())

    assert store.sizes == [1, 10] + [1] * 10
    assert isinstance(results[4], type(make_error()))
    assert results[4] is store.raised[-1]
    others = results[:4] + results[5:]
    assert all(isinstance(r, int) for r in others), others
    assert [store.stored[r] for r in others] == good  # type: ignore[index]
    assert bad not in store.stored.values()


def test_integrity_error_on_a_single_arrival_is_not_retried() -> None:
    store = FakeStore(fail=lambda batch: integrity_error())

    async def scenario() -> None:
        committer = GroupCommitter(store)
        committer.start()
        with pytest.raises(IntegrityError):
            await committer.store(arrival(0))
        await committer.close()

    asyncio.run(scenario())

    assert store.sizes == [1]


def test_close_commits_pending_arrivals_before_returning() -> None:
    store = FakeStore()
    store.hold_first()

    async def scenario() -> tuple[int, list[int]]:
        committer = GroupCommitter(store)
        committer.start()
        first = asyncio.create_task(committer.store(arrival(0)))
        await store.first_commit_started()
        pending = [asyncio.create_task(committer.store(arrival(i))) for i in range(1, 21)]
        await asyncio.sleep(0)  # they are queued behind the commit in progress
        closing = asyncio.create_task(committer.close())
        await asyncio.sleep(0)
        assert not closing.done()
        store.release_first.set()
        await closing
        stored_when_closed = len(store.stored)
        return stored_when_closed, await asyncio.gather(first, *pending)

    stored_when_closed, ids = asyncio.run(scenario())

    assert stored_when_closed == 21
    assert store.sizes == [1, 20]
    assert sorted(ids) == list(range(1, 22))


def test_close_commits_arrivals_queued_before_the_committer_woke() -> None:
    store = FakeStore()

    async def scenario() -> tuple[int, list[int]]:
        committer = GroupCommitter(store)
        committer.start()
        tasks = [asyncio.create_task(committer.store(arrival(i))) for i in range(5)]
        await asyncio.sleep(0)  # queued; the committer has not taken them yet
        await committer.close()
        stored_when_closed = len(store.stored)
        return stored_when_closed, await asyncio.gather(*tasks)

    stored_when_closed, ids = asyncio.run(scenario())

    assert stored_when_closed == 5
    assert sorted(ids) == [1, 2, 3, 4, 5]


def test_store_after_close_raises_intake_closed() -> None:
    store = FakeStore()

    async def scenario() -> None:
        committer = GroupCommitter(store)
        committer.start()
        await committer.store(arrival(0))
        await committer.close()
        with pytest.raises(IntakeClosed):
            await committer.store(arrival(1))

    asyncio.run(scenario())

    assert store.sizes == [1]


def test_store_before_start_raises_intake_closed() -> None:
    store = FakeStore()

    async def scenario() -> None:
        committer = GroupCommitter(store)
        with pytest.raises(IntakeClosed):
            await committer.store(arrival(0))
        await committer.close()  # closing one never started is harmless

    asyncio.run(scenario())

    assert store.calls == []


def test_store_while_closing_raises_intake_closed() -> None:
    store = FakeStore()
    store.hold_first()

    async def scenario() -> None:
        committer = GroupCommitter(store)
        committer.start()
        first = asyncio.create_task(committer.store(arrival(0)))
        await store.first_commit_started()
        closing = asyncio.create_task(committer.close())
        await asyncio.sleep(0)
        with pytest.raises(IntakeClosed):
            await committer.store(arrival(1))
        store.release_first.set()
        await closing
        assert await first == 1

    asyncio.run(scenario())

    assert store.sizes == [1]


def test_cancelled_caller_does_not_cancel_the_commit_for_others() -> None:
    store = FakeStore()
    store.hold_first()
    a, b, c = arrival(1), arrival(2), arrival(3)

    async def scenario() -> tuple[bool, list[int], int]:
        committer = GroupCommitter(store)
        committer.start()
        tasks = [asyncio.create_task(committer.store(x)) for x in (a, b, c)]
        await store.first_commit_started()
        tasks[0].cancel()
        await asyncio.sleep(0)
        store.release_first.set()
        results = await asyncio.gather(*tasks[1:])
        # The committer is still working afterwards.
        later = await committer.store(arrival(4))
        await committer.close()
        return tasks[0].cancelled(), results, later

    cancelled, results, later = asyncio.run(scenario())

    assert cancelled
    assert store.sizes == [3, 1]
    # The cancelled caller's message was committed all the same (the client will retry and
    # the duplicate is the lesser evil); the others got their ids.
    assert a in store.stored.values()
    assert [store.stored[i] for i in results] == [b, c]
    assert store.stored[later] == arrival(4)


def test_cancelled_caller_of_a_failed_commit_leaves_no_unretrieved_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FakeStore(fail=lambda batch: RuntimeError("disk full"))
    store.hold_first()

    async def scenario() -> object:
        committer = GroupCommitter(store)
        committer.start()
        gone = asyncio.create_task(committer.store(arrival(1)))
        staying = asyncio.create_task(committer.store(arrival(2)))
        await store.first_commit_started()
        gone.cancel()
        await asyncio.sleep(0)
        store.release_first.set()
        (result,) = await asyncio.gather(staying, return_exceptions=True)
        await committer.close()
        return result

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        result = asyncio.run(scenario())
        gc.collect()

    assert isinstance(result, RuntimeError)
    assert "never retrieved" not in caplog.text


def test_store_now_commits_on_the_loop_thread_and_the_thread_path_is_not_used() -> None:
    thread_store = FakeStore()
    loop_threads: list[int] = []

    def store_now(batch: Sequence[Arrival]) -> list[int]:
        loop_threads.append(threading.get_ident())
        start = 1 + sum(len(b) for b in thread_store.calls) + 100 * len(loop_threads)
        return list(range(start, start + len(batch)))

    async def scenario() -> tuple[list[int], int]:
        committer = GroupCommitter(thread_store, store_now=store_now)
        committer.start()
        ids = await asyncio.gather(*(committer.store(arrival(i)) for i in range(10)))
        await committer.close()
        return ids, threading.get_ident()

    ids, loop_thread = asyncio.run(scenario())

    assert len(set(ids)) == 10
    assert thread_store.calls == []
    assert set(loop_threads) == {loop_thread}


def test_store_now_that_would_wait_hands_the_batch_to_the_thread() -> None:
    thread_store = FakeStore()
    offered: list[int] = []

    def busy(batch: Sequence[Arrival]) -> None:
        offered.append(len(batch))
        return None  # the write lock is held elsewhere: nothing written

    async def scenario() -> list[int]:
        committer = GroupCommitter(thread_store, store_now=busy)
        committer.start()
        ids = await asyncio.gather(*(committer.store(arrival(i)) for i in range(5)))
        await committer.close()
        return ids

    ids = asyncio.run(scenario())

    assert sum(offered) == 5 == sum(thread_store.sizes)
    assert [thread_store.stored[i].peer_port for i in ids] == [40000 + i for i in range(5)]


def test_store_now_failure_fails_its_callers_without_a_second_attempt() -> None:
    thread_store = FakeStore()

    def broken(batch: Sequence[Arrival]) -> list[int]:
        raise OSError("disk I/O error")

    async def scenario() -> list[BaseException | int]:
        committer = GroupCommitter(thread_store, store_now=broken)
        committer.start()
        outcomes = await asyncio.gather(
            *(committer.store(arrival(i)) for i in range(3)), return_exceptions=True
        )
        await committer.close()
        return outcomes

    outcomes = asyncio.run(scenario())

    assert all(isinstance(outcome, OSError) for outcome in outcomes)
    # Never written twice: what failed is reported, not retried on the other path.
    assert thread_store.calls == []
