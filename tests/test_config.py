"""Settings: built-in defaults, the example file, one-line errors, environment overrides, CLI."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner

from mailproc.cli import EX_CONFIG, main
from mailproc.config import (
    SECTIONS,
    ConfigError,
    ListenAddress,
    Settings,
    SmtpSettings,
    load_settings,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
_KEY_LINE = re.compile(r"\s*([A-Za-z0-9_]+)\s*=")
_SECTION_LINE = re.compile(r"\s*\[([A-Za-z0-9_]+)\]\s*$")


@pytest.fixture
def write(tmp_path: Path):
    """Write TOML text to a fresh file and return its path."""

    def write(text: str, name: str = "mailproc.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MAILPROC_* variables leaking in from the environment the tests run in."""
    for name in list(os.environ):
        if name.startswith("MAILPROC_"):
            monkeypatch.delenv(name)


def load_error(path: Path | None, env: dict[str, str] | None = None) -> str:
    """The ConfigError message for ``path``; asserts it is exactly one line."""
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={} if env is None else env)
    message = str(info.value)
    assert message.strip() == message
    assert len(message.splitlines()) == 1, message
    return message


# -- built-in defaults and the example file ------------------------------------------------


def test_no_file_and_no_mailproc_config_gives_builtin_defaults() -> None:
    settings = load_settings(None, env={})

    assert settings == Settings()
    assert settings.source == "built-in defaults"
    assert settings.smtp.listen == ListenAddress("127.0.0.1", 2525)
    assert settings.smtp.protocol == "smtp"
    assert settings.smtp.support_addresses == ("support@example.com",)
    assert settings.database.url == "sqlite:///mailproc.db"
    assert settings.logging.level == "info"


def test_empty_mailproc_config_means_builtin_defaults() -> None:
    assert load_settings(None, env={"MAILPROC_CONFIG": ""}) == Settings()


def test_example_config_gives_exactly_the_builtin_defaults() -> None:
    settings = load_settings(EXAMPLE, env={})

    assert settings.source == str(EXAMPLE)
    assert dataclasses.replace(settings, source=Settings().source) == Settings()


def test_example_config_sets_every_key_of_every_section() -> None:
    data = tomllib.loads(EXAMPLE.read_text())

    assert set(SECTIONS) == {
        "smtp",
        "database",
        "worker",
        "dns",
        "auth",
        "logging",
        "templates",
        "outbound",
        "accounts",
        "rules",
        "queue",
        "mode",
        "approval",
        "reset",
        "web",
        "retention",
    }
    assert set(data) == set(SECTIONS)
    for section, cls in SECTIONS.items():
        assert set(data[section]) == {f.name for f in dataclasses.fields(cls)}, section


def _documented_keys(text: str) -> dict[tuple[str | None, str], bool]:
    """(section, key) -> whether a comment sits above the key (or above the run of key lines
    it belongs to, as for two keys sharing one explanation)."""
    lines = text.splitlines()
    section: str | None = None
    documented: dict[tuple[str | None, str], bool] = {}
    for index, line in enumerate(lines):
        if match := _SECTION_LINE.match(line):
            section = match.group(1)
            continue
        if match := _KEY_LINE.match(line):
            above = index - 1
            while above >= 0 and _KEY_LINE.match(lines[above]):
                above -= 1
            commented = above >= 0 and lines[above].lstrip().startswith("#")
            documented[(section, match.group(1))] = commented
    return documented


