"""A real DNS server on loopback for sender-authentication tests.

`ZoneServer` answers UDP and TCP queries on one free port of 127.0.0.1 from an in-memory zone
(TXT, A, AAAA, MX, CNAME, PTR), built on dnslib's `DNSServer` with a custom resolver. It
answers NXDOMAIN / NODATA with an SOA for negative caching, truncates large UDP answers so
clients retry over TCP, can drop queries (per name, or every query) or answer SERVFAIL, and
records every query it received. `resolver()` returns a dnspython resolver pointed at it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import select
import socket
import socketserver
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

import dns.resolver
from dnslib import (  # type: ignore[import-untyped, unused-ignore]
    AAAA,
    CNAME,
    EDNS0,
    MX,
    PTR,
    QTYPE,
    RCODE,
    RR,
    SOA,
    TXT,
    A,
    DNSError,
    DNSHeader,
    DNSLabel,
    DNSRecord,
)
from dnslib.server import (  # type: ignore[import-untyped, unused-ignore]
    DNSHandler,
    DNSServer,
)

__all__ = ["ZoneServer"]

_Fault = Literal["timeout", "servfail"]

#: Largest UDP answer for a query without EDNS (RFC 1035 section 4.2.1).
_PLAIN_UDP_LIMIT = 512
#: Largest UDP answer this server sends to an EDNS client, whatever it advertises.
_EDNS_UDP_LIMIT = 1232
#: How often the serving threads look for a stop request, in seconds.
_POLL = 0.05


def _norm(name: str | DNSLabel) -> str:
    """The zone's key for a name: lower case, no trailing dot ("" is the root)."""
    return str(name).rstrip(".").lower()


def _qtype(qtype: str | int) -> int:
    if isinstance(qtype, int):
        return qtype
    return int(getattr(QTYPE, qtype.upper()))


def _txt_strings(text: str | bytes | Iterable[str | bytes]) -> list[bytes]:
    """Character-strings for one TXT record; anything over 255 bytes is split, as DNS needs."""
    if isinstance(text, str | bytes):
        parts: list[str | bytes] = [text]
    else:
        parts = list(text)
    strings: list[bytes] = []
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part
        strings.extend(raw[i : i + 255] for i in range(0, len(raw), 255))
        if not raw:
            strings.append(b"")
    return strings


@dataclass(frozen=True)
class _Record:
    qtype: int
    rdata: Any  # a dnslib RD instance
    ttl: int


class _QuietLogger:
    """dnslib's logger interface with every hook silenced."""

    def _quiet(self, *args: object) -> None:
        pass

    log_recv = log_send = log_request = log_reply = _quiet
    log_truncated = log_error = log_data = _quiet


class _UDPServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    # Non-daemon handler threads, joined by server_close(): nothing outlives stop().
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = False


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True


class _Handler(DNSHandler):  # type: ignore[misc]
    """dnslib's handler, but a resolver answer of None drops the query, and UDP answers larger
    than the client can take are sent truncated (TC set, question kept) so it retries on TCP."""

    def handle(self) -> None:
        tcp = self.server.socket_type == socket.SOCK_STREAM
        self.protocol = "tcp" if tcp else "udp"
        zone: ZoneServer = self.server.resolver
        data = self._read_tcp(zone._stopping) if tcp else self.request[0]
        if data is None:
            return
        try:
            request = DNSRecord.parse(data)
        except DNSError:
            return  # not DNS: ignore it, like a real server
        reply = zone.resolve(request, self)
        if reply is None:
            if tcp:
                self._hold_tcp(zone._stopping)
            return
        packed = reply.pack()
        if tcp:
            self.request.settimeout(2.0)
            with contextlib.suppress(OSError):  # the client went away
                self.request.sendall(len(packed).to_bytes(2, "big") + packed)
            return
        limit = _PLAIN_UDP_LIMIT
        for rr in request.ar:
            if rr.rtype == QTYPE.OPT:  # EDNS: the client's buffer size, within our cap
                limit = max(_PLAIN_UDP_LIMIT, min(int(rr.rclass), _EDNS_UDP_LIMIT))
        if len(packed) > limit:
            truncated = DNSRecord(DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap))
            truncated.add_question(request.q)
            truncated.header.tc = 1
            packed = truncated.pack()
        self.request[1].sendto(packed, self.client_address)

    def _read_tcp(self, stopping: threading.Event) -> bytes | None:
        """One length-prefixed query; gives up after 5 s of silence or when we stop."""
        sock: socket.socket = self.request
        sock.settimeout(_POLL)
        data = b""
        deadline = time.monotonic() + 5.0
        while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
            if stopping.is_set() or time.monotonic() > deadline:
                return None
            try:
                chunk = sock.recv(8192)
            except TimeoutError:
                continue
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return data[2 : 2 + int.from_bytes(data[:2], "big")]

    def _hold_tcp(self, stopping: threading.Event) -> None:
        """Never answer: keep the connection open until the client gives up or we stop."""
        sock: socket.socket = self.request
        while not stopping.is_set():
            readable, _, _ = select.select([sock], [], [], _POLL)
            if readable:
                try:
                    if not sock.recv(8192):
                        return
                except OSError:
                    return


