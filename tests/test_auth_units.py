"""Pure pieces of sender authentication: alignment, the strict author, the resolver's line
between "no record" and "could not find out", and the check command."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailproc.auth import Authenticator, Envelope
from mailproc.auth.alignment import aligned, organizational_domain
from mailproc.auth.author import identify_author
from mailproc.auth.dns import Resolver, TemporaryDNSError
from mailproc.cli import main
from mailproc.config import AuthSettings, ConfigError, DnsSettings
from mailproc.message import parse_message
from tests.dkimkeys import build_message, publish, rsa_key, sign
from tests.dnsserver import ZoneServer
from tests.support import write_config


@pytest.mark.parametrize(
    ("signer", "author", "mode", "expected"),
    [
        ("example.org", "example.org", "strict", True),
        ("EXAMPLE.org.", "example.ORG", "strict", True),
        ("mail.example.org", "example.org", "strict", False),
        ("mail.example.org", "example.org", "relaxed", True),
        ("example.org", "a.b.example.org", "relaxed", True),
        ("example.co.uk", "mail.example.co.uk", "relaxed", True),
        ("co.uk", "example.co.uk", "relaxed", False),  # never through a public suffix
        ("github.io", "alice.github.io", "relaxed", False),  # PSL private section
        ("bob.github.io", "alice.github.io", "relaxed", False),
        ("evil.example", "example.org", "relaxed", False),
        ("bücher.example", "xn--bcher-kva.example", "strict", True),  # IDNA A-labels
        (None, "example.org", "strict", False),
        ("not a domain", "example.org", "strict", False),
    ],
)
def test_alignment(signer: str | None, author: str, mode: str, expected: bool) -> None:
    assert aligned(signer, author, mode) is expected


def test_organizational_domain_uses_the_private_section() -> None:
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert organizational_domain("alice.github.io") == "alice.github.io"
    assert organizational_domain("co.uk") is None


@pytest.mark.parametrize(
    ("header", "address", "reason"),
    [
        ("Alice <alice@example.org>", "alice@example.org", None),
        ('"Example, Alice" <Alice@Example.org>', "alice@example.org", None),
        ("alice@example.org", "alice@example.org", None),
        ('"alice@example.org" <mallory@evil.example>', None, "display_name_shows"),
        ("Alice <alice@example.org> <mallory@evil.example>", None, "multiple_angle"),
        ("Alice <alice@example.org", None, "malformed_angle"),
        ('"Alice <alice@example.org>', None, "unterminated_quote"),
        ("alice@example.org\t(Alice)", None, "from_comment"),
    ],
)
def test_author_is_one_unambiguous_mailbox(
    header: str, address: str | None, reason: str | None
) -> None:
    author = identify_author(parse_message(build_message(from_header=header)), [])
    if reason is None:
        assert author.reasons == []
        assert author.address == address
    else:
        assert any(reason in r for r in author.reasons), author.reasons


def test_resolver_tells_no_record_from_temporary_failure(zone: ZoneServer) -> None:
    zone.add_txt("present.example", "hello")
    zone.set_servfail("broken.example")
    zone.set_timeout("slow.example")
    resolver = Resolver(DnsSettings(nameservers=(zone.address,), timeout_seconds=0.3))
    with resolver.tracking() as errors:
        assert resolver.txt("present.example") == [b"hello"]
        assert resolver.txt("absent.example") == []
        with pytest.raises(TemporaryDNSError):
            resolver.txt("broken.example")
        with pytest.raises(TemporaryDNSError):
            resolver.txt("slow.example")
    assert len(errors) == 2


def test_resolver_caches_answers_within_their_ttl() -> None:
    with ZoneServer(ttl=300) as server:
        server.add_txt("cached.example", "v=spf1 -all")
        resolver = Resolver(DnsSettings(nameservers=(server.address,), timeout_seconds=0.5))
        for _ in range(3):
            assert resolver.txt("cached.example") == [b"v=spf1 -all"]
        assert server.queries.count(("cached.example", "TXT")) == 1


def test_resolver_asks_again_once_the_ttl_has_passed_and_keeps_its_size() -> None:
    with ZoneServer(ttl=1, negative_ttl=1) as server:
        server.add_txt("short.example", "first")
        resolver = Resolver(
            DnsSettings(nameservers=(server.address,), timeout_seconds=0.5, cache_size=2)
        )
        assert resolver.txt("short.example") == [b"first"]
        server.remove("short.example")
        server.add_txt("short.example", "second")
        assert resolver.txt("short.example") == [b"first"]  # within the TTL
        time.sleep(1.1)
        assert resolver.txt("short.example") == [b"second"]
        assert server.queries.count(("short.example", "TXT")) == 2
        for name in ("a.example", "b.example", "c.example"):
            resolver.txt(name)
        assert len(resolver._answers) <= 2


def test_a_broken_check_fails_closed(zone: ZoneServer, monkeypatch: pytest.MonkeyPatch) -> None:
    key = rsa_key(1024, selector="boom")
    publish(zone, key)

    def explode(*args: object, **kwargs: object) -> bool:
        raise RuntimeError("unexpected")

    monkeypatch.setattr("dkim.DKIM.verify", explode)
    authenticator = Authenticator(
        AuthSettings(), DnsSettings(nameservers=(zone.address,), timeout_seconds=0.5)
    )
    verdict = authenticator.evaluate(
        sign(build_message(), key), Envelope(None, "", None), datetime.now(UTC)
    )
    assert verdict.authenticated is False
    assert "dkim check error: RuntimeError: unexpected" in verdict.dkim[0].reasons


def test_check_command_explains_and_sets_its_exit_status(
    zone: ZoneServer, tmp_path: Path, sqlite_url: str
) -> None:
    key = rsa_key(1024, selector="cli")
    publish(zone, key)
    config = write_config(tmp_path / "c.toml", sqlite_url)
    good, bad = tmp_path / "good.eml", tmp_path / "bad.eml"
    good.write_bytes(sign(build_message(), key))
    bad.write_bytes(build_message(from_header="alice@example.org, bob@example.org"))
    runner = CliRunner()

    result = runner.invoke(main, ["--config", str(config), "check", str(good), "--json"])
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.output)
    assert verdict["authenticated"] is True
    assert verdict["strength"] == "strong"
    assert verdict["from"] == "alice@example.org"
    assert verdict["reasons"] == []

    result = runner.invoke(main, ["--config", str(config), "check", str(bad)])
    assert result.exit_code == 1
    assert "NOT authenticated" in result.output
    assert "reason: from_multiple_mailboxes" in result.output

    zone.set_down(True)
    fresh = tmp_path / "fresh.eml"
    fresh.write_bytes(sign(build_message(), rsa_key(1024, selector="uncached")))
    result = runner.invoke(main, ["--config", str(config), "check", str(fresh)])
    assert result.exit_code == 75
    assert "temporary:" in result.output


def test_no_system_resolver_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import dns.resolver

    def no_resolv_conf(configure: bool = True) -> None:
        raise dns.resolver.NoResolverConfiguration("no nameservers")

    monkeypatch.setattr(dns.resolver, "Resolver", no_resolv_conf)
    with pytest.raises(ConfigError, match=r"^\[dns\] nameservers: empty, and this system"):
        Resolver(DnsSettings())
