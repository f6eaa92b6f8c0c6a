"""The whole path of a reset, end to end: a signed request over real SMTP (keys on the real DNS
server), queued by the real worker, approved with the ``mailproc`` command in a child process,
carried out by the running service against a real HTTP receiver that checks the signature with
the README's verifier, and the owner's "completed" reply through a real relay."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest

from mailproc.agents import AgentService
from mailproc.models import AgentRole, RequestState
from mailproc.requests import RequestService
from tests import test_pipeline
from tests.conftest import free_port
from tests.dkimkeys import DkimKey
from tests.support import AppThread, send_raw, stored_id, wait_for, write_config
from tests.test_outbox import Relay
from tests.test_pipeline import ALICE, deliver, processed, requests, sections, signed
from tests.webhook import Receiver

# The pipeline tests' fixtures: its accounts database, DKIM key and relay.
accounts_url = test_pipeline.accounts_url
key = test_pipeline.key
relay = test_pipeline.relay

SECRET = "0123456789abcdef" * 4
PASSWORD = "correct horse battery"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver(SECRET).start()
    yield running
    running.stop()


def flow_sections(
    accounts_url: str, relay: Relay, receiver: Receiver, **reset: Any
) -> dict[str, Any]:
    return sections(
        accounts_url,
        relay,
        reset={
            "method": "webhook",
            "webhook_url": receiver.url,
            "webhook_secret": SECRET,
            "poll_interval_seconds": 0.2,
            "retry_base_seconds": 0.2,
            "timeout_seconds": 2.0,
            "lease_seconds": 8.0,
            **reset,
        },
    )


class Cli:
    """``python -m mailproc`` in a child process, as an agent or operator runs it; the webhook
    secret comes from the environment, as the README says to keep it."""

    def __init__(self, config: Path) -> None:
        self.config = config

    def __call__(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPROC_")}
        env["MAILPROC_RESET_WEBHOOK_SECRET"] = SECRET
        return subprocess.run(
            [sys.executable, "-m", "mailproc", "--config", str(self.config), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

    def ok(self, *args: str, stdin: str | None = None) -> str:
        done = self(*args, stdin=stdin)
        assert done.returncode == 0, done.stderr
        return done.stdout


def cli_for(tmp_path: Path, database_url: str, flow: dict[str, Any]) -> Cli:
    on_disk = {k: v for k, v in flow.items() if k != "reset"}
    on_disk["reset"] = {k: v for k, v in flow["reset"].items() if k != "webhook_secret"}
    return Cli(write_config(tmp_path / "mailproc.toml", database_url, **on_disk))


def body(reply: EmailMessage) -> str:
    part = reply.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def test_a_verified_request_approved_from_the_cli_is_reset_once_and_the_owner_told(
    database_url: str,
    accounts_url: str,
    key: DkimKey,
    relay: Relay,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    flow = flow_sections(accounts_url, relay, receiver)
    cli = cli_for(tmp_path, database_url, flow)
    with AppThread.running(database_url, **flow) as app:
        raw = signed(key, message_id="<reset-1@example.org>")
        message = processed(app, stored_id(send_raw(app.port, raw, ALICE)))
        [request] = requests(app)
        assert request.state == RequestState.PENDING
        assert "first_contact" in request.risk_flags  # so two agents must approve
        [ack] = deliver(app, relay, 1)
        assert request.reference in body(ack)

        agents = AgentService(app.app.database)
        agents.add("alice", PASSWORD)
        agents.add("bob", PASSWORD)
        first = cli.ok(
            "requests", "approve", str(request.id), "--agent", "alice", "--note", "called back"
        )
        assert f"request {request.id} ({request.reference}): pending" in first
        assert "a second, different agent must approve" in first
        again = cli("requests", "approve", str(request.id), "--agent", "alice", "--note", "sure")
        assert again.returncode == 1
        assert "a second, different agent must approve it" in again.stderr
        time.sleep(1)  # several executor runs: nothing may have been called on one vote
        assert receiver.calls == []

        second = json.loads(
            cli.ok(
                "requests",
                "approve",
                str(request.id),
                "--agent",
                "bob",
                "--note",
                "checked the account's recovery phone",
                "--json",
            )
        )
        assert second["state"] == "approved"
        assert second["decided_by"] == ["alice", "bob"]
        wait_for(
            lambda: (
                RequestService(app.app.database).get(request.id).request.state
                == RequestState.COMPLETED
            ),
            timeout=20,
        )
        [ack, completed] = deliver(app, relay, 2)
        time.sleep(1)  # and no second call comes

    # Exactly one call, correctly signed, for this request and account.
    [call] = receiver.calls
    assert call.genuine
    assert call.status == 200
    assert call.headers["Idempotency-Key"] == str(request.id)
    assert call.headers["Content-Type"] == "application/json"
    assert call.payload == {
        "event": "reset_security_question",
        "request_id": request.id,
        "reference": request.reference,
        "account_id": "42",
        "email": ALICE,
        "approved_by": ["alice", "bob"],
        "approved_at": call.payload["approved_at"],
    }
    assert receiver.successes == {str(request.id): 1}

    # The owner is told, in their language, in the thread of their message.
    assert str(completed["To"]) == ALICE
    assert completed["In-Reply-To"] == "<reset-1@example.org>"
    assert completed["Content-Language"] == "de"
    assert completed["Auto-Submitted"] == "auto-replied"
    assert request.reference in body(completed)

    shown = json.loads(cli.ok("requests", "show", str(request.id), "--json"))
    assert shown["state"] == "completed"
    assert [v["agent"] for v in shown["votes"]] == ["alice", "bob"]
    assert shown["execution"]["state"] == "succeeded"
    assert shown["execution"]["attempts"] == 1
    assert shown["message_ids"] == [message.id]
    assert [(e["actor"], e["action"]) for e in shown["events"]] == [
        ("mailproc", "created"),
        ("mailproc", "message_decided"),
        ("alice", "vote"),
        ("bob", "approved"),
        ("mailproc", "execution_attempt"),
        ("mailproc", "completed"),
    ]
    assert "audit log intact" in cli.ok("audit", "verify")
    listed = cli.ok("requests", "list", "--state", "completed")
    assert request.reference in listed


def test_a_receiver_failing_several_times_then_succeeding_still_yields_one_reset(
    database_url: str,
    accounts_url: str,
    key: DkimKey,
    relay: Relay,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    flow = flow_sections(accounts_url, relay, receiver, max_attempts=3)
    flow["approval"] = {"four_eyes_for_flagged": False}
    cli = cli_for(tmp_path, database_url, flow)
    receiver.script = [500, 503, 502, 500, 200]
    with AppThread.running(database_url, **flow) as app:
        processed(app, stored_id(send_raw(app.port, signed(key), ALICE)))
        [request] = requests(app)
        agents = AgentService(app.app.database)
        agents.add("alice", PASSWORD)
        agents.add("root", PASSWORD, AgentRole.ADMIN)
        cli.ok("requests", "approve", str(request.id), "--agent", "alice", "--note", "verified")

        # Three failures: the request fails, and operators see it.
        wait_for(
            lambda: (
                RequestService(app.app.database).get(request.id).request.state
                == RequestState.FAILED
            ),
            timeout=20,
        )
        failed = cli.ok("requests", "list", "--state", "failed")
        assert request.reference in failed
        shown = cli.ok("requests", "show", str(request.id))
        assert (
            "reset:         webhook, failed after 3 attempt(s): gave up after 3 attempts" in shown
        )
        refused = cli("requests", "retry", str(request.id), "--agent", "alice")
        assert refused.returncode == 1
        assert "not an admin" in refused.stderr

        # An admin tries again: one more failure, then success.
        retried = cli.ok("requests", "retry", str(request.id), "--agent", "root")
        assert f"request {request.id} ({request.reference}): approved" in retried
        wait_for(
            lambda: (
                RequestService(app.app.database).get(request.id).request.state
                == RequestState.COMPLETED
            ),
            timeout=20,
        )
        [_ack, completed] = deliver(app, relay, 2)
        time.sleep(1)  # and no further call comes
        events = [e.action for e in RequestService(app.app.database).get(request.id).events]
    assert [call.status for call in receiver.calls] == [500, 503, 502, 500, 200]
    assert all(call.genuine for call in receiver.calls)
    assert len({call.body for call in receiver.calls}) == 1
    assert receiver.successes == {str(request.id): 1}
    assert request.reference in body(completed)
    assert events.count("execution_attempt") == 5
    assert events[-1] == "completed"
    assert "failed" in events
    assert "retry" in events


def test_serve_expires_an_undecided_request_and_tells_the_owner(
    database_url: str, accounts_url: str, key: DkimKey, relay: Relay, receiver: Receiver
) -> None:
    flow = flow_sections(accounts_url, relay, receiver)
    flow["queue"] = {"expire_after_days": 2 / 86400, "expire_check_seconds": 0.2}
    with AppThread.running(database_url, **flow) as app:
        processed(app, stored_id(send_raw(app.port, signed(key), ALICE)))
        [request] = requests(app)
        wait_for(
            lambda: (
                RequestService(app.app.database).get(request.id).request.state
                == RequestState.EXPIRED
            ),
            timeout=20,
        )
        [_ack, expired] = deliver(app, relay, 2)
        events = [e.action for e in RequestService(app.app.database).get(request.id).events]
    assert str(expired["To"]) == ALICE
    assert request.reference in body(expired)
    assert events[-1] == "expired"
    assert receiver.calls == []


def test_the_owner_cancels_from_the_link_in_the_acknowledgement(
    database_url: str, accounts_url: str, key: DkimKey, relay: Relay, receiver: Receiver
) -> None:
    port = free_port()
    flow = flow_sections(accounts_url, relay, receiver)
    flow["web"] = {"listen": f"127.0.0.1:{port}", "base_url": f"http://127.0.0.1:{port}"}
    with AppThread.running(database_url, **flow) as app:
        processed(app, stored_id(send_raw(app.port, signed(key), ALICE)))
        [request] = requests(app)
        [ack] = deliver(app, relay, 1)
        links = re.findall(rf"http://127\.0\.0\.1:{port}/cancel/[A-Za-z0-9_-]+", body(ack))
        assert links, body(ack)
        with httpx.Client() as owner:
            page = owner.get(links[0])
            assert page.status_code == 200
            assert request.reference in page.text
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert csrf
            done = owner.post(links[0], data={"csrf": csrf.group(1)})
            assert done.status_code == 200
        detail = RequestService(app.app.database).get(request.id)
        assert detail.request.state == RequestState.CANCELLED
        assert (detail.events[-1].actor, detail.events[-1].action) == ("owner", "cancelled")
        [_ack, cancelled] = deliver(app, relay, 2)
    assert request.reference in body(cancelled)
    assert receiver.calls == []
