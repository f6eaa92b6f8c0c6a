"""The SMTP edge over real sessions (smtplib) against the real service, on SQLite and PostgreSQL."""

from __future__ import annotations

import smtplib
import socket
import ssl
import time
from pathlib import Path

import pytest
import trustme

from mailproc.models import MessageState
from tests.support import (
    SUPPORT,
    AppThread,
    make_message,
    messages,
    send,
    stored_id,
    wait_for,
    wait_processed,
    wire,
)


def test_message_to_support_address_is_stored_before_250_and_processed(app: AppThread) -> None:
    message = make_message()
    reply = send(app.port, message)
    assert reply.startswith("2.0.0 Stored as message ")

    # The 250 promised the row: it is there the moment we look, with the exact bytes.
    rows = messages(app.database_url)
    assert [m.id for m in rows] == [stored_id(reply)]
    stored = rows[0]
    assert stored.raw == wire(message)
    assert stored.mail_from == "alice@example.org"
    assert stored.rcpt_tos == [SUPPORT]
    assert stored.peer_ip == "127.0.0.1"
    assert stored.client_ip == "127.0.0.1"
    assert stored.helo == "client.example.org"
    assert stored.client_protocol == "ESMTP"
    assert stored.tls is None
    assert stored.intake_flags == []

    [done] = wait_processed(app.database_url, 1)
    assert done.state == MessageState.PROCESSED
    assert done.parsed is not None
    assert done.parsed["subject"] == "Reset my security question"
    assert done.parsed["from_addresses"] == ["alice@example.org"]
    assert done.parsed["defects"] == []
    assert done.processed_at is not None


def test_recipient_other_than_support_address_gets_550(app: AppThread) -> None:
    with smtplib.SMTP("127.0.0.1", app.port) as client:
        client.ehlo("client.example.org")
        client.mail("alice@example.org")
        code, reply = client.rcpt("sales@example.com")
        assert code == 550
        assert b"5.1.1" in reply
        code, _ = client.rcpt("not an address")
        assert code in (501, 550, 553)
        # The support address is matched case-insensitively, like any mailbox we compare.
        code, _ = client.rcpt("Support@EXAMPLE.com")
        assert code == 250
    assert messages(app.database_url) == []


def test_null_reverse_path_is_accepted_and_stored_empty(app: AppThread) -> None:
    with smtplib.SMTP("127.0.0.1", app.port) as client:
        client.ehlo("mailer.example.net")
        assert client.mail("<>")[0] == 250
        assert client.rcpt(SUPPORT)[0] == 250
        assert client.data(wire(make_message()))[0] == 250
    [stored] = messages(app.database_url)
    assert stored.mail_from == ""


def test_declared_size_over_limit_gets_552_at_mail_from(database_url: str) -> None:
    with (
        AppThread.running(database_url, smtp={"max_message_bytes": 2000}) as app,
        smtplib.SMTP("127.0.0.1", app.port) as client,
    ):
        client.ehlo("client.example.org")
        code, reply = client.mail("alice@example.org", ["SIZE=5000"])
        assert code == 552, reply
    assert messages(database_url) == []


def test_message_over_limit_gets_552_after_data_and_is_not_stored(database_url: str) -> None:
    with (
        AppThread.running(database_url, smtp={"max_message_bytes": 2000}) as app,
        smtplib.SMTP("127.0.0.1", app.port) as client,
    ):
        client.ehlo("client.example.org")
        client.mail("alice@example.org")
        client.rcpt(SUPPORT)
        code, reply = client.data(wire(make_message(body=("y" * 70 + "\n") * 40)))
        assert code == 552, reply
        # The session goes on: the next, smaller message is accepted.
        client.mail("alice@example.org")
        client.rcpt(SUPPORT)
        assert client.data(wire(make_message()))[0] == 250
    assert len(messages(database_url)) == 1


