"""Replies: what is never answered, the outbox, the rate limit, and delivery through a real
aiosmtpd relay (signed, retried, exactly once across a relay outage and a restart)."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import json
import signal
import ssl
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

import dkim
import pytest
from aiosmtpd.controller import Controller

from mailproc import db
from mailproc.models import Message, OutboxEntry, OutboxState
from mailproc.outbox import Outbox, OutboxSender, Source, why_not_reply
from mailproc.rendering import TEMPLATE_NAMES, Templates
from tests.conftest import free_port
from tests.dkimkeys import dnsfunc, publish, rsa_key
from tests.dnsserver import ZoneServer
from tests.support import (
    SUPPORT,
    ServerProcess,
    make_message,
    send,
    settings_for,
    stored_id,
    wait_for,
    wire,
    write_config,
)

OWNER = "owner@example.org"


class Relay:
    """A real SMTP relay (aiosmtpd) that keeps what it accepts, or answers a chosen refusal."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.received: list[tuple[str, list[str], bytes]] = []
        self.answer: str | None = None  # e.g. "451 4.3.0 try later" or "550 5.1.1 no such user"
        self._lock = threading.Lock()
        self._controller: Controller | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.answer is not None:
            return self.answer
        with self._lock:
            self.received.append(
                (envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content))
            )
        return "250 2.0.0 Ok: queued"

    def start(self, **smtp_options: Any) -> Relay:
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, **smtp_options)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def messages(self) -> list[EmailMessage]:
        with self._lock:
            raws = [raw for _, _, raw in self.received]
        return [
            email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[misc]
            for raw in raws
        ]


@pytest.fixture
def relay() -> Iterator[Relay]:
    running = Relay().start()
    yield running
    running.stop()


def outbound(relay_port: int, **extra: Any) -> dict[str, Any]:
    return {
        "relay": f"127.0.0.1:{relay_port}",
        "from_address": SUPPORT,
        "retry_base_seconds": 0.2,
        "retry_max_seconds": 1.0,
        "poll_interval_seconds": 0.2,
        "timeout_seconds": 5.0,
        **extra,
    }


@pytest.fixture
def database(database_url: str) -> Iterator[db.Database]:
    database = db.Database(database_url)
    db.upgrade(database)
    yield database
    database.dispose()


def source_of(raw: bytes, mail_from: str = OWNER, message_id: int | None = None) -> Source:
    return Source(message_id, mail_from, BytesHeaderParser(policy=compat32).parsebytes(raw))


def headers(text: str) -> Any:
    return BytesHeaderParser(policy=compat32).parsebytes(text.encode() + b"\r\n")


def queue(
    database: db.Database, outbox: Outbox, template: str = "password_help", **kwargs: Any
) -> Any:
    context = outbox.templates.sample_context(template, kwargs.get("locale"))
    kwargs.setdefault("to", OWNER)
    with database.writing() as session:
        return outbox.reply(session, template=template, context=context, **kwargs)


def deliver(sender: OutboxSender) -> int:
    return asyncio.run(sender.run_once())


def entry(database: db.Database, outbox_id: int) -> OutboxEntry:
    with database.reading() as session:
        found = session.get(OutboxEntry, outbox_id)
        assert found is not None
        return found


