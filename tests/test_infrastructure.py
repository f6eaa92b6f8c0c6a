"""The test infrastructure itself, end to end over real loopback DNS: `tests.dnsserver`
queried with dnspython, and `tests.dkimkeys` keys, signatures and ARC seals checked with
dkimpy. No mailproc code is involved."""

from __future__ import annotations

import dataclasses
import email
import socket
import threading
import time
from collections.abc import Iterator
from email import policy

import dkim  # type: ignore[import-untyped, unused-ignore]
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from tests.dkimkeys import (
    DkimKey,
    arc_seal,
    build_message,
    dnsfunc,
    ed25519_key,
    publish,
    rsa_key,
    sign,
)
from tests.dnsserver import ZoneServer

LIFETIME = 0.5
#: For lookups that are meant to time out.
SHORT = 0.3


def _threads_of(port: int) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.endswith(f"-{port}")]


@pytest.fixture
def zone() -> Iterator[ZoneServer]:
    """A fresh server per test (shadows conftest's shared one: these tests read its query log,
    restart it and set its TTLs)."""
    with ZoneServer() as server:
        yield server
    assert _threads_of(server.port) == []


@pytest.fixture(scope="module")
def keys() -> dict[str, DkimKey]:
    return {
        "rsa512": rsa_key(512),
        "rsa1024": rsa_key(1024),
        "rsa2048": rsa_key(2048),
        "ed25519": ed25519_key(),
    }


def _txt(resolver: dns.resolver.Resolver, name: str) -> list[bytes]:
    return [b"".join(r.strings) for r in resolver.resolve(name, "TXT")]


# -- DNS server -----------------------------------------------------------------------------


def test_dnspython_resolves_txt_a_aaaa_and_mx_from_the_server(zone: ZoneServer) -> None:
    zone.add_txt("example.org", "v=spf1 ip4:192.0.2.0/24 -all")
    zone.add_a("mail.example.org", "192.0.2.25")
    zone.add_aaaa("mail.example.org", "2001:db8::25")
    zone.add_mx("example.org", 10, "mail.example.org")
    resolver = zone.resolver(LIFETIME)

    assert _txt(resolver, "example.org") == [b"v=spf1 ip4:192.0.2.0/24 -all"]
    assert [r.address for r in resolver.resolve("mail.example.org", "A")] == ["192.0.2.25"]
    assert [r.address for r in resolver.resolve("mail.example.org", "AAAA")] == ["2001:db8::25"]
    mx = list(resolver.resolve("example.org", "MX"))
    assert [(r.preference, r.exchange.to_text()) for r in mx] == [(10, "mail.example.org.")]


def test_address_is_host_colon_port_for_mailproc_config(zone: ZoneServer) -> None:
    assert zone.address == f"127.0.0.1:{zone.port}"
    assert zone.port > 0


def test_unknown_name_is_nxdomain_and_other_type_at_known_name_is_nodata(
    zone: ZoneServer,
) -> None:
    zone.add_a("example.org", "192.0.2.1")
    resolver = zone.resolver(LIFETIME)

    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("nosuch.example.org", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("example.org", "TXT")


def test_parent_of_a_defined_name_exists_as_an_empty_non_terminal(zone: ZoneServer) -> None:
    zone.add_txt("sel._domainkey.example.org", "v=DKIM1; p=")
    resolver = zone.resolver(LIFETIME)

    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("_domainkey.example.org", "TXT")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("other._domainkey.example.org", "TXT")


def test_negative_answers_carry_an_soa_with_the_negative_ttl() -> None:
    with ZoneServer(negative_ttl=42) as server:
        server.add_a("example.org", "192.0.2.1")
        for name, rcode in (("nosuch.example.org", "NXDOMAIN"), ("example.org", "NOERROR")):
            query = dns.message.make_query(name, "TXT")
            response = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=LIFETIME)
            assert dns.rcode.to_text(response.rcode()) == rcode
            assert response.answer == []
            soa = response.authority[0]
            assert soa.rdtype == dns.rdatatype.SOA
            assert soa[0].minimum == 42


def test_names_match_case_insensitively_with_or_without_trailing_dot(zone: ZoneServer) -> None:
    zone.add_txt("_DMARC.Example.ORG.", "v=DMARC1; p=reject")
    resolver = zone.resolver(LIFETIME)

    assert _txt(resolver, "_dmarc.example.org") == [b"v=DMARC1; p=reject"]
    assert _txt(resolver, "_Dmarc.EXAMPLE.org.") == [b"v=DMARC1; p=reject"]
    zone.remove("_dmarc.example.org")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("_dmarc.example.org", "TXT")


