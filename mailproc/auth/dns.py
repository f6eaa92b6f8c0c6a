"""DNS for every check (DKIM keys, SPF, DMARC): dnspython on the configured resolvers with a
TTL-respecting cache, and a firm line between "there is no such record" and "we could not find
out" (a timeout or SERVFAIL), which is temporary and never a verdict."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mailproc.config import ConfigError, DnsSettings


class TemporaryDNSError(Exception):
    """A lookup that timed out or failed on the server's side: try again later."""


def _nameserver(text: str) -> dns.nameserver.Nameserver:
    host, port = text, 53
    if text.startswith("[") and "]:" in text:
        host, port_text = text[1:].split("]:", 1)
        port = int(port_text)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = int(port_text)
    return dns.nameserver.Do53Nameserver(str(ipaddress.ip_address(host)), port)


class Resolver:
    """Lookups for the checks. Each evaluation runs inside ``tracking()`` so that every
    temporary failure it met is known, whichever library made the lookup."""

    def __init__(self, settings: DnsSettings) -> None:
        try:
            resolver = dns.resolver.Resolver(configure=not settings.nameservers)
        except dns.resolver.NoResolverConfiguration as exc:
            raise ConfigError(
                f"[dns] nameservers: empty, and this system has no resolver configured ({exc}); "
                "list the resolvers to use"
            ) from None
        if settings.nameservers:
            resolver.nameservers = [_nameserver(ns) for ns in settings.nameservers]
        resolver.timeout = settings.timeout_seconds
        resolver.lifetime = settings.timeout_seconds
        resolver.cache = dns.resolver.LRUCache(settings.cache_size)
        self._resolver = resolver
        self._local = threading.local()
        # In front of dnspython's cache, answers already turned into records, until the
        # expiry dnspython gives them (their TTL): a warm lookup is then a dictionary read,
        # where a resolve() through the cache costs about as much as parsing the message.
        self._answers: OrderedDict[tuple[str, str], tuple[float, list[Any]]] = OrderedDict()
        self._answers_size = max(settings.cache_size, 0)
        self._answers_lock = threading.Lock()

    @contextmanager
    def tracking(self) -> Iterator[list[str]]:
        """Collect the temporary failures of the lookups made inside the block."""
        errors: list[str] = []
        previous = getattr(self._local, "errors", None)
        self._local.errors = errors
        try:
            yield errors
        finally:
            self._local.errors = previous

    def current_errors(self) -> list[str]:
        """The temporary failures noted so far in the current ``tracking()`` block."""
        return list(getattr(self._local, "errors", None) or [])

    def _note(self, message: str) -> None:
        errors = getattr(self._local, "errors", None)
        if errors is not None and message not in errors:
            errors.append(message)

    def _cached(self, key: tuple[str, str]) -> list[Any] | None:
        with self._answers_lock:
            entry = self._answers.get(key)
            if entry is None:
                return None
            if entry[0] <= time.time():
                del self._answers[key]
                return None
            self._answers.move_to_end(key)
            return entry[1]

    def _keep(self, key: tuple[str, str], expiration: float, records: list[Any]) -> None:
        if self._answers_size == 0 or expiration <= time.time():
            return
        with self._answers_lock:
            self._answers[key] = (expiration, records)
            self._answers.move_to_end(key)
            while len(self._answers) > self._answers_size:
                self._answers.popitem(last=False)

    def query(self, name: str, rdtype: str) -> list[Any]:
        """The records of ``name``; [] when there are none (NXDOMAIN or no data)."""
        key = (name.lower(), rdtype)
        cached = self._cached(key)
        if cached is not None:
            return list(cached)
        try:
            answer = self._resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            message = f"dns {rdtype} {name}: {type(exc).__name__}"
            self._note(message)
            raise TemporaryDNSError(message) from None
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel):
            return []
        except dns.exception.DNSException as exc:
            message = f"dns {rdtype} {name}: {type(exc).__name__}"
            self._note(message)
            raise TemporaryDNSError(message) from None
        records = list(answer) if answer.rrset is not None else []
        self._keep(key, answer.expiration, records)
        return list(records)

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record of ``name`` as one string (its character-strings joined)."""
        return [b"".join(record.strings) for record in self.query(name, "TXT")]