# -- what is never answered ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header_text", "mail_from", "reason"),
    [
        ("From: a@example.org", "", "null reverse path"),
        ("From: MAILER-DAEMON@example.org", "MAILER-DAEMON@example.org", "mail robot"),
        ("From: x@example.org", "postmaster@example.org", "mail robot"),
        ("From: x@example.org", "MAILER-DAEMON", "mail robot"),
        ("From: x@example.org", "owner-users@lists.example.org", "mail robot"),
        ("From: x@example.org", "users-request@lists.example.org", "mail robot"),
        ("From: x@example.org", "users-bounces@lists.example.org", "mail robot"),
        ("From: a@example.org\r\nAuto-Submitted: auto-replied", OWNER, "Auto-Submitted"),
        ("From: a@example.org\r\nAuto-Submitted: auto-generated", OWNER, "Auto-Submitted"),
        ("From: a@example.org\r\nPrecedence: bulk", OWNER, "Precedence: bulk"),
        ("From: a@example.org\r\nPrecedence: junk", OWNER, "Precedence: junk"),
        ("From: a@example.org\r\nPrecedence: list", OWNER, "Precedence: list"),
        ("From: a@example.org\r\nList-Id: <users.lists.example.org>", OWNER, "List-Id"),
        ("From: a@example.org\r\nList-Unsubscribe: <mailto:u@x.org>", OWNER, "List-Unsub"),
        ("From: a@example.org\r\nX-Auto-Response-Suppress: OOF, DR", OWNER, "X-Auto-Response"),
        ("From: a@example.org\r\nX-Auto-Response-Suppress: All", OWNER, "X-Auto-Response"),
        (
            "From: a@example.org\r\nContent-Type: multipart/report; report-type=delivery-status",
            OWNER,
            "report",
        ),
        (f"From: Support <{SUPPORT}>", OWNER, "own addresses"),
        ("From: a@example.org", SUPPORT, "own addresses"),
    ],
)
def test_mail_that_must_never_get_a_reply(header_text: str, mail_from: str, reason: str) -> None:
    found = why_not_reply(headers(header_text), mail_from, {SUPPORT})
    assert found is not None
    assert reason in found


@pytest.mark.parametrize(
    "header_text",
    [
        "From: a@example.org",
        "From: a@example.org\r\nAuto-Submitted: no",
        "From: a@example.org\r\nPrecedence: first-class",
        "From: a@example.org\r\nX-Auto-Response-Suppress: DR",
    ],
)
def test_ordinary_mail_may_be_answered(header_text: str) -> None:
    assert why_not_reply(headers(header_text), OWNER, {SUPPORT}) is None


def test_threading_echoes_only_well_formed_message_ids() -> None:
    good = source_of(
        b"Message-ID: <abc@client.example.org>\r\nReferences: <r1@x.org> junk <r2@x.org>\r\n\r\n"
    )
    assert good.threading() == (
        "<abc@client.example.org>",
        "<r1@x.org> <r2@x.org> <abc@client.example.org>",
    )
    assert source_of(b"Message-ID: not an id\r\n\r\n").threading() == (None, None)
    assert source_of(b"Subject: none\r\n\r\n").threading() == (None, None)
    many = " ".join(f"<r{n}@x.org>" for n in range(30))
    long_chain = source_of(f"Message-ID: <m@x.org>\r\nReferences: {many}\r\n\r\n".encode())
    _, references = long_chain.threading()
    assert references is not None
    assert references.split()[-1] == "<m@x.org>"
    assert len(references.split()) == 10


# -- the outbox -------------------------------------------------------------------------------


def test_a_suppressed_reply_is_recorded_with_its_reason_and_never_sent(
    database: db.Database, database_url: str, relay: Relay
) -> None:
    settings = settings_for(database_url, outbound=outbound(relay.port))
    outbox = Outbox.from_settings(settings)
    auto = wire(make_message())
    auto = b"Auto-Submitted: auto-replied\r\n" + auto
    queued = queue(database, outbox, source=source_of(auto))
    assert queued.state == OutboxState.SUPPRESSED
    assert queued.reason is not None
    assert "Auto-Submitted" in queued.reason
    null = queue(database, outbox, source=source_of(wire(make_message()), mail_from=""))
    assert null.state == OutboxState.SUPPRESSED
    listed = b"List-Id: <users.lists.example.org>\r\n" + wire(make_message())
    from_list = queue(database, outbox, source=source_of(listed))
    assert from_list.state == OutboxState.SUPPRESSED
    assert deliver(OutboxSender(settings, database, "test")) == 0
    assert relay.received == []
    assert entry(database, queued.outbox_id).suppressed_reason == queued.reason