class ZoneServer:
    """An authoritative-style DNS server for any name, on 127.0.0.1, UDP and TCP on one port.

    Names are case-insensitive and a trailing dot is optional everywhere. A name with records,
    or with records below it (an empty non-terminal such as ``_domainkey.example.org``), exists:
    other types there get NOERROR with no answer (NODATA). Any other name is NXDOMAIN. Negative
    answers carry an SOA for "." whose minimum is ``negative_ttl``. CNAMEs are followed within
    the zone. Safe to change from the test thread while it serves.
    """

    def __init__(self, *, ttl: int = 300, negative_ttl: int = 300, host: str = "127.0.0.1") -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.host = host
        self._lock = threading.Lock()
        self._records: dict[str, list[_Record]] = {}
        self._faults: dict[tuple[str, int | None], _Fault] = {}
        self._down = False
        self._log: list[tuple[str, str, str]] = []
        self._stopping = threading.Event()
        self._servers: list[Any] = []  # dnslib DNSServer, UDP then TCP
        self._threads: list[threading.Thread] = []
        self._port: int | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind UDP and TCP on one free port and serve in background threads."""
        if self._servers:
            raise RuntimeError("ZoneServer already started")
        self._stopping.clear()
        udp, tcp = self._bind()
        self._servers = [udp, tcp]
        self._port = int(udp.server.server_address[1])
        for proto, dns_server in (("udp", udp), ("tcp", tcp)):
            thread = threading.Thread(
                target=dns_server.server.serve_forever,
                kwargs={"poll_interval": _POLL},
                name=f"ZoneServer-{proto}-{self._port}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def _bind(self) -> tuple[Any, Any]:
        logger = _QuietLogger()
        last_error: OSError | None = None
        for _ in range(20):
            udp = DNSServer(
                self, address=self.host, port=0, logger=logger, handler=_Handler, server=_UDPServer
            )
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(
                    self,
                    address=self.host,
                    port=port,
                    tcp=True,
                    logger=logger,
                    handler=_Handler,
                    server=_TCPServer,
                )
            except OSError as exc:  # the TCP side of that port is taken: try another
                udp.server.server_close()
                last_error = exc
                continue
            return udp, tcp
        raise RuntimeError(f"no free UDP+TCP port on {self.host}") from last_error

    def stop(self) -> None:
        """Stop serving, close both sockets and join every thread. Safe to call twice."""
        self._stopping.set()  # releases TCP connections held by a timeout fault
        servers, self._servers = self._servers, []
        # shutdown() waits up to a poll interval for its loop: wait for both loops at once.
        stoppers = [threading.Thread(target=s.server.shutdown) for s in servers]
        for thread in stoppers:
            thread.start()
        for thread in [*stoppers, *self._threads]:
            thread.join()
        self._threads = []
        for dns_server in servers:
            dns_server.server.server_close()  # joins the request-handler threads too

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ZoneServer not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port``, the form mailproc's ``[dns] nameservers`` takes."""
        return f"{self.host}:{self.port}"

    def resolver(self, lifetime: float = 0.5, *, cache: bool = False) -> dns.resolver.Resolver:
        """A dnspython resolver that asks only this server (no /etc/resolv.conf)."""
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = [self.host]
        res.port = self.port
        res.timeout = lifetime
        res.lifetime = lifetime
        if cache:
            res.cache = dns.resolver.Cache()
        return res

    # -- zone content ---------------------------------------------------------------------

    def _add(self, name: str, record: _Record) -> None:
        key = _norm(name)
        with self._lock:
            existing = self._records.setdefault(key, [])
            has_cname = any(r.qtype == QTYPE.CNAME for r in existing)
            if existing and (record.qtype == QTYPE.CNAME or has_cname):
                raise ValueError(f"{key}: a CNAME cannot coexist with other records")
            existing.append(record)

    def add_txt(
        self, name: str, text: str | bytes | Iterable[str | bytes], *, ttl: int | None = None
    ) -> None:
        """Add one TXT record. Text over 255 bytes becomes several character-strings of the
        one record (as DKIM keys are published); a list gives the strings explicitly (each is
        split likewise). Calling again for the same name adds another record to the set."""
        self._add(name, _Record(QTYPE.TXT, TXT(_txt_strings(text)), self._ttl(ttl)))

    def add_a(self, name: str, ip: str, *, ttl: int | None = None) -> None:
        self._add(name, _Record(QTYPE.A, A(str(ipaddress.IPv4Address(ip))), self._ttl(ttl)))

    def add_aaaa(self, name: str, ip: str, *, ttl: int | None = None) -> None:
        self._add(name, _Record(QTYPE.AAAA, AAAA(str(ipaddress.IPv6Address(ip))), self._ttl(ttl)))

    def add_mx(self, name: str, pref: int, host: str, *, ttl: int | None = None) -> None:
        self._add(name, _Record(QTYPE.MX, MX(_fqdn(host), pref), self._ttl(ttl)))

    def add_cname(self, name: str, target: str, *, ttl: int | None = None) -> None:
        self._add(name, _Record(QTYPE.CNAME, CNAME(_fqdn(target)), self._ttl(ttl)))

    def add_ptr(self, ip: str, host: str, *, ttl: int | None = None) -> None:
        """Reverse record for an IPv4 or IPv6 address (for SPF's ptr mechanism and %{p})."""
        name = ipaddress.ip_address(ip).reverse_pointer
        self._add(name, _Record(QTYPE.PTR, PTR(_fqdn(host)), self._ttl(ttl)))

    def remove(self, name: str, qtype: str | None = None) -> None:
        """Remove every record of ``name``, or only those of one type ("TXT", "A", ...)."""
        key = _norm(name)
        with self._lock:
            if qtype is None:
                self._records.pop(key, None)
                return
            kept = [r for r in self._records.get(key, []) if r.qtype != _qtype(qtype)]
            if kept:
                self._records[key] = kept
            else:
                self._records.pop(key, None)

    def clear(self) -> None:
        """Remove every record (faults and the query log are kept)."""
        with self._lock:
            self._records.clear()

    def _ttl(self, ttl: int | None) -> int:
        return self.ttl if ttl is None else ttl

    # -- faults ---------------------------------------------------------------------------

    def set_timeout(self, name: str, qtype: str | None = None) -> None:
        """Never answer queries for ``name`` (of one type, or all): the client times out."""
        with self._lock:
            self._faults[(_norm(name), None if qtype is None else _qtype(qtype))] = "timeout"

    def set_servfail(self, name: str, qtype: str | None = None) -> None:
        """Answer SERVFAIL for ``name`` (of one type, or all)."""
        with self._lock:
            self._faults[(_norm(name), None if qtype is None else _qtype(qtype))] = "servfail"

    def clear_faults(self) -> None:
        """Remove every per-name fault and bring the server back up."""
        with self._lock:
            self._faults.clear()
            self._down = False

    def set_down(self, down: bool = True) -> None:
        """A DNS outage: while down, every query is dropped unanswered."""
        with self._lock:
            self._down = down

    # -- query log ------------------------------------------------------------------------

    @property
    def queries(self) -> list[tuple[str, str]]:
        """Every query received so far, as (lower-case name without trailing dot, type name),
        including dropped and SERVFAIL ones; a copy."""
        with self._lock:
            return [(name, qtype) for name, qtype, _ in self._log]

    @property
    def tcp_queries(self) -> list[tuple[str, str]]:
        """The queries that came over TCP (e.g. retries after a truncated UDP answer)."""
        with self._lock:
            return [(name, qtype) for name, qtype, proto in self._log if proto == "tcp"]

    def clear_queries(self) -> None:
        with self._lock:
            self._log.clear()

    # -- answering (dnslib resolver interface) --------------------------------------------

    def resolve(self, request: Any, handler: Any) -> Any:
        """Answer a dnslib request; None means drop it. Called from the serving threads."""
        qname = request.q.qname
        qtype = int(request.q.qtype)
        key = _norm(qname)
        with self._lock:
            self._log.append((key, str(QTYPE[qtype]), handler.protocol))
            if self._down:
                return None
            fault = self._faults.get((key, qtype)) or self._faults.get((key, None))
            if fault == "timeout":
                return None
            reply = request.reply()
            if any(rr.rtype == QTYPE.OPT for rr in request.ar):
                reply.add_ar(EDNS0(udp_len=_EDNS_UDP_LIMIT))
            if fault == "servfail":
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            self._answer(reply, qname, qtype)
            return reply

    def _answer(self, reply: Any, qname: Any, qtype: int) -> None:
        owner, key = qname, _norm(qname)
        for _ in range(16):  # CNAME chain limit
            records = self._records.get(key)
            if records is None:
                if not self._has_descendant(key):
                    reply.header.rcode = RCODE.NXDOMAIN
                break
            matching = [r for r in records if qtype in (r.qtype, QTYPE.ANY)]
            if matching:
                for r in matching:
                    reply.add_answer(RR(owner, r.qtype, rdata=r.rdata, ttl=r.ttl))
                return
            cname = next((r for r in records if r.qtype == QTYPE.CNAME), None)
            if cname is None:
                break  # NODATA
            reply.add_answer(RR(owner, QTYPE.CNAME, rdata=cname.rdata, ttl=cname.ttl))
            owner, key = cname.rdata.label, _norm(cname.rdata.label)
        times = (1, 3600, 600, 86400, self.negative_ttl)
        soa = SOA("ns.zoneserver.test.", "hostmaster.zoneserver.test.", times)
        reply.add_auth(RR(".", QTYPE.SOA, rdata=soa, ttl=self.negative_ttl))

    def _has_descendant(self, key: str) -> bool:
        suffix = "." + key if key else ""
        return any(name.endswith(suffix) for name in self._records)


def _fqdn(host: str) -> str:
    return host if host.endswith(".") else host + "."