def test_long_txt_is_one_record_split_into_255_byte_strings(zone: ZoneServer) -> None:
    text = "v=DKIM1; k=rsa; p=" + "A" * 600
    zone.add_txt("long.example.org", text)

    answer = zone.resolver(LIFETIME).resolve("long.example.org", "TXT")
    (record,) = list(answer)
    assert [len(s) for s in record.strings] == [255, 255, len(text) - 510]
    assert b"".join(record.strings) == text.encode()


def test_explicit_strings_and_repeated_add_txt_build_one_rrset(zone: ZoneServer) -> None:
    zone.add_txt("example.org", ["v=spf1 ", "include:_spf.example.net -all"])
    zone.add_txt("example.org", "v=spf1 -all")

    records = sorted(
        tuple(r.strings) for r in zone.resolver(LIFETIME).resolve("example.org", "TXT")
    )
    assert records == [(b"v=spf1 ", b"include:_spf.example.net -all"), (b"v=spf1 -all",)]


def test_cname_is_followed_to_its_target(zone: ZoneServer) -> None:
    zone.add_cname("sel._domainkey.example.org", "sel.keys.example.net")
    zone.add_txt("sel.keys.example.net", "v=DKIM1; p=abc")

    answer = zone.resolver(LIFETIME).resolve("sel._domainkey.example.org", "TXT")
    assert [b"".join(r.strings) for r in answer] == [b"v=DKIM1; p=abc"]
    assert answer.canonical_name.to_text() == "sel.keys.example.net."


def test_cname_refuses_to_coexist_with_other_records(zone: ZoneServer) -> None:
    zone.add_a("www.example.org", "192.0.2.1")
    with pytest.raises(ValueError, match="CNAME"):
        zone.add_cname("www.example.org", "example.org")


def test_ptr_record_answers_the_reverse_name(zone: ZoneServer) -> None:
    zone.add_ptr("192.0.2.25", "mail.example.org")
    answer = zone.resolver(LIFETIME).resolve("25.2.0.192.in-addr.arpa", "PTR")
    assert [r.target.to_text() for r in answer] == ["mail.example.org."]


def test_answer_too_big_for_udp_is_truncated_and_retried_over_tcp(zone: ZoneServer) -> None:
    text = "x" * 3000
    zone.add_txt("big.example.org", text)
    query = dns.message.make_query("big.example.org", "TXT")

    udp = dns.query.udp(query, "127.0.0.1", port=zone.port, timeout=LIFETIME)
    assert udp.flags & dns.flags.TC
    assert udp.answer == []

    assert _txt(zone.resolver(LIFETIME), "big.example.org") == [text.encode()]
    assert ("big.example.org", "TXT") in zone.tcp_queries


def test_edns_client_gets_a_mid_sized_answer_over_udp(zone: ZoneServer) -> None:
    text = "y" * 1000  # over 512 bytes, under the 1232-byte EDNS cap
    zone.add_txt("mid.example.org", text)
    plain, edns = zone.resolver(LIFETIME), zone.resolver(LIFETIME)
    edns.use_edns(0, 0, 4096)

    assert _txt(edns, "mid.example.org") == [text.encode()]
    assert zone.tcp_queries == []
    assert _txt(plain, "mid.example.org") == [text.encode()]
    assert zone.tcp_queries == [("mid.example.org", "TXT")]


def test_remove_one_type_or_whole_name_and_clear(zone: ZoneServer) -> None:
    zone.add_a("example.org", "192.0.2.1")
    zone.add_txt("example.org", "v=spf1 -all")
    zone.add_txt("example.net", "x")
    resolver = zone.resolver(LIFETIME)

    zone.remove("example.org", "TXT")
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("example.org", "TXT")
    assert len(resolver.resolve("example.org", "A")) == 1

    zone.remove("example.org")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("example.org", "A")

    zone.clear()
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("example.net", "TXT")


def test_timeout_fault_makes_dnspython_time_out_within_its_lifetime(zone: ZoneServer) -> None:
    zone.add_txt("example.org", "v=spf1 -all")
    zone.set_timeout("example.org")

    started = time.monotonic()
    with pytest.raises(dns.exception.Timeout):
        zone.resolver(SHORT).resolve("example.org", "TXT")
    assert time.monotonic() - started < 1.5
    assert zone.queries[-1] == ("example.org", "TXT")


