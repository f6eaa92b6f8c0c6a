"""Strict message parsing: the fields later stages need, every ambiguity recorded as a named
defect, and never an exception, whatever the bytes."""

from __future__ import annotations

import json
import random
from email import policy

import pytest

from mailproc.message import SINGLE_USE, TEXT_BODY_LIMIT, ParsedMessage, parse_message
from tests.support import make_message

FROM = "From: Alice Example <alice@example.org>"
REST = (
    "To: support@example.com",
    "Subject: Reset my security question",
    "Date: Mon, 01 Jan 2024 09:00:00 +0000",
    "Message-ID: <reset-1@example.org>",
)
BODY = b"Please reset it.\r\n"


def message(*headers: str | bytes, body: bytes = BODY) -> bytes:
    """Raw message bytes: each header a CRLF-terminated line, a blank line, the body."""
    lines = [h.encode() if isinstance(h, str) else h for h in headers]
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


def nested_multipart(depth: int) -> bytes:
    """``depth`` multipart/mixed parts, each holding the next; a text/plain part inside."""
    head = b"From: alice@example.org\r\nMIME-Version: 1.0\r\n"
    opening = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(depth)
    )
    closing = b"".join(b"\r\n--b%d--" % i for i in reversed(range(depth)))
    return head + opening + b"Content-Type: text/plain\r\n\r\nhello" + closing + b"\r\n"


# -- a clean message ------------------------------------------------------------------------


def test_clean_message_gives_its_fields_and_no_defects() -> None:
    raw = (
        b"From: =?utf-8?q?Alice_B=C3=A9?= <Alice@Example.org>\r\n"
        b"To: support@example.com\r\n"
        b"Subject: =?utf-8?b?UmVzZXQgbXkgcXVlc3Rpb24g4pyT?=\r\n"
        b"Date: Mon, 01 Jan 2024 09:00:00 +0000\r\n"
        b"Message-ID: <abc@example.org>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b"Please reset it. \xc3\xa9\r\n"
    )

    parsed = parse_message(raw)

    assert parsed.defects == []
    assert parsed.from_header == "=?utf-8?q?Alice_B=C3=A9?= <Alice@Example.org>"
    # Exactly as written: comparing addresses is normalize_address's job, not the parser's.
    assert parsed.from_addresses == ["Alice@Example.org"]
    assert parsed.from_display_name == "Alice Bé"
    assert parsed.subject == "Reset my question ✓"
    assert parsed.message_id == "<abc@example.org>"
    assert parsed.date == "Mon, 01 Jan 2024 09:00:00 +0000"
    assert parsed.to == "support@example.com"
    assert parsed.content_type == "text/plain; charset=utf-8"
    assert parsed.text_body == "Please reset it. é\r\n"
    assert parsed.body_bytes == len(b"Please reset it. \xc3\xa9\r\n")
    assert [h.name for h in parsed.headers] == [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
    ]


def test_message_built_by_the_email_package_parses_cleanly() -> None:
    built = make_message(
        subject="Réinitialiser ma question ✓",
        sender="Zoë <zoe@example.org>",
        body="Bonjour,\nmerci.\n",
        message_id="<m1@example.org>",
    )

    parsed = parse_message(built.as_bytes(policy=policy.SMTP))

    assert parsed.defects == []
    assert parsed.subject == "Réinitialiser ma question ✓"
    assert parsed.from_addresses == ["zoe@example.org"]
    assert parsed.from_display_name == "Zoë"
    assert parsed.message_id == "<m1@example.org>"
    assert parsed.text_body == "Bonjour,\r\nmerci.\r\n"


def test_plain_text_part_is_chosen_from_multipart_alternative() -> None:
    raw = message(
        FROM,
        *REST,
        "MIME-Version: 1.0",
        'Content-Type: multipart/alternative; boundary="sep"',
        body=(
            b"--sep\r\nContent-Type: text/html\r\n\r\n<p>not this</p>\r\n"
            b"--sep\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\naGVsbG8gd29ybGQ=\r\n--sep--\r\n"
        ),
    )

    parsed = parse_message(raw)

    assert parsed.defects == []
    assert parsed.text_body == "hello world"