def test_example_config_documents_every_key_with_a_comment_above_it() -> None:
    documented = _documented_keys(EXAMPLE.read_text())

    expected = {
        (section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
    }
    missing = sorted(expected - set(documented), key=str)
    undocumented = sorted((k for k in expected & set(documented) if not documented[k]), key=str)
    assert not missing, f"keys absent from config.example.toml: {missing}"
    assert not undocumented, f"keys without a comment above them: {undocumented}"


def test_documentation_check_notices_an_uncommented_key() -> None:
    documented = _documented_keys('[smtp]\n# the listener\nlisten = "x"\n\nprotocol = "smtp"\n')

    assert documented == {("smtp", "listen"): True, ("smtp", "protocol"): False}


# -- errors: one line naming file, [section] key and problem --------------------------------


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        pytest.param("[smtp]\nbogus = 1\n", "[smtp] bogus", "unknown key", id="unknown-key"),
        pytest.param(
            "[smtpd]\nlisten = 'a:1'\n", "[smtpd]", "unknown section", id="unknown-section"
        ),
        pytest.param(
            '[smtp]\nmax_sessions = "5"\n',
            "[smtp] max_sessions",
            "expected an integer, got string",
            id="string-for-int",
        ),
        pytest.param(
            "[smtp]\nsupport_addresses = 5\n",
            "[smtp] support_addresses",
            "expected an array, got integer",
            id="int-for-list",
        ),
        pytest.param(
            '[smtp]\nsupport_addresses = "support@example.com"\n',
            "[smtp] support_addresses",
            "expected an array, got string",
            id="string-for-list",
        ),
        pytest.param(
            "[smtp]\nmax_recipients = true\n",
            "[smtp] max_recipients",
            "expected an integer, got boolean",
            id="bool-for-int",
        ),
        pytest.param(
            "[smtp]\nrequire_starttls = 1\n",
            "[smtp] require_starttls",
            "expected true or false, got integer",
            id="int-for-bool",
        ),
        pytest.param(
            "[worker]\nlease_seconds = false\n",
            "[worker] lease_seconds",
            "expected a number, got boolean",
            id="bool-for-float",
        ),
        pytest.param(
            '[worker]\npoll_interval_seconds = "5"\n',
            "[worker] poll_interval_seconds",
            "expected a number, got string",
            id="string-for-float",
        ),
        pytest.param(
            "[smtp]\nmax_sessions = 2.5\n",
            "[smtp] max_sessions",
            "expected an integer, got float",
            id="float-for-int",
        ),
        pytest.param(
            "[smtp]\nlisten = 2525\n",
            "[smtp] listen",
            "expected a string, got integer",
            id="int-for-string",
        ),
        pytest.param(
            '[smtp]\nlisten = "localhost"\n',
            "[smtp] listen",
            'expected "host:port"',
            id="listen-no-port",
        ),
        pytest.param(
            '[smtp]\nlisten = "127.0.0.1:65536"\n',
            "[smtp] listen",
            'expected "host:port"',
            id="listen-port-too-big",
        ),
        pytest.param(
            '[smtp]\nlisten = "127.0.0.1:-1"\n',
            "[smtp] listen",
            'expected "host:port"',
            id="listen-negative-port",
        ),
        pytest.param(
            '[smtp]\nlisten = "127.0.0.1:smtp"\n',
            "[smtp] listen",
            'expected "host:port"',
            id="listen-named-port",
        ),
        pytest.param(
            '[smtp]\nlisten = ":2525"\n',
            "[smtp] listen",
            'expected "host:port"',
            id="listen-no-host",
        ),
        pytest.param(
            '[smtp]\nlisten = "[::1]"\n',
            "[smtp] listen",
            'expected "host:port"',
            id="listen-ipv6-no-port",
        ),
        pytest.param(
            '[smtp]\nsupport_addresses = ["support"]\n',
            "[smtp] support_addresses",
            "item 1: invalid address 'support'",
            id="support-no-at",
        ),
        pytest.param(
            '[smtp]\nsupport_addresses = ["support@example.com", "help@localhost"]\n',
            "[smtp] support_addresses",
            "item 2: invalid domain 'localhost'",
            id="support-single-label",
        ),
        pytest.param(
            '[smtp]\nsupport_addresses = ["sup port@example.com"]\n',
            "[smtp] support_addresses",
            "item 1: invalid address",
            id="support-space",
        ),
        pytest.param(
            "[smtp]\nsupport_addresses = []\n",
            "[smtp] support_addresses",
            "must not be empty",
            id="support-empty",
        ),
        pytest.param(
            '[smtp]\ntrusted_proxies = ["10.0.0.0/33"]\n',
            "[smtp] trusted_proxies",
            "item 1: expected an IP address or CIDR",
            id="cidr-prefix-too-long",
        ),
        pytest.param(
            '[smtp]\ntrusted_proxies = ["10.0.0.1", "postfix.internal"]\n',
            "[smtp] trusted_proxies",
            "item 2: expected an IP address or CIDR",
            id="cidr-hostname",
        ),
        pytest.param(
            '[smtp]\ntrusted_proxies = ["300.0.0.0/8"]\n',
            "[smtp] trusted_proxies",
            "item 1: expected an IP address or CIDR",
            id="cidr-bad-octet",
        ),
        pytest.param(
            '[smtp]\nprotocol = "esmtp"\n',
            "[smtp] protocol",
            "must be one of 'smtp', 'lmtp', got 'esmtp'",
            id="bad-protocol",
        ),
        pytest.param(
            '[smtp]\nprotocol = "SMTP"\n', "[smtp] protocol", "must be one of", id="protocol-case"
        ),
        pytest.param(
            '[logging]\nlevel = "verbose"\n',
            "[logging] level",
            "must be one of",
            id="bad-log-level",
        ),
        pytest.param(
            "[smtp]\nmax_message_bytes = 0\n",
            "[smtp] max_message_bytes",
            "must be greater than 0, got 0",
            id="zero-int",
        ),
        pytest.param(
            "[smtp]\nmax_recipients = -1\n",
            "[smtp] max_recipients",
            "must be greater than 0, got -1",
            id="negative-int",
        ),
        pytest.param(
            "[worker]\nmax_attempts = 0\n",
            "[worker] max_attempts",
            "must be greater than 0",
            id="zero-attempts",
        ),
        pytest.param(
            "[worker]\npoll_interval_seconds = 0.0\n",
            "[worker] poll_interval_seconds",
            "must be greater than 0",
            id="zero-float",
        ),
        pytest.param(
            "[smtp]\nshutdown_grace_seconds = -1.5\n",
            "[smtp] shutdown_grace_seconds",
            "must be greater than 0",
            id="negative-float",
        ),
        pytest.param(
            '[database]\nurl = "sqlite://"\n',
            "[database] url",
            "in-memory SQLite",
            id="sqlite-no-path",
        ),
        pytest.param(
            '[database]\nurl = "sqlite:///:memory:"\n',
            "[database] url",
            "in-memory SQLite",
            id="sqlite-memory",
        ),
        pytest.param(
            '[database]\nurl = "mysql://mailproc@db/mailproc"\n',
            "[database] url",
            "unsupported database 'mysql'",
            id="mysql",
        ),
        pytest.param(
            '[database]\nurl = "postgresql+psycopg2://mailproc@db/mailproc"\n',
            "[database] url",
            "use the psycopg driver",
            id="postgres-wrong-driver",
        ),
        pytest.param(
            '[database]\nurl = "mailproc.db"\n',
            "[database] url",
            "not a database URL",
            id="not-a-url",
        ),
        pytest.param(
            '[database]\nmigrate_on_start = "yes"\n',
            "[database] migrate_on_start",
            "expected true or false, got string",
            id="string-for-bool",
        ),
        pytest.param(
            '[smtp]\ntls_cert_file = "/nonexistent/cert.pem"\n'
            'tls_key_file = "/nonexistent/key.pem"\n',
            "[smtp] tls_cert_file",
            "file not found: '/nonexistent/cert.pem'",
            id="missing-cert-file",
        ),
        pytest.param(
            "[smtp]\nrequire_starttls = true\n",
            "[smtp] require_starttls",
            "needs tls_cert_file and tls_key_file",
            id="starttls-without-tls",
        ),
    ],
)
def test_invalid_value_names_file_section_key_and_problem(
    write, text: str, where: str, problem: str
) -> None:
    path = write(text)

    message = load_error(path)

    assert message.startswith(f"{path}: {where}: "), message
    assert problem in message, message