def test_rate_limit_per_recipient_holds(
    database: db.Database, database_url: str, relay: Relay
) -> None:
    settings = settings_for(
        database_url, outbound=outbound(relay.port, replies_per_recipient_per_day=3)
    )
    outbox = Outbox.from_settings(settings)
    states = [queue(database, outbox).state for _ in range(5)]
    assert states == [OutboxState.PENDING] * 3 + [OutboxState.SUPPRESSED] * 2
    other = queue(database, outbox, to="someone.else@example.org")
    assert other.state == OutboxState.PENDING
    # What was suppressed does not count toward the limit; what was sent does.
    assert deliver(OutboxSender(settings, database, "test")) == 4
    assert len(relay.received) == 4
    assert queue(database, outbox).state == OutboxState.SUPPRESSED
    last = queue(database, outbox).reason
    assert last is not None
    assert "rate limit: 3 replies" in last


def test_every_template_in_every_locale_arrives_as_a_proper_reply(
    database: db.Database, database_url: str, relay: Relay
) -> None:
    settings = settings_for(database_url, outbound=outbound(relay.port))
    outbox = Outbox.from_settings(settings)
    templates: Templates = outbox.templates
    original = make_message(message_id="<original-1@client.example.org>")
    original.set_content("SECRET-ORIGINAL-BODY: my old answer was Fluffy\n")
    source = source_of(wire(original))
    expected: dict[str, tuple[str, str]] = {}
    for name in TEMPLATE_NAMES:
        for locale in templates.locales(name):
            queued = queue(
                database,
                outbox,
                template=name,
                locale=locale,
                to=f"{name}.{locale}@example.org",
                source=source,
            )
            assert queued.state == OutboxState.PENDING, queued.reason
            expected[f"{name}.{locale}@example.org"] = (name, locale)
    assert len(expected) >= 2 * len(TEMPLATE_NAMES)
    assert deliver(OutboxSender(settings, database, "test")) == len(expected)

    assert {rcpt for _, rcpts, _ in relay.received for rcpt in rcpts} == set(expected)
    # aiosmtpd records the null reverse path as "<>".
    assert {mail_from for mail_from, _, _ in relay.received} == {"<>"}
    ids = set()
    for message in relay.messages():
        to = str(message["To"])
        name, locale = expected[to]
        assert message["From"].addresses[0].addr_spec == SUPPORT
        assert message["Reply-To"] is None
        assert message["In-Reply-To"] == "<original-1@client.example.org>"
        assert "<original-1@client.example.org>" in message["References"]
        assert message["Auto-Submitted"] == "auto-replied"
        assert message["X-Auto-Response-Suppress"] == "All"
        assert message["Content-Language"] == locale
        assert message["Message-ID"]
        assert message["Date"]
        assert message["Subject"]
        ids.add(str(message["Message-ID"]))
        html = templates.render(name, locale, templates.sample_context(name, locale)).html
        if html is not None:
            assert message.get_content_type() == "multipart/alternative"
            assert [part.get_content_type() for part in message.iter_parts()] == [
                "text/plain",
                "text/html",
            ]
        else:
            assert message.get_content_type() == "text/plain"
        assert not message.defects
        assert "SECRET-ORIGINAL-BODY" not in message.as_string()
    assert len(ids) == len(expected)  # a fresh Message-ID each


def test_signed_replies_verify_against_published_keys(
    database: db.Database, database_url: str, relay: Relay, zone: ZoneServer, tmp_path: Path
) -> None:
    key = dataclasses.replace(rsa_key(2048, selector="replies"), domain="example.com")
    publish(zone, key)
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(key.private)
    settings = settings_for(
        database_url,
        outbound=outbound(
            relay.port,
            dkim_selector="replies",
            dkim_domain="example.com",
            dkim_private_key_file=str(key_file),
        ),
    )
    outbox = Outbox.from_settings(settings)
    queue(database, outbox, template="request_received", source=source_of(wire(make_message())))
    assert deliver(OutboxSender(settings, database, "test")) == 1
    [(_, _, raw)] = relay.received
    assert raw.startswith(b"DKIM-Signature:")
    assert dkim.verify(raw, dnsfunc=dnsfunc(zone))
    tampered = raw.replace(b"Subject: ", b"Subject: Re: ", 1)
    assert not dkim.verify(tampered, dnsfunc=dnsfunc(zone))