def test_html_only_message_has_no_text_body() -> None:
    parsed = parse_message(message(FROM, *REST, "Content-Type: text/html", body=b"<p>x</p>"))

    assert parsed.text_body is None
    assert parsed.defects == []


def test_text_body_is_truncated_but_body_bytes_counts_everything() -> None:
    body = b"x" * (TEXT_BODY_LIMIT + 5000)

    parsed = parse_message(message(FROM, *REST, body=body))

    assert parsed.text_body == "x" * TEXT_BODY_LIMIT
    assert parsed.body_bytes == len(body)


def test_header_lookup_ignores_case_and_keeps_order() -> None:
    parsed = parse_message(message(FROM, "X-Tag: one", "x-tag: two", "X-TAG: three"))

    assert parsed.header("x-tag") == ["one", "two", "three"]
    assert parsed.header("X-Missing") == []


def test_summary_is_json_ready_and_leaves_out_the_header_list() -> None:
    parsed = parse_message(message(FROM, *REST, "X-Extra: 1"))

    summary = parsed.summary()

    assert "headers" not in summary
    assert summary["header_count"] == 6
    assert summary["subject"] == "Reset my security question"
    assert json.loads(json.dumps(summary)) == summary


def test_tab_in_a_header_value_is_not_a_control_character() -> None:
    parsed = parse_message(message(FROM, "Subject: reset\tplease"))

    assert parsed.defects == []
    assert parsed.subject == "reset\tplease"


def test_address_lookalike_in_display_name_or_comment_is_not_the_from_address() -> None:
    # An address-looking display name (plain or encoded) never becomes the From address.
    for header in (
        'From: "mallory@evil.example" <alice@example.org>',
        "From: =?utf-8?q?mallory=40evil.example?= <alice@example.org>",
        "From: alice@example.org (mallory@evil.example)",
    ):
        parsed = parse_message(message(header))
        assert parsed.from_addresses == ["alice@example.org"], header


# -- defects --------------------------------------------------------------------------------


def test_two_from_headers_are_a_defect_and_give_no_address() -> None:
    parsed = parse_message(message(FROM, "From: Mallory <mallory@evil.example>", *REST))

    assert "multiple_from_headers" in parsed.defects
    assert parsed.from_addresses == []
    assert parsed.from_header is None
    assert parsed.from_display_name is None


def test_two_from_headers_differing_in_case_are_still_two() -> None:
    parsed = parse_message(message("From: alice@example.org", "FROM: mallory@evil.example"))

    assert "multiple_from_headers" in parsed.defects
    assert parsed.from_addresses == []


def test_from_with_two_mailboxes_is_a_defect() -> None:
    parsed = parse_message(message("From: alice@example.org, mallory@evil.example", *REST))

    assert "from_mailbox_count:2" in parsed.defects
    assert parsed.from_display_name is None


def test_from_with_group_syntax_is_a_defect() -> None:
    parsed = parse_message(message("From: Support team: alice@example.org;", *REST))

    assert "from_group_syntax" in parsed.defects


def test_from_with_empty_group_is_a_defect() -> None:
    parsed = parse_message(message("From: undisclosed-senders:;", *REST))

    assert "from_group_syntax" in parsed.defects
    assert "from_mailbox_count:0" in parsed.defects
    assert parsed.from_addresses == []


def test_missing_from_is_a_defect() -> None:
    parsed = parse_message(message(*REST))

    assert "no_from_header" in parsed.defects
    assert parsed.from_addresses == []
    assert parsed.from_header is None


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("alice", id="no-at"),
        pytest.param("<>", id="null-path"),
        pytest.param("alice@", id="no-domain"),
    ],
)
def test_from_without_a_usable_mailbox_is_a_defect(value: str) -> None:
    parsed = parse_message(message(f"From: {value}", *REST))

    assert any(d.startswith(("from_", "unparseable_from")) for d in parsed.defects), parsed.defects


