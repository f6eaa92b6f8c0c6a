"""The one author of a message: the single mailbox of its single From header, parsed strictly.

Anything that lets two readers see two different authors is refused with a reason: several
From headers or mailboxes, groups, route addresses, comments, quoted local parts, encoded
words outside the display name, a display name that shows another address, and header-level
damage (duplicated single-use headers, whitespace before a colon, folded field names, control
characters, bare line ends). Two parsers must agree on the address: ours and the email
package's."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.errors import HeaderParseError

from mailproc.addresses import AddressError, normalize_address
from mailproc.message import FROM_HEADER_CLASS, ParsedMessage, decoded_text

# Parse defects that make the header block ambiguous; MIME body defects are DKIM's business.
FATAL_DEFECT_PREFIXES = (
    "no_headers",
    "no_header_body_separator",
    "continuation_before_first_header",
    "whitespace_before_colon",
    "malformed_header_line",
    "control_character_in_header",
    "invalid_utf8_in_header",
    "duplicate_header",
    "no_from_header",
    "multiple_from_headers",
    "header_too_long:from",
)
FATAL_WIRE_FLAGS = ("nul_byte", "bare_lf", "bare_cr", "smuggling_sequence")

_ADDRESS_IN_TEXT = re.compile(r"[^\s<>\"'(),;:]+@[^\s<>\"'(),;:]+")


@dataclass
class Author:
    address: str | None = None
    domain: str | None = None
    display_name: str | None = None
    reasons: list[str] = field(default_factory=list)


def _outside_quotes(value: str) -> str:
    """The value with the contents of quoted strings blanked out, positions kept."""
    out: list[str] = []
    in_quote = False
    escaped = False
    for char in value:
        if in_quote:
            if escaped:
                escaped = False
                out.append(" ")
            elif char == "\\":
                escaped = True
                out.append(" ")
            elif char == '"':
                in_quote = False
                out.append('"')
            else:
                out.append(" ")
        else:
            in_quote = char == '"'
            out.append(char)
    if in_quote:
        raise ValueError("unterminated quoted string")
    return "".join(out)


def _parse_from_value(value: str, reasons: list[str]) -> tuple[str, str] | None:
    """(display name, addr-spec) of a single-mailbox From value, or None with reasons."""
    try:
        bare = _outside_quotes(value)
    except ValueError:
        reasons.append("from_unterminated_quote")
        return None
    if "(" in bare or ")" in bare:
        reasons.append("from_comment")
    if ";" in bare or ":" in bare:
        reasons.append("from_group_or_route_syntax")
    if "," in bare:
        reasons.append("from_multiple_mailboxes")
    if bare.count("<") > 1 or bare.count(">") > 1:
        reasons.append("from_multiple_angle_addresses")
    if reasons:
        return None
    if "<" in bare or ">" in bare:
        start, end = bare.find("<"), bare.find(">")
        if start < 0 or end < start or bare[end + 1 :].strip():
            reasons.append("from_malformed_angle_address")
            return None
        display = value[:start].strip()
        addr_spec = value[start + 1 : end].strip()
    else:
        display, addr_spec = "", value.strip()
    if '"' in addr_spec:
        reasons.append("from_quoted_local_part")
        return None
    if "=?" in addr_spec:
        reasons.append("from_encoded_word_in_address")
        return None
    if addr_spec.startswith("@"):
        reasons.append("from_route_address")
        return None
    return display, addr_spec


def _display_name(display: str, reasons: list[str]) -> str:
    if display.startswith('"') and display.endswith('"') and len(display) >= 2:
        display = display[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    decoded = decoded_text(display, "from", reasons) if "=?" in display else display
    return decoded.strip()


def _email_package_addresses(parsed: ParsedMessage, value: str) -> list[str] | None:
    if parsed.from_parsed and parsed.from_header == value:
        return parsed.from_addresses  # read by the email package in parse_message already
    try:
        header = FROM_HEADER_CLASS("From", value)
    except (HeaderParseError, IndexError, ValueError, TypeError, AttributeError, RecursionError):
        return None
    return [a.addr_spec for a in getattr(header, "addresses", ())]


def identify_author(parsed: ParsedMessage, wire_flags: list[str]) -> Author:
    author = Author()
    reasons = author.reasons
    for flag in wire_flags:
        if flag in FATAL_WIRE_FLAGS:
            reasons.append(f"wire_{flag}")
    for defect in parsed.defects:
        if defect.startswith(FATAL_DEFECT_PREFIXES):
            reasons.append(f"header_{defect}")
    values = parsed.header("From")
    if len(values) != 1:
        return author
    value = values[0]
    parsed_value = _parse_from_value(value, reasons)
    if parsed_value is None:
        return author
    display, addr_spec = parsed_value
    try:
        address = normalize_address(addr_spec)
    except AddressError:
        reasons.append("from_invalid_address")
        return author
    name = _display_name(display, reasons)
    for shown in _ADDRESS_IN_TEXT.findall(name):
        try:
            if normalize_address(shown.strip(".")) != address:
                reasons.append("from_display_name_shows_another_address")
                break
        except AddressError:
            reasons.append("from_display_name_shows_another_address")
            break
    others = _email_package_addresses(parsed, value)
    if others is None or len(others) != 1 or others[0].lower() != addr_spec.lower():
        reasons.append("from_parsers_disagree")
        return author
    author.address = address
    author.domain = address.rpartition("@")[2]
    author.display_name = name or None
    return author