def test_unknown_key_names_file_and_key(write) -> None:
    path = write("[worker]\nlease = 5.0\n")

    message = load_error(path)

    assert message.startswith(f"{path}: [worker] lease: unknown key"), message
    # The operator is told what would have been right.
    assert "lease_seconds" in message


def test_unknown_section_names_file_and_section(write) -> None:
    path = write('[smtp]\nlisten = "127.0.0.1:25"\n[workers]\nmax_attempts = 3\n')

    message = load_error(path)

    assert message.startswith(f"{path}: [workers]: unknown section"), message
    assert "worker" in message.split("known:", 1)[1]


def test_key_outside_any_table_is_an_error(write) -> None:
    path = write('listen = "127.0.0.1:25"\n')

    assert load_error(path).startswith(f"{path}: [listen]: unknown section")


def test_section_that_is_not_a_table_is_an_error(write) -> None:
    path = write("smtp = 1\n")

    message = load_error(path)

    assert message.startswith(f"{path}: smtp: expected a [smtp] table"), message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"

    assert load_error(path) == f"{path}: file not found"


def test_unreadable_path_names_the_file(tmp_path: Path) -> None:
    message = load_error(tmp_path)

    assert message.startswith(f"{tmp_path}: cannot read: "), message


def test_invalid_toml_names_the_file_in_one_line(write) -> None:
    path = write('[smtp]\nlisten = "127.0.0.1:25\nprotocol = "smtp"\n')

    message = load_error(path)

    assert message.startswith(f"{path}: invalid TOML: "), message
    assert "line 2" in message


def test_duplicate_key_is_invalid_toml(write) -> None:
    path = write('[smtp]\nprotocol = "smtp"\nprotocol = "lmtp"\n')

    assert load_error(path).startswith(f"{path}: invalid TOML: ")


