"""DKIM keys, signing, ARC sealing and test messages for sender-authentication tests.

`rsa_key` / `ed25519_key` make a `DkimKey` (private key in the form dkimpy signs with, plus its
DNS record), `publish` puts the record on a `ZoneServer`, `sign` / `arc_seal` run dkimpy's
signer and sealer over a message, `build_message` makes a plain CRLF message, and `dnsfunc`
gives dkimpy's `verify` / `arc_verify` a TXT lookup that asks a `ZoneServer` through dnspython.
"""

from __future__ import annotations

import base64
import math
import secrets
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, parseaddr
from typing import Any

import dkim  # type: ignore[import-untyped, unused-ignore]
import dns.exception
import dns.resolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.dnsserver import ZoneServer

__all__ = [
    "DEFAULT_BODY",
    "DEFAULT_SIGNED_HEADERS",
    "DkimKey",
    "arc_seal",
    "build_message",
    "dnsfunc",
    "ed25519_key",
    "publish",
    "rsa_key",
    "sign",
]

DEFAULT_SIGNED_HEADERS: tuple[bytes, ...] = (b"from", b"to", b"subject", b"date", b"message-id")
DEFAULT_BODY = (
    "Hello support,\n\nI have lost access to my account. Please reset my security question.\n"
    "\nThanks,\nAlice\n"
)


@dataclass(frozen=True)
class DkimKey:
    """A DKIM signing key and the TXT record value that publishes it.

    ``private`` is what dkimpy's ``sign`` takes: PKCS#1 PEM for RSA, base64 of the 32-byte
    seed for Ed25519. ``algorithm`` is the signature algorithm ``sign`` uses by default.
    Use ``dataclasses.replace(key, domain=..., selector=...)`` to reuse a key elsewhere.
    """

    selector: str
    domain: str
    algorithm: bytes  # b"rsa-sha256" or b"ed25519-sha256"
    private: bytes
    record: str  # "v=DKIM1; k=...; p=..."
    bits: int  # RSA modulus size; 256 for Ed25519

    @property
    def dns_name(self) -> str:
        """Where the record lives: ``<selector>._domainkey.<domain>``."""
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def key_type(self) -> str:
        """The record's k= value: "rsa" or "ed25519"."""
        return "ed25519" if self.algorithm == b"ed25519-sha256" else "rsa"


def rsa_key(bits: int, *, selector: str | None = None, domain: str = "example.org") -> DkimKey:
    """A fresh RSA key (512, 1024, 2048, ... bits); selector defaults to ``rsa<bits>``."""
    private_key = _generate_rsa(bits)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    spki = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return DkimKey(
        selector=selector or f"rsa{bits}",
        domain=domain,
        algorithm=b"rsa-sha256",
        private=pem,
        record=f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode()}",
        bits=private_key.key_size,
    )


def ed25519_key(*, selector: str = "ed25519", domain: str = "example.org") -> DkimKey:
    """A fresh Ed25519 key (RFC 8463): seed for dkimpy, raw public key in the record."""
    private_key = ed25519.Ed25519PrivateKey.generate()
    seed = private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return DkimKey(
        selector=selector,
        domain=domain,
        algorithm=b"ed25519-sha256",
        private=base64.b64encode(seed),
        record=f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode()}",
        bits=256,
    )


def publish(server: ZoneServer, key: DkimKey, extra_tags: str = "") -> str:
    """Publish the key's record (plus e.g. ``"t=y"`` or ``"t=s; h=sha256"``); returns the name."""
    record = key.record
    if extra_tags.strip(" ;"):
        record = f"{record}; {extra_tags.strip(' ;')}"
    server.add_txt(key.dns_name, record)
    return key.dns_name


def sign(
    raw: bytes,
    key: DkimKey,
    headers: Sequence[bytes] = DEFAULT_SIGNED_HEADERS,
    length: bool = False,
    expire_seconds: int | None = None,
    canonicalize: tuple[bytes, bytes] = (b"relaxed", b"simple"),
    algorithm: bytes | None = None,
    *,
    identity: bytes | None = None,
    timestamp: int | None = None,
) -> bytes:
    """The message with a DKIM-Signature by ``key`` prepended.

    ``length`` adds l=, ``expire_seconds`` adds x= (t= plus that many seconds), ``timestamp``
    overrides t= (e.g. to make an already-expired signature), ``algorithm`` overrides the
    key's (b"rsa-sha1" still signs, for negative cases), ``identity`` sets i=.
    """
    kwargs: dict[str, Any] = {
        "identity": identity,
        "canonicalize": canonicalize,
        "include_headers": list(headers),
        "length": length,
    }
    selector, domain = key.selector.encode(), key.domain.encode()
    signature_algorithm = algorithm or key.algorithm
    if expire_seconds is None and timestamp is None:
        header: bytes = dkim.sign(
            raw,
            selector,
            domain,
            key.private,
            signature_algorithm=signature_algorithm,
            linesep=b"\r\n",
            **kwargs,
        )
    else:
        signer = _TimedDKIM(
            raw,
            signature_algorithm=signature_algorithm,
            linesep=b"\r\n",
            timestamp=timestamp,
            expire_seconds=expire_seconds,
        )
        header = signer.sign(selector, domain, key.private, **kwargs)
    return header + raw