@pytest.mark.parametrize("name", [n for n in SINGLE_USE if n != "from"])
def test_duplicated_single_use_header_is_a_defect(name: str) -> None:
    parsed = parse_message(message(FROM, f"{name}: first", f"{name.upper()}: second"))

    assert f"duplicate_header:{name}" in parsed.defects


@pytest.mark.parametrize(
    ("first", "second", "defect"),
    [
        ("Subject: reset", "Subject: transfer funds", "duplicate_header:subject"),
        (
            "Date: Mon, 01 Jan 2024 09:00:00 +0000",
            "Date: Tue, 02 Jan 2024 09:00:00 +0000",
            "duplicate_header:date",
        ),
        (
            "Message-ID: <1@example.org>",
            "Message-ID: <2@example.org>",
            "duplicate_header:message-id",
        ),
        ("To: support@example.com", "To: other@example.com", "duplicate_header:to"),
        (
            "Reply-To: alice@example.org",
            "Reply-To: mallory@evil.example",
            "duplicate_header:reply-to",
        ),
        ("Sender: alice@example.org", "Sender: mallory@evil.example", "duplicate_header:sender"),
        ("Content-Type: text/plain", "Content-Type: text/html", "duplicate_header:content-type"),
        ("MIME-Version: 1.0", "MIME-Version: 1.0", "duplicate_header:mime-version"),
    ],
)
def test_named_duplicated_headers_are_defects(first: str, second: str, defect: str) -> None:
    parsed = parse_message(message(FROM, first, second))

    assert defect in parsed.defects
    # The message is not repaired: which copy "wins" is not hidden from later stages.
    name = first.split(":", 1)[0]
    assert parsed.header(name) == [first.split(": ", 1)[1], second.split(": ", 1)[1]]


def test_repeatable_headers_are_not_duplicate_defects() -> None:
    parsed = parse_message(
        message(FROM, "Received: from a", "Received: from b", "Comments: x", "Comments: y")
    )

    assert parsed.defects == []


@pytest.mark.parametrize("separator", [" ", "\t", "  \t "])
def test_whitespace_before_colon_is_a_defect(separator: str) -> None:
    parsed = parse_message(message(f"From{separator}: mallory@evil.example", FROM, *REST))

    assert "whitespace_before_colon:From" in parsed.defects
    # The malformed line is not taken as a From header.
    assert parsed.from_addresses == ["alice@example.org"]


def test_header_line_without_colon_is_a_defect() -> None:
    # A field name folded onto two lines: "X-Fo" has no colon; " o: bar" looks like a
    # continuation of nothing.
    parsed = parse_message(message(FROM, "X-Fo", " o: bar", *REST))

    assert "malformed_header_line" in parsed.defects


@pytest.mark.parametrize(
    "line",
    [b"no colon here", b"Sub\xffject: x", b"X-\x00: x", b": empty name", b"X-Tag\x01: x"],
)
def test_header_line_with_no_valid_field_name_is_a_defect(line: bytes) -> None:
    parsed = parse_message(message(FROM, line, *REST))

    assert "malformed_header_line" in parsed.defects


@pytest.mark.parametrize("leading", [" folded", "\tfolded", " From: mallory@evil.example"])
def test_continuation_before_first_header_is_a_defect(leading: str) -> None:
    parsed = parse_message(message(leading, FROM, *REST))

    assert "continuation_before_first_header" in parsed.defects
    assert parsed.from_addresses == ["alice@example.org"]


@pytest.mark.parametrize(
    ("value", "label"),
    [
        (b"reset\x00please", "NUL"),
        (b"reset\x1b[2Jplease", "ESC"),
        (b"reset\x7fplease", "DEL"),
        (b"reset\x08please", "BS"),
        (b"reset\rplease", "bare CR"),
        (b"reset\nplease", "bare LF"),
    ],
)
def test_control_character_in_a_header_is_a_defect(value: bytes, label: str) -> None:
    parsed = parse_message(message(FROM, b"Subject: " + value, *REST[:1]))

    assert "control_character_in_header:Subject" in parsed.defects, label