def test_tls_cert_without_key_is_an_error(write, tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not checked here")
    path = write(f'[smtp]\ntls_cert_file = "{cert}"\n')

    message = load_error(path)

    assert message == f"{path}: [smtp] tls_cert_file: needs tls_key_file too (both or neither)"


def test_tls_key_without_cert_is_an_error(write, tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not checked here")
    path = write(f'[smtp]\ntls_key_file = "{key}"\n')

    assert load_error(path) == (
        f"{path}: [smtp] tls_key_file: needs tls_cert_file too (both or neither)"
    )


def test_tls_cert_and_key_together_allow_require_starttls(write, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued = trustme.CA().issue_cert("mx.example.com")
    issued.private_key_and_cert_chain_pem.write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    path = write(
        f'[smtp]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\nrequire_starttls = true\n'
    )

    smtp = load_settings(path, env={}).smtp

    assert (smtp.tls_cert_file, smtp.tls_key_file, smtp.require_starttls) == (
        str(cert),
        str(key),
        True,
    )


def test_tls_files_that_are_not_a_certificate_and_key_are_an_error(write, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    path = write(f'[smtp]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n')

    message = load_error(path)

    assert message.startswith(f"{path}: [smtp] tls_cert_file: cannot load the certificate"), message


@pytest.mark.parametrize("value", ["nan", "-nan", "+nan"])
def test_nan_is_not_a_positive_number(write, value: str) -> None:
    path = write(f"[smtp]\ncommand_timeout_seconds = {value}\n")

    message = load_error(path)

    assert message.startswith(f"{path}: [smtp] command_timeout_seconds: "), message


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///file:mailproc?mode=memory&uri=true",
        "sqlite:///file::memory:?uri=true",
        "sqlite:///file::memory:?cache=shared&uri=true",
    ],
)
def test_in_memory_sqlite_uri_is_rejected(write, url: str) -> None:
    path = write(f'[database]\nurl = "{url}"\n')

    message = load_error(path)

    assert message.startswith(f"{path}: [database] url: "), message


@pytest.mark.parametrize("hostname", ["mx.example.com\\r\\n250 evil", "mx\\n", "mx\\u0000"])
def test_hostname_with_whitespace_or_control_characters_is_rejected(write, hostname: str) -> None:
    path = write(f'[smtp]\nhostname = "{hostname}"\n')

    message = load_error(path)

    assert message.startswith(f"{path}: [smtp] hostname: "), message


# -- accepted values ------------------------------------------------------------------------


def test_file_values_are_parsed_into_typed_settings(write) -> None:
    path = write(
        """
[smtp]
listen = "[::1]:0"
protocol = "lmtp"
hostname = "mx.example.com"
support_addresses = ["Support@EXAMPLE.com", "help@Bücher.example"]
max_message_bytes = 1024
trusted_proxies = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]
command_timeout_seconds = 5
[database]
url = "postgresql+psycopg://mailproc@db.internal/mailproc"
migrate_on_start = false
[worker]
max_attempts = 2
[logging]
level = "debug"
"""
    )

    settings = load_settings(path, env={})

    assert settings.source == str(path)
    assert settings.smtp.listen == ListenAddress("::1", 0)
    assert str(settings.smtp.listen) == "[::1]:0"
    assert settings.smtp.protocol == "lmtp"
    assert settings.smtp.hostname == "mx.example.com"
    # Compared the same way as RCPT addresses: normalised once, here.
    assert settings.smtp.support_addresses == (
        "support@example.com",
        "help@xn--bcher-kva.example",
    )
    assert settings.smtp.max_message_bytes == 1024
    assert settings.smtp.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert settings.smtp.command_timeout_seconds == 5.0
    assert isinstance(settings.smtp.command_timeout_seconds, float)
    assert settings.database.url == "postgresql+psycopg://mailproc@db.internal/mailproc"
    assert settings.database.migrate_on_start is False
    assert settings.worker.max_attempts == 2
    assert settings.logging.level == "debug"
    # Keys not given keep their defaults.
    assert settings.smtp.max_recipients == SmtpSettings().max_recipients


def test_ipv4_listen_address_round_trips_through_str(write) -> None:
    settings = load_settings(write('[smtp]\nlisten = "0.0.0.0:25"\n'), env={})

    assert settings.smtp.listen == ListenAddress("0.0.0.0", 25)
    assert str(settings.smtp.listen) == "0.0.0.0:25"


def test_trusted_proxy_cidr_with_host_bits_is_accepted_as_its_network(write) -> None:
    settings = load_settings(write('[smtp]\ntrusted_proxies = ["10.1.2.3/8"]\n'), env={})

    assert settings.smtp.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)


def test_settings_are_frozen() -> None:
    settings = load_settings(None, env={})

    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.smtp.protocol = "lmtp"  # type: ignore[misc]


# -- environment variables ------------------------------------------------------------------


def test_mailproc_config_selects_the_file(write) -> None:
    path = write('[smtp]\nprotocol = "lmtp"\n')

    settings = load_settings(None, env={"MAILPROC_CONFIG": str(path)})

    assert settings.source == str(path)
    assert settings.smtp.protocol == "lmtp"


def test_explicit_path_wins_over_mailproc_config(write) -> None:
    chosen = write('[smtp]\nprotocol = "lmtp"\n', name="chosen.toml")
    other = write("[smtp]\nbogus = 1\n", name="other.toml")

    settings = load_settings(chosen, env={"MAILPROC_CONFIG": str(other)})

    assert settings.source == str(chosen)
    assert settings.smtp.protocol == "lmtp"


def test_mailproc_config_pointing_nowhere_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    assert load_error(None, env={"MAILPROC_CONFIG": str(path)}) == f"{path}: file not found"


def test_env_listen_overrides_the_file(write) -> None:
    path = write('[smtp]\nlisten = "127.0.0.1:2525"\n')

    settings = load_settings(path, env={"MAILPROC_SMTP_LISTEN": "[::]:25"})

    assert settings.smtp.listen == ListenAddress("::", 25)


def test_env_database_url_overrides_the_file(write) -> None:
    path = write('[database]\nurl = "sqlite:///from-file.db"\n')
    url = "postgresql+psycopg://mailproc:secret@db.internal/mailproc"

    settings = load_settings(path, env={"MAILPROC_DATABASE_URL": url})

    assert settings.database.url == url


def test_env_support_addresses_as_comma_list(write) -> None:
    path = write('[smtp]\nsupport_addresses = ["file@example.com"]\n')
    env = {"MAILPROC_SMTP_SUPPORT_ADDRESSES": " Help@Example.com ,support@example.org,"}

    settings = load_settings(path, env=env)

    assert settings.smtp.support_addresses == ("help@example.com", "support@example.org")


def test_env_support_addresses_as_toml_array(write) -> None:
    path = write('[smtp]\nsupport_addresses = ["file@example.com"]\n')
    env = {"MAILPROC_SMTP_SUPPORT_ADDRESSES": '["help@example.com", "support@example.org"]'}

    settings = load_settings(path, env=env)

    assert settings.smtp.support_addresses == ("help@example.com", "support@example.org")


def test_env_max_message_bytes_overrides_the_file(write) -> None:
    path = write("[smtp]\nmax_message_bytes = 1000\n")

    settings = load_settings(path, env={"MAILPROC_SMTP_MAX_MESSAGE_BYTES": "2048"})

    assert settings.smtp.max_message_bytes == 2048


def test_env_overrides_apply_without_a_file() -> None:
    env = {
        "MAILPROC_SMTP_MAX_MESSAGE_BYTES": "4096",
        "MAILPROC_DATABASE_MIGRATE_ON_START": "false",
        "MAILPROC_WORKER_POLL_INTERVAL_SECONDS": "2.5",
        "MAILPROC_WORKER_LEASE_SECONDS": "60",
        "MAILPROC_LOGGING_LEVEL": "warning",
    }

    settings = load_settings(None, env=env)

    assert settings.source == "built-in defaults"
    assert settings.smtp.max_message_bytes == 4096
    assert settings.database.migrate_on_start is False
    assert settings.worker.poll_interval_seconds == 2.5
    assert settings.worker.lease_seconds == 60.0
    assert settings.logging.level == "warning"


def test_env_is_not_read_from_os_environ_when_given(
    clean_environ: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILPROC_SMTP_PROTOCOL", "lmtp")

    assert load_settings(None, env={}).smtp.protocol == "smtp"
    assert load_settings(None).smtp.protocol == "lmtp"


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("MAILPROC_SMTP_MAX_MESSAGE_BYTES", "ten megabytes", "expected an integer, got string"),
        ("MAILPROC_SMTP_MAX_MESSAGE_BYTES", "0", "must be greater than 0, got 0"),
        ("MAILPROC_SMTP_MAX_MESSAGE_BYTES", "1.5", "expected an integer, got float"),
        ("MAILPROC_SMTP_LISTEN", "localhost", 'expected "host:port"'),
        ("MAILPROC_SMTP_PROTOCOL", "esmtp", "must be one of"),
        ("MAILPROC_SMTP_SUPPORT_ADDRESSES", "support@example.com,nope", "item 2: invalid address"),
        ("MAILPROC_SMTP_SUPPORT_ADDRESSES", '["support@localhost"]', "item 1: invalid domain"),
        ("MAILPROC_SMTP_TRUSTED_PROXIES", "10.0.0.0/33", "item 1: expected an IP address or CIDR"),
        ("MAILPROC_SMTP_REQUIRE_STARTTLS", "yes", "expected true or false, got string"),
        ("MAILPROC_SMTP_REQUIRE_STARTTLS", "1", "expected true or false, got integer"),
        ("MAILPROC_DATABASE_URL", "sqlite:///:memory:", "in-memory SQLite"),
        ("MAILPROC_DATABASE_URL", "mysql://db/mailproc", "unsupported database 'mysql'"),
        ("MAILPROC_WORKER_POLL_INTERVAL_SECONDS", "-1", "must be greater than 0"),
        ("MAILPROC_LOGGING_LEVEL", "loud", "must be one of"),
    ],
)
def test_bad_env_value_names_the_variable(write, name: str, value: str, problem: str) -> None:
    path = write("")

    message = load_error(path, env={name: value})

    assert message.startswith(f"environment {name}: "), message
    assert problem in message, message


