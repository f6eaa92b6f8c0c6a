"""From verdict to action: the account directory, the rules, and what a decision does (a reset
request, a reply, a notice to the owner, a forward), all written in the transaction that
records the message's result.

The lookups and the rules run before that transaction (the directory is another database, and
may be slow). Inside it, the replay check may find that the message was seen before: such a
message is recorded and never acted on, whatever its decision was."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, func, select

from mailproc.accounts import (
    Directory,
    DirectoryError,
    Lookalike,
    Lookup,
    directory_from_settings,
)
from mailproc.auth import Verdict
from mailproc.config import Settings
from mailproc.db import Database
from mailproc.links import cancel_url, signing_key
from mailproc.models import Base, OutboxState
from mailproc.outbox import Outbox, Source
from mailproc.requests import audit, open_or_join, record_sighting, risk_flags
from mailproc.rules import Decision, Facts, RuleSet

log = logging.getLogger(__name__)

_OUTBOX = Base.metadata.tables["outbox"]
# Notices of unverified mail written to an owner lately (built once: the worker's hot path).
_NOTICES_SINCE = (
    select(func.count())
    .select_from(_OUTBOX)
    .where(
        _OUTBOX.c.recipient == bindparam("recipient"),
        _OUTBOX.c.template == "unverified_notice",
        _OUTBOX.c.state != OutboxState.SUPPRESSED,
        _OUTBOX.c.created_at > bindparam("since"),
    )
)


@dataclass(frozen=True)
class Evaluation:
    """What the rules saw and decided for one message, before its transaction."""

    facts: Facts
    decision: Decision
    author: Lookup | None  # the authenticated author address
    claimed: Lookup | None  # the From address, authenticated or not
    lookalike: Lookalike | None


class Pipeline:
    def __init__(
        self, settings: Settings, directory: Directory, rules: RuleSet, outbox: Outbox
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.rules = rules
        self.outbox = outbox
        self.shadow = settings.mode.shadow
        self.helpdesk = settings.rules.helpdesk_address
        self.expire_after = timedelta(days=settings.queue.expire_after_days)
        self.owner_notices_per_day = settings.queue.owner_notices_per_day
        # Signs the owner's cancel link in the acknowledgement (None: no console, no link).
        self.link_key: bytes | None = None

    @classmethod
    def from_settings(cls, settings: Settings, database: Database | None = None) -> Pipeline:
        pipeline = cls(
            settings,
            directory_from_settings(settings.accounts),
            RuleSet.from_settings(settings.rules),
            Outbox.from_settings(settings),
        )
        if database is not None and settings.web.listen is not None:
            pipeline.link_key = signing_key(settings, database)
        return pipeline

    # before the transaction -----------------------------------------------------------------

    def evaluate(
        self,
        verdict: Verdict,
        subject: str | None,
        text_body: str | None,
        recipients: tuple[str, ...],
        wire_flags: tuple[str, ...],
    ) -> Evaluation:
        """Look the addresses up and decide. Raises DirectoryError (temporary)."""
        claimed = author = None
        lookalike = None
        if verdict.from_address:
            claimed = self.directory.lookup(verdict.from_address)
            # Mail with wire-level irregularities (bare CR/LF, smuggling) never has an
            # authenticated author, whatever its signatures say.
            if verdict.authenticated and not wire_flags:
                author = claimed
            lookalike = self.directory.lookalike(verdict.from_address)
        facts = Facts(
            subject=subject,
            text_body=text_body,
            strength=verdict.strength,
            authenticated=verdict.authenticated,
            from_address=verdict.from_address,
            registered=author is not None and author.status == "registered",
            claims_registered=claimed is not None and claimed.status == "registered",
            recipients=recipients,
            wire_flags=wire_flags,
        )
        return Evaluation(facts, self.rules.decide(facts), author, claimed, lookalike)

    # in the transaction ------------------------------------------------------------------------

    def apply(
        self,
        connection: Connection,
        *,
        message_id: int,
        evaluation: Evaluation,
        verdict: Verdict,
        source: Source,
        now: datetime,
    ) -> dict[str, Any]:
        """Carry out the decision; returns the record stored with the message. The decision
        is also appended to the audit log."""
        record = self._apply(
            connection,
            message_id=message_id,
            evaluation=evaluation,
            verdict=verdict,
            source=source,
            now=now,
        )
        outcome = f" ({record['outcome']})" if record.get("outcome") else ""
        audit(
            connection,
            record.get("request_id"),
            action="message_decided",
            at=now,
            reason=f"rule {record['rule']}: {record['action']}{outcome}",
            details={"strength": verdict.strength.value, "author": verdict.from_address},
            message_id=message_id,
        )
        return record

    def _apply(
        self,
        connection: Connection,
        *,
        message_id: int,
        evaluation: Evaluation,
        verdict: Verdict,
        source: Source,
        now: datetime,
    ) -> dict[str, Any]:
        if any(reason.startswith("replay:") for reason in verdict.reasons):
            # Seen before: a duplicate delivery or a replay. Either way, never acted on again.
            return self._record(evaluation, "ignore", outcome="replay of an earlier message")
        if evaluation.lookalike is not None and evaluation.lookalike.resembles:
            record_sighting(
                connection,
                address=evaluation.lookalike.address,
                resembles=evaluation.lookalike.resembles,
                message_id=message_id,
                now=now,
            )
        decision = evaluation.decision
        if self.shadow:
            return self._record(evaluation, decision.action, outcome="shadow mode: nothing done")
        action = decision.action
        if action == "queue_reset":
            return self._queue_reset(connection, message_id, evaluation, verdict, source, now)
        if action == "notify_owner":
            return self._notify_owner(connection, evaluation, source, now)
        if action == "reply":
            return self._reply(connection, evaluation, source, now)
        if action == "forward":
            return self._forward(connection, message_id, evaluation, source, now)
        return self._record(evaluation, "ignore", outcome="ignored")

    def _queue_reset(
        self,
        connection: Connection,
        message_id: int,
        evaluation: Evaluation,
        verdict: Verdict,
        source: Source,
        now: datetime,
    ) -> dict[str, Any]:
        lookup = evaluation.author
        account = lookup.account if lookup is not None else None
        if account is None or not verdict.authenticated:
            # A rule file asked for a request without a registered, authenticated author.
            return self._record(
                evaluation, "ignore", outcome="no request: the author is not a registered account"
            )
        record = self._record(evaluation, "queue_reset")
        flags = risk_flags(connection, account, verdict.strength.value, now)
        if evaluation.lookalike is not None:
            flags.append("lookalike_sender")
        opened = open_or_join(
            connection,
            account=account,
            message_id=message_id,
            verdict=verdict.to_dict(),
            decision=record,
            strength=verdict.strength.value,
            flags=flags,
            now=now,
            expire_after=self.expire_after,
        )
        queued = self.outbox.reply(
            connection,
            template=evaluation.decision.template or "request_received",
            to=account.email,
            locale=account.locale,
            context={
                "reference": opened.reference,
                "expire_days": round(self.expire_after / timedelta(days=1)),
                "cancel_url": (
                    cancel_url(
                        self.settings.web.base_url,
                        self.link_key,
                        opened.request_id,
                        opened.expires_at,
                    )
                    if self.link_key is not None
                    else None
                ),
                "original_subject": evaluation.facts.subject or "",
            },
            source=source,
        )
        return record | {
            "outcome": "joined the open request" if opened.joined else "request opened",
            "request_id": opened.request_id,
            "reference": opened.reference,
            "reply": queued.outbox_id,
            "reply_state": queued.state.value,
        }

    def _notify_owner(
        self, connection: Connection, evaluation: Evaluation, source: Source, now: datetime
    ) -> dict[str, Any]:
        claimed = evaluation.claimed
        account = claimed.account if claimed is not None else None
        if account is None:
            return self._record(evaluation, "ignore", outcome="no registered owner to notify")
        sent = connection.execute(
            _NOTICES_SINCE, {"recipient": account.email, "since": now - timedelta(days=1)}
        ).scalar_one()
        record = self._record(evaluation, "notify_owner")
        if sent >= self.owner_notices_per_day:
            return record | {"outcome": "owner already notified today: no further notice"}
        # Written to the registered owner, so no threading to the forged message: its
        # Message-ID is the forger's. Loop rules still apply to what was received.
        queued = self.outbox.reply(
            connection,
            template=evaluation.decision.template or "unverified_notice",
            to=account.email,
            locale=account.locale,
            context={"claimed_from": evaluation.facts.from_address or ""},
            source=replace(source, headers=_without_threading(source)),
        )
        return record | {
            "outcome": "owner notified",
            "reply": queued.outbox_id,
            "reply_state": queued.state.value,
        }

    def _reply(
        self, connection: Connection, evaluation: Evaluation, source: Source, now: datetime
    ) -> dict[str, Any]:
        facts = evaluation.facts
        if not facts.authenticated or facts.wire_flags or not facts.from_address:
            # Replies go only to an authenticated address: never to a forged one.
            return self._record(
                evaluation, "ignore", outcome="no reply: the sender is not authenticated"
            )
        template = evaluation.decision.template or "password_help"
        context: dict[str, Any] = {"original_subject": facts.subject or ""}
        if template == "use_registered_address":
            context["sender"] = facts.from_address
        queued = self.outbox.reply(
            connection, template=template, to=facts.from_address, context=context, source=source
        )
        return self._record(evaluation, "reply") | {
            "outcome": "replied",
            "reply": queued.outbox_id,
            "reply_state": queued.state.value,
        }

    def _forward(
        self,
        connection: Connection,
        message_id: int,
        evaluation: Evaluation,
        source: Source,
        now: datetime,
    ) -> dict[str, Any]:
        if not self.helpdesk:
            return self._record(
                evaluation, "forward", outcome="tap mode: the helpdesk has its own copy"
            )
        outbox_id = self.outbox.forward(
            connection, message_id=message_id, to=self.helpdesk, now=now
        )
        return self._record(evaluation, "forward") | {
            "outcome": f"forwarded to {self.helpdesk}",
            "forward": outbox_id,
        }

    def record(self, evaluation: Evaluation) -> dict[str, Any]:
        """The decision as stored with a message, before anything is carried out."""
        return self._record(evaluation, evaluation.decision.action)

    @staticmethod
    def _record(evaluation: Evaluation, action: str, outcome: str | None = None) -> dict[str, Any]:
        record: dict[str, Any] = {
            "rule": evaluation.decision.rule.name,
            "rule_action": evaluation.decision.action,
            "action": action,
            "trace": evaluation.decision.trace,
            "author": _lookup_dict(evaluation.author),
            "claimed": _lookup_dict(evaluation.claimed),
        }
        if evaluation.lookalike is not None:
            record["lookalike"] = {
                "address": evaluation.lookalike.address,
                "reasons": list(evaluation.lookalike.reasons),
                "resembles": evaluation.lookalike.resembles,
            }
        if outcome is not None:
            record["outcome"] = outcome
        return record


def _lookup_dict(lookup: Lookup | None) -> dict[str, Any] | None:
    if lookup is None:
        return None
    return {
        "address": lookup.address,
        "status": lookup.status,
        "account_ids": [account.id for account in lookup.accounts],
    }


def _without_threading(source: Source) -> Any:
    headers = source.headers
    copy = type(headers)()
    for name, value in headers.items():
        if name.lower() not in ("message-id", "references", "in-reply-to"):
            copy[name] = value
    return copy


def check_directory(settings: Settings) -> None:
    """At start: a misconfigured directory stops us (DirectorySetupError); one that is not
    configured or not reachable yet is only worth a warning."""
    directory = directory_from_settings(settings.accounts)
    try:
        if not directory.configured:
            log.warning(
                "no account directory configured ([accounts] url or csv_file): no address is "
                "registered, so no reset request will be queued"
            )
            return
        directory.check()
    except DirectoryError as exc:
        log.warning("account directory not reachable at start (%s); messages wait for it", exc)
    finally:
        directory.close()
