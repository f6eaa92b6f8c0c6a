"""End to end through the real listener, worker processes, DNS server, accounts database and
relay: which mail opens a reset request, and which reply (or silence) every other kind gets."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailproc.models import Message, MessageState, OutboxEntry, OutboxState, ResetRequest
from mailproc.requests import RequestService, verify_chain
from tests.dkimkeys import DkimKey, build_message, publish, rsa_key, sign
from tests.dnsserver import ZoneServer
from tests.support import AppThread, send_raw, stored_id, wait_for
from tests.test_outbox import Relay

ALICE = "alice@example.org"  # registered, German-speaking
CAROL = "carol@example.org"  # writes from a domain we can authenticate, but has no account


@pytest.fixture
def accounts_url(tmp_path: Path) -> str:
    path = tmp_path / "accounts.db"
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE accounts (id INTEGER PRIMARY KEY, email TEXT, name TEXT, locale TEXT)"
        )
        connection.executemany(
            "INSERT INTO accounts VALUES (?, ?, ?, ?)",
            [
                (42, "Alice@Example.org", "Alice Example", "de"),
                (43, "bob@example.net", "Bob", None),
            ],
        )
    connection.close()
    return f"sqlite:///{path}"


@pytest.fixture
def key(zone: ZoneServer) -> DkimKey:
    signing = rsa_key(1024, selector="pipeline")
    publish(zone, signing)
    return signing


@pytest.fixture
def relay() -> Iterator[Relay]:
    running = Relay().start()
    yield running
    running.stop()


def sections(accounts_url: str, relay: Relay, **extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "accounts": {
            "url": accounts_url,
            "query": "SELECT id, email, name, locale FROM accounts WHERE lower(email) = :email",
        },
        "outbound": {
            "relay": f"127.0.0.1:{relay.port}",
            "poll_interval_seconds": 0.2,
            "retry_base_seconds": 0.2,
        },
        **extra,
    }


def signed(key: DkimKey, sender: str = ALICE, **kwargs: Any) -> bytes:
    return sign(build_message(from_header=f"<{sender}>", **kwargs), key)


def unsigned(sender: str = ALICE, **kwargs: Any) -> bytes:
    return build_message(from_header=f"<{sender}>", **kwargs)


def processed(app: AppThread, message_id: int) -> Message:
    service = app.app.messages
    return wait_for(
        lambda: (
            (m := service.get(message_id)).state in (MessageState.PROCESSED, MessageState.FAILED)
            and m
        ),
        timeout=30,
    )


def requests(app: AppThread) -> list[ResetRequest]:
    return RequestService(app.app.database).list()


def outbox(app: AppThread) -> list[OutboxEntry]:
    with app.app.database.reading() as session:
        return list(session.query(OutboxEntry).order_by(OutboxEntry.id))


def deliver(app: AppThread, relay: Relay, count: int) -> list[Any]:
    wait_for(lambda: len(relay.received) >= count, timeout=20)
    time.sleep(0.5)  # and nothing more arrives
    assert len(relay.received) == count
    return relay.messages()


def test_signed_request_from_the_registered_address_queues_one_request_and_acknowledges(
    database_url: str, accounts_url: str, key: DkimKey, relay: Relay, tmp_path: Path
) -> None:
    with AppThread.running(database_url, **sections(accounts_url, relay)) as app:
        first = processed(app, stored_id(send_raw(app.port, signed(key), ALICE)))
        assert first.state == MessageState.PROCESSED
        assert first.decision is not None
        assert (first.decision["rule"], first.decision["action"]) == (
            "reset-security-question",
            "queue_reset",
        )
        [request] = requests(app)
        assert (request.state.value, request.account_id, request.email) == (
            "pending",
            "42",
            ALICE,
        )
        assert "first_contact" in request.risk_flags
        detail = RequestService(app.app.database).get(request.id)
        assert [e.action for e in detail.events] == ["created", "message_decided"]
        assert detail.message_ids == [first.id]
        [ack] = deliver(app, relay, 1)
        assert str(ack["To"]) == ALICE
        assert ack["Content-Language"] == "de"  # the account's locale
        assert request.reference in str(ack["Subject"]) + ack.get_body(("plain",)).get_content()

        # The same bytes again (a duplicate delivery, or a replay): recorded, never acted on.
        again = processed(app, stored_id(send_raw(app.port, signed(key), ALICE)))
        assert again.decision is not None
        assert again.decision["outcome"] == "joined the open request"
        duplicate_raw = build_message(from_header=f"<{ALICE}>", message_id="<dup@example.org>")
        duplicate = sign(duplicate_raw, key)
        one = processed(app, stored_id(send_raw(app.port, duplicate, ALICE)))
        two = processed(app, stored_id(send_raw(app.port, duplicate, ALICE)))
        assert two.decision is not None
        assert two.decision["outcome"] == "replay of an earlier message"
        # Every verified message for Alice joined the one open request.
        [request] = requests(app)
        detail = RequestService(app.app.database).get(request.id)
        assert detail.message_ids == sorted({first.id, again.id, one.id})
        assert [e.action for e in detail.events] == [
            "created",
            "message_decided",
            "joined",
            "message_decided",
            "joined",
            "message_decided",
        ]
        # Every message's decision, the replay's included, is in the chained audit log.
        report = verify_chain(app.app.database)
        assert report.broken_at is None
        assert report.events == 7

    # What an operator sees of it.
    from click.testing import CliRunner

    from mailproc.cli import main
    from tests.support import write_config

    config = write_config(tmp_path / "mailproc.toml", database_url, **sections(accounts_url, relay))
    listed = CliRunner().invoke(main, ["--config", str(config), "requests", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.output)
    assert {"id", "state", "account_id", "email", "created_at", "risk_flags"} <= set(row)
    assert (row["state"], row["account_id"], row["email"]) == ("pending", "42", ALICE)
    shown = CliRunner().invoke(main, ["--config", str(config), "requests", "show", str(row["id"])])
    assert shown.exit_code == 0, shown.output
    assert f"reference:     {row['reference']}" in shown.output
    assert "rule:          reset-security-question" in shown.output
    assert "mailproc  created - -> pending" in shown.output


def test_unverified_variants_queue_nothing_and_get_the_reply_their_rule_says(
    database_url: str, accounts_url: str, key: DkimKey, relay: Relay
) -> None:
    with AppThread.running(database_url, **sections(accounts_url, relay)) as app:
        # Forged From: the registered owner is told, once a day, and nothing is queued.
        forged = processed(app, stored_id(send_raw(app.port, unsigned(ALICE), ALICE)))
        assert forged.decision is not None
        assert forged.decision["rule"] == "unverified-reset-owner"
        forged_again = processed(app, stored_id(send_raw(app.port, unsigned(ALICE), ALICE)))
        assert forged_again.decision is not None
        assert "already notified" in forged_again.decision["outcome"]
        # Authenticated, but not a registered address: told to write from the registered one.
        carol = processed(app, stored_id(send_raw(app.port, signed(key, CAROL), CAROL)))
        assert carol.decision is not None
        assert carol.decision["rule"] == "unverified-reset-wrong-address"
        # Neither authenticated nor claiming an account: silence.
        stranger = "dave@example.org"
        silent = processed(app, stored_id(send_raw(app.port, unsigned(stranger), stranger)))
        assert silent.decision is not None
        assert silent.decision["action"] == "ignore"
        # An authenticated password question: how to use Forgot Password.
        question = signed(key, CAROL, subject="I forgot my password")
        password = processed(app, stored_id(send_raw(app.port, question, CAROL)))
        assert password.decision is not None
        assert password.decision["rule"] == "password-question"

        assert requests(app) == []
        replies = deliver(app, relay, 3)
        by_recipient = {str(m["To"]): m for m in replies}
        assert set(by_recipient) == {ALICE, CAROL}
        notices = [e for e in outbox(app) if e.template == "unverified_notice"]
        assert len(notices) == 1
        assert notices[0].recipient == ALICE
        # The notice to the owner does not thread onto the forged message.
        assert by_recipient[ALICE]["In-Reply-To"] is None
        templates = sorted(e.template for e in outbox(app) if e.state == OutboxState.SENT)
        assert templates == ["password_help", "unverified_notice", "use_registered_address"]


def test_a_signed_request_with_wire_irregularities_queues_nothing(
    database_url: str, accounts_url: str, key: DkimKey, relay: Relay
) -> None:
    # The signature still verifies (the extra header is not signed), but a bare CR is the kind
    # of irregularity smuggling relies on: such mail is never an authenticated request.
    head, _, body = signed(key).partition(b"\r\n\r\n")
    raw = head + b"\r\nX-Relay-Note: a\rb\r\n\r\n" + body
    with AppThread.running(database_url, **sections(accounts_url, relay)) as app:
        message = processed(app, stored_id(send_raw(app.port, raw, ALICE)))
        assert "bare_cr" in message.intake_flags
        assert message.verdict is not None
        assert message.verdict["dkim"][0]["result"] == "pass"
        assert message.verdict["authenticated"] is False
        assert "wire_bare_cr" in message.verdict["reasons"]
        assert message.decision is not None
        assert message.decision["rule"] == "unverified-reset-other"
        assert message.decision["author"] is None
        assert requests(app) == []


def test_shadow_mode_decides_and_records_but_queues_and_sends_nothing(
    database_url: str, accounts_url: str, key: DkimKey, relay: Relay
) -> None:
    shadow = sections(accounts_url, relay, mode={"shadow": True})
    with AppThread.running(database_url, **shadow) as app:
        message = processed(app, stored_id(send_raw(app.port, signed(key), ALICE)))
        assert message.decision is not None
        assert message.decision["action"] == "queue_reset"
        assert message.decision["outcome"] == "shadow mode: nothing done"
        forged = processed(app, stored_id(send_raw(app.port, unsigned(ALICE), ALICE)))
        assert forged.decision is not None
        assert forged.decision["action"] == "notify_owner"
        time.sleep(0.5)
        assert requests(app) == []
        assert outbox(app) == []
        assert relay.received == []


def test_an_unreachable_directory_defers_the_message_until_it_answers(
    database_url: str, tmp_path: Path, key: DkimKey, relay: Relay
) -> None:
    missing = tmp_path / "not-yet" / "accounts.db"
    with AppThread.running(database_url, **sections(f"sqlite:///{missing}", relay)) as app:
        message_id = stored_id(send_raw(app.port, signed(key), ALICE))
        service = app.app.messages
        waiting = wait_for(
            lambda: (m := service.get(message_id)).state == MessageState.DEFERRED and m,
            timeout=30,
        )
        assert waiting.error is not None
        assert waiting.error.startswith("account directory:")
        assert requests(app) == []


def test_check_prints_the_account_the_rule_and_the_action(
    tmp_path: Path, database_url: str, accounts_url: str, key: DkimKey, relay: Relay
) -> None:
    from click.testing import CliRunner

    from mailproc.cli import main
    from tests.support import write_config

    config = write_config(tmp_path / "mailproc.toml", database_url, **sections(accounts_url, relay))
    eml = tmp_path / "request.eml"
    eml.write_bytes(signed(key))
    result = CliRunner().invoke(main, ["--config", str(config), "check", str(eml)])
    assert result.exit_code == 0, result.output
    assert f"account (author): {ALICE} registered (ids: 42)" in result.output
    assert "rule reset-security-question: MATCH" in result.output
    assert (
        "action: queue_reset with request_received (rule reset-security-question)" in result.output
    )
    eml.write_bytes(unsigned(ALICE))
    result = CliRunner().invoke(main, ["--config", str(config), "check", str(eml), "--json"])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert (data["decision"]["rule"], data["decision"]["action"]) == (
        "unverified-reset-owner",
        "notify_owner",
    )
    assert relay.received == []  # check decides, never sends


def test_gateway_mode_forwards_what_no_rule_handles_unchanged(
    database_url: str, accounts_url: str, key: DkimKey, relay: Relay
) -> None:
    gateway = sections(accounts_url, relay, rules={"helpdesk_address": "helpdesk@example.com"})
    with AppThread.running(database_url, **gateway) as app:
        raw = unsigned("dave@example.org", subject="My invoice is wrong", body="Invoice 7 please\n")
        message = processed(app, stored_id(send_raw(app.port, raw, "dave@example.org")))
        assert message.decision is not None
        assert (message.decision["rule"], message.decision["outcome"]) == (
            "fallthrough",
            "forwarded to helpdesk@example.com",
        )
        wait_for(lambda: len(relay.received) == 1, timeout=20)
        [(_, rcpts, forwarded)] = relay.received
        assert rcpts == ["helpdesk@example.com"]
        assert forwarded.startswith(b"Resent-From: support@example.com\r\n")
        assert forwarded.endswith(raw)  # the message itself, byte for byte
        assert requests(app) == []


def test_serve_refuses_to_start_on_a_broken_rule(tmp_path: Path, database_url: str) -> None:
    import shutil

    from click.testing import CliRunner

    from mailproc.cli import main
    from mailproc.rules import RuleSet
    from tests.support import write_config

    folder = tmp_path / "rules"
    shutil.copytree(RuleSet.from_settings(settings_rules()).folder, folder)
    broken = folder / "10-reset-security-question.toml"
    broken.write_text(broken.read_text().replace('min_strength = "strong"', 'min_strength = "max"'))
    config = write_config(tmp_path / "mailproc.toml", database_url, rules={"path": str(folder)})
    result = CliRunner().invoke(main, ["--config", str(config), "serve"])
    assert result.exit_code == 78
    assert result.output.startswith(f"Error: {broken}: [when] min_strength:"), result.output
    assert result.output.count("\n") == 1


def settings_rules() -> Any:
    from mailproc.config import RulesSettings

    return RulesSettings()