def test_control_character_in_from_is_a_defect() -> None:
    parsed = parse_message(message(b"From: alice@example.org\x00mallory@evil.example", *REST))

    assert "control_character_in_header:From" in parsed.defects


@pytest.mark.parametrize(
    "value", [b"\xff\xfe", b"caf\xe9", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]
)
def test_invalid_utf8_in_a_header_is_a_defect(value: bytes) -> None:
    parsed = parse_message(message(FROM, b"Subject: reset " + value, *REST[:1]))

    assert "invalid_utf8_in_header:Subject" in parsed.defects
    assert parsed.subject is not None
    assert "\ufffd" in parsed.subject


def test_invalid_utf8_in_from_is_a_defect() -> None:
    parsed = parse_message(message(b"From: \xffalice@example.org", *REST))

    assert "invalid_utf8_in_header:From" in parsed.defects


def test_utf8_header_is_not_a_defect_of_its_own() -> None:
    parsed = parse_message(message(FROM, "Subject: Réinitialiser ✓"))

    assert parsed.defects == []
    assert parsed.subject == "Réinitialiser ✓"


def test_missing_header_body_separator_is_a_defect() -> None:
    parsed = parse_message(b"From: alice@example.org\r\nSubject: reset")

    assert "no_header_body_separator" in parsed.defects
    assert parsed.body_bytes == 0


def test_lf_only_message_has_no_header_body_separator() -> None:
    parsed = parse_message(b"From: alice@example.org\nSubject: x\n\nbody\n")

    assert "no_header_body_separator" in parsed.defects


def test_message_without_headers_is_a_defect() -> None:
    parsed = parse_message(b"\r\njust a body")

    assert "no_headers" in parsed.defects
    assert "no_from_header" in parsed.defects
    assert parsed.body_bytes == len(b"just a body")


@pytest.mark.parametrize(
    "subject",
    ["=?utf-8?q?=FF=FE?=", "=?x-no-such-charset?q?reset?="],
)
def test_undecodable_encoded_word_is_a_defect_and_kept_raw(subject: str) -> None:
    parsed = parse_message(message(FROM, f"Subject: {subject}"))

    assert "undecodable_encoded_words:subject" in parsed.defects
    assert parsed.subject == subject


def test_body_in_unknown_charset_is_a_defect() -> None:
    parsed = parse_message(message(FROM, "Content-Type: text/plain; charset=x-no-such-charset"))

    # Recorded by name, and the text is still shown (as UTF-8, undecodable bytes replaced).
    assert "unknown_charset:x-no-such-charset" in parsed.defects
    assert parsed.text_body is not None


# -- garbage in, defects out ----------------------------------------------------------------