def test_bare_lf_nul_and_smuggling_are_stored_flagged_and_byte_exact(app: AppThread) -> None:
    raw = (
        b"From: alice@example.org\r\nTo: support@example.com\r\nSubject: odd\r\n\r\n"
        b"line with bare lf\nnul \x00 here\r\n"
        b"smuggled\n.\r\nMAIL FROM:<mallory@example.net>\r\n"
    )
    sock = _raw_session(app.port)
    try:
        _command(sock, "EHLO client.example.org")
        _command(sock, "MAIL FROM:<alice@example.org>")
        _command(sock, f"RCPT TO:<{SUPPORT}>")
        assert _command(sock, "DATA")[0].startswith("354")
        # Exactly these bytes on the wire (smtplib would dot-stuff after the bare LF).
        sock.sendall(raw + b".\r\n")
        [reply] = _read_replies(sock, 1)
        assert reply.startswith("250 ")
    finally:
        sock.close()
    [stored] = messages(app.database_url)
    assert stored.raw == raw
    assert set(stored.intake_flags) == {"bare_lf", "nul_byte", "smuggling_sequence"}


def test_database_failure_answers_451_and_stores_nothing(app: AppThread) -> None:
    # Take the table away under the running service: every commit now fails.
    from mailproc.db import Database

    database = Database(app.database_url)
    with database.writing() as session:
        session.connection().exec_driver_sql("ALTER TABLE message RENAME TO message_away")
    with smtplib.SMTP("127.0.0.1", app.port) as client:
        client.ehlo("client.example.org")
        client.mail("alice@example.org")
        client.rcpt(SUPPORT)
        code, reply = client.data(wire(make_message()))
        assert code == 451, reply
        assert reply.startswith(b"4.3.0")
        # Our failure is temporary and the session stays usable.
        assert client.noop()[0] == 250
    with database.writing() as session:
        session.connection().exec_driver_sql("ALTER TABLE message_away RENAME TO message")
    database.dispose()
    assert messages(app.database_url) == []
    # Once the database is back, the same message is accepted.
    send(app.port, make_message())
    assert len(messages(app.database_url)) == 1


@pytest.mark.postgres
def test_postgres_refusing_connections_answers_451(postgres: object, tmp_path: Path) -> None:
    import psycopg

    from tests.conftest import PostgresCluster, create_pg_database, drop_pg_database

    assert isinstance(postgres, PostgresCluster)
    name = create_pg_database(postgres)
    try:
        with AppThread.running(postgres.url(name)) as app:
            send(app.port, make_message())
            with psycopg.connect(postgres.admin_dsn, autocommit=True) as admin:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )
            with smtplib.SMTP("127.0.0.1", app.port) as client:
                client.ehlo("client.example.org")
                client.mail("alice@example.org")
                client.rcpt(SUPPORT)
                code, _ = client.data(wire(make_message()))
                assert code == 451
            with psycopg.connect(postgres.admin_dsn, autocommit=True) as admin:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            send(app.port, make_message())
            assert len(messages(app.database_url)) == 2
    finally:
        drop_pg_database(postgres, name)


