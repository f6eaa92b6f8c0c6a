"""SPF with pyspf: the MAIL FROM identity against the real client IP, through our resolver,
with RFC 7208's lookup and void-lookup limits (pyspf enforces both). A null or odd MAIL FROM is
``none``: we never fall back to checking the HELO name in its place."""

from __future__ import annotations

import threading
from typing import Any

import spf

from mailproc.addresses import AddressError, normalize_address
from mailproc.auth.alignment import aligned
from mailproc.auth.dns import Resolver, TemporaryDNSError
from mailproc.auth.verdict import SpfEvidence

_current = threading.local()


def _lookup(name: str, qtype: str, strict: bool = True, timeout: float = 30) -> list[Any]:
    """pyspf's DNS hook, answered by the resolver of the check running in this thread."""
    resolver: Resolver | None = getattr(_current, "resolver", None)
    if resolver is None:
        raise spf.TempError("DNS: no resolver for this check")
    try:
        records = resolver.query(name, qtype)
    except TemporaryDNSError as exc:
        raise spf.TempError(str(exc)) from None
    result: list[Any] = []
    for record in records:
        if qtype in ("A", "AAAA"):
            result.append(((name, qtype), record.address))
        elif qtype == "MX":
            result.append(((name, qtype), (record.preference, record.exchange)))
        elif qtype == "PTR":
            result.append(((name, qtype), record.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            result.append(((name, qtype), record.strings))
    return result


spf.DNSLookup = _lookup


def check_spf(
    client_ip: str | None,
    mail_from: str,
    helo: str | None,
    from_domain: str | None,
    mode: str,
    resolver: Resolver,
    timeout: float,
) -> SpfEvidence:
    evidence = SpfEvidence(identity=mail_from or None, domain=None, client_ip=client_ip, helo=helo)
    if not mail_from:
        evidence.explanation = "null reverse path: no MAIL FROM identity to check"
        return evidence
    try:
        identity = normalize_address(mail_from)
    except AddressError:
        evidence.explanation = "MAIL FROM is not a plain mailbox"
        return evidence
    evidence.domain = identity.rpartition("@")[2]
    if client_ip is None:
        evidence.explanation = "no client IP (a local submission, or not forwarded)"
        return evidence
    _current.resolver = resolver
    try:
        query = spf.query(
            i=client_ip, s=identity, h=helo or "unknown", timeout=timeout, querytime=timeout * 4
        )
        result, _code, explanation = query.check()
    except Exception as exc:  # a check that breaks fails closed, with the reason
        result, explanation = "permerror", f"spf check error: {type(exc).__name__}: {exc}"
    finally:
        _current.resolver = None
    evidence.result = str(result)
    evidence.explanation = str(explanation)
    evidence.aligned = evidence.result == "pass" and aligned(evidence.domain, from_domain, mode)
    return evidence
