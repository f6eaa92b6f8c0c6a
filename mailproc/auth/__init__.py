"""Sender authentication: one fail-closed, explained ``Verdict`` on who wrote a message.

``strong`` needs an aligned DKIM pass (ours, or from the topmost trusted upstream
Authentication-Results); ``weak`` is an aligned SPF pass or a trusted ARC chain; anything that
makes the author ambiguous, a stale or future Date, or a check that broke, leaves the message
not authenticated with the reason recorded. DNS trouble that could change the outcome makes the
verdict temporary: the caller keeps the message and asks again later."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime

from dkim.util import InvalidTagValueList, parse_tag_value

from mailproc.auth.alignment import organizational_domain
from mailproc.auth.arc_check import check_arc
from mailproc.auth.author import identify_author
from mailproc.auth.dkim_check import check_dkim
from mailproc.auth.dns import Resolver, TemporaryDNSError
from mailproc.auth.spf_check import check_spf
from mailproc.auth.upstream import check_upstream
from mailproc.auth.verdict import Strength, Verdict
from mailproc.config import AuthSettings, DnsSettings
from mailproc.intake import wire_flags
from mailproc.message import ParsedMessage, parse_message

__all__ = ["Authenticator", "Envelope", "Strength", "Verdict"]

log = logging.getLogger(__name__)

SETTLED_REASONS = ("wire_", "header_", "from_", "date_", "no single From")


@dataclass(frozen=True)
class Envelope:
    """What the SMTP session told us: the real client and the MAIL FROM identity."""

    client_ip: str | None
    mail_from: str
    helo: str | None


class Authenticator:
    def __init__(self, auth: AuthSettings, dns_settings: DnsSettings) -> None:
        self.settings = auth
        self.dns_timeout = dns_settings.timeout_seconds
        self.resolver = Resolver(dns_settings)

    def evaluate(
        self,
        raw: bytes,
        envelope: Envelope,
        now: datetime,
        parsed: ParsedMessage | None = None,
    ) -> Verdict:
        parsed = parsed if parsed is not None else parse_message(raw)
        with self.resolver.tracking() as temporary:
            verdict = self._evaluate(raw, parsed, envelope, now)
        # DNS cannot rescue a message refused for its form, nor spoil a strong pass.
        settled = verdict.strength == Strength.STRONG or any(
            r.startswith(SETTLED_REASONS) for r in verdict.reasons
        )
        if temporary and not settled:
            verdict.temporary_errors = list(temporary)
            verdict.reasons.append("dns: temporary failure; to be evaluated again")
        return verdict

    def _evaluate(
        self, raw: bytes, parsed: ParsedMessage, envelope: Envelope, now: datetime
    ) -> Verdict:
        mode = self.settings.alignment
        author = identify_author(parsed, wire_flags(raw))
        reasons = list(author.reasons)
        domain = author.domain
        verdict = Verdict(
            authenticated=False,
            strength=Strength.NONE,
            from_address=author.address,
            from_domain=domain,
            alignment=mode,
            message_id=parsed.message_id,
            organizational_domain=organizational_domain(domain) if domain else None,
        )
        if author.address is None and not reasons:
            reasons.append("no single From mailbox")
        reasons.extend(self._date_reasons(parsed, now))

        verdict.dkim, notes = check_dkim(
            raw,
            domain,
            mode,
            self.resolver,
            self.settings.max_signatures,
            self.settings.min_rsa_bits,
            now,
        )
        reasons.extend(notes)
        verdict.spf = check_spf(
            envelope.client_ip,
            envelope.mail_from,
            envelope.helo,
            domain,
            mode,
            self.resolver,
            self.dns_timeout,
        )
        headers = [(h.name, h.value) for h in parsed.headers]
        verdict.upstream, upstream_dkim, upstream_spf = check_upstream(
            headers, self.settings.trusted_authserv_ids, domain, mode
        )
        verdict.arc, arc_vouches = check_arc(
            raw,
            headers,
            self.settings.trusted_arc_sealers,
            domain,
            mode,
            self.resolver,
            self.settings.min_rsa_bits,
        )
        verdict.dmarc = self._dmarc(domain)

        if any(d.counts for d in verdict.dkim) or upstream_dkim:
            strength = Strength.STRONG
        elif (verdict.spf and verdict.spf.aligned) or upstream_spf or arc_vouches:
            strength = Strength.WEAK
        else:
            strength = Strength.NONE
            reasons.append("no aligned DKIM pass, aligned SPF pass or trusted ARC chain")
        verdict.reasons = reasons
        if author.address is not None and not author.reasons and strength != Strength.NONE:
            fatal = [r for r in reasons if r.startswith(("date_", "dkim: message"))]
            if not fatal:
                verdict.authenticated = True
                verdict.strength = strength
        if not verdict.authenticated:
            verdict.strength = Strength.NONE
        return verdict

    def _date_reasons(self, parsed: ParsedMessage, now: datetime) -> list[str]:
        if parsed.date is None:
            return ["date_missing"]
        try:
            sent = parsedate_to_datetime(parsed.date)
        except (TypeError, ValueError, IndexError, OverflowError):  # OverflowError: a huge year
            return ["date_unparseable"]
        if sent.tzinfo is None:
            return ["date_without_timezone"]
        if sent < now - timedelta(hours=self.settings.max_age_hours):
            return [f"date_stale: sent {sent.isoformat()}, older than the replay window"]
        if sent > now + timedelta(minutes=self.settings.max_clock_skew_minutes):
            return [f"date_in_future: {sent.isoformat()}"]
        return []

    def _dmarc(self, domain: str | None) -> dict[str, str] | None:
        """The published DMARC record, for the agent's eyes only: it never changes the verdict."""
        if domain is None:
            return None
        candidates = [domain]
        org = organizational_domain(domain)
        if org and org != domain:
            candidates.append(org)
        for candidate in candidates:
            try:
                records = [
                    r for r in self.resolver.txt(f"_dmarc.{candidate}") if r.startswith(b"v=DMARC1")
                ]
            except TemporaryDNSError:
                return {"domain": candidate, "error": "temporary DNS failure"}
            if len(records) == 1:
                record = records[0].decode("ascii", errors="replace")
                try:
                    tags = parse_tag_value(records[0])
                    policy = tags.get(b"p", b"").decode("ascii", errors="replace")
                except InvalidTagValueList:
                    policy = ""
                return {"domain": candidate, "record": record, "policy": policy}
        return {"domain": domain, "record": "", "policy": ""}