def test_a_permanent_refusal_fails_the_reply_at_once(
    database: db.Database, database_url: str, relay: Relay
) -> None:
    settings = settings_for(database_url, outbound=outbound(relay.port))
    outbox = Outbox.from_settings(settings)
    queued = queue(database, outbox)
    relay.answer = "550 5.1.1 no such user"
    assert deliver(OutboxSender(settings, database, "test")) == 1
    failed = entry(database, queued.outbox_id)
    assert failed.state == OutboxState.FAILED
    assert failed.last_error is not None
    assert "550 5.1.1 no such user" in failed.last_error
    relay.answer = None
    time.sleep(0.3)
    assert deliver(OutboxSender(settings, database, "test")) == 0


def test_a_temporary_refusal_is_retried_with_backoff_and_sent_once(
    database: db.Database, database_url: str, relay: Relay
) -> None:
    settings = settings_for(database_url, outbound=outbound(relay.port))
    outbox = Outbox.from_settings(settings)
    sender = OutboxSender(settings, database, "test")
    queued = queue(database, outbox)
    relay.answer = "451 4.3.0 try again later"
    assert deliver(sender) == 1
    waiting = entry(database, queued.outbox_id)
    assert waiting.state == OutboxState.PENDING
    assert waiting.last_error is not None
    assert "451 4.3.0" in waiting.last_error
    assert deliver(sender) == 0  # not due yet: backoff
    relay.answer = None
    wait_for(lambda: deliver(sender) == 1, timeout=5, interval=0.1)
    sent = entry(database, queued.outbox_id)
    assert (sent.state, sent.attempts) == (OutboxState.SENT, 2)
    assert sent.relay_reply is not None
    assert "queued" in sent.relay_reply
    time.sleep(0.5)
    assert deliver(sender) == 0
    assert len(relay.received) == 1


def test_temporary_failures_give_up_after_max_attempts(
    database: db.Database, database_url: str
) -> None:
    settings = settings_for(
        database_url,
        outbound=outbound(free_port(), max_attempts=2, retry_base_seconds=0.05),
    )
    outbox = Outbox.from_settings(settings)
    sender = OutboxSender(settings, database, "test")
    queued = queue(database, outbox)
    assert deliver(sender) == 1
    wait_for(lambda: deliver(sender) == 1, timeout=5, interval=0.05)
    failed = entry(database, queued.outbox_id)
    assert failed.state == OutboxState.FAILED
    assert failed.last_error is not None
    assert failed.last_error.startswith("gave up after 2 attempts")


def test_relay_down_then_up_across_a_restart_delivers_exactly_once(
    tmp_path: Path, database_url: str
) -> None:
    relay = Relay()  # not started yet: the relay is down
    port = free_port()
    config = write_config(
        tmp_path / "mailproc.toml", database_url, port=port, outbound=outbound(relay.port)
    )
    server = ServerProcess(config, port, tmp_path / "serve.log")
    database = db.Database(database_url)
    db.upgrade(database)
    try:
        server.start()
        # A real message in through SMTP, then its reply queued as a rule would queue it.
        message_id = stored_id(send(port, make_message(message_id="<ask-1@example.org>")))
        settings = settings_for(database_url, outbound=outbound(relay.port))
        outbox = Outbox.from_settings(settings)
        with database.writing() as session:
            stored = session.get(Message, message_id)
            assert stored is not None
            queued = outbox.reply(
                session,
                template="request_received",
                to=OWNER,
                context=outbox.templates.sample_context("request_received"),
                source=Source.of(stored),
            )
        wait_for(
            lambda: (
                (e := entry(database, queued.outbox_id)).attempts >= 2
                and e.state == OutboxState.PENDING
            ),
            timeout=20,
        )
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        relay.start()
        server.start()
        wait_for(lambda: entry(database, queued.outbox_id).state == OutboxState.SENT, timeout=20)
        time.sleep(1.0)  # several more runs of the sender: nothing goes out again
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        [delivered] = relay.messages()
        assert delivered["In-Reply-To"] == "<ask-1@example.org>"
        sent = entry(database, queued.outbox_id)
        assert str(delivered["Message-ID"]).strip("<>") == sent.message_id_header
        assert sent.last_error is not None  # the outage is on record
    finally:
        server.kill()
        relay.stop()
        database.dispose()


