"""The SMTP/LMTP edge: translates the wire into ``Arrival``s for the intake and answers with
what the intake says. ``250`` is sent only after the message's row is committed."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from mailproc import metrics
from mailproc.addresses import AddressError, normalize_address
from mailproc.config import IPNetwork, SmtpSettings
from mailproc.intake import Arrival, GroupCommitter, IntakeClosed
from mailproc.models import utcnow

log = logging.getLogger(__name__)

XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
_XTEXT = re.compile(r"\+([0-9A-F]{2})")
_UNSAFE_VALUE = re.compile(r"[^\x21-\x7e]|[<>()\[\]\\,;:\"]")
_UNAVAILABLE = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")
_ENVELOPE_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


_HOOK_NAMES: dict[type, list[str]] = {}


class _HookNames:
    """aiosmtpd's SMTP.__init__ finds command handlers, hooks and AUTH mechanisms with dir()
    and inspect.getmembers() on the protocol and the handler for every new connection, which
    costs more than the rest of a short session's set-up. Their names are fixed by the class,
    so dir() here lists just those names, worked out once per class."""

    _dir_prefixes: tuple[str, ...] = ()

    def __dir__(self) -> list[str]:
        cls = type(self)
        names = _HOOK_NAMES.get(cls)
        if names is None:
            names = _HOOK_NAMES[cls] = sorted(
                name for name in dir(cls) if name.startswith(self._dir_prefixes)
            )
        return names


TEMP_FAILURE = "451 4.3.0 Temporary failure storing the message; please try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"


def _xtext_decode(value: str) -> str:
    return _XTEXT.sub(lambda m: chr(int(m.group(1), 16)), value)


def _peer(session: Session | None) -> tuple[str, int | None]:
    peer: Any = session.peer if session is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return str(peer or "unknown"), None


@dataclass
class Connections:
    """The open sessions, for the concurrency cap and for a graceful shutdown."""

    limit: int
    open: set[SMTPProtocol] = field(default_factory=set)
    closing: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, protocol: SMTPProtocol) -> bool:
        if self.closing or len(self.open) >= self.limit:
            return False
        self.open.add(protocol)
        return True

    def discard(self, protocol: SMTPProtocol) -> None:
        self.open.discard(protocol)
        self.changed.set()

    def close_idle(self) -> None:
        for protocol in list(self.open):
            if not protocol.in_transaction:
                protocol.say_goodbye(SHUTTING_DOWN)

    def close_all(self) -> None:
        for protocol in list(self.open):
            protocol.say_goodbye(SHUTTING_DOWN)

    async def drain(self, grace_seconds: float) -> None:
        """Close sessions as they go idle, waiting up to ``grace_seconds`` for the busy ones."""
        self.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        while self.open and loop.time() < deadline:
            self.close_idle()
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=min(0.2, grace_seconds))
        if self.open:
            log.warning("closing %d session(s) still busy after the grace period", len(self.open))
            self.close_all()


class Handler(_HookNames):
    """aiosmtpd hooks: recipient filter, XFORWARD advertising, store-then-250."""

    _dir_prefixes = ("handle_", "auth_")

    def __init__(self, settings: SmtpSettings, intake: GroupCommitter, protocol_name: str) -> None:
        self.settings = settings
        self.intake = intake
        self.protocol_name = protocol_name
        self.support = frozenset(settings.support_addresses)

    def is_trusted(self, peer_ip: str) -> bool:
        return is_trusted_proxy(peer_ip, self.settings.trusted_proxies)

    async def handle_EHLO(
        self,
        server: SMTPProtocol,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        server.xforward = None
        # We offer no AUTH: nobody submits mail here, they deliver it.
        lines = [line for line in responses if not line[4:].upper().startswith("AUTH")]
        if self.is_trusted(_peer(session)[0]):
            lines.insert(-1, "250-XFORWARD " + " ".join(XFORWARD_ATTRIBUTES))
        return lines

    async def handle_HELO(
        self, server: SMTPProtocol, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        session.host_name = hostname
        server.xforward = None
        return f"250 {server.hostname}"

    async def handle_RSET(self, server: SMTPProtocol, session: Session, envelope: Envelope) -> str:
        server.xforward = None
        return "250 2.0.0 OK"

    async def handle_MAIL(
        self,
        server: SMTPProtocol,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        if server.connections.closing:
            return SHUTTING_DOWN
        if _ENVELOPE_CONTROL.search(address) or len(address) > 254:
            return "553 5.1.7 Bad sender address syntax"
        try:
            address.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes kept by aiosmtpd as surrogates
            return "553 5.1.7 Bad sender address syntax"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTPProtocol,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        # Support addresses are stored normalised (lowercase, A-labels): a plain lowercase
        # match is the common case and needs no parsing.
        if address.isascii() and address.lower() in self.support:
            normalized = address.lower()
        else:
            try:
                normalized = normalize_address(address)
            except AddressError:
                metrics.SMTP_RECIPIENTS_REFUSED.inc()
                return "550 5.1.3 Bad recipient address syntax"
        if normalized not in self.support:
            metrics.SMTP_RECIPIENTS_REFUSED.inc()
            return f"550 5.1.1 <{address}>: recipient not handled here"
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTPProtocol, session: Session, envelope: Envelope) -> str:
        arrival = self._arrival(server, session, envelope)
        try:
            message_id = await self.intake.store(arrival)
        except IntakeClosed:
            metrics.SHUTTING_DOWN.inc()
            return server.data_reply(SHUTTING_DOWN)
        except Exception:
            log.exception("storing a message from %s failed", arrival.peer_ip)
            metrics.TEMPORARY_FAILURE.inc()
            return server.data_reply(TEMP_FAILURE)
        metrics.STORED.inc()
        log.info(
            "stored message %d from %s (%d bytes, %d recipient(s))",
            message_id,
            arrival.client_ip or arrival.peer_ip,
            len(arrival.raw),
            len(arrival.rcpt_tos),
        )
        return server.data_reply(f"250 2.0.0 Stored as message {message_id}")

    async def handle_exception(self, error: Exception) -> str:
        # Our own fault is never the sender's: a temporary failure, so the mail is retried.
        log.exception("unexpected error in an SMTP session", exc_info=error)
        return TEMP_FAILURE

    def _arrival(self, server: SMTPProtocol, session: Session, envelope: Envelope) -> Arrival:
        peer_ip, peer_port = _peer(session)
        tls = None
        if session.ssl is not None:
            ssl_object = session.ssl.get("ssl_object")
            cipher = session.ssl.get("cipher")
            tls = {
                "version": ssl_object.version() if ssl_object is not None else None,
                "cipher": cipher[0] if cipher else None,
            }
        xforward = server.xforward
        if xforward is not None:
            # Never mix forwarded facts with ours (Postfix XFORWARD_README, note 4).
            client_ip = xforward.get("ADDR")
            client_name = xforward.get("NAME")
            client_helo = xforward.get("HELO")
            client_protocol = xforward.get("PROTO")
        else:
            client_ip, client_name, client_helo = peer_ip, None, session.host_name
            client_protocol = self.protocol_name.upper()
            if self.protocol_name == "smtp" and session.extended_smtp:
                client_protocol = "ESMTPS" if tls else "ESMTP"
        raw = envelope.original_content
        assert isinstance(raw, bytes)
        return Arrival(
            received_at=utcnow(),
            protocol=self.protocol_name,
            peer_ip=peer_ip,
            peer_port=peer_port,
            helo=session.host_name,
            client_ip=client_ip,
            client_name=client_name,
            client_helo=client_helo,
            client_protocol=client_protocol,
            xforward=dict(xforward) if xforward is not None else None,
            # aiosmtpd keeps the null reverse path as "<>"; we store it as "".
            mail_from="" if envelope.mail_from == "<>" else (envelope.mail_from or ""),
            rcpt_tos=tuple(envelope.rcpt_tos),
            tls=tls,
            raw=raw,
        )


def is_trusted_proxy(ip: str, networks: Iterable[IPNetwork]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


# aiosmtpd inspects the EHLO hook's signature for every new connection; give it the answer.
setattr(Handler.handle_EHLO, "__signature__", inspect.signature(Handler.handle_EHLO))  # noqa: B010


class SMTPProtocol(_HookNames, SMTP):
    """aiosmtpd's protocol plus XFORWARD, the session cap and time limit, and a DATA phase that
    answers once per recipient under LMTP."""

    _dir_prefixes = ("smtp_", "auth_")

    lmtp = False

    def __init__(
        self, handler: Handler, connections: Connections, settings: SmtpSettings, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self.connections = connections
        self.settings = settings
        self.xforward: dict[str, str | None] | None = None
        self._refused = False
        self._session_timer: asyncio.TimerHandle | None = None

    # -- connection lifecycle -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:  # the TLS layer after STARTTLS
            super().connection_made(transport)
            return
        if not self.connections.add(self):
            metrics.SESSION_REFUSED.inc()
            self._refused = True
            reply = (
                SHUTTING_DOWN
                if self.connections.closing
                else ("421 4.3.2 Too many connections, try again later")
            )
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(reply.encode("ascii") + b"\r\n")
            transport.close()
            return
        metrics.SESSION_ACCEPTED.inc()
        super().connection_made(transport)
        self._session_timer = self.loop.call_later(
            self.settings.session_timeout_seconds,
            self.say_goodbye,
            "421 4.4.2 Session time limit reached, closing",
        )

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._session_timer is not None:
            self._session_timer.cancel()
        self.connections.discard(self)
        super().connection_lost(error)

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def say_goodbye(self, reply: str) -> None:
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(reply.encode("ascii") + b"\r\n")
            transport.close()

    def data_reply(self, status: str) -> str:
        """The reply after DATA: once per accepted recipient under LMTP (RFC 2033 4.2)."""
        if not self.lmtp or self.envelope is None or not self.envelope.rcpt_tos:
            return status
        return "\r\n".join(status for _ in self.envelope.rcpt_tos)

    async def smtp_AUTH(self, arg: str) -> None:
        await self.push("502 5.5.1 AUTH not offered here")

    # -- XFORWARD (Postfix XFORWARD_README) -----------------------------------------------

    @syntax("XFORWARD attribute=value ...")
    async def smtp_XFORWARD(self, arg: str | None) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        peer_ip, _ = _peer(self.session)
        if not is_trusted_proxy(peer_ip, self.settings.trusted_proxies):
            log.warning("XFORWARD refused from untrusted peer %s", peer_ip)
            await self.push("550 5.7.0 Error: insufficient authorization")
            return
        if self.in_transaction:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        attributes = self._parse_xforward(arg)
        if attributes is None:
            await self.push("501 5.5.4 Syntax: XFORWARD attribute=value...")
            return
        if self.xforward is None:
            self.xforward = dict.fromkeys(XFORWARD_ATTRIBUTES)
        self.xforward.update(attributes)
        await self.push("250 2.0.0 Ok")

    @staticmethod
    def _parse_xforward(arg: str | None) -> dict[str, str | None] | None:
        if not arg:
            return None
        attributes: dict[str, str | None] = {}
        for item in arg.split():
            name, sep, value = item.partition("=")
            name = name.upper()
            if not sep or name not in XFORWARD_ATTRIBUTES or len(value) > 255:
                return None
            decoded = _xtext_decode(value)
            if decoded.upper() in _UNAVAILABLE:
                attributes[name] = None
                continue
            if name == "ADDR":
                if decoded.upper().startswith("IPV6:"):
                    decoded = decoded[5:]
                try:
                    decoded = str(ipaddress.ip_address(decoded))
                except ValueError:
                    return None
            elif (name == "PORT" and not decoded.isdigit()) or _UNSAFE_VALUE.search(decoded):
                return None
            attributes[name] = decoded
        return attributes

    # -- DATA -----------------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        # aiosmtpd's own DATA sends a single reply on every error path; LMTP needs one reply
        # per recipient, so the reading loop lives here, with the same limits.
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        lines: list[bytes] = []
        size = 0
        problem: str | None = None
        limit = self.data_size_limit
        # The command timeout limits idling, not the whole transfer (RFC 5321 4.5.3.2.6 times
        # each block sent): a slow but steady sender gets to finish, within the session's time
        # limit. Renewed now and then, not per line: a new timer costs more than a line.
        renew_every = min(1.0, self.settings.command_timeout_seconds / 2)
        renewed = self.loop.time()
        while self.transport is not None:
            if self.loop.time() - renewed >= renew_every:
                renewed = self.loop.time()
                self._reset_timeout()
            try:
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                problem = problem or "500 5.5.2 Line too long (RFC 5321 section 4.5.3.1.6)"
                lines.clear()
                await self._reader.read(exc.consumed)
                continue
            if line == b".\r\n":
                break
            size += len(line)
            if problem is None and limit and size > limit:
                problem = f"552 5.3.4 Message exceeds the size limit of {limit} bytes"
                lines.clear()
            if problem is None:
                lines.append(line[1:] if line.startswith(b".") else line)
        if problem is not None:
            status = problem
        else:
            self.envelope.original_content = b"".join(lines)
            self.envelope.content = self.envelope.original_content
            status = await self._call_handler_hook("DATA")
        status = self.data_reply(status) if problem is not None else status
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        self.xforward = None
        await self.push(status)


class LMTPProtocol(SMTPProtocol, LMTP):
    lmtp = True


def tls_context(settings: SmtpSettings) -> ssl.SSLContext | None:
    if not settings.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return context


def protocol_factory(
    settings: SmtpSettings, intake: GroupCommitter, connections: Connections
) -> Callable[[], SMTPProtocol]:
    cls = LMTPProtocol if settings.protocol == "lmtp" else SMTPProtocol
    handler = Handler(settings, intake, settings.protocol)
    context = tls_context(settings)
    # Looked up once: aiosmtpd would otherwise ask the resolver for every connection.
    hostname = settings.hostname or socket.getfqdn()

    def make() -> SMTPProtocol:
        return cls(
            handler,
            connections,
            settings,
            data_size_limit=settings.max_message_bytes,
            enable_SMTPUTF8=True,
            hostname=hostname,
            ident="mailproc",
            tls_context=context,
            require_starttls=settings.require_starttls,
            timeout=settings.command_timeout_seconds,
            auth_require_tls=True,
        )

    return make
