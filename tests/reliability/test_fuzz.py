"""Malformed mail: hypothesis-made bytes and broken-but-structured messages through the strict
parser and through the whole check the worker runs (parse, authenticate against the loopback
DNS server, look the author up, apply the rules, record the result in a real SQLite database),
then a corpus of hostile messages built here through the real listener and worker.

Whatever arrives, nothing raises out of the parser or the check, and every message we answered
250 for ends processed, with its verdict and the decision that was taken, and the reasons."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import quopri
import re
import smtplib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailproc.db import Database, upgrade
from mailproc.intake import Arrival, wire_flags
from mailproc.message import TEXT_BODY_LIMIT, parse_message
from mailproc.models import Message, MessageState, utcnow
from mailproc.pipeline import Pipeline
from mailproc.services import MessageService
from tests.dkimkeys import DkimKey, build_message, ed25519_key, publish, sign
from tests.dnsserver import ZoneServer
from tests.reliability.counts import Counts
from tests.support import SUPPORT, AppThread, messages, settings_for, wait_for

pytestmark = [pytest.mark.reliability]

Report = Callable[..., Counts]

ALICE = "alice@example.org"  # registered; example.org has our key and an SPF record
IN_SPF = "192.0.2.25"
OUTSIDE_SPF = "198.51.100.7"
CRLF = b"\r\n"


def _message(*headers: bytes, body: bytes = b"Please reset it.\r\n") -> bytes:
    return b"".join(h + CRLF for h in headers) + CRLF + body


BASE = (
    b"From: Alice <alice@example.org>",
    b"To: support@example.com",
    b"Subject: Reset my security question",
    b"Date: Mon, 01 Jan 2024 09:00:00 +0000",
)


def fuzz_settings(max_examples: int) -> settings:
    """Bounded, reproducible runs that write nothing into the repository."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


# -- strategies: header values, headers, MIME trees, whole messages ---------------------------

CHARSETS = [
    "utf-8",
    "us-ascii",
    "iso-8859-1",
    "utf-16",
    "utf-7",
    "x-no-such-charset",
    "unicode_escape",
    "base64",
    "",
    "utf-8*en",
    "\u00e9",
]
_SAFE_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@st.composite
def encoded_words(draw: st.DrawFn) -> bytes:
    """RFC 2047 encoded words, well or badly formed: unknown charsets, bad base64, bad Q."""
    charset = draw(st.sampled_from(CHARSETS))
    encoding = draw(st.sampled_from(["B", "Q", "b", "q", "X", ""]))
    payload = draw(st.binary(max_size=30))
    text = draw(
        st.sampled_from(
            [
                base64.b64encode(payload).decode(),
                base64.b64encode(payload).decode().rstrip("="),
                quopri.encodestring(payload).decode(errors="replace").replace("\n", ""),
                "!!not*base64??",
                "=ZZ=X",
                "",
            ]
        )
    )
    word = f"=?{charset}?{encoding}?{text}?="
    if draw(st.booleans()):
        word = word[: draw(st.integers(0, len(word)))]  # unterminated
    return word.encode("utf-8", "surrogatepass")


@st.composite
def mailboxes(draw: st.DrawFn) -> bytes:
    local = draw(st.sampled_from(["alice", "Alice", "bob", "al\u0456ce", '"a b"', "a+b", ""]))
    domain = draw(
        st.sampled_from(
            [
                "example.org",
                "EXAMPLE.org",
                "example.org.",
                "evil.example",
                "ex\u00e4mple.org",
                "[1]",
            ]
        )
    )
    display = draw(st.sampled_from(["", "Alice", '"Alice, Admin"', "=?utf-8?q?A?=", "bob@x.test"]))
    address = f"{local}@{domain}"
    form = draw(st.sampled_from(["bare", "angle", "group", "two", "route", "comment"]))
    value = {
        "bare": address,
        "angle": f"{display} <{address}>",
        "group": f"team: {address};",
        "two": f"{address}, other@example.net",
        "route": f"<@relay.example:{address}>",
        "comment": f"{address} (comment <{display}>)",
    }[form]
    return value.encode("utf-8", "surrogatepass")