def arc_seal(
    raw: bytes,
    key: DkimKey,
    authserv_id: str,
    chain_validation: str = "none",
    results: Iterable[str] = (),
) -> bytes:
    """The message as an ARC sealer at ``authserv_id`` would forward it.

    Adds the sealer's ``Authentication-Results: <authserv_id>; arc=<chain_validation>; ...``
    (``results`` such as ``"dkim=pass header.d=example.org"``), then the ARC set from
    ``dkim.arc_sign`` on top. ``chain_validation`` must be "none" for the first hop and
    "pass" or "fail" after. ARC in dkimpy is RSA-only.
    """
    if key.key_type != "rsa":
        raise ValueError("dkimpy's ARC signer only supports RSA keys")
    parts = [authserv_id, f"arc={chain_validation}", *results]
    ar_header = ("Authentication-Results: " + ";\r\n\t".join(parts) + "\r\n").encode()
    message = ar_header + raw
    arc_set: list[bytes] = dkim.arc_sign(
        message,
        key.selector.encode(),
        key.domain.encode(),
        key.private,
        authserv_id.encode(),
        linesep=b"\r\n",
    )
    if not arc_set:
        raise ValueError(f"dkim.arc_sign produced no ARC set (chain_validation={chain_validation})")
    return b"".join(arc_set) + message


def build_message(
    from_header: str | None = "Alice <alice@example.org>",
    subject: str = "Reset my security question",
    to: str = "support@example.com",
    date: str | datetime | None = None,
    message_id: str | None = None,
    extra_headers: Iterable[tuple[str, str]] = (),
    body: str = DEFAULT_BODY,
) -> bytes:
    """A plain-text message with CRLF line ends, headers written exactly as given (UTF-8).

    ``date`` defaults to now (RFC 2822, +0000), ``message_id`` to a fresh one at the From
    domain; ``extra_headers`` follow Message-ID; ``from_header=None`` leaves From out.
    """
    domain = parseaddr(from_header or "")[1].rpartition("@")[2] or "example.org"
    if date is None:
        date = datetime.now(UTC)
    if isinstance(date, datetime):
        date = format_datetime(date)
    headers: list[tuple[str, str]] = []
    if from_header is not None:
        headers.append(("From", from_header))
    headers += [
        ("To", to),
        ("Subject", subject),
        ("Date", date),
        ("Message-ID", message_id or f"<{uuid.uuid4().hex}@{domain}>"),
        *extra_headers,
        ("MIME-Version", "1.0"),
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Transfer-Encoding", "7bit" if body.isascii() else "8bit"),
    ]
    text = body.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return (head + "\r\n" + text.replace("\n", "\r\n")).encode()


def dnsfunc(server: ZoneServer, lifetime: float = 0.5) -> Callable[..., bytes | None]:
    """A TXT lookup for ``dkim.verify(..., dnsfunc=...)`` / ``dkim.arc_verify`` that asks
    ``server`` through dnspython, with dkimpy's own semantics: the first TXT record's strings
    joined, None for NXDOMAIN / no TXT / SERVFAIL, ``dkim.DnsTimeoutError`` on timeout."""

    def get_txt(name: bytes, timeout: float = 5) -> bytes | None:
        resolver = server.resolver(lifetime=min(lifetime, timeout))
        try:
            answer = resolver.resolve(name.decode(), "TXT", raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):
            return None
        except dns.exception.Timeout as exc:
            raise dkim.DnsTimeoutError(str(exc)) from exc
        if answer.rrset is None:
            return None
        return b"".join(next(iter(answer.rrset)).strings)

    return get_txt


class _TimedDKIM(dkim.DKIM):  # type: ignore[misc]
    """dkimpy's signer with t= set by us and an optional x= (dkimpy's sign has neither)."""

    def __init__(
        self, message: bytes, *, timestamp: int | None, expire_seconds: int | None, **kw: Any
    ) -> None:
        super().__init__(message, **kw)
        self._timestamp = timestamp
        self._expire_seconds = expire_seconds

    def gen_header(self, fields: list[tuple[bytes, bytes]], *args: Any, **kwargs: Any) -> bytes:
        signed_at = self._timestamp
        if signed_at is None:
            signed_at = int(dict(fields)[b"t"])
        timed: list[tuple[bytes, bytes]] = []
        for tag, value in fields:
            if tag == b"t":
                timed.append((b"t", str(signed_at).encode()))
                if self._expire_seconds is not None:
                    timed.append((b"x", str(signed_at + self._expire_seconds).encode()))
            else:
                timed.append((tag, value))
        result: bytes = super().gen_header(timed, *args, **kwargs)
        return result


def _generate_rsa(bits: int) -> rsa.RSAPrivateKey:
    if bits >= 1024:
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    # cryptography refuses to generate keys under 1024 bits but loads them; DKIM tests need
    # 512-bit keys to prove they are rejected, so build one from two random primes.
    exponent = 65537
    while True:
        p, q = _random_prime(bits // 2), _random_prime(bits - bits // 2)
        phi = (p - 1) * (q - 1)
        if p == q or (p * q).bit_length() != bits or math.gcd(exponent, phi) != 1:
            continue
        d = pow(exponent, -1, phi)
        numbers = rsa.RSAPrivateNumbers(
            p=p,
            q=q,
            d=d,
            dmp1=rsa.rsa_crt_dmp1(d, p),
            dmq1=rsa.rsa_crt_dmq1(d, q),
            iqmp=rsa.rsa_crt_iqmp(p, q),
            public_numbers=rsa.RSAPublicNumbers(exponent, p * q),
        )
        return numbers.private_key()


def _random_prime(bits: int) -> int:
    while True:
        # Top two bits set so the product has the full size; odd.
        candidate = secrets.randbits(bits) | (0b11 << (bits - 2)) | 1
        if _probably_prime(candidate):
            return candidate


def _probably_prime(n: int, rounds: int = 40) -> bool:
    for small in (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % small == 0:
            return n == small
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(rounds):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True
