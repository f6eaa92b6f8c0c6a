"""Upstream Authentication-Results (RFC 8601), parsed with authres.

Only a header whose authserv-id is one of ours (``[auth] trusted_authserv_ids``) is believed,
and only the topmost such header: anything below it was there before our border MTA saw the
message. Its domains are aligned again here. Every other Authentication-Results header is
attacker-controlled text and recorded as ignored."""

from __future__ import annotations

import authres

from mailproc.auth.alignment import aligned
from mailproc.auth.verdict import UpstreamEvidence


def _property(result: authres.core.AuthenticationResult, ptype: str, name: str) -> str | None:
    for prop in result.properties:
        if prop.type == ptype and prop.name == name:
            return str(prop.value)
    return None


def aligned_passes(
    header: authres.AuthenticationResultsHeader, from_domain: str | None, mode: str
) -> tuple[bool, bool]:
    """Whether the header reports a DKIM pass, and an SPF pass, aligned with the From domain."""
    dkim_pass = spf_pass = False
    for result in header.results:
        if result.result != "pass":
            continue
        if result.method == "dkim" and aligned(_property(result, "header", "d"), from_domain, mode):
            dkim_pass = True
        if result.method == "spf":
            mailfrom = _property(result, "smtp", "mailfrom") or ""
            if aligned(mailfrom.rpartition("@")[2], from_domain, mode):
                spf_pass = True
    return dkim_pass, spf_pass


def check_upstream(
    headers: list[tuple[str, str]], trusted_ids: tuple[str, ...], from_domain: str | None, mode: str
) -> tuple[list[UpstreamEvidence], bool, bool]:
    """Evidence per header, and whether a trusted header shows an aligned DKIM pass (strong)
    or an aligned SPF pass (weak)."""
    evidence: list[UpstreamEvidence] = []
    dkim_pass = spf_pass = False
    seen_trusted = False
    for name, value in headers:
        if name.lower() != "authentication-results":
            continue
        try:
            header = authres.AuthenticationResultsHeader.parse_value(value)
        except Exception as exc:  # authres raises many kinds; unparseable is simply untrusted
            evidence.append(UpstreamEvidence("", False, reason=f"unparseable: {exc}"))
            continue
        authserv_id = str(header.authserv_id or "").lower()
        results = [
            {"method": str(r.method), "result": str(r.result)}
            | {f"{p.type}.{p.name}": str(p.value) for p in r.properties}
            for r in header.results
        ]
        if authserv_id not in trusted_ids:
            evidence.append(
                UpstreamEvidence(authserv_id, False, results, "authserv-id is not trusted")
            )
            continue
        if seen_trusted:
            evidence.append(
                UpstreamEvidence(authserv_id, False, results, "below the topmost trusted header")
            )
            continue
        seen_trusted = True
        evidence.append(UpstreamEvidence(authserv_id, True, results, "topmost trusted header"))
        dkim_pass, spf_pass = aligned_passes(header, from_domain, mode)
    return evidence, dkim_pass, spf_pass