def header_values() -> st.SearchStrategy[bytes]:
    piece = st.one_of(
        _SAFE_TEXT.map(str.encode),
        st.text(max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.binary(max_size=20),  # invalid UTF-8, NULs, bare CR and LF
        encoded_words(),
        mailboxes(),
        st.sampled_from([b"\x00", b"\r", b"\n", b"\x7f", b"(", b"((((", b'"', b";", b"=?"]),
    )
    separator = st.sampled_from([b" ", b"", b"\r\n ", b"\r\n\t", b"\r\n"])
    return st.lists(st.tuples(piece, separator), max_size=5).map(
        lambda parts: b"".join(p + s for p, s in parts).rstrip(b"\r\n")
    )


HEADER_NAMES = [
    b"From",
    b"FROM",
    b"To",
    b"Cc",
    b"Subject",
    b"Date",
    b"Message-ID",
    b"Reply-To",
    b"Sender",
    b"MIME-Version",
    b"Content-Type",
    b"Content-Transfer-Encoding",
    b"Content-Disposition",
    b"DKIM-Signature",
    b"Authentication-Results",
    b"ARC-Seal",
    b"ARC-Message-Signature",
    b"ARC-Authentication-Results",
    b"Received",
    b"Auto-Submitted",
    b"List-Id",
    b"X-Fuzz",
]


def header_names() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from(HEADER_NAMES),
        st.sampled_from(HEADER_NAMES).map(lambda n: n + b" "),  # whitespace before the colon
        st.binary(min_size=0, max_size=12),  # anything at all, the colon included
    )


def dkim_signature_values() -> st.SearchStrategy[bytes]:
    """DKIM-Signature values that are tag lists, partly plausible, partly garbage."""
    tag = st.tuples(
        st.sampled_from([b"v", b"a", b"d", b"s", b"h", b"bh", b"b", b"l", b"x", b"t", b"c", b"i"]),
        st.one_of(
            st.sampled_from(
                [
                    b"1",
                    b"rsa-sha256",
                    b"ed25519-sha256",
                    b"rsa-sha1",
                    b"example.org",
                    b"fuzz",
                    b"from:to:subject",
                    b"relaxed/relaxed",
                    b"simple/bogus",
                    b"9" * 5000,
                    b"-1",
                    b"AAAA",
                    b"",
                ]
            ),
            st.binary(max_size=20),
        ),
    )
    return st.lists(tag, max_size=10).map(lambda tags: b"; ".join(k + b"=" + v for k, v in tags))


@dataclass
class Part:
    head: list[bytes]
    body: bytes


def _leaf_body(payload: bytes, cte: str, garble: bool) -> bytes:
    if cte == "base64":
        encoded = base64.encodebytes(payload).replace(b"\n", CRLF)
        return encoded[: max(0, len(encoded) - 3)] + b"!*" if garble else encoded
    if cte == "quoted-printable":
        encoded = quopri.encodestring(payload).replace(b"\n", CRLF)
        return encoded + b"=Z" if garble else encoded
    return payload


@st.composite
def leaves(draw: st.DrawFn) -> Part:
    content_type = draw(
        st.sampled_from(
            [
                "text/plain",
                "text/html",
                "application/octet-stream",
                "image/png",
                "message/rfc822",
                "message/delivery-status",
                "text",
                "",
            ]
        )
    )
    charset = draw(st.sampled_from([None, *CHARSETS]))
    cte = draw(
        st.sampled_from(
            [None, "7bit", "8bit", "binary", "base64", "quoted-printable", "x-uuencode", "bogus"]
        )
    )
    head = []
    if content_type or charset is not None:
        value = content_type + (f"; charset={charset}" if charset is not None else "")
        head.append(b"Content-Type: " + value.encode("utf-8", "surrogatepass"))
    if cte is not None:
        head.append(b"Content-Transfer-Encoding: " + cte.encode())
    if draw(st.booleans()):
        head.append(b"Content-Disposition: " + draw(st.sampled_from([b"attachment", b"inline"])))
    payload = draw(
        st.one_of(
            st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
            st.binary(max_size=200),
        )
    )
    return Part(head, _leaf_body(payload, cte or "", draw(st.booleans())))


