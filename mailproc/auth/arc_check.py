"""ARC (RFC 8617) with dkimpy: a chain counts only when it validates and its latest seal is by a
sealer in ``[auth] trusted_arc_sealers``, and then only for what that sealer's
ARC-Authentication-Results say, aligned again here. A self-sealed chain speaks for nobody."""

from __future__ import annotations

import re

import authres
import dkim

from mailproc.auth.alignment import canonical_domain
from mailproc.auth.dkim_check import DKIMPY_LOG, dns_function
from mailproc.auth.dns import Resolver
from mailproc.auth.upstream import aligned_passes
from mailproc.auth.verdict import ArcEvidence

_INSTANCE = re.compile(r"^\s*i\s*=\s*(\d+)\s*;", re.IGNORECASE)


def _sealer_says_pass(
    headers: list[tuple[str, str]], instance: int, from_domain: str | None, mode: str
) -> bool:
    for name, value in headers:
        if name.lower() != "arc-authentication-results":
            continue
        match = _INSTANCE.match(value)
        if match is None or int(match.group(1)) != instance:
            continue
        try:
            header = authres.AuthenticationResultsHeader.parse_value(value[match.end() :])
        except Exception:  # unparseable results vouch for nothing
            return False
        return any(aligned_passes(header, from_domain, mode))
    return False


def check_arc(
    raw: bytes,
    headers: list[tuple[str, str]],
    trusted_sealers: tuple[str, ...],
    from_domain: str | None,
    mode: str,
    resolver: Resolver,
    min_rsa_bits: int,
) -> tuple[ArcEvidence, bool]:
    """The chain's evidence, and whether it vouches (weakly) for the author."""
    if not any(name.lower() == "arc-seal" for name, _ in headers):
        return ArcEvidence(), False
    try:
        cv, results, comment = dkim.arc_verify(
            raw, logger=DKIMPY_LOG, dnsfunc=dns_function(resolver), minkey=min_rsa_bits
        )
    except Exception as exc:  # a check that breaks fails closed, with the reason
        return ArcEvidence(result="fail", reason=f"arc check error: {exc}"), False
    sealers = [(r.get("as-domain") or b"").decode("ascii", errors="replace") for r in results or []]
    evidence = ArcEvidence(
        result=(cv or b"fail").decode("ascii"), sealers=sealers, reason=str(comment)
    )
    if cv != dkim.CV_Pass or not results:
        return evidence, False
    latest = canonical_domain(sealers[0])
    if latest is None or latest not in trusted_sealers:
        evidence.reason = f"latest sealer {sealers[0]} is not trusted"
        return evidence, False
    evidence.trusted_sealer = latest
    instance = int(results[0].get("instance", 0))
    if not _sealer_says_pass(headers, instance, from_domain, mode):
        evidence.reason = f"trusted sealer {latest} reports no aligned pass"
        return evidence, False
    return evidence, True
