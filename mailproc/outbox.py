"""Replies: composed from templates into the outbox in the caller's transaction, then delivered
through the relay by the sender, with retries, and never again once the relay accepted them.

What is never answered (RFC 3834 section 2 and the usual loop rules): mail with a null reverse
path or from a mailer-daemon or list robot, auto-submitted mail, bulk, junk and list mail,
delivery and read reports, mail that asks for no automatic replies, and mail from our own
addresses. Such a reply is still written to the outbox, as ``suppressed`` with the reason, so
what was not sent is on record; so is a reply over the per-recipient daily limit."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.headerregistry import Address, BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.message import Message as EmailHeaders
from email.parser import BytesHeaderParser
from email.policy import SMTP, SMTPUTF8, compat32
from email.utils import format_datetime, getaddresses, make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim
from sqlalchemy import Connection, Update, bindparam, func, insert, or_, select, text, update
from sqlalchemy.orm import Session, defer

from mailproc.addresses import normalize_address
from mailproc.config import ConfigError, Settings
from mailproc.db import Database
from mailproc.errors import InvalidState, NotFound
from mailproc.models import Base, Message, OutboxEntry, OutboxState, utcnow
from mailproc.rendering import Templates
from mailproc.requests import lock_audit_log

log = logging.getLogger(__name__)

# The outbox "template" of a forwarded message (delivered as received, never signed by us).
FORWARD = "forward"
# Headers a reply's DKIM signature covers (those present are signed).
SIGNED_HEADERS = (
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
    b"content-language",
    b"auto-submitted",
)
# A msg-id we are willing to echo in In-Reply-To/References (RFC 5322 section 3.6.4, printable
# ASCII only): anything else in the original's header is attacker text and is dropped.
_MSG_ID = re.compile(r"<[!-;=?-~]{1,244}@[!-;=?-~]{1,244}>")
_MAX_REFERENCES = 10
# Local parts of robots that must never get an automatic answer.
_ROBOTS = re.compile(
    r"^(mailer-daemon|postmaster|listserv|majordomo|owner-.*|.*-(request|bounces?|owner))$",
    re.IGNORECASE,
)
_PRECEDENCE = {"bulk", "junk", "list"}
_LIST_HEADERS = ("List-Id", "List-Unsubscribe", "List-Post", "List-Help", "List-Owner")


_OUTBOX = Base.metadata.tables["outbox"]
_INSERT_REPLY = insert(_OUTBOX).returning(_OUTBOX.c.id)
_LOCK_RECIPIENT = text("SELECT pg_advisory_xact_lock(hashtext(:key))")
_REPLIES_SINCE = (
    select(func.count())
    .select_from(_OUTBOX)
    .where(
        _OUTBOX.c.recipient == bindparam("recipient"),
        _OUTBOX.c.created_at > bindparam("since"),
        # IN spelled out: a constant list would be expanded anew at every execution.
        or_(
            *(
                _OUTBOX.c.state == state
                for state in (OutboxState.PENDING, OutboxState.SENDING, OutboxState.SENT)
            )
        ),
    )
)


def why_not_reply(
    headers: EmailHeaders, mail_from: str, own_addresses: Iterable[str]
) -> str | None:
    """The reason not to answer a message, or None when answering it is allowed."""
    if not mail_from:
        return "null reverse path (a bounce or another automatic message)"
    local = mail_from.rpartition("@")[0] or mail_from  # "MAILER-DAEMON" may come bare
    if _ROBOTS.match(local):
        return f"sender {mail_from} is a mail robot"
    own = {address.lower() for address in own_addresses}
    senders = {mail_from.lower()} | {
        address.lower()
        for _, address in getaddresses([str(v) for v in headers.get_all("From", [])])
    }
    if senders & own:
        return "from one of our own addresses (a loop)"
    auto = str(headers.get("Auto-Submitted", "")).strip().lower()
    if auto and auto.split(";")[0].strip() != "no":
        return f"Auto-Submitted: {auto}"
    precedence = str(headers.get("Precedence", "")).strip().lower()
    if precedence in _PRECEDENCE:
        return f"Precedence: {precedence}"
    for name in _LIST_HEADERS:
        if headers.get(name) is not None:
            return f"list mail ({name})"
    suppress = {
        part.strip().lower()
        for part in str(headers.get("X-Auto-Response-Suppress", "")).split(",")
        if part.strip()
    }
    if suppress & {"all", "autoreply", "oof"}:
        return "X-Auto-Response-Suppress asks for no automatic replies"
    content_type = str(headers.get("Content-Type", "")).strip().lower()
    if content_type.startswith("multipart/report"):
        return "a delivery or read report"
    return None


def _msg_ids(value: str | None) -> list[str]:
    return _MSG_ID.findall(value or "")


@dataclass(frozen=True)
class Source:
    """What a reply needs to know of the message it answers."""

    message_id: int | None
    mail_from: str
    headers: EmailHeaders

    @classmethod
    def of(cls, message: Message) -> Source:
        headers = BytesHeaderParser(policy=compat32).parsebytes(message.raw)
        return cls(message.id, message.mail_from, headers)

    def threading(self) -> tuple[str | None, str | None]:
        """In-Reply-To and References for a reply, from well-formed ids only."""
        own = _msg_ids(str(self.headers.get("Message-ID", "")))
        if not own:
            return None, None
        references = _msg_ids(str(self.headers.get("References", "")))
        chain = [*references, own[0]][-_MAX_REFERENCES:]
        return own[0], " ".join(chain)


@dataclass(frozen=True)
class Queued:
    outbox_id: int
    state: OutboxState
    reason: str | None


class Outbox:
    """Writes replies into the outbox, in the transaction of the change that caused them."""

    def __init__(self, settings: Settings, templates: Templates) -> None:
        self.settings = settings
        self.templates = templates
        self.from_address = settings.outbound.from_address
        self.own_addresses = {self.from_address, *settings.smtp.support_addresses}
        self.daily_limit = settings.outbound.replies_per_recipient_per_day

    @classmethod
    def from_settings(cls, settings: Settings) -> Outbox:
        return cls(settings, Templates.from_settings(settings.templates))

    def reply(
        self,
        session: Session | Connection,
        *,
        template: str,
        to: str,
        context: Mapping[str, Any],
        locale: str | None = None,
        source: Source | None = None,
    ) -> Queued:
        """Compose ``template`` for ``to`` and write it to the outbox (pending, or suppressed
        with the reason). ``to`` must be the registered or authenticated address; nothing of
        the message answered is copied but its Message-ID, for threading."""
        now = utcnow()
        recipient = normalize_address(to)
        reason = None
        if source is not None:
            reason = why_not_reply(source.headers, source.mail_from, self.own_addresses)
        if reason is None:
            reason = self._over_limit(session, recipient, now)
        rendered = self.templates.render(
            template,
            locale,
            {
                "original_subject": "",
                "received_at": now,
                **context,
                # Never the caller's: who we are and whom we write to.
                "support_address": self.from_address,
                "recipient": recipient,
            },
        )
        in_reply_to, references = source.threading() if source is not None else (None, None)
        content, message_id = compose(
            from_address=self.from_address,
            from_name=f"{self.templates.product_name} Support",
            to=recipient,
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            locale=rendered.locale,
            in_reply_to=in_reply_to,
            references=references,
            now=now,
        )
        state = OutboxState.PENDING if reason is None else OutboxState.SUPPRESSED
        outbox_id = session.execute(
            _INSERT_REPLY,
            {
                "state": state,
                "template": template,
                "locale": rendered.locale,
                "recipient": recipient,
                "subject": rendered.subject,
                "message_id_header": message_id,
                "content": content,
                "source_message_id": source.message_id if source is not None else None,
                "suppressed_reason": reason,
                "attempts": 0,
                "next_attempt_at": now if reason is None else None,
                "created_at": now,
                "updated_at": now,
            },
        ).scalar_one()
        if reason is None:
            log.info("reply %d (%s) to %s queued", outbox_id, template, recipient)
        else:
            log.info("reply %d (%s) to %s suppressed: %s", outbox_id, template, recipient, reason)
        return Queued(outbox_id, state, reason)

    def forward(
        self, session: Session | Connection, *, message_id: int, to: str, now: datetime
    ) -> int:
        """Queue the stored message, unchanged, for ``to`` (the helpdesk, in gateway mode),
        with Resent-* headers in front (RFC 5322 section 3.6.6). Neither the loop rules nor
        the rate limit apply: this is delivery, not an answer."""
        raw, subject = session.execute(
            select(Message.raw, Message.parsed).where(Message.id == message_id)
        ).one()
        resent_id = make_msgid(domain=self.from_address.rpartition("@")[2])
        head = (
            f"Resent-From: {self.from_address}\r\n"
            f"Resent-To: {to}\r\n"
            f"Resent-Date: {format_datetime(now)}\r\n"
            f"Resent-Message-ID: {resent_id}\r\n"
        ).encode("ascii")
        outbox_id: int = session.execute(
            insert(OutboxEntry)
            .values(
                state=OutboxState.PENDING,
                template=FORWARD,
                locale="",
                recipient=normalize_address(to),
                subject=str((subject or {}).get("subject") or "")[:500],
                message_id_header=resent_id.strip("<>"),
                content=head + raw,
                source_message_id=message_id,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
            .returning(OutboxEntry.id)
        ).scalar_one()
        log.info("message %d queued for forwarding to %s (%d)", message_id, to, outbox_id)
        return outbox_id

    def _over_limit(
        self, session: Session | Connection, recipient: str, now: datetime
    ) -> str | None:
        connection = session.connection() if isinstance(session, Session) else session
        if connection.dialect.name == "postgresql":
            # Serialise replies to one address across instances, so the count below holds. The
            # audit log's lock first: every transaction that writes a reply also writes audit
            # events, and taking the two in one order everywhere is what keeps two workers
            # from waiting on each other (a deadlock PostgreSQL would break by failing one).
            lock_audit_log(connection)
            connection.execute(_LOCK_RECIPIENT, {"key": f"mailproc-reply:{recipient}"})
        sent = session.execute(
            _REPLIES_SINCE, {"recipient": recipient, "since": now - timedelta(days=1)}
        ).scalar_one()
        if sent >= self.daily_limit:
            return f"rate limit: {sent} replies to this address in the last 24 hours"
        return None


class _Headers(HeaderRegistry):
    """The standard header factory, remembering what it made: the header class for each
    name (the stock one builds a new class on every call), and header objects for values
    seen recently (a reply's fixed headers: MIME-Version, Content-Type, Auto-Submitted, ...).
    Header objects are immutable, so a reply composed with these is the same, byte for
    byte, as one composed with the stock factory."""

    _MAX_VALUES = 512

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type[BaseHeader]] = {}
        self._values: dict[tuple[str, str], BaseHeader] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls

    def __call__(self, name: str, value: Any) -> BaseHeader:
        if type(value) is not str:
            return super().__call__(name, value)
        key = (name.lower(), value)
        header = self._values.get(key)
        if header is None:
            header = super().__call__(name, value)
            if len(self._values) >= self._MAX_VALUES:
                self._values.clear()
            self._values[key] = header
        return header


_HEADERS = _Headers()
_SMTP = SMTP.clone(header_factory=_HEADERS)
_SMTPUTF8 = SMTPUTF8.clone(header_factory=_HEADERS)


@functools.lru_cache(maxsize=16)
def _from_header(name: str, local: str, domain: str) -> BaseHeader:
    return _HEADERS("From", Address(display_name=name, username=local, domain=domain))


def compose(
    *,
    from_address: str,
    from_name: str,
    to: str,
    subject: str,
    text: str,
    html: str | None,
    locale: str,
    in_reply_to: str | None,
    references: str | None,
    now: datetime,
) -> tuple[bytes, str]:
    """A reply as RFC 5322 bytes (CRLF) and its Message-ID without angle brackets."""
    international = not (to.isascii() and from_address.isascii())
    policy = _SMTPUTF8 if international else _SMTP
    message = EmailMessage(policy=policy)
    from_local, _, from_domain = from_address.rpartition("@")
    message["From"] = _from_header(from_name, from_local, from_domain)
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = format_datetime(now)
    message_id = make_msgid(domain=from_domain)
    message["Message-ID"] = message_id
    if in_reply_to is not None:
        message["In-Reply-To"] = in_reply_to
        message["References"] = references or in_reply_to
    message["Auto-Submitted"] = "auto-replied"
    message["X-Auto-Response-Suppress"] = "All"
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    # After the body: making it multipart moves the Content-* headers set so far into a part.
    message["Content-Language"] = locale
    return message.as_bytes(policy=policy), message_id.strip("<>")


# -- delivery ------------------------------------------------------------------------------


class Signer:
    """DKIM signatures for replies, when ``[outbound] dkim_*`` are set."""

    def __init__(
        self,
        selector: str,
        domain: str,
        key_file: str,
        where: str = "[outbound] dkim_private_key_file",
    ) -> None:
        self.selector = selector.encode()
        self.domain = domain.encode()
        try:
            self.key = Path(key_file).read_bytes()
            # Fail at start on a key dkimpy cannot use, not at the first reply.
            dkim.sign(
                b"From: a@example.com\r\nSubject: x\r\n\r\nx\r\n",
                self.selector,
                self.domain,
                self.key,
                include_headers=[b"from"],
            )
        except (OSError, dkim.DKIMException, ValueError) as exc:
            raise ConfigError(f"{where}: cannot sign with {key_file!r}: {exc}") from None

    @classmethod
    def from_settings(cls, settings: Settings) -> Signer | None:
        outbound = settings.outbound
        if not outbound.dkim_selector:
            return None
        return cls(
            outbound.dkim_selector,
            outbound.dkim_domain,
            outbound.dkim_private_key_file,
            settings.where("outbound", "dkim_private_key_file"),
        )

    def sign(self, content: bytes) -> bytes:
        signature: bytes = dkim.sign(
            content, self.selector, self.domain, self.key, include_headers=list(SIGNED_HEADERS)
        )
        return signature + content


@dataclass(frozen=True)
class Delivery:
    outbox_id: int
    recipient: str
    content: bytes
    attempts: int
    template: str = ""


class TemporaryFailure(Exception):
    pass


class PermanentFailure(Exception):
    pass


class OutboxSender:
    """Delivers due outbox entries through the relay. Entries are claimed with a lease (``FOR
    UPDATE SKIP LOCKED`` on PostgreSQL), so several instances share the work and an entry held
    by a dead one is taken over when its lease runs out; the lease is longer than an attempt
    may take, so a live attempt is never doubled. Once the relay accepted an entry it is marked
    sent; only a crash between the relay's ``250`` and that mark can send it again, with the
    same Message-ID."""

    def __init__(self, settings: Settings, database: Database, worker_id: str) -> None:
        self.settings = settings
        self.outbound = settings.outbound
        self.db = database
        self.worker_id = worker_id
        self.signer = Signer.from_settings(settings)
        self.lease = timedelta(seconds=self.outbound.lease_seconds)

    # database side (blocking; run on a thread) --------------------------------------------

    def claim_due(self, limit: int = 20) -> list[Delivery]:
        now = utcnow()
        due = (
            select(OutboxEntry.id)
            .where(
                ((OutboxEntry.state == OutboxState.PENDING) & (OutboxEntry.next_attempt_at <= now))
                | (
                    (OutboxEntry.state == OutboxState.SENDING)
                    & (OutboxEntry.lease_expires_at < now)
                )
            )
            .order_by(OutboxEntry.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        with self.db.writing() as session:
            ids = list(session.scalars(due))
            if not ids:
                return []
            rows = session.execute(
                update(OutboxEntry)
                .where(OutboxEntry.id.in_(ids))
                .values(
                    state=OutboxState.SENDING,
                    claimed_by=self.worker_id,
                    lease_expires_at=now + self.lease,
                    attempts=OutboxEntry.attempts + 1,
                    updated_at=now,
                )
                .returning(
                    OutboxEntry.id,
                    OutboxEntry.recipient,
                    OutboxEntry.content,
                    OutboxEntry.attempts,
                    OutboxEntry.template,
                )
            ).all()
        return sorted(
            (
                Delivery(row.id, row.recipient, row.content, row.attempts, row.template)
                for row in rows
            ),
            key=lambda delivery: delivery.outbox_id,
        )

    def _held(self, delivery: Delivery) -> Update:
        """An UPDATE of the entry that matches only while this sender's claim holds."""
        return update(OutboxEntry).where(
            OutboxEntry.id == delivery.outbox_id,
            OutboxEntry.state == OutboxState.SENDING,
            OutboxEntry.claimed_by == self.worker_id,
            OutboxEntry.attempts == delivery.attempts,
        )

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Give back claimed entries not attempted (on stop), due again at once."""
        now = utcnow()
        with self.db.writing() as session:
            for delivery in deliveries:
                session.execute(
                    self._held(delivery).values(
                        state=OutboxState.PENDING,
                        attempts=OutboxEntry.attempts - 1,
                        claimed_by=None,
                        lease_expires_at=None,
                        updated_at=now,
                    )
                )

    def record(self, delivery: Delivery, outcome: Exception | str) -> OutboxState | None:
        """Write what happened to one attempt: sent (``outcome`` is the relay's reply), or a
        failure, retried later or given up. None if the claim was lost meanwhile."""
        now = utcnow()
        values: dict[str, Any] = {"claimed_by": None, "lease_expires_at": None, "updated_at": now}
        if isinstance(outcome, str):
            values |= {"state": OutboxState.SENT, "sent_at": now, "relay_reply": outcome}
        elif (
            isinstance(outcome, TemporaryFailure) and delivery.attempts < self.outbound.max_attempts
        ):
            delay = min(
                self.outbound.retry_max_seconds,
                self.outbound.retry_base_seconds * 2 ** (delivery.attempts - 1),
            )
            values |= {
                "state": OutboxState.PENDING,
                "next_attempt_at": now + timedelta(seconds=delay),
                "last_error": str(outcome),
            }
        else:
            error = str(outcome)
            if isinstance(outcome, TemporaryFailure):
                error = f"gave up after {delivery.attempts} attempts: {error}"
            values |= {"state": OutboxState.FAILED, "last_error": error, "next_attempt_at": None}
        with self.db.writing() as session:
            result = session.execute(self._held(delivery).values(**values))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                log.warning(
                    "reply %d: claim lost before its outcome was recorded", delivery.outbox_id
                )
                return None
        state = OutboxState(values["state"])
        if state == OutboxState.SENT:
            log.info("reply %d sent to %s: %s", delivery.outbox_id, delivery.recipient, outcome)
        elif state == OutboxState.PENDING:
            log.warning(
                "reply %d to %s: %s; retrying at %s",
                delivery.outbox_id,
                delivery.recipient,
                outcome,
                values["next_attempt_at"].isoformat(timespec="seconds"),
            )
        else:
            log.error(
                "reply %d to %s failed: %s",
                delivery.outbox_id,
                delivery.recipient,
                values["last_error"],
            )
        return state

    # relay side ---------------------------------------------------------------------------

    async def deliver(
        self,
        delivery: Delivery,
        accepted: Callable[[str], Awaitable[None]] | None = None,
    ) -> str:
        """One attempt; returns the relay's reply to the message, or raises Temporary- or
        PermanentFailure. ``accepted`` is awaited with that reply as soon as the relay has
        taken the message, before the session is closed: the sooner the mark is written,
        the smaller the window in which a crash sends the reply again. Once the relay has
        taken it, a failure to close the session is no longer a failure of the delivery."""
        content = delivery.content
        if self.signer is not None and delivery.template != FORWARD:
            content = await asyncio.to_thread(self.signer.sign, content)
        relay = self.outbound.relay
        client = aiosmtplib.SMTP(
            hostname=relay.host,
            port=relay.port,
            username=self.outbound.username or None,
            password=self.outbound.password or None,
            start_tls=self.outbound.starttls,
            timeout=self.outbound.timeout_seconds,
        )
        try:
            await client.connect()
            # RFC 3834 section 3.3: automatic responses go out with a null reverse path, so
            # a failure to deliver one never produces a bounce to answer in turn.
            errors, reply = await client.sendmail("", [delivery.recipient], content)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            client.close()
            refused = exc.recipients[0]
            raise _classified(refused.code, refused.message) from None
        except aiosmtplib.SMTPResponseException as exc:
            client.close()
            raise _classified(exc.code, exc.message) from None
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
            client.close()
            raise TemporaryFailure(f"relay {relay}: {exc or type(exc).__name__}") from None
        try:
            if errors:  # a recipient refused while others were accepted: we only have one
                code, message = next(iter(errors.values()))
                raise _classified(code, message)
            if accepted is not None:
                await accepted(reply)
        finally:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError, ssl.SSLError, TimeoutError):
                client.close()
        return reply

    async def run_once(self, stop: Callable[[], bool] = lambda: False) -> int:
        """Deliver everything due now, until ``stop()`` turns true (the claims not begun are
        given back); returns how many attempts were made. An attempt starts only while at
        least half the batch's lease is left, so that no claim runs out under a slow relay
        and another instance sends the same reply: the rest is given back and claimed anew."""
        attempts = 0
        while not stop():
            deliveries = await asyncio.to_thread(self.claim_due)
            if not deliveries:
                break
            start_by = time.monotonic() + self.lease.total_seconds() / 2
            for index, delivery in enumerate(deliveries):
                if stop() or time.monotonic() > start_by:
                    await asyncio.to_thread(self.release, deliveries[index:])
                    break
                recorded = False

                async def mark_sent(reply: str, delivery: Delivery = delivery) -> None:
                    nonlocal recorded
                    await asyncio.to_thread(self.record, delivery, reply)
                    recorded = True

                outcome: Exception | str
                try:
                    outcome = await self.deliver(delivery, mark_sent)
                except (TemporaryFailure, PermanentFailure) as exc:
                    outcome = exc
                if not recorded:
                    await asyncio.to_thread(self.record, delivery, outcome)
                attempts += 1
        return attempts


def _classified(code: int, message: str) -> Exception:
    text = f"{code} {message}".strip()
    if 500 <= code < 600:
        return PermanentFailure(f"relay refused it: {text}")
    return TemporaryFailure(f"relay deferred it: {text}")


# -- operations ------------------------------------------------------------------------------


class OutboxAdmin:
    """What operators do with the outbox: look, and send a failed reply again."""

    def __init__(self, database: Database) -> None:
        self.db = database

    def list(self, state: OutboxState | None = None, limit: int = 50) -> list[OutboxEntry]:
        query = (
            select(OutboxEntry)
            .options(defer(OutboxEntry.content))
            .order_by(OutboxEntry.id.desc())
            .limit(limit)
        )
        if state is not None:
            query = query.where(OutboxEntry.state == state)
        with self.db.reading() as session:
            return list(session.scalars(query))

    def get(self, outbox_id: int) -> OutboxEntry:
        with self.db.reading() as session:
            found = session.get(OutboxEntry, outbox_id)
            if found is None:
                raise NotFound(f"reply {outbox_id} not found")
            return found

    def counts(self) -> dict[str, int]:
        with self.db.reading() as session:
            rows = session.execute(
                select(OutboxEntry.state, func.count()).group_by(OutboxEntry.state)
            )
            return {state.value: count for state, count in rows}

    def retry(self, outbox_id: int) -> OutboxEntry:
        """Send a failed reply again, from its first attempt, at the sender's next run."""
        with self.db.writing() as session:
            found = session.get(OutboxEntry, outbox_id, with_for_update=True)
            if found is None:
                raise NotFound(f"reply {outbox_id} not found")
            if found.state != OutboxState.FAILED:
                raise InvalidState(
                    f"reply {outbox_id} is {found.state.value}; only failed replies can be retried"
                )
            now = utcnow()
            found.state = OutboxState.PENDING
            found.attempts = 0
            found.next_attempt_at = now
            found.updated_at = now
            return found