NASTY: list[tuple[str, bytes, set[str]]] = [
    ("empty", b"", {"no_from_header", "no_header_body_separator"}),
    ("only-crlf", b"\r\n", {"no_from_header"}),
    ("only-crlfs", b"\r\n" * 10_000, {"no_from_header"}),
    ("only-lfs", b"\n" * 10_000, {"no_from_header", "no_header_body_separator"}),
    ("only-crs", b"\r" * 10_000, {"no_from_header", "no_header_body_separator"}),
    ("lf-cr-pairs", b"\n\r" * 10_000, {"no_from_header"}),
    ("only-nuls", b"\x00" * 10_000, {"no_from_header"}),
    ("only-colons", b":\r\n" * 1000 + b"\r\n", {"malformed_header_line", "no_from_header"}),
    ("only-spaces", b" \r\n" * 1000 + b"\r\n", {"continuation_before_first_header"}),
    (
        "10k-headers",
        b"".join(b"X-Header-%d: value %d\r\n" % (i, i) for i in range(10_000)) + b"\r\nbody",
        {"no_from_header"},
    ),
    ("10k-from-headers", b"From: a@example.org\r\n" * 10_000 + b"\r\nx", {"multiple_from_headers"}),
    ("10k-subjects", b"Subject: x\r\n" * 10_000 + b"\r\nx", {"duplicate_header:subject"}),
    ("10k-continuations", b"From: a@example.org\r\n" + b" x\r\n" * 10_000 + b"\r\nx", set()),
    (
        "1mb-subject-line",
        b"From: a@example.org\r\nSubject: " + b"a" * (1 << 20) + b"\r\n\r\nx",
        set(),
    ),
    (
        "1mb-x-header-line",
        b"From: a@example.org\r\nX-Big: " + b"ab " * (1 << 18) + b"\r\n\r\nx",
        set(),
    ),
    ("1mb-line-no-colon", b"a" * (1 << 20) + b"\r\n\r\nx", {"malformed_header_line"}),
    ("1mb-name-space-colon", b"a" * (1 << 20) + b" : x\r\n\r\nx", {"no_from_header"}),
    ("1mb-from-address", b"From: <" + b"a" * (1 << 20) + b"@example.org>\r\n\r\nx", set()),
    ("1mb-body-line", b"From: a@example.org\r\n\r\n" + b"x" * (1 << 20), set()),
    ("all-bytes", bytes(range(256)) * 100, {"no_from_header"}),
    ("high-bytes", bytes(range(128, 256)) * 1000, {"no_from_header"}),
    (
        "invalid-utf8-everywhere",
        b"Fr\xffom: \xff@\xfe.example\r\nFrom: \xc3\x28@\xe9.example\r\nSubject: \xed\xa0\x80\r\n"
        b"Content-Type: text/\xff; charset=\xff\r\n\r\n\xff\xfe\xfd\r\n",
        {"malformed_header_line", "invalid_utf8_in_header:From", "invalid_utf8_in_header:Subject"},
    ),
    ("random-bytes", random.Random(5322).randbytes(200_000), {"no_from_header"}),
    ("nested-multipart-200", nested_multipart(200), set()),
    (
        "1000-mime-parts",
        b'From: a@example.org\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + b"--b\r\nContent-Type: text/plain\r\n\r\npart\r\n" * 1000
        + b"--b--\r\n",
        set(),
    ),
    (
        "multipart-without-boundary",
        b"From: a@example.org\r\nContent-Type: multipart/mixed\r\n\r\n--x\r\nhello\r\n",
        {"mime_NoBoundaryInMultipartDefect"},
    ),
    (
        "multipart-never-closed",
        b'From: a@example.org\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\n",
        {"mime_CloseBoundaryNotFoundDefect"},
    ),
    (
        "bad-base64-body",
        b"From: a@example.org\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!!not=base64===\r\n",
        set(),
    ),
    (
        "bad-quoted-printable-body",
        b"From: a@example.org\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ=\r\n=",
        set(),
    ),
    (
        "garbage-content-type",
        b'From: a@example.org\r\nContent-Type: ;;;==""\\"\r\n\r\nx',
        set(),
    ),
    (
        "message-rfc822-garbage",
        b'From: a@example.org\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: message/rfc822\r\n\r\n\xff\x00:\r\n \r\n--b--\r\n",
        set(),
    ),
    (
        "broken-encoded-words",
        b"From: =?utf-8?b?=?= <a@example.org>\r\nSubject: =?utf-8?q?unterminated\r\n"
        b"To: =?=?=??==?\r\n\r\nx",
        set(),
    ),
    (
        "bare-cr-lf-mix",
        b"From: a@example.org\r\r\n\n\r\n\rSubject: x\n\r\n\r\n.\r\n\n.\n\r.\r",
        {"control_character_in_header:From"},
    ),
    ("lf-headers", b"From: a@example.org\nSubject: x\n\nbody\n", {"no_header_body_separator"}),
    ("cr-headers", b"From: a@example.org\rSubject: x\r\rbody\r", {"no_header_body_separator"}),
    (
        "crcrlf-headers",
        b"From: a@example.org\r\r\nSubject: x\r\r\n\r\r\nbody",
        {"control_character_in_header:From"},
    ),
]


