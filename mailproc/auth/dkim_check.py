"""DKIM: every signature (up to a cap) verified with dkimpy and judged on its own.

A signature counts only if it verifies, its d= aligns with the From domain, ``from`` is among
its signed headers, ``l=`` is absent or covers the whole body, its algorithm is rsa-sha256 or
ed25519-sha256, an RSA key has enough bits, the key record is not in testing mode (t=y), d= is
a valid host name that is not a public suffix, and x= has not passed."""

from __future__ import annotations

import hashlib
import logging
import re
from datetime import datetime
from typing import Any

import dkim
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

from mailproc.auth.alignment import aligned, canonical_domain, is_public_suffix
from mailproc.auth.dns import Resolver, TemporaryDNSError
from mailproc.auth.verdict import DkimEvidence

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")

# dkimpy logs every failed verification at ERROR; our evidence records them instead.
DKIMPY_LOG = logging.getLogger("mailproc.auth.dkimpy")
DKIMPY_LOG.addHandler(logging.NullHandler())
DKIMPY_LOG.propagate = False


def _text(value: bytes | None) -> str | None:
    return value.decode("ascii", errors="replace") if value is not None else None


def _number(value: bytes | None) -> int | None:
    """A numeric tag's value (l=, x=), or None if it is not one. RFC 6376 allows at most 76
    digits; the signer's text is never handed whole to int(), which refuses very long ones."""
    text = (value or b"").strip()
    if not text.isdigit() or len(text) > 76:
        return None
    return int(text)


def dns_function(resolver: Resolver) -> Any:
    """dkimpy's ``dnsfunc``: the key record text, or b"" when there is none."""

    def lookup(name: bytes | str, timeout: float = 5) -> bytes:
        text = name.decode("ascii", errors="replace") if isinstance(name, bytes) else name
        try:
            records = resolver.txt(text.rstrip("."))
        except TemporaryDNSError as exc:
            raise dkim.DnsTimeoutError(str(exc)) from None
        return records[0] if len(records) == 1 else b""

    return lookup


def _key_record_tags(resolver: Resolver, selector: str, domain: str) -> dict[bytes, bytes]:
    try:
        records = resolver.txt(f"{selector}._domainkey.{domain}")
        return parse_tag_value(records[0]) if len(records) == 1 else {}
    except (TemporaryDNSError, InvalidTagValueList):
        return {}


def _body_length(d: dkim.DKIM, tags: dict[bytes, bytes]) -> int | None:
    try:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError:
        return None
    return len(policy.canonicalize_body(d.body))


def _judge(
    evidence: DkimEvidence,
    tags: dict[bytes, bytes],
    key_tags: dict[bytes, bytes],
    full_body: int | None,
    min_rsa_bits: int,
    now: datetime,
) -> None:
    reasons = evidence.reasons
    if evidence.algorithm not in ALGORITHMS:
        reasons.append(f"algorithm {evidence.algorithm} not accepted")
    domain = canonical_domain(evidence.domain)
    if domain is None:
        reasons.append(f"d={evidence.domain} is not a valid host name")
    elif is_public_suffix(domain):
        reasons.append(f"d={domain} is a public suffix")
    if "from" not in evidence.signed_headers:
        reasons.append("From is not among the signed headers (h=)")
    if evidence.body_length is not None and (full_body is None or evidence.body_length < full_body):
        reasons.append(f"l={evidence.body_length} does not cover the whole body ({full_body})")
    if evidence.algorithm == "rsa-sha256" and (evidence.key_bits or 0) < min_rsa_bits:
        reasons.append(f"RSA key of {evidence.key_bits} bits is shorter than {min_rsa_bits}")
    flags = key_tags.get(b"t", b"").split(b":")
    if b"y" in [flag.strip() for flag in flags]:
        reasons.append("key record is in testing mode (t=y)")
    if b"x" in tags:
        expiry = _number(tags[b"x"])
        if expiry is None:
            reasons.append("x= is not a timestamp")
        elif expiry < now.timestamp():
            reasons.append("signature expired (x=)")


def check_dkim(
    raw: bytes,
    from_domain: str | None,
    mode: str,
    resolver: Resolver,
    max_signatures: int,
    min_rsa_bits: int,
    now: datetime,
) -> tuple[list[DkimEvidence], list[str]]:
    """Evidence for each signature, and reasons about the set (such as too many)."""
    try:
        d = dkim.DKIM(raw, logger=DKIMPY_LOG, minkey=min_rsa_bits)
    except (dkim.DKIMException, ValueError, IndexError) as exc:
        return [], [f"dkim: message cannot be read ({exc})"]
    signatures = [value for name, value in d.headers if name.lower() == b"dkim-signature"]
    notes = []
    if len(signatures) > max_signatures:
        notes.append(f"dkim: {len(signatures)} signatures, only the first {max_signatures} checked")
    full_body = None
    lookup = dns_function(resolver)
    results: list[DkimEvidence] = []
    for index, header in enumerate(signatures[:max_signatures]):
        try:
            tags = parse_tag_value(header)
        except InvalidTagValueList:
            tags = {}
        evidence = DkimEvidence(
            domain=_text(tags.get(b"d")),
            selector=_text(tags.get(b"s")),
            algorithm=_text(tags.get(b"a")),
            signed_headers=[
                h.strip().lower() for h in (_text(tags.get(b"h")) or "").split(":") if h.strip()
            ],
            body_length=_number(tags.get(b"l")),
            signature_hash=hashlib.sha256(re.sub(rb"\s+", b"", tags.get(b"b", b""))).hexdigest()
            if tags.get(b"b")
            else None,
        )
        results.append(evidence)
        if not tags:
            evidence.result = "permerror"
            evidence.reasons.append("signature header cannot be parsed")
            continue
        d.keysize = 0
        try:
            verified = bool(d.verify(idx=index, dnsfunc=lookup))
        except dkim.DKIMException as exc:
            verified = False
            evidence.reasons.append(f"dkimpy: {exc}")
        except Exception as exc:  # a check that breaks fails closed, with the reason
            verified = False
            evidence.reasons.append(f"dkim check error: {type(exc).__name__}: {exc}")
        evidence.key_bits = d.keysize or None
        key_tags = {}
        if evidence.selector and evidence.domain:
            key_tags = _key_record_tags(resolver, evidence.selector, evidence.domain)
        if evidence.body_length is not None and full_body is None:
            full_body = _body_length(d, tags)
        temp = [e for e in resolver.current_errors() if "_domainkey." in e]
        if verified:
            evidence.result = "pass"
        elif (
            temp
            and evidence.selector
            and any(f"{evidence.selector}._domainkey." in e for e in temp)
        ):
            evidence.result = "temperror"
            evidence.reasons.append("key lookup failed temporarily")
        else:
            evidence.result = "fail"
            if not evidence.reasons:
                evidence.reasons.append("signature does not verify")
        _judge(evidence, tags, key_tags, full_body, min_rsa_bits, now)
        evidence.aligned = aligned(evidence.domain, from_domain, mode)
        if verified and not evidence.aligned:
            evidence.reasons.append(f"d={evidence.domain} does not align with the From domain")
        evidence.counts = verified and evidence.aligned and not evidence.reasons
    return results, notes