def _raw_session(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.recv(1024)
    return sock


def _command(sock: socket.socket, line: str, replies: int = 1) -> list[str]:
    sock.sendall(line.encode() + b"\r\n")
    return _read_replies(sock, replies)


def _read_replies(sock: socket.socket, count: int) -> list[str]:
    buffer = b""
    lines: list[str] = []
    while len([ln for ln in lines if ln[3:4] == " "]) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buffer += chunk
        *complete, buffer = buffer.split(b"\r\n")
        lines.extend(ln.decode() for ln in complete)
    return lines


def test_undecodable_envelope_addresses_get_5xx_not_451(app: AppThread) -> None:
    sock = _raw_session(app.port)
    try:
        _command(sock, "EHLO client.example.org")
        sock.sendall(b"MAIL FROM:<al\xffice@example.org> SMTPUTF8\r\n")
        assert _read_replies(sock, 1)[0].startswith("553 5.1.7")
        assert _command(sock, "MAIL FROM:<alice@example.org>")[0].startswith("250")
        sock.sendall(b"RCPT TO:<supp\xffort@example.com>\r\n")
        assert _read_replies(sock, 1)[0].startswith("550 5.1.3")
        assert _command(sock, f"RCPT TO:<{SUPPORT}>")[0].startswith("250")
    finally:
        sock.close()


def test_xforward_from_trusted_proxy_is_recorded_as_the_client(database_url: str) -> None:
    with AppThread.running(database_url, smtp={"trusted_proxies": ["127.0.0.0/8"]}) as app:
        with smtplib.SMTP("127.0.0.1", app.port) as client:
            _, features = client.ehlo("mx.example.com")
            assert b"XFORWARD NAME ADDR PORT PROTO HELO" in features
            assert client.docmd("XFORWARD", "NAME=mail.example.org ADDR=192.0.2.7")[0] == 250
            assert client.docmd("XFORWARD", "HELO=mail.example.org PROTO=ESMTP")[0] == 250
            client.mail("alice@example.org")
            client.rcpt(SUPPORT)
            assert client.data(wire(make_message()))[0] == 250
            # Forwarded facts last for one transaction only.
            client.mail("bob@example.org")
            client.rcpt(SUPPORT)
            assert client.data(wire(make_message(sender="bob@example.org")))[0] == 250
            assert client.docmd("XFORWARD", "ADDR=IPV6:2001:db8::1 NAME=[UNAVAILABLE]")[0] == 250
            client.mail("carol@example.org")
            # XFORWARD is only allowed outside a mail transaction.
            assert client.docmd("XFORWARD", "ADDR=192.0.2.99")[0] == 503
            client.rcpt(SUPPORT)
            assert client.data(wire(make_message(sender="carol@example.org")))[0] == 250
            assert client.docmd("XFORWARD", "ADDR=not-an-ip")[0] == 501
            assert client.docmd("XFORWARD", "COLOR=blue")[0] == 501
        first, second, third = messages(database_url)
    assert first.peer_ip == "127.0.0.1"
    assert first.client_ip == "192.0.2.7"
    assert first.client_name == "mail.example.org"
    assert first.client_helo == "mail.example.org"
    assert first.client_protocol == "ESMTP"
    assert first.xforward is not None
    assert first.xforward["ADDR"] == "192.0.2.7"
    assert second.client_ip == "127.0.0.1"
    assert second.xforward is None
    assert third.client_ip == "2001:db8::1"
    assert third.client_name is None
    # Forwarded and own facts are never mixed: no HELO came with this XFORWARD.
    assert third.client_helo is None


def test_xforward_from_untrusted_peer_is_refused_and_not_offered(app: AppThread) -> None:
    with smtplib.SMTP("127.0.0.1", app.port) as client:
        _, features = client.ehlo("mx.example.com")
        assert b"XFORWARD" not in features
        code, reply = client.docmd("XFORWARD", "ADDR=192.0.2.7")
        assert code == 550
        assert b"5.7.0" in reply
        client.mail("alice@example.org")
        client.rcpt(SUPPORT)
        assert client.data(wire(make_message()))[0] == 250
    [stored] = messages(app.database_url)
    assert stored.client_ip == "127.0.0.1"
    assert stored.xforward is None


def test_lmtp_answers_once_per_recipient(database_url: str) -> None:
    other = "help@example.com"
    with AppThread.running(
        database_url, smtp={"protocol": "lmtp", "support_addresses": [SUPPORT, other]}
    ) as app:
        sock = _raw_session(app.port)
        try:
            assert _command(sock, "EHLO mx.example.com")[0].startswith("500")  # LHLO only
            assert _command(sock, "LHLO mx.example.com")[-1].startswith("250 ")
            assert _command(sock, "MAIL FROM:<alice@example.org>")[0].startswith("250")
            assert _command(sock, f"RCPT TO:<{SUPPORT}>")[0].startswith("250")
            assert _command(sock, "RCPT TO:<nobody@example.com>")[0].startswith("550")
            assert _command(sock, f"RCPT TO:<{other}>")[0].startswith("250")
            assert _command(sock, "DATA")[0].startswith("354")
            body = wire(make_message()).replace(b"\r\n.", b"\r\n..")
            sock.sendall(body + b".\r\n")
            replies = _read_replies(sock, 2)
            assert len(replies) == 2
            assert all(r.startswith("250 2.0.0 Stored as message ") for r in replies)
            # Errors after DATA are per recipient too: the oversize reply comes twice.
            _command(sock, "MAIL FROM:<alice@example.org>")
            _command(sock, f"RCPT TO:<{SUPPORT}>")
            _command(sock, f"RCPT TO:<{other}>")
            _command(sock, "DATA")
            sock.sendall(b"Subject: x\r\n\r\n" + b"y" * 998 + b"z" * 10 + b"\r\n.\r\n")
            too_long = _read_replies(sock, 2)
            assert [r[:3] for r in too_long] == ["500", "500"]
            _command(sock, "QUIT")
        finally:
            sock.close()
        [stored] = messages(database_url)
        assert stored.protocol == "lmtp"
        assert stored.rcpt_tos == [SUPPORT, other]


def test_starttls_is_offered_and_recorded(database_url: str, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("mail.example.com")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    tls = {"tls_cert_file": str(cert_file), "tls_key_file": str(key_file), "require_starttls": True}
    with AppThread.running(database_url, smtp=tls) as app:
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)
        with smtplib.SMTP("127.0.0.1", app.port) as client:
            _, features = client.ehlo("client.example.org")
            assert b"STARTTLS" in features
            assert b"AUTH" not in features
            # Mail before STARTTLS is refused when it is required.
            assert client.mail("alice@example.org")[0] == 530
            client.starttls(context=_hostname_context(client_context))
            client.ehlo("client.example.org")
            client.mail("alice@example.org")
            client.rcpt(SUPPORT)
            assert client.data(wire(make_message()))[0] == 250
        [stored] = messages(database_url)
    assert stored.tls is not None
    assert stored.tls["version"] in ("TLSv1.2", "TLSv1.3")
    assert stored.tls["cipher"]
    assert stored.client_protocol == "ESMTPS"


def _hostname_context(context: ssl.SSLContext) -> ssl.SSLContext:
    # The server's certificate names mail.example.com; we connect to 127.0.0.1.
    context.check_hostname = False
    return context


def test_sessions_over_the_cap_get_421(database_url: str) -> None:
    with AppThread.running(database_url, smtp={"max_sessions": 2}) as app:
        first, second = _raw_session(app.port), _raw_session(app.port)
        try:
            third = socket.create_connection(("127.0.0.1", app.port), timeout=10)
            assert third.recv(1024).startswith(b"421 4.3.2")
            assert third.recv(1024) == b""  # and closed
            third.close()
            first.close()
            # A freed slot is usable again.
            wait_for(lambda: len(app.app.connections.open) < 2)
            fourth = _raw_session(app.port)
            assert _command(fourth, "NOOP")[0].startswith("250")
            fourth.close()
        finally:
            second.close()


def test_idle_and_overlong_sessions_are_closed(database_url: str) -> None:
    timeouts = {"command_timeout_seconds": 0.5, "session_timeout_seconds": 1.5}
    with AppThread.running(database_url, smtp=timeouts) as app:
        idle = _raw_session(app.port)
        started = time.monotonic()
        assert idle.recv(1024) == b""  # closed for idling
        assert time.monotonic() - started < 5
        idle.close()

        busy = _raw_session(app.port)
        deadline = time.monotonic() + 10
        goodbye = b""
        while time.monotonic() < deadline:
            busy.sendall(b"NOOP\r\n")
            chunk = busy.recv(1024)
            if not chunk or b"421" in chunk:
                goodbye = chunk
                break
            time.sleep(0.2)
        assert b"421 4.4.2" in goodbye
        busy.close()


def test_auth_is_not_offered(app: AppThread) -> None:
    with smtplib.SMTP("127.0.0.1", app.port) as client:
        client.ehlo("client.example.org")
        assert client.docmd("AUTH", "PLAIN AGFsaWNlAHNlY3JldA==")[0] == 502
