"""Email address syntax and the one normalisation used wherever two addresses are compared.

The written rule: the domain is lowercased and converted to IDNA A-labels; an ASCII local
part is compared case-insensitively (so it is lowercased); a non-ASCII local part is put in
Unicode NFC and otherwise kept. No plus-tag or dot stripping: ``a.b+x@example.com`` and
``ab@example.com`` are different addresses.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import idna

# RFC 5322 dot-atom (atext), plus UTF-8 (RFC 6532) in the local part.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
# Controls, format characters (bidi overrides, zero-width), separators, surrogates, private use
# and unassigned code points: nothing a person could read back from a screen.
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})


class AddressError(ValueError):
    """An address that is not a plain ``local@domain`` mailbox we can compare."""


@lru_cache(maxsize=4096)
def normalize_domain(domain: str) -> str:
    """Lowercase A-label form of a hostname; raises AddressError if it is not one."""
    if not domain or _CONTROL.search(domain):
        raise AddressError(f"invalid domain {domain!r}")
    try:
        ascii_domain = idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise AddressError(f"invalid domain {domain!r}: {exc}") from None
    ascii_domain = ascii_domain.lower()
    labels = ascii_domain.split(".")
    if len(ascii_domain) > 253 or len(labels) < 2:
        raise AddressError(f"invalid domain {domain!r}: needs at least two labels")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise AddressError(f"invalid domain {domain!r}: bad label {label!r}")
    return ascii_domain


def normalize_address(address: str) -> str:
    """The comparable form of ``local@domain``; raises AddressError for anything else."""
    if _CONTROL.search(address):
        raise AddressError(f"invalid address {address!r}: whitespace or control character")
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        raise AddressError(f"invalid address {address!r}: not valid UTF-8") from None
    local, sep, domain = address.rpartition("@")
    if not sep or not local:
        raise AddressError(f"invalid address {address!r}: expected local@domain")
    if not _DOT_ATOM.fullmatch(local) or len(local.encode("utf-8")) > 64:
        raise AddressError(f"invalid address {address!r}: bad local part")
    if not local.isascii() and any(
        unicodedata.category(char) in _INVISIBLE for char in local if ord(char) > 0x7F
    ):
        raise AddressError(f"invalid address {address!r}: invisible or control character")
    local = local.lower() if local.isascii() else unicodedata.normalize("NFC", local)
    return f"{local}@{normalize_domain(domain)}"