def test_bad_env_value_is_reported_even_when_the_file_sets_the_key_well(write) -> None:
    path = write("[smtp]\nmax_recipients = 10\n")

    message = load_error(path, env={"MAILPROC_SMTP_MAX_RECIPIENTS": "many"})

    assert message.startswith("environment MAILPROC_SMTP_MAX_RECIPIENTS: "), message


@pytest.mark.parametrize(
    ("name", "section", "key"),
    [
        ("MAILPROC_SMTP_LISTEN_ADDRESS", "smtp", "listen_address"),
        ("MAILPROC_SMTP_MAX_SIZE", "smtp", "max_size"),
        ("MAILPROC_DATABASE_PASSWORD", "database", "password"),
        ("MAILPROC_WORKER_THREADS", "worker", "threads"),
    ],
)
def test_unknown_env_key_names_the_variable(name: str, section: str, key: str) -> None:
    message = load_error(None, env={name: "1"})

    assert message == f"environment {name}: unknown key [{section}] {key}"


@pytest.mark.parametrize("name", ["MAILPROC_DATABSE_URL", "MAILPROC_SMPT_LISTEN"])
def test_env_variable_with_unknown_section_is_a_warning_naming_it(name: str) -> None:
    # A warning, not an error: container platforms set MAILPROC_SERVICE_HOST and the like.
    settings = load_settings(None, env={name: "x"})

    [warning] = settings.warnings
    assert warning.startswith(f"environment {name}: ignored, not a setting"), warning
    assert settings == Settings()


def test_cli_config_check_prints_env_warnings(runner: CliRunner, monkeypatch) -> None:
    monkeypatch.setenv("MAILPROC_DATABSE_URL", "sqlite:///elsewhere.db")

    result = runner.invoke(main, ["config", "check"])

    assert result.exit_code == 0
    assert "Warning: environment MAILPROC_DATABSE_URL: ignored" in result.output


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAILPROC_SMTP_SUPPORT_ADDRESSES", ""),
        ("MAILPROC_SMTP_SUPPORT_ADDRESSES", "[]"),
        ("MAILPROC_SMTP_REQUIRE_STARTTLS", "true"),
    ],
)
def test_env_value_failing_a_cross_check_names_the_variable(write, name: str, value: str) -> None:
    path = write("")

    message = load_error(path, env={name: value})

    assert name in message, message


# -- the CLI --------------------------------------------------------------------------------


@pytest.fixture
def runner(clean_environ: None) -> CliRunner:
    return CliRunner()


def test_cli_config_check_with_bad_file_exits_78_with_one_error_line(write, runner) -> None:
    path = write('[smtp]\nlisten = "127.0.0.1:2525"\nbogus = true\n', name="bad.toml")

    result = runner.invoke(main, ["--config", str(path), "config", "check"])

    assert result.exit_code == EX_CONFIG == 78
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: {path}: [smtp] bogus: unknown key"), lines[0]
    assert "Traceback" not in result.output


def test_cli_config_check_with_bad_value_exits_78_naming_key(write, runner) -> None:
    path = write("[worker]\nmax_attempts = 0\n", name="bad.toml")

    result = runner.invoke(main, ["--config", str(path), "config", "check"])

    assert result.exit_code == 78
    assert result.stderr == f"Error: {path}: [worker] max_attempts: must be greater than 0, got 0\n"