def test_timeout_fault_for_one_type_leaves_other_types_answering(zone: ZoneServer) -> None:
    zone.add_txt("example.org", "v=spf1 -all")
    zone.add_a("example.org", "192.0.2.1")
    zone.set_timeout("example.org", "TXT")
    resolver = zone.resolver(SHORT)

    assert len(resolver.resolve("example.org", "A")) == 1
    with pytest.raises(dns.exception.Timeout):
        resolver.resolve("example.org", "TXT")


def test_timeout_fault_over_tcp_holds_the_connection_until_the_client_gives_up(
    zone: ZoneServer,
) -> None:
    zone.add_txt("example.org", "v=spf1 -all")
    zone.set_timeout("example.org")
    query = dns.message.make_query("example.org", "TXT")

    with pytest.raises(dns.exception.Timeout):
        dns.query.tcp(query, "127.0.0.1", port=zone.port, timeout=SHORT)


def test_servfail_fault_gives_dnspython_no_nameservers(zone: ZoneServer) -> None:
    zone.add_txt("_dmarc.example.org", "v=DMARC1; p=reject")
    zone.set_servfail("_dmarc.example.org")

    with pytest.raises(dns.resolver.NoNameservers):
        zone.resolver(LIFETIME).resolve("_dmarc.example.org", "TXT")

    zone.clear_faults()
    assert _txt(zone.resolver(LIFETIME), "_dmarc.example.org") == [b"v=DMARC1; p=reject"]


def test_server_down_drops_every_query_until_brought_back(zone: ZoneServer) -> None:
    zone.add_a("example.org", "192.0.2.1")
    zone.set_down(True)

    with pytest.raises(dns.exception.Timeout):
        zone.resolver(SHORT).resolve("example.org", "A")
    with pytest.raises(dns.exception.Timeout):
        zone.resolver(SHORT).resolve("nosuch.example.org", "A")

    zone.set_down(False)
    assert len(zone.resolver(LIFETIME).resolve("example.org", "A")) == 1


def test_query_log_shows_a_caching_resolver_asking_once(zone: ZoneServer) -> None:
    zone.add_txt("example.org", "v=spf1 -all")
    zone.clear_queries()
    cached = zone.resolver(LIFETIME, cache=True)

    for _ in range(3):
        cached.resolve("example.org", "TXT")
    assert zone.queries == [("example.org", "TXT")]

    uncached = zone.resolver(LIFETIME)
    uncached.resolve("Example.org.", "TXT")
    assert zone.queries.count(("example.org", "TXT")) == 2


def test_stop_closes_both_sockets_and_leaves_no_threads() -> None:
    server = ZoneServer()
    server.start()
    server.add_a("example.org", "192.0.2.1")
    # A held TCP connection must not keep stop() waiting or leave its thread behind.
    server.set_timeout("example.org")
    held = socket.create_connection(("127.0.0.1", server.port))
    query = dns.message.make_query("example.org", "A").to_wire()
    held.sendall(len(query).to_bytes(2, "big") + query)
    time.sleep(0.1)
    port = server.port

    server.stop()
    held.close()
    server.stop()  # idempotent

    assert _threads_of(port) == []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", port))
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=LIFETIME).close()


def test_port_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _ = ZoneServer().port


# -- DKIM keys and signatures ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["rsa1024", "rsa2048", "ed25519"])
def test_signed_message_verifies_over_loopback_dns(
    zone: ZoneServer, keys: dict[str, DkimKey], name: str
) -> None:
    key = keys[name]
    publish(zone, key)

    signed = sign(build_message(), key)

    assert signed.startswith(b"DKIM-Signature: ")
    assert f"a={key.algorithm.decode()};".encode() in signed
    assert dkim.verify(signed, dnsfunc=dnsfunc(zone)) is True
    assert (key.dns_name, "TXT") in zone.queries


def test_key_records_have_the_dkim_formats(keys: dict[str, DkimKey]) -> None:
    assert keys["rsa2048"].record.startswith("v=DKIM1; k=rsa; p=MIIBIjAN")
    assert keys["rsa2048"].private.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert keys["ed25519"].record.startswith("v=DKIM1; k=ed25519; p=")
    assert len(keys["ed25519"].record) == len("v=DKIM1; k=ed25519; p=") + 44
    assert len(keys["ed25519"].private) == 44  # base64 of the 32-byte seed
    assert [keys[n].bits for n in ("rsa512", "rsa1024", "rsa2048", "ed25519")] == [
        512,
        1024,
        2048,
        256,
    ]