@pytest.mark.parametrize(
    ("raw", "expected"), [(raw, exp) for _, raw, exp in NASTY], ids=[n for n, _, _ in NASTY]
)
def test_garbage_never_raises_and_gives_storable_defects(raw: bytes, expected: set[str]) -> None:
    parsed = parse_message(raw)

    assert isinstance(parsed, ParsedMessage)
    assert expected <= set(parsed.defects), parsed.defects
    # What is stored with the message must always serialise.
    json.dumps(parsed.summary())
    assert parsed.body_bytes <= len(raw)


def test_ten_thousand_headers_are_all_kept() -> None:
    raw = b"".join(b"X-Header-%d: value\r\n" % i for i in range(10_000)) + b"\r\nbody"

    parsed = parse_message(raw)

    assert len(parsed.headers) == 10_000
    assert parsed.summary()["header_count"] == 10_000


def test_nested_multipart_200_levels_still_finds_the_text() -> None:
    parsed = parse_message(nested_multipart(200))

    assert parsed.text_body == "hello"


# -- known bugs -----------------------------------------------------------------------------


def test_deeply_nested_comment_in_from_is_a_defect_not_an_exception() -> None:
    parsed = parse_message(message(b"From: " + b"(" * 1000 + b"alice@example.org", *REST))

    assert parsed.defects
    assert parsed.from_addresses == []


def test_deeply_nested_comment_in_content_type_is_a_defect_not_an_exception() -> None:
    raw = message(FROM, b"Content-Type: text/plain; charset=" + b"(" * 1000)

    parsed = parse_message(raw)

    assert parsed.defects


def test_multipart_nested_1200_levels_is_a_defect_not_an_exception() -> None:
    parsed = parse_message(nested_multipart(1200))

    assert parsed.defects


@pytest.mark.timeout(5, method="signal")
@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"From: " + b"a " * (1 << 19) + b"\r\n\r\nx", id="1mb-from-words"),
        pytest.param(
            b"From: a@example.org\r\nContent-Type: text/plain; "
            + b"a=b; " * (1 << 18)
            + b"\r\n\r\nx",
            id="1mb-content-type-params",
        ),
    ],
)
def test_huge_structured_header_is_parsed_without_stalling_the_worker(raw: bytes) -> None:
    parsed = parse_message(raw)

    assert parsed.defects


@pytest.mark.parametrize(
    "header",
    [
        b"From: Alice Example\r\n <alice@example.org>",
        b"From: =?utf-8?q?Alice_Example?=\r\n\t<alice@example.org>",
        b"From: alice@example.org (a comment\r\n that goes on)",
    ],
)
def test_folded_from_header_is_parsed(header: bytes) -> None:
    parsed = parse_message(message(header, *REST))

    assert parsed.defects == []
    assert parsed.from_addresses == ["alice@example.org"]


def test_folded_subject_is_unfolded() -> None:
    parsed = parse_message(message(FROM, "Subject: Reset my", " security question"))

    assert parsed.subject == "Reset my security question"


@pytest.mark.parametrize(
    ("payload", "defect"),
    [
        (b"!!!!not base64!!!!", "mime_InvalidBase64LengthDefect"),
        (b"aGVsbG8gd29ybGQ", "mime_InvalidBase64PaddingDefect"),
    ],
)
def test_invalid_base64_in_the_text_body_is_a_defect(payload: bytes, defect: str) -> None:
    raw = message(
        FROM,
        *REST,
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: base64",
        body=payload + b"\r\n",
    )

    parsed = parse_message(raw)

    assert defect in parsed.defects


def test_defect_in_a_mime_sub_part_is_recorded() -> None:
    raw = message(
        FROM,
        *REST,
        "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="outer"',
        body=b"--outer\r\nContent-Type: multipart/alternative\r\n\r\n--x\r\nhidden\r\n"
        b"--outer\r\nContent-Type: text/plain\r\n\r\nhello\r\n--outer--\r\n",
    )

    parsed = parse_message(raw)

    assert parsed.text_body == "hello"
    assert "mime_NoBoundaryInMultipartDefect" in parsed.defects