def test_cli_config_check_with_missing_file_exits_78(runner, tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    result = runner.invoke(main, ["--config", str(path), "config", "check"])

    assert result.exit_code == 78
    assert result.stderr == f"Error: {path}: file not found\n"


def test_cli_config_check_reads_mailproc_config(write, runner) -> None:
    path = write("[smtp]\nbogus = 1\n", name="bad.toml")

    result = runner.invoke(main, ["config", "check"], env={"MAILPROC_CONFIG": str(path)})

    assert result.exit_code == 78
    assert result.stderr.startswith(f"Error: {path}: [smtp] bogus: ")


def test_cli_config_check_with_bad_env_value_names_the_variable(write, runner) -> None:
    path = write("")

    result = runner.invoke(
        main,
        ["--config", str(path), "config", "check"],
        env={"MAILPROC_SMTP_MAX_MESSAGE_BYTES": "big"},
    )

    assert result.exit_code == 78
    assert result.stderr.splitlines() == [
        "Error: environment MAILPROC_SMTP_MAX_MESSAGE_BYTES: expected an integer, got string"
    ]


def test_cli_config_check_with_good_file_exits_0(write, runner) -> None:
    path = write('[smtp]\nlisten = "127.0.0.1:0"\nprotocol = "lmtp"\n', name="good.toml")

    result = runner.invoke(main, ["--config", str(path), "config", "check"])

    assert result.exit_code == 0, result.output
    assert result.stdout == f"configuration OK ({path})\n"
    assert result.stderr == ""


def test_cli_config_check_accepts_the_example_file(runner) -> None:
    result = runner.invoke(main, ["--config", str(EXAMPLE), "config", "check"])

    assert result.exit_code == 0, result.output
    assert result.stdout == f"configuration OK ({EXAMPLE})\n"


def test_cli_config_check_without_config_uses_builtin_defaults(runner) -> None:
    result = runner.invoke(main, ["config", "check"])

    assert result.exit_code == 0, result.output
    assert result.stdout == "configuration OK (built-in defaults)\n"


def test_partial_outbound_dkim_settings_are_an_error(write) -> None:
    path = write('[outbound]\ndkim_selector = "replies"\n')

    assert load_error(path) == (
        f"{path}: [outbound] dkim_selector: outbound DKIM signing needs dkim_domain, "
        "dkim_private_key_file too (all three or none)"
    )


def test_outbound_lease_shorter_than_an_attempt_is_an_error(write) -> None:
    path = write("[outbound]\ntimeout_seconds = 30\nlease_seconds = 60\n")

    message = load_error(path)

    assert message.startswith(f"{path}: [outbound] lease_seconds: must be at least 4 times")


def test_outbound_password_comes_from_the_environment(write) -> None:
    path = write('[outbound]\nusername = "mailproc"\n')

    settings = load_settings(path, env={"MAILPROC_OUTBOUND_PASSWORD": "s3cret"})

    assert (settings.outbound.username, settings.outbound.password) == ("mailproc", "s3cret")


def test_templates_path_must_be_a_folder(write, tmp_path: Path) -> None:
    path = write(f'[templates]\npath = "{tmp_path / "missing"}"\n')

    assert load_error(path) == (
        f"{path}: [templates] path: folder not found: '{tmp_path / 'missing'}'"
    )


# -- [approval] and [reset] -----------------------------------------------------------------

GOOD_SECRET = "0123456789abcdef" * 2  # exactly the 32 characters required
SECRET_MESSAGE = (
    "the webhook needs a secret of at least 32 characters (set MAILPROC_RESET_WEBHOOK_SECRET, "
    "for example to the output of: openssl rand -hex 32)"
)
RESET_SQL = "UPDATE accounts SET security_question = NULL WHERE id = :account_id"
ACCOUNTS_URL = "sqlite:///accounts.db"


def test_approval_and_reset_defaults() -> None:
    settings = load_settings(None, env={})

    assert settings.approval.four_eyes_for_flagged is True
    assert settings.reset.method == "manual"
    assert (settings.reset.webhook_url, settings.reset.webhook_secret, settings.reset.sql) == (
        "",
        "",
        "",
    )
    assert settings.reset.lease_seconds >= 4 * settings.reset.timeout_seconds


def test_four_eyes_can_be_turned_off_in_the_file_or_the_environment(write) -> None:
    path = write("[approval]\nfour_eyes_for_flagged = false\n")

    assert load_settings(path, env={}).approval.four_eyes_for_flagged is False
    env = {"MAILPROC_APPROVAL_FOUR_EYES_FOR_FLAGGED": "false"}
    assert load_settings(None, env=env).approval.four_eyes_for_flagged is False
    bad = write('[approval]\nfour_eyes_for_flagged = "no"\n', name="bad.toml")
    assert load_error(bad) == (
        f"{bad}: [approval] four_eyes_for_flagged: expected true or false, got string"
    )


def test_a_complete_webhook_configuration_is_accepted(write) -> None:
    path = write(
        "[reset]\n"
        'method = "webhook"\n'
        'webhook_url = "https://app.example.com/hooks/reset"\n'
        f'webhook_secret = "{GOOD_SECRET}"\n'
        "timeout_seconds = 5\n"
        "lease_seconds = 20\n"  # exactly 4 x timeout_seconds
        "max_attempts = 3\n"
    )

    settings = load_settings(path, env={})

    reset = settings.reset
    assert (reset.method, reset.webhook_url, reset.webhook_secret) == (
        "webhook",
        "https://app.example.com/hooks/reset",
        GOOD_SECRET,
    )
    assert (reset.timeout_seconds, reset.lease_seconds, reset.max_attempts) == (5.0, 20.0, 3)
    assert settings.warnings == ()


def test_a_complete_sql_configuration_is_accepted(write) -> None:
    path = write(
        f'[accounts]\nurl = "{ACCOUNTS_URL}"\n[reset]\nmethod = "sql"\nsql = "{RESET_SQL}"\n'
    )

    reset = load_settings(path, env={}).reset

    assert (reset.method, reset.sql) == ("sql", RESET_SQL)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            f'[reset]\nmethod = "webhook"\nwebhook_secret = "{GOOD_SECRET}"\n',
            '[reset] method: "webhook" needs webhook_url',
            id="webhook-without-url",
        ),
        pytest.param(
            '[reset]\nmethod = "webhook"\nwebhook_url = "https://app.example.com/reset"\n',
            f"[reset] webhook_secret: {SECRET_MESSAGE}",
            id="webhook-without-secret",
        ),
        pytest.param(
            '[reset]\nmethod = "webhook"\nwebhook_url = "https://app.example.com/reset"\n'
            f'webhook_secret = "{GOOD_SECRET[:-1]}"\n',
            f"[reset] webhook_secret: {SECRET_MESSAGE}",
            id="webhook-secret-one-short",
        ),
        pytest.param(
            '[reset]\nmethod = "webhook"\nwebhook_url = "ftp://app.example.com/reset"\n'
            f'webhook_secret = "{GOOD_SECRET}"\n',
            "[reset] webhook_url: expected an http(s) URL, got 'ftp://app.example.com/reset'",
            id="webhook-url-not-http",
        ),
        pytest.param(
            f'[accounts]\nurl = "{ACCOUNTS_URL}"\n[reset]\nmethod = "sql"\n',
            '[reset] method: "sql" needs sql, one statement with the parameter :account_id '
            "(see config.example.toml)",
            id="sql-without-sql",
        ),
        pytest.param(
            f'[accounts]\nurl = "{ACCOUNTS_URL}"\n[reset]\nmethod = "sql"\nsql = "  \\n "\n',
            '[reset] method: "sql" needs sql, one statement with the parameter :account_id '
            "(see config.example.toml)",
            id="sql-blank",
        ),
        pytest.param(
            f'[reset]\nmethod = "sql"\nsql = "{RESET_SQL}"\n',
            '[reset] method: "sql" runs against the accounts database: set [accounts] url',
            id="sql-without-accounts-url",
        ),
        pytest.param(
            f'[accounts]\nurl = "{ACCOUNTS_URL}"\n[reset]\nmethod = "sql"\n'
            'sql = "UPDATE accounts SET security_question = NULL WHERE email = :email"\n',
            "[reset] sql: must use the parameter :account_id",
            id="sql-other-parameter-only",
        ),
        pytest.param(
            f'[accounts]\nurl = "{ACCOUNTS_URL}"\n[reset]\nmethod = "sql"\n'
            'sql = "UPDATE accounts SET security_question = NULL"\n',
            "[reset] sql: must use the parameter :account_id",
            id="sql-no-parameter",
        ),
        pytest.param(
            f'[accounts]\nurl = "{ACCOUNTS_URL}"\n[reset]\nmethod = "sql"\n'
            'sql = "UPDATE accounts SET security_question = NULL '
            'WHERE id = :account_id AND email = :email"\n',
            "[reset] sql: may use only :account_id, not email",
            id="sql-extra-parameter",
        ),
        pytest.param(
            "[reset]\ntimeout_seconds = 20\nlease_seconds = 79.9\n",
            "[reset] lease_seconds: must be at least 4 times timeout_seconds (20), so that no "
            "reset still running is taken over and run twice",
            id="lease-below-4x-timeout",
        ),
        pytest.param(
            "[reset]\ntimeout_seconds = 30\n",  # the default lease (60) is now too short
            "[reset] lease_seconds: must be at least 4 times timeout_seconds (30), so that no "
            "reset still running is taken over and run twice",
            id="default-lease-below-4x-timeout",
        ),
        pytest.param(
            '[reset]\nmethod = "ldap"\n',
            "[reset] method: must be one of 'manual', 'webhook', 'sql', got 'ldap'",
            id="unknown-method",
        ),
        pytest.param(
            '[reset]\nmethod = "Webhook"\n',
            "[reset] method: must be one of 'manual', 'webhook', 'sql', got 'Webhook'",
            id="method-case",
        ),
        pytest.param(
            "[reset]\nmax_attempts = 0\n",
            "[reset] max_attempts: must be greater than 0, got 0",
            id="zero-attempts",
        ),
    ],
)
def test_reset_error_names_file_and_key_in_one_line(write, text: str, expected: str) -> None:
    path = write(text)

    # load_error asserts the message is exactly one line.
    assert load_error(path) == f"{path}: {expected}"


