"""Health, readiness and Prometheus metrics of the running service, over real HTTP."""

from __future__ import annotations

import asyncio
import smtplib
import socket
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from mailproc.web.server import WebServer
from tests.support import AppThread, make_message, send, stored_id, wait_for
from tests.test_decisions import request as open_request


@pytest.fixture
def app(database_url: str) -> Iterator[AppThread]:
    with AppThread.running(database_url) as running:
        yield running


def get(app: AppThread, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{app.app.web_port}{path}", timeout=10)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_healthz_and_readyz(app: AppThread) -> None:
    assert get(app, "/healthz").json() == {"status": "ok"}
    ready = get(app, "/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": True, "listener": True, "scheduler": True},
    }
    # The scheduler stops (as it would if it died): not ready, and why.
    app.call(_stop_scheduler(app))
    answer = get(app, "/readyz")
    assert answer.status_code == 503
    assert answer.json()["checks"] == {"database": True, "listener": True, "scheduler": False}


async def _stop_scheduler(app: AppThread) -> None:
    app.app.scheduler.shutdown(wait=False)


def test_metrics_report_messages_requests_and_sessions(app: AppThread, database_url: str) -> None:
    first = stored_id(send(app.port, make_message()))
    wait_for(lambda: app.app.messages.get(first).state.value == "processed", timeout=30)
    open_request(app.app.database, database_url)
    answer = get(app, "/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = samples(answer.text)
    assert values[("mailproc_messages", (("state", "processed"),))] >= 1
    assert values[("mailproc_messages", (("state", "failed"),))] == 0
    assert values[("mailproc_requests", (("state", "pending"),))] == 1
    assert values[("mailproc_requests", (("state", "completed"),))] == 0
    assert values[("mailproc_queue_oldest_pending_seconds", ())] >= 0
    assert ("mailproc_outbox", (("state", "pending"),)) in values
    assert ("mailproc_reset_executions", (("state", "failed"),)) in values
    assert values[("mailproc_smtp_sessions_open", ())] == 0
    assert any(name == "mailproc_verdicts" for name, _ in values)
    assert values[("mailproc_message_deferrals", ())] >= 0
    # make_message() is unsigned: not authenticated, and the reason says why.
    assert (
        values[
            (
                "mailproc_unauthenticated_reasons",
                (("reason", "no aligned DKIM pass, aligned SPF pass or trusted ARC chain"),),
            )
        ]
        >= 1
    )
    stored = values[("mailproc_smtp_messages_total", (("outcome", "stored"),))]
    accepted = values[("mailproc_smtp_sessions_total", (("result", "accepted"),))]
    refused = values.get(("mailproc_smtp_recipients_refused_total", ()), 0.0)
    assert stored >= 1
    assert accepted >= 1
    # One more message, and one recipient refused: the counters move by exactly that.
    send(app.port, make_message())
    with smtplib.SMTP("127.0.0.1", app.port) as client:
        client.ehlo("client.example.org")
        client.mail("alice@example.org")
        assert client.rcpt("nobody@example.net")[0] == 550
    after = samples(get(app, "/metrics").text)
    assert after[("mailproc_smtp_messages_total", (("outcome", "stored"),))] == stored + 1
    assert after[("mailproc_smtp_sessions_total", (("result", "accepted"),))] == accepted + 2
    assert after[("mailproc_smtp_recipients_refused_total", ())] == refused + 1


def test_console_connections_send_without_delay() -> None:
    """The console's listening socket says it is TCP, so asyncio turns Nagle's algorithm off on
    every connection it accepts; otherwise each answer on a kept-alive connection after the
    first would wait for the browser's delayed ACK (about 40 ms)."""

    async def accepted_nodelay() -> int:
        server = WebServer.bind(Starlette(), "127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        client = socket.create_connection(("127.0.0.1", server.port))
        try:
            connection, _ = await loop.sock_accept(server.sock)
            transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, connection)
            try:
                return connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            finally:
                transport.close()
                await asyncio.sleep(0)
        finally:
            client.close()
            server.sock.close()

    assert asyncio.run(accepted_nodelay()) != 0