def test_starttls_and_login_to_the_relay(
    database: db.Database, database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import trustme
    from aiosmtpd.smtp import AuthResult

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # how the relay's CA is trusted
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        logins.append((data.login, data.password))
        return AuthResult(success=data.password == b"s3cret")

    relay = Relay().start(
        tls_context=server_context,
        require_starttls=True,
        auth_required=True,
        authenticator=authenticator,
    )
    try:
        settings = settings_for(
            database_url,
            outbound=outbound(relay.port, starttls=True, username="mailproc", password="s3cret"),
        )
        queue(database, Outbox.from_settings(settings))
        assert deliver(OutboxSender(settings, database, "test")) == 1
        assert len(relay.received) == 1
        assert logins == [(b"mailproc", b"s3cret")]
    finally:
        relay.stop()


# -- operators ---------------------------------------------------------------------------------


def cli(config: Path, *args: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from mailproc.cli import main

    result = CliRunner().invoke(main, ["--config", str(config), *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_outbox_commands_show_and_retry_a_failed_reply(
    tmp_path: Path, database: db.Database, database_url: str, relay: Relay
) -> None:
    config = write_config(tmp_path / "mailproc.toml", database_url, outbound=outbound(relay.port))
    settings = settings_for(database_url, outbound=outbound(relay.port))
    outbox = Outbox.from_settings(settings)
    queued = queue(database, outbox, template="request_denied")
    suppressed = queue(database, outbox, source=source_of(wire(make_message()), mail_from=""))
    relay.answer = "550 5.7.1 not wanted here"
    assert deliver(OutboxSender(settings, database, "test")) == 1

    code, output = cli(config, "outbox", "list")
    assert code == 0, output
    assert "failed" in output
    assert "550 5.7.1 not wanted here" in output
    assert "null reverse path" in output
    assert "all replies: 1 failed, 1 suppressed" in output
    code, output = cli(config, "outbox", "show", str(queued.outbox_id), "--json")
    shown = json.loads(output)
    assert (shown["state"], shown["template"], shown["recipient"]) == (
        "failed",
        "request_denied",
        OWNER,
    )
    code, output = cli(config, "outbox", "show", str(queued.outbox_id), "--raw")
    assert "Auto-Submitted: auto-replied" in output

    code, output = cli(config, "outbox", "retry", str(suppressed.outbox_id))
    assert code == 1
    assert output == (
        f"Error: reply {suppressed.outbox_id} is suppressed; only failed replies can be retried\n"
    )
    code, output = cli(config, "outbox", "retry", str(queued.outbox_id))
    assert (code, output) == (0, f"reply {queued.outbox_id} is pending again and will be sent\n")
    relay.answer = None
    assert deliver(OutboxSender(settings, database, "test")) == 1
    assert len(relay.received) == 1
    assert cli(config, "outbox", "show", "999999")[1] == "Error: reply 999999 not found\n"


def test_broken_template_or_dkim_key_stops_config_check_and_serve(
    tmp_path: Path, database_url: str
) -> None:
    folder = tmp_path / "templates"
    import shutil

    from mailproc.rendering import SHIPPED_TEMPLATES

    shutil.copytree(SHIPPED_TEMPLATES, folder)
    (folder / "en" / "request_denied.txt").write_text("{{ reson }}\n")
    config = write_config(tmp_path / "mailproc.toml", database_url, templates={"path": str(folder)})
    for command in (["config", "check"], ["serve"]):
        code, output = cli(config, *command)
        assert code == 78, output
        assert output.startswith(f"Error: {folder / 'en' / 'request_denied.txt'}"), output
        assert output.count("\n") == 1

    key_file = tmp_path / "not-a-key.pem"
    key_file.write_text("-----BEGIN NOTHING-----\n")
    config = write_config(
        tmp_path / "mailproc.toml",
        database_url,
        outbound={
            "dkim_selector": "replies",
            "dkim_domain": "example.com",
            "dkim_private_key_file": str(key_file),
        },
    )
    code, output = cli(config, "config", "check")
    assert code == 78
    assert output.startswith(f"Error: {config}: [outbound] dkim_private_key_file: cannot sign with")
    assert output.count("\n") == 1