def test_short_webhook_secret_is_not_repeated_in_the_error(write) -> None:
    secret = "hunter2-but-longer"
    path = write(
        '[reset]\nmethod = "webhook"\nwebhook_url = "https://app.example.com/reset"\n'
        f'webhook_secret = "{secret}"\n'
    )

    message = load_error(path)

    assert message.startswith(f"{path}: [reset] webhook_secret: "), message
    assert secret not in message


def test_webhook_secret_from_the_environment_satisfies_the_webhook(write) -> None:
    path = write('[reset]\nmethod = "webhook"\nwebhook_url = "https://app.example.com/reset"\n')

    settings = load_settings(path, env={"MAILPROC_RESET_WEBHOOK_SECRET": GOOD_SECRET})

    assert settings.reset.webhook_secret == GOOD_SECRET
    assert settings.where("reset", "webhook_secret") == "environment MAILPROC_RESET_WEBHOOK_SECRET"


def test_too_short_webhook_secret_from_the_environment_names_the_variable(write) -> None:
    # The file's secret is long enough, but the variable overrides it.
    path = write(
        '[reset]\nmethod = "webhook"\nwebhook_url = "https://app.example.com/reset"\n'
        f'webhook_secret = "{GOOD_SECRET}"\n'
    )

    message = load_error(path, env={"MAILPROC_RESET_WEBHOOK_SECRET": GOOD_SECRET[:-1]})

    assert message == f"environment MAILPROC_RESET_WEBHOOK_SECRET: {SECRET_MESSAGE}"
    assert GOOD_SECRET[:-1] not in message


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param(
            {"MAILPROC_RESET_METHOD": "ldap"},
            "environment MAILPROC_RESET_METHOD: must be one of 'manual', 'webhook', 'sql', "
            "got 'ldap'",
            id="method",
        ),
        pytest.param(
            {"MAILPROC_RESET_METHOD": "webhook"},
            'environment MAILPROC_RESET_METHOD: "webhook" needs webhook_url',
            id="method-webhook-without-url",
        ),
        pytest.param(
            {
                "MAILPROC_RESET_METHOD": "sql",
                "MAILPROC_ACCOUNTS_URL": ACCOUNTS_URL,
                "MAILPROC_RESET_SQL": "DELETE FROM accounts WHERE email = :email",
            },
            "environment MAILPROC_RESET_SQL: must use the parameter :account_id",
            id="sql",
        ),
        pytest.param(
            {"MAILPROC_RESET_LEASE_SECONDS": "39"},
            "environment MAILPROC_RESET_LEASE_SECONDS: must be at least 4 times timeout_seconds "
            "(10), so that no reset still running is taken over and run twice",
            id="lease",
        ),
    ],
)
def test_reset_error_from_the_environment_names_the_variable(
    write, env: dict[str, str], expected: str
) -> None:
    assert load_error(write(""), env=env) == expected


