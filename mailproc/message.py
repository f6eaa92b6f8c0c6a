"""Strict parsing of a message's raw bytes into the fields later stages need, with every defect
recorded by name. Nothing here repairs the message: a defect is data, not an exception."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from email import policy
from email.errors import HeaderParseError, MessageError
from email.header import decode_header, make_header
from email.headerregistry import HeaderRegistry
from email.parser import BytesParser
from typing import Any

# Headers RFC 5322 section 3.6 allows once; a second copy is an ambiguity an attacker can use.
SINGLE_USE = (
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "content-type",
    "content-transfer-encoding",
    "mime-version",
)
TEXT_BODY_LIMIT = 20_000
# Longer values are not handed to the email package's structured parsers, whose cost grows
# faster than linearly with the input: a defect, not a stalled worker.
STRUCTURED_HEADER_LIMIT = 4096
MIME_HEADER_LIMIT = 16384

_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_NAME_THEN_SPACE = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]+:")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# The email package's From header class, made once: asking the registry for it by name builds
# a new class on every call, which costs more than the parse itself.
FROM_HEADER_CLASS = HeaderRegistry()["from"]


@dataclass
class Header:
    name: str
    value: str


@dataclass
class ParsedMessage:
    headers: list[Header] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    from_header: str | None = None
    from_addresses: list[str] = field(default_factory=list)
    from_display_name: str | None = None
    subject: str | None = None
    message_id: str | None = None
    date: str | None = None
    to: str | None = None
    content_type: str | None = None
    text_body: str | None = None
    body_bytes: int = 0
    # Whether from_addresses is the email package's reading of from_header (the author check
    # compares it with its own and need not parse the header a second time).
    from_parsed: bool = field(default=False, repr=False, compare=False)

    def header(self, name: str) -> list[str]:
        lowered = name.lower()
        return [h.value for h in self.headers if h.name.lower() == lowered]

    def summary(self) -> dict[str, Any]:
        """What is stored with the message: the fields, not the whole header list again."""
        # Field by field: asdict() would deep-copy every header only for them to be dropped.
        data = {
            f.name: list(value) if isinstance(value := getattr(self, f.name), list) else value
            for f in fields(self)
            if f.name not in ("headers", "from_parsed")
        }
        data["header_count"] = len(self.headers)
        return data


def _split_head(raw: bytes, defects: list[str]) -> tuple[bytes, bytes]:
    index = raw.find(b"\r\n\r\n")
    if index >= 0:
        return raw[: index + 2], raw[index + 4 :]
    if raw.startswith(b"\r\n"):
        defects.append("no_headers")
        return b"", raw[2:]
    defects.append("no_header_body_separator")
    return raw, b""


def _decode(value: bytes, name: str, defects: list[str]) -> str:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        defects.append(f"invalid_utf8_in_header:{name}")
        text = value.decode("utf-8", errors="replace")
    if _CONTROL.search(text.replace("\r\n", "")):
        defects.append(f"control_character_in_header:{name}")
    return text


def _header_fields(head: bytes, defects: list[str]) -> list[Header]:
    headers: list[Header] = []
    current: tuple[bytes, list[bytes]] | None = None

    def finish() -> None:
        if current is not None:
            name = current[0].decode("ascii")
            # Unfolding (RFC 5322 2.2.3): the CRLF before folding whitespace goes away.
            value = _decode(b"".join(current[1]), name, defects)
            headers.append(Header(name, value.strip(" \t")))

    for line in head.split(b"\r\n")[:-1] if head.endswith(b"\r\n") else head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if current is None:
                defects.append("continuation_before_first_header")
            else:
                current[1].append(line)
            continue
        finish()
        current = None
        name, colon, value = line.partition(b":")
        if colon and _FIELD_NAME.fullmatch(name):
            current = (name, [value])
        elif match := _NAME_THEN_SPACE.match(line):
            defects.append(f"whitespace_before_colon:{match.group(1).decode('ascii')}")
        else:
            defects.append("malformed_header_line")
    finish()
    return headers


def decoded_text(value: str, name: str, defects: list[str]) -> str:
    try:
        return str(make_header(decode_header(value)))
    except (HeaderParseError, UnicodeError, LookupError, ValueError):
        defects.append(f"undecodable_encoded_words:{name}")
        return value


def _from_fields(parsed: ParsedMessage) -> None:
    values = parsed.header("From")
    if len(values) != 1:
        parsed.defects.append("no_from_header" if not values else "multiple_from_headers")
        return
    parsed.from_header = values[0]
    if len(values[0]) > STRUCTURED_HEADER_LIMIT:
        parsed.defects.append("header_too_long:from")
        return
    try:
        header = FROM_HEADER_CLASS("From", values[0])
    except (HeaderParseError, IndexError, ValueError, TypeError, AttributeError, RecursionError):
        parsed.defects.append("unparseable_from")
        return
    groups = getattr(header, "groups", ())
    if any(group.display_name is not None for group in groups):
        parsed.defects.append("from_group_syntax")
    addresses = list(getattr(header, "addresses", ()))
    for defect in getattr(header, "defects", ()):
        parsed.defects.append(f"from_{type(defect).__name__}")
    parsed.from_addresses = [a.addr_spec for a in addresses]
    parsed.from_parsed = True
    if len(addresses) != 1:
        parsed.defects.append(f"from_mailbox_count:{len(addresses)}")
    else:
        parsed.from_display_name = addresses[0].display_name or None


def _text_body(raw: bytes, parsed: ParsedMessage) -> None:
    oversized = [h.name for h in parsed.headers if len(h.value) > MIME_HEADER_LIMIT]
    if oversized:
        parsed.defects.extend(f"header_too_long:{name.lower()}" for name in oversized)
        return
    try:
        # compat32 keeps headers as strings: several times faster than the default policy's
        # header objects, and the body text is all we take from this parse.
        message = BytesParser(policy=policy.compat32).parsebytes(raw)
        for part in message.walk():
            if part.get_content_type() != "text/plain":
                continue
            if str(part.get("Content-Disposition", "")).strip().lower().startswith("attachment"):
                continue
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                charset = part.get_content_charset() or "us-ascii"
                try:
                    text = payload.decode(charset, errors="replace")
                except LookupError:
                    parsed.defects.append(f"unknown_charset:{charset[:40]}")
                    text = payload.decode("utf-8", errors="replace")
                parsed.text_body = text[:TEXT_BODY_LIMIT]
            break
        # Collected after decoding: decoding adds what it finds (bad base64, say).
        for sub_part in message.walk():
            for defect in sub_part.defects:
                name = f"mime_{type(defect).__name__}"
                if name not in parsed.defects:
                    parsed.defects.append(name)
    except (
        MessageError,
        LookupError,
        UnicodeError,
        ValueError,
        AttributeError,
        TypeError,
        RecursionError,
    ):
        parsed.defects.append("undecodable_body")


def parse_message(raw: bytes) -> ParsedMessage:
    defects: list[str] = []
    head, body = _split_head(raw, defects)
    parsed = ParsedMessage(defects=defects, body_bytes=len(body))
    parsed.headers = _header_fields(head, defects)

    counts: dict[str, int] = {}
    for header in parsed.headers:
        counts[header.name.lower()] = counts.get(header.name.lower(), 0) + 1
    for name in SINGLE_USE:
        if counts.get(name, 0) > 1 and name != "from":
            defects.append(f"duplicate_header:{name}")

    _from_fields(parsed)
    subjects = parsed.header("Subject")
    if subjects:
        parsed.subject = decoded_text(subjects[0], "subject", defects)
    for attr, name in (("message_id", "Message-ID"), ("date", "Date"), ("to", "To")):
        values = parsed.header(name)
        if values:
            setattr(parsed, attr, values[0])
    content_types = parsed.header("Content-Type")
    if content_types:
        parsed.content_type = content_types[0]
    _text_body(raw, parsed)
    return parsed