def _extend(children: st.SearchStrategy[Part]) -> st.SearchStrategy[Part]:
    @st.composite
    def multipart(draw: st.DrawFn) -> Part:
        subtype = draw(st.sampled_from(["mixed", "alternative", "related", "digest", "signed"]))
        boundary = draw(
            st.one_of(
                st.sampled_from(["b", "", "a b", "--", "=_x", "b" * 200, '"', "b\u00e9"]),
                _SAFE_TEXT,
            )
        )
        declared = draw(
            st.sampled_from([f'; boundary="{boundary}"', f"; boundary={boundary}", "", "; bound"])
        )
        parts = draw(st.lists(children, min_size=0, max_size=4))
        head = [f"Content-Type: multipart/{subtype}{declared}".encode("utf-8", "surrogatepass")]
        delimiter = b"--" + boundary.encode("utf-8", "surrogatepass")
        body = draw(st.sampled_from([b"", b"preamble\r\n", delimiter + b" in the preamble\r\n"]))
        for part in parts:
            body += delimiter + CRLF + b"".join(h + CRLF for h in part.head) + CRLF + part.body
            body += CRLF
        if draw(st.booleans()):  # closed, or left open
            body += delimiter + b"--" + CRLF
        if draw(st.booleans()):  # the boundary again, inside a header of the next part
            body += b"X-Note: " + delimiter + CRLF
        return Part(head, body)

    @st.composite
    def rfc822(draw: st.DrawFn) -> Part:
        inner = draw(children)
        inner_head = [b"From: " + draw(mailboxes()), b"Subject: inner", *inner.head]
        body = b"".join(h + CRLF for h in inner_head) + CRLF + inner.body
        return Part([b"Content-Type: message/rfc822"], body)

    return st.one_of(multipart(), rfc822())


# Made once: hypothesis reads a strategy's source when it is built, which costs far more than
# drawing from it.
MIME_TREES = st.recursive(leaves(), _extend, max_leaves=8)
HEADER_VALUES = header_values()
EXTRA_HEADERS = st.lists(st.tuples(header_names(), HEADER_VALUES), max_size=6)
DKIM_SIGNATURES = dkim_signature_values()
FROM_VALUES = st.sampled_from([ALICE.encode(), b"Alice <alice@example.org>"]) | mailboxes()
SUBJECTS = st.just(b"Reset my security question") | HEADER_VALUES
MESSAGE_IDS = st.just(b"<fuzz@example.org>") | HEADER_VALUES


@dataclass
class Shape:
    """A generated message and the envelope it arrives with."""

    raw: bytes
    mail_from: str
    client_ip: str
    signed: bool = False
    notes: list[str] = field(default_factory=list)


LINE_ENDINGS = [CRLF, CRLF, CRLF, CRLF, b"\n", b"\r", b"\r\r\n"]


_MESSAGE_NUMBERS = itertools.count()


@st.composite
def broken_messages(draw: st.DrawFn, key: DkimKey | None = None) -> Shape:
    """A message that is mostly a message: usual headers (often the ones a reset request has,
    so the checks go deep), random headers, a random MIME tree, odd line ends. One in four has
    a clean reset request's header block instead; with ``key``, half are DKIM-signed, and half
    of those broken afterwards by one flipped bit."""
    date = format_datetime(datetime.now(UTC)).encode()
    clean = draw(st.integers(0, 3)) == 0
    headers: list[tuple[bytes, bytes]] = []
    if clean:
        headers = [
            (b"From", ALICE.encode()),
            (b"To", SUPPORT.encode()),
            (b"Subject", b"Reset my security question"),
            (b"Date", date),
            (b"Message-ID", b"<fuzz-%d@example.org>" % next(_MESSAGE_NUMBERS)),
        ]
    else:
        if draw(st.integers(0, 3)):
            headers.append((b"From", draw(FROM_VALUES)))
        if draw(st.booleans()):
            headers.append((b"Subject", draw(SUBJECTS)))
        if draw(st.booleans()):
            headers.append((b"Date", date if draw(st.booleans()) else draw(HEADER_VALUES)))
        if draw(st.booleans()):
            headers.append((b"Message-ID", draw(MESSAGE_IDS)))
        headers.append((b"To", SUPPORT.encode()))
        headers += draw(EXTRA_HEADERS)
        if draw(st.integers(0, 3)) == 0:
            headers.append((b"DKIM-Signature", draw(DKIM_SIGNATURES)))
        headers = draw(st.permutations(headers))
    tree = draw(MIME_TREES)
    mime = [b"MIME-Version: 1.0"] if draw(st.booleans()) else []
    head = b"".join(n + b": " + v + CRLF for n, v in headers)
    head += b"".join(h + CRLF for h in mime + tree.head)
    separator = CRLF if clean else draw(st.sampled_from([CRLF, CRLF, CRLF, b"", b"\n"]))
    raw = head + separator + tree.body
    ending = CRLF if clean else draw(st.sampled_from(LINE_ENDINGS))
    if ending != CRLF:
        raw = raw.replace(CRLF, ending)
    shape = Shape(
        raw,
        mail_from=draw(st.sampled_from([ALICE, "", "bob@evil.example", "not an address"])),
        client_ip=draw(st.sampled_from([IN_SPF, OUTSIDE_SPF])),
    )
    if key is not None and draw(st.booleans()):
        try:
            shape.raw = sign(shape.raw, key, headers=(b"from", b"subject", b"date"))
            shape.signed = True
        except Exception as exc:  # dkimpy refuses to sign some of these: so be it
            shape.notes.append(f"unsigned: {type(exc).__name__}")
        if shape.signed and draw(st.booleans()):
            at = draw(st.integers(0, len(shape.raw) - 1))
            shape.raw = shape.raw[:at] + bytes([shape.raw[at] ^ 0x01]) + shape.raw[at + 1 :]
    return shape