def test_lease_of_exactly_4x_timeout_is_accepted(write) -> None:
    path = write("[reset]\ntimeout_seconds = 20\nlease_seconds = 80\n")

    assert load_settings(path, env={}).reset.lease_seconds == 80.0


def webhook_settings(write, url: str, method: str = "webhook") -> Settings:
    path = write(
        f'[reset]\nmethod = "{method}"\nwebhook_url = "{url}"\nwebhook_secret = "{GOOD_SECRET}"\n'
    )
    return load_settings(path, env={})


def test_plain_http_webhook_to_another_host_is_a_warning(write) -> None:
    url = "http://app.internal:8080/hooks/reset"

    settings = webhook_settings(write, url)

    assert settings.reset.webhook_url == url  # a warning, not an error
    [warning] = settings.warnings
    assert warning.startswith(f"{settings.source}: [reset] webhook_url: {url} is plain http: ")
    assert "unencrypted" in warning
    assert len(warning.splitlines()) == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hooks/reset",
        "http://localhost/hooks/reset",
        "http://[::1]:8080/hooks/reset",
        "https://app.example.com/hooks/reset",
        "https://127.0.0.1/hooks/reset",
    ],
)
def test_no_warning_for_a_loopback_or_https_webhook(write, url: str) -> None:
    assert webhook_settings(write, url).warnings == ()


def test_a_postgresql_cast_on_the_parameter_gets_a_hint(write) -> None:
    path = write(
        '[accounts]\nurl = "sqlite:///accounts.db"\n[reset]\nmethod = "sql"\n'
        'sql = "UPDATE accounts SET q = NULL WHERE id = :account_id::bigint"\n'
    )
    with pytest.raises(ConfigError) as raised:
        load_settings(path, env={})
    assert str(raised.value) == (
        f"{path}: [reset] sql: a parameter followed by :: is not bound; write "
        "CAST(:account_id AS bigint) instead of :account_id::bigint"
    )


def test_no_http_warning_when_the_webhook_is_not_the_method(write) -> None:
    settings = webhook_settings(write, "http://app.internal/hooks/reset", method="manual")

    assert settings.warnings == ()


def test_cli_config_check_prints_the_plain_http_warning(write, runner) -> None:
    path = write(
        '[reset]\nmethod = "webhook"\nwebhook_url = "http://app.internal/reset"\n'
        f'webhook_secret = "{GOOD_SECRET}"\n'
    )

    result = runner.invoke(main, ["--config", str(path), "config", "check"])

    assert result.exit_code == 0, result.output
    assert result.stdout == f"configuration OK ({path})\n"
    assert result.stderr.startswith(
        f"Warning: {path}: [reset] webhook_url: http://app.internal/reset is plain http: "
    ), result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_cli_config_check_with_a_bad_reset_exits_78_in_one_line(write, runner) -> None:
    path = write('[reset]\nmethod = "sql"\n', name="bad.toml")

    result = runner.invoke(main, ["--config", str(path), "config", "check"])

    assert result.exit_code == EX_CONFIG
    assert result.stdout == ""
    assert result.stderr == (
        f'Error: {path}: [reset] method: "sql" needs sql, one statement with the parameter '
        ":account_id (see config.example.toml)\n"
    )


def test_a_plain_http_console_on_another_host_is_a_warning(write) -> None:
    path = write('[web]\nbase_url = "http://support.example.com:8025"\n')
    [warning] = load_settings(path, env={}).warnings
    assert warning.startswith(f"{path}: [web] base_url: http://support.example.com:8025 is plain")
    assert "cannot be Secure" in warning
    assert (
        load_settings(write('[web]\nbase_url = "https://support.example.com"\n'), env={}).warnings
        == ()
    )
    assert load_settings(None, env={}).warnings == ()