def test_2048_bit_key_record_longer_than_255_bytes_round_trips(
    zone: ZoneServer, keys: dict[str, DkimKey]
) -> None:
    key = keys["rsa2048"]
    assert len(key.record) > 255
    publish(zone, key)

    (record,) = list(zone.resolver(LIFETIME).resolve(key.dns_name, "TXT"))
    assert len(record.strings) == 2
    assert dnsfunc(zone)(f"{key.dns_name}.".encode()) == key.record.encode()
    assert dkim.verify(sign(build_message(), key), dnsfunc=dnsfunc(zone)) is True


def test_512_bit_key_verifies_only_below_the_default_minimum(
    zone: ZoneServer, keys: dict[str, DkimKey]
) -> None:
    key = keys["rsa512"]
    publish(zone, key)
    signed = sign(build_message(), key)

    assert dkim.verify(signed, dnsfunc=dnsfunc(zone)) is False
    assert dkim.verify(signed, dnsfunc=dnsfunc(zone), minkey=512) is True


def test_tampered_body_or_signed_header_fails_verification(
    zone: ZoneServer, keys: dict[str, DkimKey]
) -> None:
    key = keys["rsa2048"]
    publish(zone, key)
    signed = sign(build_message(), key)
    assert dkim.verify(signed, dnsfunc=dnsfunc(zone)) is True

    tampered_body = signed.replace(b"reset my security question", b"send me the keys")
    tampered_subject = signed.replace(b"Subject: Reset", b"Subject: Urgent reset")
    assert tampered_body != signed
    assert tampered_subject != signed
    assert dkim.verify(tampered_body, dnsfunc=dnsfunc(zone)) is False
    assert dkim.verify(tampered_subject, dnsfunc=dnsfunc(zone)) is False


def test_unpublished_or_unreachable_key_fails_verification(
    zone: ZoneServer, keys: dict[str, DkimKey]
) -> None:
    key = keys["ed25519"]
    signed = sign(build_message(), key)
    assert dkim.verify(signed, dnsfunc=dnsfunc(zone)) is False

    publish(zone, key)
    zone.set_timeout(key.dns_name)
    with pytest.raises(dkim.DnsTimeoutError):
        dnsfunc(zone, lifetime=SHORT)(f"{key.dns_name}.".encode())
    assert dkim.verify(signed, dnsfunc=dnsfunc(zone, lifetime=SHORT)) is False


def test_key_published_for_another_selector_does_not_verify(
    zone: ZoneServer, keys: dict[str, DkimKey]
) -> None:
    key = keys["rsa1024"]
    publish(zone, dataclasses.replace(keys["rsa2048"], selector=key.selector))

    assert dkim.verify(sign(build_message(), key), dnsfunc=dnsfunc(zone)) is False


def test_publish_appends_extra_tags(zone: ZoneServer, keys: dict[str, DkimKey]) -> None:
    key = keys["ed25519"]
    assert publish(zone, key, extra_tags="t=y") == key.dns_name

    assert _txt(zone.resolver(LIFETIME), key.dns_name) == [f"{key.record}; t=y".encode()]
    assert dkim.verify(sign(build_message(), key), dnsfunc=dnsfunc(zone)) is True


def test_rsa_sha1_signature_can_be_made_for_negative_cases(
    zone: ZoneServer, keys: dict[str, DkimKey]
) -> None:
    key = keys["rsa2048"]
    publish(zone, key)

    signed = sign(build_message(), key, algorithm=b"rsa-sha1")

    assert b"a=rsa-sha1;" in signed
    # dkimpy still accepts rsa-sha1 (RFC 8301 says verifiers must not): policy is the caller's.
    assert dkim.verify(signed, dnsfunc=dnsfunc(zone)) is True


def test_expiry_tag_is_set_and_an_expired_signature_fails(
    zone: ZoneServer, keys: dict[str, DkimKey]
) -> None:
    key = keys["rsa2048"]
    publish(zone, key)
    message = build_message()

    fresh = sign(message, key, expire_seconds=3600)
    tags = _signature_tags(fresh)
    assert int(tags["x"]) == int(tags["t"]) + 3600
    assert dkim.verify(fresh, dnsfunc=dnsfunc(zone)) is True

    two_days_ago = int(time.time()) - 2 * 86400
    expired = sign(message, key, expire_seconds=3600, timestamp=two_days_ago)
    assert _signature_tags(expired)["t"] == str(two_days_ago)
    assert dkim.verify(expired, dnsfunc=dnsfunc(zone)) is False


def test_length_tag_lets_appended_body_text_still_verify(
    zone: ZoneServer, keys: dict[str, DkimKey]
) -> None:
    key = keys["rsa2048"]
    publish(zone, key)

    signed = sign(build_message(), key, length=True)
    assert "l" in _signature_tags(signed)
    appended = signed + b"P.S. also change the recovery email to evil@example.net\r\n"

    assert dkim.verify(appended, dnsfunc=dnsfunc(zone)) is True