# -- the whole check, in process, on a real database ------------------------------------------


class Checker:
    """What a worker does with one stored message, through the same service and pipeline:
    store it, claim it, process it, read the recorded result back."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        accounts = tmp_path / "accounts.csv"
        accounts.write_text(f"id,email,name,locale\n42,{ALICE},Alice,en\n")
        self.settings = settings_for(url, accounts={"csv_file": str(accounts)})
        # Not durable: a crash is not what this test is about, and fsyncs cost seconds.
        self.database = Database(url, durable=False)
        upgrade(self.database)
        pipeline = Pipeline.from_settings(self.settings, self.database)
        self.service = MessageService.from_settings(self.database, self.settings, pipeline)
        self.stored = 0

    def check(self, raw: bytes, mail_from: str = ALICE, client_ip: str = IN_SPF) -> Message:
        arrival = Arrival(
            received_at=utcnow(),
            protocol="smtp",
            peer_ip=client_ip,
            peer_port=25,
            helo="mx.example.org",
            client_ip=client_ip,
            client_name=None,
            client_helo="mx.example.org",
            client_protocol="ESMTP",
            xforward=None,
            mail_from=mail_from,
            rcpt_tos=(SUPPORT,),
            tls=None,
            raw=raw,
        )
        [message_id] = self.service.store_batch([arrival])
        self.stored += 1
        claims = self.service.claim_batch("fuzz-worker", 5)
        assert [claim.message_id for claim in claims] == [message_id]
        self.service.process_batch(claims)
        return self.service.get(message_id)

    def close(self) -> None:
        self.database.dispose()


@pytest.fixture
def checker(tmp_path: Path, sqlite_url: str) -> Iterator[Checker]:
    running = Checker(tmp_path, sqlite_url)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def key(zone: ZoneServer) -> DkimKey:
    """Our signing key for example.org on the loopback DNS server, with SPF and DMARC."""
    signing = ed25519_key(selector="fuzz")
    publish(zone, signing)
    zone.add_txt("example.org", "v=spf1 ip4:192.0.2.0/24 -all")
    zone.add_txt("_dmarc.example.org", "v=DMARC1; p=reject")
    return signing


def assert_decided(message: Message, raw: bytes) -> None:
    """Processed, with a verdict and a decision, and the reasons when not authenticated. And
    fail closed: only a clean message by the one author we hold a key for authenticates."""
    assert message.state == MessageState.PROCESSED, (message.state, message.error, raw[:300])
    assert message.verdict is not None
    assert message.decision is not None
    assert message.decision["rule"], message.decision
    assert message.parsed is not None
    json.dumps([message.parsed, message.verdict, message.decision])
    if message.authenticated:
        assert message.verdict["from"] == ALICE, message.verdict
        assert message.intake_flags == [], message.intake_flags
        assert message.auth_strength in ("strong", "weak")
    else:
        assert message.verdict["reasons"], message.verdict


def assert_parsed(raw: bytes) -> None:
    parsed = parse_message(raw)
    json.dumps(parsed.summary())
    assert parsed.body_bytes <= len(raw)
    assert parsed.text_body is None or len(parsed.text_body) <= TEXT_BODY_LIMIT
    if parsed.from_addresses:
        assert len(parsed.header("From")) == 1, parsed.defects


# -- property tests -----------------------------------------------------------------------------


def test_parser_never_raises_on_arbitrary_bytes(report: Report) -> None:
    seen = 0

    @fuzz_settings(400)
    @given(st.binary(max_size=4000))
    def parse(raw: bytes) -> None:
        nonlocal seen
        seen += 1
        assert_parsed(raw)

    parse()
    counts = report(sent=seen, accepted=seen, decided=seen, lost=0, duplicated=0)
    assert counts.lost == 0
    assert counts.duplicated == 0


def test_parser_never_raises_on_broken_structured_messages(report: Report) -> None:
    seen = 0

    @fuzz_settings(200)
    @given(broken_messages())
    def parse(shape: Shape) -> None:
        nonlocal seen
        seen += 1
        assert_parsed(shape.raw)

    parse()
    counts = report(sent=seen, accepted=seen, decided=seen, lost=0, duplicated=0)
    assert counts.lost == 0
    assert counts.duplicated == 0


def _whole_check_counts(checker: Checker, report: Report, **extra: int) -> Counts:
    rows = messages(checker.settings.database.url)
    decided = sum(row.state == MessageState.PROCESSED and row.decision is not None for row in rows)
    counts = report(
        sent=checker.stored,
        accepted=len(rows),
        decided=decided,
        lost=checker.stored - decided,
        duplicated=max(0, len(rows) - checker.stored),
        **extra,
    )
    assert counts.lost == 0
    assert counts.duplicated == 0
    return counts


def test_whole_check_decides_every_arbitrary_message(
    checker: Checker, key: DkimKey, report: Report
) -> None:
    @fuzz_settings(60)
    @given(
        st.binary(max_size=3000),
        st.sampled_from([ALICE, "", "x"]),
        st.sampled_from([IN_SPF, OUTSIDE_SPF]),
    )
    def check(raw: bytes, mail_from: str, client_ip: str) -> None:
        assert_decided(checker.check(raw, mail_from, client_ip), raw)

    check()
    _whole_check_counts(checker, report)


def test_whole_check_decides_every_broken_structured_message(
    checker: Checker, key: DkimKey, report: Report
) -> None:
    authenticated = signed = 0

    @fuzz_settings(120)
    @given(broken_messages(key))
    def check(shape: Shape) -> None:
        nonlocal authenticated, signed
        message = checker.check(shape.raw, shape.mail_from, shape.client_ip)
        assert_decided(message, shape.raw)
        signed += shape.signed
        authenticated += bool(message.authenticated)

    check()
    _whole_check_counts(checker, report, signed=signed, authenticated=authenticated)


def test_whole_check_still_authenticates_a_clean_signed_request(
    checker: Checker, key: DkimKey, report: Report
) -> None:
    """The control for the two above: the same checker is not simply refusing everything."""
    raw = sign(build_message(from_header=f"<{ALICE}>"), key)
    message = checker.check(raw)
    assert_decided(message, raw)
    assert message.authenticated
    assert message.auth_strength == "strong"
    assert message.decision is not None
    assert message.decision["action"] == "queue_reset"
    _whole_check_counts(checker, report)


# What the fuzzing found raising out of the check (the message then failed, at every retry).
CRASHERS = [
    (
        "dkim-l-and-x-of-5000-digits",  # int() refuses over 4300 digits
        _message(
            b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=fuzz; h=from; bh=AAAA; b=AAAA;"
            b" l=" + b"9" * 5000 + b"; x=" + b"9" * 5000,
            *BASE,
        ),
    ),
    (
        "date-with-a-huge-year",
        _message(*BASE[:3], b"Date: Mon, 1 Jan 99999999999999999999 0:0 +0000"),
    ),
    # The email package's group parser fails on a bare LF in the value.
    ("from-group-and-bare-lf", b"From: team: alice@example.org;\nTo: support@example.com\n\n"),
]


def test_what_the_fuzzing_found_is_decided(checker: Checker, key: DkimKey, report: Report) -> None:
    for _, raw in CRASHERS:
        assert_decided(checker.check(raw), raw)
    _whole_check_counts(checker, report)


UNSTORABLE_TEXT = [
    ("nul-in-subject", _message(BASE[0], BASE[1], b"Subject: reset\x00me")),
    ("nul-in-from", _message(b"From: alice\x00@example.org", *BASE[1:])),
    ("nul-in-message-id", _message(*BASE, b"Message-ID: <\x00@example.org>")),
    (
        "nul-in-dkim-tags",
        _message(b"DKIM-Signature: v=1; a=rsa-sha256; d=exa\x00mple.org; s=s\x00; h=from", *BASE),
    ),
    ("nul-in-upstream-results", _message(b"Authentication-Results: mx\x00; dkim=pass", *BASE)),
    (
        "lone-surrogate-in-body",
        _message(*BASE, b"Content-Type: text/plain; charset=unicode_escape", body=b"\\ud800\r\n"),
    ),
]


def test_nul_and_lone_surrogates_are_recorded_on_every_backend(
    database_url: str, tmp_path: Path, key: DkimKey, report: Report
) -> None:
    """PostgreSQL's jsonb refuses NUL and lone surrogates, which parsed fields and evidence can
    hold: such a message once failed its whole batch's transaction, again at every attempt."""
    checker = Checker(tmp_path, database_url)
    try:
        for name, raw in UNSTORABLE_TEXT:
            message = checker.check(raw)
            assert_decided(message, raw)
            assert message.raw == raw, name  # the evidence is kept exactly
            assert "\\u0000" not in json.dumps([message.parsed, message.verdict]), name
        _whole_check_counts(checker, report)
    finally:
        checker.close()


