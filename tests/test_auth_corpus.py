"""The authentication corpus: crafted messages, legitimate and hostile, each sent through the
real SMTP listener and evaluated against keys and SPF records served by a DNS server on
loopback. Every case states the verdict it must get and the reason it must give."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import smtplib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dkim
import pytest
from dkim import HASH_ALGORITHMS
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import parse_pem_private_key

from mailproc.models import Message, MessageState
from tests.dkimkeys import DkimKey, arc_seal, build_message, ed25519_key, publish, rsa_key, sign
from tests.dnsserver import ZoneServer
from tests.support import SUPPORT, AppThread, messages, wait_for

CLIENT = "192.0.2.25"  # inside example.org's SPF range
STRANGER = "198.51.100.7"  # outside every SPF range here


@dataclass
class Keys:
    rsa2048: DkimKey
    rsa1024: DkimKey
    rsa512: DkimKey
    ed25519: DkimKey
    testing: DkimKey
    evil: DkimKey
    suffix: DkimKey
    sealer: DkimKey
    self_sealer: DkimKey
    sub: DkimKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    base = rsa_key(2048, selector="s2048")
    return Keys(
        rsa2048=base,
        rsa1024=rsa_key(1024, selector="s1024"),
        rsa512=rsa_key(512, selector="s512"),
        ed25519=ed25519_key(selector="ed"),
        testing=dataclasses.replace(base, selector="testing"),
        evil=dataclasses.replace(base, domain="evil.example", selector="evil"),
        suffix=dataclasses.replace(base, domain="co.uk", selector="psl"),
        sealer=rsa_key(2048, selector="arc", domain="lists.example.net"),
        self_sealer=dataclasses.replace(base, domain="evil.example", selector="arc"),
        sub=dataclasses.replace(base, domain="mail.example.org", selector="sub"),
    )


@pytest.fixture(scope="module")
def corpus_dns(keys: Keys) -> Iterator[ZoneServer]:
    with ZoneServer(ttl=0, negative_ttl=0) as server:
        for key in (keys.rsa2048, keys.rsa1024, keys.rsa512, keys.ed25519, keys.evil):
            publish(server, key)
        for key in (keys.suffix, keys.sealer, keys.self_sealer, keys.sub):
            publish(server, key)
        publish(server, keys.testing, "t=y")
        server.add_txt("example.org", "v=spf1 ip4:192.0.2.0/24 -all")
        server.add_txt("_dmarc.example.org", "v=DMARC1; p=reject; rua=mailto:d@example.org")
        server.add_txt("evil.example", "v=spf1 ip4:198.51.100.0/24 -all")
        server.add_txt("loop.example", "v=spf1 include:loop.example -all")
        for n in range(12):
            server.add_txt(f"d{n}.many.example", "v=spf1 -all")
        server.add_txt(
            "many.example",
            "v=spf1 " + " ".join(f"include:d{n}.many.example" for n in range(12)) + " -all",
        )
        yield server


def _app(tmp: Path, dns: ZoneServer, **auth: Any) -> AppThread:
    app = AppThread.from_sections(
        f"sqlite:///{tmp / 'corpus.db'}",
        smtp={"trusted_proxies": ["127.0.0.0/8"]},
        dns={"nameservers": [dns.address], "timeout_seconds": 0.5},
        auth={
            "trusted_authserv_ids": ["mx.example.com"],
            "trusted_arc_sealers": ["lists.example.net"],
            **auth,
        },
    )
    app.start()
    return app


@pytest.fixture(scope="module")
def strict_app(
    tmp_path_factory: pytest.TempPathFactory, corpus_dns: ZoneServer
) -> Iterator[AppThread]:
    app = _app(tmp_path_factory.mktemp("strict"), corpus_dns)
    yield app
    app.stop()


@pytest.fixture(scope="module")
def relaxed_app(
    tmp_path_factory: pytest.TempPathFactory, corpus_dns: ZoneServer
) -> Iterator[AppThread]:
    app = _app(tmp_path_factory.mktemp("relaxed"), corpus_dns, alignment="relaxed")
    yield app
    app.stop()


def deliver(
    app: AppThread, raw: bytes, client_ip: str | None = CLIENT, mail_from: str = "alice@example.org"
) -> Message:
    """Send through the real listener, as Postfix would with XFORWARD; the processed row."""
    with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as client:
        client.ehlo("mx.example.com")
        address = client_ip if client_ip is not None else "[UNAVAILABLE]"
        assert client.docmd("XFORWARD", f"ADDR={address} HELO=mail.example.org")[0] == 250
        assert client.mail(mail_from or "<>")[0] == 250
        assert client.rcpt(SUPPORT)[0] == 250
        code, reply = client.data(raw)
        assert code == 250, reply
    message_id = int(reply.decode().rsplit(" ", 1)[1])

    def finished() -> Message | None:
        for row in messages(app.database_url):
            if row.id == message_id and row.state in (
                MessageState.PROCESSED,
                MessageState.DEFERRED,
                MessageState.FAILED,
            ):
                return row
        return None

    row: Message = wait_for(finished, timeout=30)
    return row


def all_reasons(row: Message) -> str:
    verdict = row.verdict or {}
    parts = list(verdict.get("reasons") or [])
    for signature in verdict.get("dkim") or []:
        parts.extend(signature.get("reasons") or [])
    if verdict.get("spf"):
        parts.append(f"spf={verdict['spf']['result']}: {verdict['spf']['explanation']}")
    for upstream in verdict.get("upstream") or []:
        parts.append(f"upstream {upstream['authserv_id']}: {upstream['reason']}")
    if verdict.get("arc"):
        parts.append(f"arc={verdict['arc']['result']}: {verdict['arc']['reason']}")
    return " | ".join(parts)


@dataclass
class Case:
    build: Callable[[Keys], bytes]
    strength: str  # expected: strong | weak | none
    reason: str = ""  # a piece of text the recorded reasons must contain
    client_ip: str | None = CLIENT
    mail_from: str = "alice@example.org"
    relaxed: bool = False
    marks: list[Any] = field(default_factory=list)


def _signed(key_name: str, **message: Any) -> Callable[[Keys], bytes]:
    return lambda k: sign(build_message(**message), getattr(k, key_name))


def _prepend(header: bytes, inner: Callable[[Keys], bytes]) -> Callable[[Keys], bytes]:
    return lambda k: header + inner(k)


def _append(extra: bytes, inner: Callable[[Keys], bytes]) -> Callable[[Keys], bytes]:
    return lambda k: inner(k) + extra


def _list_forwarded(sealer: str) -> Callable[[Keys], bytes]:
    def build(k: Keys) -> bytes:
        original = sign(build_message(), k.rsa2048)
        # The list rewrites the subject, which breaks the author's signature...
        modified = original.replace(
            b"Subject: Reset my security question", b"Subject: [help] Reset my security question"
        )
        # ...and seals what it saw on arrival.
        key = k.sealer if sealer == "trusted" else k.self_sealer
        authserv = "lists.example.net" if sealer == "trusted" else "evil.example"
        return arc_seal(
            modified, key, authserv, "none", ["dkim=pass header.d=example.org", "spf=none"]
        )

    return build


def _ar(text: str, inner: Callable[[Keys], bytes]) -> Callable[[Keys], bytes]:
    return _prepend(f"Authentication-Results: {text}\r\n".encode(), inner)


def _sign_without_from(k: Keys) -> bytes:
    """A valid signature whose h= leaves From out (dkimpy's signer refuses to make one)."""
    raw = build_message()
    signer = dkim.DKIM(raw, signature_algorithm=b"rsa-sha256", linesep=b"\r\n")
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/simple")
    signer.hasher = HASH_ALGORITHMS[b"rsa-sha256"]
    body_hash = base64.b64encode(hashlib.sha256(policy.canonicalize_body(signer.body)).digest())
    headers = (b"to", b"subject", b"date")
    fields = [
        (b"v", b"1"),
        (b"a", b"rsa-sha256"),
        (b"c", b"relaxed/simple"),
        (b"d", b"example.org"),
        (b"s", k.rsa2048.selector.encode()),
        (b"t", str(int(time.time())).encode()),
        (b"h", b" : ".join(headers)),
        (b"bh", body_hash),
        (b"b", b"0" * 60),
    ]
    value = signer.gen_header(
        fields, headers, policy, b"DKIM-Signature", parse_pem_private_key(k.rsa2048.private)
    )
    return b"DKIM-Signature: " + value + raw


def _two_signatures(k: Keys) -> bytes:
    raw = sign(build_message(), k.rsa2048)
    return sign(raw, k.evil)  # the outermost (first) signature is the unaligned one


OLD = datetime.now(UTC) - timedelta(days=5)
FUTURE = datetime.now(UTC) + timedelta(days=2)

CASES: dict[str, Case] = {
    # -- legitimate ---------------------------------------------------------------------
    "strict-alignment-rsa2048": Case(_signed("rsa2048"), "strong"),
    "rsa1024-key": Case(_signed("rsa1024"), "strong"),
    "ed25519": Case(_signed("ed25519"), "strong"),
    "two-signatures-second-aligned": Case(_two_signatures, "strong"),
    "uppercase-from-domain": Case(
        _signed("rsa2048", from_header="Alice <alice@EXAMPLE.ORG>"), "strong"
    ),
    "display-name-equal-to-address": Case(
        _signed("rsa2048", from_header="alice@example.org <alice@example.org>"), "strong"
    ),
    "encoded-word-display-name": Case(
        _signed("rsa2048", from_header="=?utf-8?q?Al=C3=AFce?= <alice@example.org>"), "strong"
    ),
    "subdomain-under-relaxed": Case(
        _signed("rsa2048", from_header="Alice <alice@mail.example.org>"),
        "strong",
        relaxed=True,
        mail_from="",
    ),
    "parent-domain-signer-under-strict": Case(
        _signed("rsa2048", from_header="Alice <alice@mail.example.org>"),
        "none",
        "does not align",
        mail_from="",
    ),
    "aligned-spf-pass-only": Case(lambda k: build_message(), "weak"),
    "trusted-arc-sealer": Case(_list_forwarded("trusted"), "weak", client_ip=STRANGER),
    "trusted-upstream-dkim-pass": Case(
        _ar("mx.example.com; dkim=pass header.d=example.org", lambda k: build_message()),
        "strong",
        client_ip=STRANGER,
    ),
    # -- the author is ambiguous ----------------------------------------------------------
    "two-from-headers": Case(
        _prepend(b"From: mallory@evil.example\r\n", _signed("rsa2048")),
        "none",
        "multiple_from_headers",
    ),
    "multi-mailbox-from": Case(
        _signed("rsa2048", from_header="alice@example.org, mallory@evil.example"),
        "none",
        "from_multiple_mailboxes",
    ),
    "group-syntax": Case(
        _signed("rsa2048", from_header="Friends: alice@example.org;"),
        "none",
        "from_group_or_route_syntax",
    ),
    "route-address": Case(
        _signed("rsa2048", from_header="<@evil.example:alice@example.org>"),
        "none",
        "from_group_or_route_syntax",
    ),
    "display-name-shows-another-address": Case(
        _signed("evil", from_header="alice@example.org <mallory@evil.example>"),
        "none",
        "from_display_name_shows_another_address",
        mail_from="mallory@evil.example",
        client_ip="198.51.100.9",
    ),
    "encoded-word-display-name-hides-address": Case(
        _signed("evil", from_header="=?utf-8?q?alice=40example=2Eorg?= <mallory@evil.example>"),
        "none",
        "from_display_name_shows_another_address",
        mail_from="mallory@evil.example",
        client_ip="198.51.100.9",
    ),
    "encoded-word-in-address": Case(
        _signed("rsa2048", from_header="Alice <=?utf-8?q?alice?=@example.org>"),
        "none",
        "from_encoded_word_in_address",
    ),
    "comment-hides-address": Case(
        _signed("evil", from_header="mallory@evil.example (alice@example.org)"),
        "none",
        "from_comment",
        mail_from="mallory@evil.example",
        client_ip="198.51.100.9",
    ),
    "quoted-local-part": Case(
        _signed("evil", from_header='"alice@example.org"@evil.example'),
        "none",
        "from_quoted_local_part",
        mail_from="mallory@evil.example",
        client_ip="198.51.100.9",
    ),
    "no-from": Case(_signed("rsa2048", from_header=None), "none", "no_from_header"),
    "prepended-duplicate-subject": Case(
        _prepend(b"Subject: Transfer the funds\r\n", _signed("rsa2048")),
        "none",
        "duplicate_header:subject",
    ),
    "duplicate-message-id": Case(
        _prepend(b"Message-ID: <other@evil.example>\r\n", _signed("rsa2048")),
        "none",
        "duplicate_header:message-id",
    ),
    "whitespace-before-colon": Case(
        _prepend(b"From : mallory@evil.example\r\n", _signed("rsa2048")),
        "none",
        "whitespace_before_colon",
    ),
    "folded-field-name": Case(
        _prepend(b"From\r\n : mallory@evil.example\r\n", _signed("rsa2048")),
        "none",
        "malformed_header_line",
    ),
    "bare-lf-line-ends": Case(
        lambda k: sign(build_message(), k.rsa2048).replace(b"Thanks,\r\n", b"Thanks,\n"),
        "none",
        "wire_bare_lf",
    ),
    # -- signatures that do not count -------------------------------------------------------
    "from-not-signed": Case(
        _sign_without_from,
        "none",
        "From is not among the signed headers",
        client_ip=STRANGER,
    ),
    "length-tag-with-appended-content": Case(
        _append(
            b"\r\nP.S. also send the new password to mallory@evil.example\r\n",
            lambda k: sign(build_message(), k.rsa2048, length=True),
        ),
        "none",
        "does not cover the whole body",
        client_ip=STRANGER,
    ),
    "signature-by-another-domain": Case(
        _signed("evil"), "none", "does not align", client_ip=STRANGER
    ),
    "signature-by-public-suffix": Case(
        _signed("suffix", from_header="Alice <alice@example.co.uk>"),
        "none",
        "public suffix",
        relaxed=True,
        mail_from="",
    ),
    "rsa-sha1": Case(
        lambda k: sign(build_message(), k.rsa2048, algorithm=b"rsa-sha1"),
        "none",
        "algorithm rsa-sha1 not accepted",
        client_ip=STRANGER,
    ),
    "rsa512-key": Case(_signed("rsa512"), "none", "512 bits", client_ip=STRANGER),
    "testing-key": Case(_signed("testing"), "none", "testing mode", client_ip=STRANGER),
    "expired-signature": Case(
        lambda k: sign(
            build_message(), k.rsa2048, timestamp=int(time.time()) - 7200, expire_seconds=60
        ),
        "none",
        "expired",
        client_ip=STRANGER,
    ),
    "tampered-body": Case(
        lambda k: sign(build_message(), k.rsa2048).replace(b"Alice\r\n", b"Mallory\r\n"),
        "none",
        "body hash mismatch",
        client_ip=STRANGER,
    ),
    "unknown-selector": Case(
        lambda k: sign(build_message(), dataclasses.replace(k.rsa2048, selector="nosuch")),
        "none",
        "signature does not verify",
        client_ip=STRANGER,
    ),
    # -- forged or untrusted upstream claims ----------------------------------------------
    "forged-authentication-results": Case(
        _ar("mx.attacker.example; dkim=pass header.d=example.org", lambda k: build_message()),
        "none",
        "authserv-id is not trusted",
        client_ip=STRANGER,
    ),
    "trusted-id-below-the-topmost": Case(
        _ar(
            "mx.example.com; dkim=fail header.d=example.org",
            _ar("mx.example.com; dkim=pass header.d=example.org", lambda k: build_message()),
        ),
        "none",
        "below the topmost trusted header",
        client_ip=STRANGER,
    ),
    "trusted-upstream-pass-for-another-domain": Case(
        _ar("mx.example.com; dkim=pass header.d=evil.example", lambda k: build_message()),
        "none",
        "no aligned DKIM pass",
        client_ip=STRANGER,
    ),
    "self-sealed-arc": Case(_list_forwarded("self"), "none", "not trusted", client_ip=STRANGER),
    # -- SPF --------------------------------------------------------------------------------
    "spf-fail-from-stranger": Case(
        lambda k: build_message(), "none", "spf=fail", client_ip=STRANGER
    ),
    "spf-no-helo-fallback-for-null-sender": Case(
        lambda k: build_message(), "none", "null reverse path", mail_from=""
    ),
    "spf-include-loop": Case(
        lambda k: build_message(from_header="Alice <alice@loop.example>"),
        "none",
        "spf=permerror",
        mail_from="alice@loop.example",
    ),
    "spf-too-many-lookups": Case(
        lambda k: build_message(from_header="Alice <alice@many.example>"),
        "none",
        "spf=permerror",
        mail_from="alice@many.example",
    ),
    "spf-pass-for-another-domain": Case(
        lambda k: build_message(),
        "none",
        "no aligned DKIM pass",
        mail_from="mallory@evil.example",
        client_ip="198.51.100.9",
    ),
    # -- time -------------------------------------------------------------------------------
    "stale-date": Case(_signed("rsa2048", date=OLD), "none", "date_stale"),
    "date-in-the-future": Case(_signed("rsa2048", date=FUTURE), "none", "date_in_future"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_corpus_message_gets_its_verdict(
    name: str, keys: Keys, strict_app: AppThread, relaxed_app: AppThread
) -> None:
    case = CASES[name]
    app = relaxed_app if case.relaxed else strict_app
    row = deliver(app, case.build(keys), case.client_ip, case.mail_from)
    reasons = all_reasons(row)
    assert row.state == MessageState.PROCESSED, reasons
    assert row.auth_strength == case.strength, reasons
    assert row.authenticated is (case.strength != "none"), reasons
    assert case.reason in reasons, reasons


def test_the_corpus_is_large_enough() -> None:
    attacks = [c for c in CASES.values() if c.strength == "none"]
    assert len(CASES) >= 40
    assert len(attacks) >= 30


def test_verdict_records_the_evidence(keys: Keys, strict_app: AppThread) -> None:
    row = deliver(strict_app, _two_signatures(keys))
    verdict = row.verdict
    assert verdict is not None
    assert verdict["from"] == "alice@example.org"
    assert verdict["from_domain"] == "example.org"
    assert verdict["alignment"] == "strict"
    assert verdict["organizational_domain"] == "example.org"
    first, second = verdict["dkim"]
    assert (first["domain"], first["selector"], first["result"]) == ("evil.example", "evil", "pass")
    assert first["aligned"] is False
    assert first["counts"] is False
    assert (second["domain"], second["selector"], second["algorithm"]) == (
        "example.org",
        "s2048",
        "rsa-sha256",
    )
    assert second["key_bits"] == 2048
    assert second["counts"] is True
    assert "from" in second["signed_headers"]
    assert verdict["spf"]["result"] == "pass"
    assert verdict["spf"]["client_ip"] == CLIENT
    assert verdict["spf"]["aligned"] is True
    assert verdict["dmarc"]["policy"] == "reject"


def test_replayed_message_is_not_authenticated_again(keys: Keys, strict_app: AppThread) -> None:
    raw = sign(build_message(), keys.rsa2048)
    first = deliver(strict_app, raw)
    again = deliver(strict_app, raw)
    assert first.auth_strength == "strong"
    assert again.authenticated is False
    assert f"replay: dkim already seen in message {first.id}" in all_reasons(again)


def test_dns_trouble_defers_and_the_message_is_decided_when_dns_returns(
    keys: Keys, strict_app: AppThread, corpus_dns: ZoneServer
) -> None:
    key = dataclasses.replace(keys.rsa2048, selector="flaky")
    publish(corpus_dns, key)
    corpus_dns.set_timeout(key.dns_name)
    corpus_dns.set_servfail("example.org")
    try:
        row = deliver(strict_app, sign(build_message(), key))
        assert row.state == MessageState.DEFERRED
        assert row.authenticated is False
        assert row.next_attempt_at is not None
        assert any("Timeout" in e for e in (row.verdict or {})["temporary_errors"])
    finally:
        corpus_dns.clear_faults()
    # Bring the retry forward instead of waiting a minute; the worker does the rest.
    service = strict_app.app.messages
    with service.db.writing() as session:
        stored = session.get(Message, row.id)
        assert stored is not None
        stored.next_attempt_at = datetime.now(UTC)
    strict_app.app.worker.wake()
    decided = wait_for(
        lambda: (m := service.get(row.id)).state == MessageState.PROCESSED and m, timeout=30
    )
    assert decided.auth_strength == "strong"
    assert decided.deferrals == 1