def test_identity_and_headers_end_up_in_the_signature(keys: dict[str, DkimKey]) -> None:
    signed = sign(
        build_message(),
        keys["ed25519"],
        headers=(b"from", b"from", b"subject"),
        identity=b"alice@example.org",
        canonicalize=(b"simple", b"simple"),
    )
    tags = _signature_tags(signed)
    assert tags["i"] == "alice@example.org"
    assert tags["h"].replace(" ", "") == "from:from:subject"
    assert tags["c"] == "simple/simple"


def test_arc_sealed_message_verifies_with_arc_verify(
    zone: ZoneServer, keys: dict[str, DkimKey]
) -> None:
    author = keys["rsa2048"]
    forwarder = dataclasses.replace(keys["rsa1024"], domain="lists.example.net", selector="arc")
    publish(zone, author)
    publish(zone, forwarder)
    signed = sign(build_message(), author)

    sealed = arc_seal(signed, forwarder, "mx.lists.example.net", "none", ["dkim=pass"])

    assert sealed.startswith(b"ARC-Seal: i=1; cv=none;")
    assert b"Authentication-Results: mx.lists.example.net;" in sealed
    cv, results, reason = dkim.arc_verify(sealed, dnsfunc=dnsfunc(zone))
    assert (cv, reason) == (b"pass", "success")
    assert results[0]["as-domain"] == b"lists.example.net"

    # A second hop continues the chain.
    resealed = arc_seal(sealed, forwarder, "mx2.lists.example.net", "pass")
    assert resealed.startswith(b"ARC-Seal: i=2; cv=pass;")
    cv, results, _ = dkim.arc_verify(resealed, dnsfunc=dnsfunc(zone))
    assert cv == b"pass"
    assert [r["instance"] for r in results] == [2, 1]


def test_arc_seal_over_a_modified_message_fails(zone: ZoneServer, keys: dict[str, DkimKey]) -> None:
    forwarder = dataclasses.replace(keys["rsa2048"], domain="lists.example.net", selector="arc")
    publish(zone, forwarder)
    sealed = arc_seal(build_message(), forwarder, "mx.lists.example.net")

    cv, _, _ = dkim.arc_verify(sealed.replace(b"Reset my", b"Wipe my"), dnsfunc=dnsfunc(zone))
    assert cv == b"fail"


def test_arc_seal_refuses_ed25519_keys(keys: dict[str, DkimKey]) -> None:
    with pytest.raises(ValueError, match="RSA"):
        arc_seal(build_message(), keys["ed25519"], "mx.example.net")


# -- messages ---------------------------------------------------------------------------------


def test_build_message_has_crlf_lines_and_fresh_date_and_message_id() -> None:
    first, second = build_message(), build_message()

    assert b"\n" not in first.replace(b"\r\n", b"")
    assert first.endswith(b"\r\n")
    parsed = email.message_from_bytes(first, policy=policy.default)
    assert parsed["From"] == "Alice <alice@example.org>"
    assert parsed["To"] == "support@example.com"
    assert parsed["Subject"] == "Reset my security question"
    assert parsed["Date"].datetime.tzinfo is not None
    assert parsed["Message-ID"].endswith("@example.org>")
    assert parsed["Message-ID"] != email.message_from_bytes(second)["Message-ID"]
    assert "reset my security question" in parsed.get_content()


def test_build_message_takes_given_headers_and_body() -> None:
    raw = build_message(
        from_header="Mallory <mallory@example.net>",
        subject="Hi",
        date="Mon, 1 Jan 2024 00:00:00 +0000",
        message_id="<fixed@example.net>",
        extra_headers=[("Reply-To", "other@example.net"), ("From", "second@example.net")],
        body="line one\nline two",
    )
    head, _, body = raw.partition(b"\r\n\r\n")

    assert b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n" in head
    assert b"Message-ID: <fixed@example.net>\r\n" in head
    assert head.count(b"\r\nFrom: ") + head.startswith(b"From: ") == 2
    assert body == b"line one\r\nline two\r\n"
    assert not build_message(from_header=None).startswith(b"From:")


def _signature_tags(signed: bytes) -> dict[str, str]:
    value = email.message_from_bytes(signed)["DKIM-Signature"]
    tags = (part.strip() for part in "".join(value.split()).split(";") if part.strip())
    return dict(tag.split("=", 1) for tag in tags)