# -- the corpus, through the real listener and worker ---------------------------------------------


def _nested_multipart(depth: int) -> bytes:
    opening = b"".join(
        b'Content-Type: multipart/mixed; boundary="n%d"\r\n\r\n--n%d\r\n' % (i, i)
        for i in range(depth)
    )
    closing = b"".join(b"\r\n--n%d--" % i for i in reversed(range(depth)))
    return (
        b"From: alice@example.org\r\nSubject: nested\r\nMIME-Version: 1.0\r\n"
        + opening
        + b"Content-Type: text/plain\r\n\r\nhello"
        + closing
        + CRLF
    )


def _nested_rfc822(depth: int) -> bytes:
    raw = b"From: alice@example.org\r\nSubject: innermost\r\n\r\nhello\r\n"
    for _ in range(depth):
        raw = (
            b"From: alice@example.org\r\nSubject: wrapper\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: message/rfc822\r\n\r\n" + raw
        )
    return raw


def _multipart(boundary_param: bytes, body: bytes) -> bytes:
    return _message(
        *BASE, b"MIME-Version: 1.0", b"Content-Type: multipart/mixed" + boundary_param, body=body
    )


MB = 1 << 20
SIZE_LIMIT = 4 * MB

# (name, raw, the reply code expected after DATA)
CORPUS: list[tuple[str, bytes, int]] = [
    # broken MIME
    ("multipart-no-boundary", _multipart(b"", b"--x\r\nhello\r\n--x--\r\n"), 250),
    ("multipart-unterminated", _multipart(b'; boundary="b"', b"--b\r\nhello\r\n"), 250),
    ("boundary-never-used", _multipart(b'; boundary="b"', b"just text\r\n"), 250),
    ("boundary-empty", _multipart(b'; boundary=""', b"--\r\nhello\r\n----\r\n"), 250),
    (
        "boundary-in-a-header",
        _multipart(
            b'; boundary="b"',
            b"--b\r\nX-Trap: --b\r\nSubject: --b--\r\n\r\nhello\r\n--b--\r\n",
        ),
        250,
    ),
    (
        "boundary-reused-by-child",
        _multipart(
            b'; boundary="b"',
            b'--b\r\nContent-Type: multipart/alternative; boundary="b"\r\n\r\n--b\r\n'
            b"Content-Type: text/plain\r\n\r\nhi\r\n--b--\r\n--b--\r\n",
        ),
        250,
    ),
    ("boundary-200-chars", _multipart(b"; boundary=" + b"b" * 200, b"--" + b"b" * 200 + CRLF), 250),
    # huge headers
    ("header-line-1mb", _message(*BASE, b"X-Big: " + b"a" * MB), 500),
    (
        "header-1mb-folded-in-long-lines",
        _message(*BASE, b"X-Big: " + b"\r\n ".join([b"a" * 990] * (MB // 990))),
        250,
    ),
    ("header-folded-10k-times", _message(*BASE, b"X-Folded: a" + b"\r\n b" * 10_000), 250),
    ("subject-folded-10k-times", _message(BASE[0], b"Subject: Reset" + b"\r\n x" * 10_000), 250),
    (
        "ten-thousand-headers",
        _message(*BASE, *(b"X-H-%d: value %d" % (i, i) for i in range(10_000))),
        250,
    ),
    # bad encodings
    (
        "bad-base64-body",
        _message(*BASE, b"Content-Transfer-Encoding: base64", body=b"!!!!not base64===\r\n"),
        250,
    ),
    (
        "bad-quoted-printable-body",
        _message(*BASE, b"Content-Transfer-Encoding: quoted-printable", body=b"=ZZ=\r\n=X\r\n="),
        250,
    ),
    (
        "unknown-charset-body",
        _message(*BASE, b"Content-Type: text/plain; charset=x-no-such", body=b"\xe9t\xe9\r\n"),
        250,
    ),
    (
        "unicode-escape-charset-body",
        _message(
            *BASE, b"Content-Type: text/plain; charset=unicode_escape", body=b"\\ud800 \\x00\r\n"
        ),
        250,
    ),
    (
        "encoded-words-bad-charset",
        _message(
            b"From: =?x-bogus?q?Alice?= <alice@example.org>",
            b"Subject: =?no-such?b?UmVzZXQ=?= =?utf-8?b?!!!?= =?utf-8?q?=ZZ?=",
            b"To: support@example.com",
        ),
        250,
    ),
    # deep nesting
    ("nested-multipart-1000", _nested_multipart(1000), 250),
    ("nested-rfc822-300", _nested_rfc822(300), 250),
    # NULs and invalid UTF-8
    ("nul-in-header", _message(*BASE, b"X-Nul: a\x00b"), 250),
    ("nul-in-from", _message(b"From: alice\x00@example.org", *BASE[1:]), 250),
    ("nul-in-body", _message(*BASE, body=b"reset\x00please\r\n\x00\x00\r\n"), 250),
    (
        "invalid-utf8-in-headers",
        _message(*BASE, b"X-Bad: \xff\xfe\xc3\x28", b"Subject: \xed\xa0\x80"),
        250,
    ),
    ("invalid-utf8-in-from", _message(b"From: \xff <alice@example.org>", *BASE[1:]), 250),
    ("invalid-utf8-in-body", _message(*BASE, body=b"\xff\xfe\xfd\xc3\x28\r\n"), 250),
    # structure
    ("no-header-body-separator", b"".join(h + CRLF for h in BASE) + b"X-Body-Here: yes\r\n", 250),
    ("only-headers", b"".join(h + CRLF for h in BASE), 250),
    ("headers-without-final-crlf", CRLF.join(BASE), 250),
    ("empty", b"", 250),
    ("cr-only-line-ends", CRLF.join(BASE).replace(CRLF, b"\r") + b"\r\rbody\r", 250),
    ("cr-only-long", (b"\r".join(BASE) + b"\r\r" + b"body line\r" * 200), 500),
    ("lf-only-line-ends", b"\n".join(BASE) + b"\n\nbody\n.\nmore\n", 250),
    ("smuggling-sequence", _message(*BASE, body=b"a\n.\r\nMAIL FROM:<x@evil.example>\r\n"), 250),
    ("dot-lines", _message(*BASE, body=b".\r\n..\r\n.x\r\n"), 250),
    ("duplicate-from", _message(BASE[0], b"From: mallory@evil.example", *BASE[1:]), 250),
    ("duplicate-subject", _message(*BASE, b"Subject: other"), 250),
    ("duplicate-message-id", _message(*BASE, b"Message-ID: <a@x>", b"Message-ID: <b@x>"), 250),
    ("ten-thousand-from-headers", _message(*[BASE[0]] * 10_000), 250),
    (
        "deep-comment-in-from",
        _message(b"From: " + b"(" * 900 + b"alice@example.org", *BASE[1:]),
        250,
    ),
    (
        "date-year-overflow",
        _message(*BASE[:3], b"Date: Mon, 01 Jan 99999999999999999999 00:00 +0000"),
        250,
    ),
    # garbage DKIM-Signature, Authentication-Results and ARC headers
    ("dkim-random-bytes", _message(b"DKIM-Signature: \xff\x00;;==;\x01", *BASE), 250),
    ("dkim-no-tags", _message(b"DKIM-Signature: nothing here", *BASE), 250),
    (
        "dkim-huge-l-and-x",
        _message(
            b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=fuzz; h=from; bh=AAAA; b=AAAA; l="
            + b"9" * 900
            + b";\r\n x="
            + b"9" * 900,
            *BASE,
        ),
        250,
    ),
    (
        "dkim-bad-base64",
        _message(
            b"DKIM-Signature: v=1; a=ed25519-sha256; d=example.org; s=fuzz; h=from; bh=!!; b=*&^",
            *BASE,
        ),
        250,
    ),
    (
        "dkim-bad-canonicalization",
        _message(
            b"DKIM-Signature: v=1; a=rsa-sha256; c=bogus/none; d=example.org; s=fuzz; h=from;"
            b" bh=AAAA; b=AAAA; l=5",
            *BASE,
        ),
        250,
    ),
    (
        "dkim-200-signatures",
        _message(
            *(b"DKIM-Signature: v=1; d=example.org; s=s%d; b=AA" % i for i in range(200)), *BASE
        ),
        250,
    ),
    (
        "authentication-results-garbage",
        _message(b"Authentication-Results: " + b"(" * 900, b"Authentication-Results: ;;;", *BASE),
        250,
    ),
    (
        "arc-garbage",
        _message(
            b"ARC-Seal: i=" + b"9" * 900 + b"; cv=pass; b=\xff",
            b"ARC-Message-Signature: \x00",
            b"ARC-Authentication-Results: i=1; \xff",
            *BASE,
        ),
        250,
    ),
    # size
    (
        "over-the-size-limit",
        _message(*BASE, body=(b"y" * 998 + CRLF) * (SIZE_LIMIT // 1000 + 10)),
        552,
    ),
]


def smtplib_delivers(raw: bytes) -> bytes:
    """What the listener stores for ``raw`` sent with smtplib: smtplib doubles a dot at the
    start of any line (after CR LF or a bare LF) and ends the data with CR LF; the listener
    takes one dot off the start of each CR LF line."""
    wire_bytes = re.sub(rb"(?m)^\.", b"..", raw)
    if not wire_bytes.endswith(CRLF):
        wire_bytes += CRLF
    lines = wire_bytes.split(CRLF)[:-1]
    return b"".join((line[1:] if line.startswith(b".") else line) + CRLF for line in lines)


def _send(port: int, raw: bytes) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.example.org")
        assert client.mail(ALICE)[0] == 250
        assert client.rcpt(SUPPORT)[0] == 250
        code, reply = client.data(raw)
        return code, reply.decode(errors="replace")


@pytest.mark.slow  # the listener's worker is a process of its own
def test_malformed_corpus_through_the_real_server(
    sqlite_url: str, tmp_path: Path, key: DkimKey, report: Report
) -> None:
    accounts = tmp_path / "accounts.csv"
    accounts.write_text(f"id,email\n42,{ALICE}\n")
    sections: dict[str, dict[str, Any]] = {
        "smtp": {"max_message_bytes": SIZE_LIMIT},
        "accounts": {"csv_file": str(accounts)},
        # Replies stay in the outbox: nothing here is about delivering them.
        "outbound": {"poll_interval_seconds": 3600.0},
    }
    control = sign(build_message(from_header=f"<{ALICE}>"), key)
    corpus = [*CORPUS, ("control-signed-request", control, 250)]
    codes: dict[str, int] = {}
    accepted: dict[int, str] = {}
    with AppThread.running(sqlite_url, **sections) as app:
        for name, raw, expected in corpus:
            code, reply = _send(app.port, raw)
            codes[name] = code
            assert code == expected, (name, code, reply)
            if code == 250:
                message_id = int(reply.rsplit(" ", 1)[-1])
                assert message_id not in accepted, (name, message_id)
                accepted[message_id] = name

        service = app.app.messages
        finals = (MessageState.PROCESSED.value, MessageState.FAILED.value)

        def settled() -> bool:
            counts = service.counts()
            return sum(counts.get(state, 0) for state in finals) >= len(accepted)

        with contextlib.suppress(AssertionError):  # what is not settled is counted as lost
            wait_for(settled, timeout=60, interval=0.2)
        rows = messages(sqlite_url)
        # The worker never crashed on any of it, and the listener still takes normal mail.
        assert app.app.worker.alive == app.settings.worker.processes
        assert app.app.worker.restarts == 0
        after = sign(build_message(from_header=f"<{ALICE}>", subject="Hello again"), key)
        code, reply = _send(app.port, after)
        assert code == 250
        after_id = int(reply.rsplit(" ", 1)[-1])
        wait_for(lambda: service.get(after_id).state == MessageState.PROCESSED, timeout=30)
        assert service.get(after_id).authenticated

    by_id = {row.id: row for row in rows}
    sent = {name: raw for name, raw, _ in corpus}
    decided = failed = 0
    stuck: list[str] = []
    for message_id, name in accepted.items():
        row = by_id.get(message_id)
        if row is None or row.state not in (MessageState.PROCESSED, MessageState.FAILED):
            stuck.append(name)
            continue
        assert row.raw == smtplib_delivers(sent[name]), name
        assert set(row.intake_flags) == set(wire_flags(row.raw)), name
        if row.state == MessageState.FAILED:
            failed += 1
            assert row.error, name
        else:
            assert_decided(row, row.raw)
        decided += 1
    assert by_id[max(accepted)].authenticated  # the signed control got through every check
    counts = report(
        sent=len(corpus),
        accepted=len(accepted),
        decided=decided,
        lost=len(stuck),
        duplicated=len(set(by_id) - set(accepted)),
        failed=failed,
        refused_500=sum(code == 500 for code in codes.values()),
        refused_552=sum(code == 552 for code in codes.values()),
    )
    assert counts.lost == 0, stuck
    assert counts.duplicated == 0
    assert failed == 0, [accepted[r.id] for r in rows if r.state == MessageState.FAILED]
