"""Settings: one TOML file plus ``MAILPROC_<SECTION>_<KEY>`` environment variables, validated
into typed, frozen dataclasses. Every error names its source (file or variable), the key and
what is wrong, in one line."""

from __future__ import annotations

import ipaddress
import math
import os
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from mailproc.addresses import AddressError, normalize_address, normalize_domain

ENV_PREFIX = "MAILPROC_"
CONFIG_ENV = "MAILPROC_CONFIG"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """Invalid configuration; the message is one line naming source, key and problem."""


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# Each key's parser takes the raw TOML value and returns the typed value or raises ValueError.
# ``kind`` tells how to read the same key from an environment variable's text.
@dataclass(frozen=True)
class _Key:
    parse: Callable[[Any], Any]
    kind: Literal["str", "int", "float", "bool", "list"]


def _key(default: Any, parse: Callable[[Any], Any], kind: str) -> Any:
    return field(default=default, metadata={"key": _Key(parse, kind)})  # type: ignore[arg-type]


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}.get(
        type(value), type(value).__name__
    )


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type_name(value)}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_type_name(value)}")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {_type_name(value)}")
    if value <= 0:
        raise ValueError(f"must be greater than 0, got {value}")
    return value


def _positive_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {_type_name(value)}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be greater than 0, got {value}")
    return float(value)


def _non_negative_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {_type_name(value)}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return float(value)


def _one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _str(value)
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}, got {text!r}")
        return text

    return parse


def _list_of(item: Callable[[Any], Any], at_least: int = 0) -> Callable[[Any], tuple[Any, ...]]:
    def parse(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected an array, got {_type_name(value)}")
        if len(value) < at_least:
            raise ValueError("must not be empty" if at_least == 1 else f"needs {at_least} items")
        parsed = []
        for index, element in enumerate(value):
            try:
                parsed.append(item(element))
            except ValueError as exc:
                raise ValueError(f"item {index + 1}: {exc}") from None
        return tuple(parsed)

    return parse


def _listen(value: Any) -> ListenAddress:
    text = _str(value)
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f'expected "host:port" (IPv6 as "[::1]:port"), got {text!r}')
    return ListenAddress(host, int(port_text))


def _address(value: Any) -> str:
    try:
        return normalize_address(_str(value))
    except AddressError as exc:
        raise ValueError(str(exc)) from None


def _address_or_empty(value: Any) -> str:
    return _address(value) if _str(value) else ""


def _hostname(value: Any) -> str:
    text = _str(value)
    if not text:
        return text
    try:
        return normalize_domain(text)
    except AddressError as exc:
        raise ValueError(f"expected a fully qualified host name: {exc}") from None


def _network(value: Any) -> IPNetwork:
    text = _str(value)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"expected an IP address or CIDR such as 10.0.0.0/8, got {text!r}"
        ) from None


def _database_url(value: Any) -> str:
    text = _str(value)
    try:
        url = make_url(text)
    except ArgumentError:
        raise ValueError(f"not a database URL: {text!r}") from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(
            f"unsupported database {url.get_backend_name()!r}: use sqlite or postgresql"
        )
    if url.get_backend_name() == "sqlite" and (
        not url.database
        or ":memory:" in url.database
        or url.query.get("mode") == "memory"
        or "mode=memory" in url.database
    ):
        raise ValueError("an in-memory SQLite database would lose every message; give a file path")
    if url.get_backend_name() == "postgresql" and url.get_driver_name() not in ("psycopg",):
        raise ValueError('use the psycopg driver: "postgresql+psycopg://user@host/dbname"')
    return text


def _existing_file_or_empty(value: Any) -> str:
    text = _str(value)
    if text and not Path(text).is_file():
        raise ValueError(f"file not found: {text!r}")
    return text


def _existing_dir_or_empty(value: Any) -> str:
    text = _str(value)
    if text and not Path(text).is_dir():
        raise ValueError(f"folder not found: {text!r}")
    return text


def _url(value: Any) -> str:
    text = _str(value)
    if not text.startswith(("https://", "http://")):
        raise ValueError(f"expected an http(s) URL, got {text!r}")
    return text


def _url_or_empty(value: Any) -> str:
    return _url(value) if _str(value) else ""


def _log_level(value: Any) -> str:
    return _one_of("debug", "info", "warning", "error")(value)


DEFAULT_LISTEN = ListenAddress("127.0.0.1", 2525)


@dataclass(frozen=True)
class SmtpSettings:
    listen: ListenAddress = _key(DEFAULT_LISTEN, _listen, "str")
    protocol: str = _key("smtp", _one_of("smtp", "lmtp"), "str")
    hostname: str = _key("", _hostname, "str")
    support_addresses: tuple[str, ...] = _key(
        ("support@example.com",), _list_of(_address, at_least=1), "list"
    )
    max_message_bytes: int = _key(10 * 1024 * 1024, _positive_int, "int")
    max_recipients: int = _key(50, _positive_int, "int")
    trusted_proxies: tuple[IPNetwork, ...] = _key((), _list_of(_network), "list")
    max_sessions: int = _key(100, _positive_int, "int")
    command_timeout_seconds: float = _key(300.0, _positive_float, "float")
    session_timeout_seconds: float = _key(1800.0, _positive_float, "float")
    tls_cert_file: str = _key("", _existing_file_or_empty, "str")
    tls_key_file: str = _key("", _existing_file_or_empty, "str")
    require_starttls: bool = _key(False, _bool, "bool")
    shutdown_grace_seconds: float = _key(30.0, _positive_float, "float")


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = _key("sqlite:///mailproc.db", _database_url, "str")
    migrate_on_start: bool = _key(True, _bool, "bool")


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {_type_name(value)}")
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return value


def _niceness(value: Any) -> int:
    count = _count(value)
    if count > 19:
        raise ValueError(f"must be between 0 and 19, got {count}")
    return count


@dataclass(frozen=True)
class WorkerSettings:
    processes: int = _key(1, _count, "int")
    nice: int = _key(10, _niceness, "int")
    poll_interval_seconds: float = _key(5.0, _positive_float, "float")
    lease_seconds: float = _key(60.0, _positive_float, "float")
    max_attempts: int = _key(5, _positive_int, "int")
    batch_size: int = _key(20, _positive_int, "int")
    intake_yield: float = _key(1.0, _non_negative_float, "float")


def _nameserver(value: Any) -> str:
    text = _str(value)
    host, port = text, ""
    if text.startswith("[") and "]:" in text:
        host, port = text[1:].split("]:", 1)
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f'expected an IP address, optionally with ":port", got {text!r}') from None
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"bad port in {text!r}")
    return text


def _domain_name(value: Any) -> str:
    try:
        return normalize_domain(_str(value))
    except AddressError as exc:
        raise ValueError(str(exc)) from None


def _authserv_id(value: Any) -> str:
    text = _str(value).strip().lower()
    if not text or any(ch.isspace() or ord(ch) < 0x21 for ch in text):
        raise ValueError(f"expected an authserv-id such as mx.example.com, got {value!r}")
    return text


@dataclass(frozen=True)
class DnsSettings:
    nameservers: tuple[str, ...] = _key((), _list_of(_nameserver), "list")
    timeout_seconds: float = _key(5.0, _positive_float, "float")
    cache_size: int = _key(10000, _positive_int, "int")


@dataclass(frozen=True)
class AuthSettings:
    alignment: str = _key("strict", _one_of("strict", "relaxed"), "str")
    trusted_authserv_ids: tuple[str, ...] = _key((), _list_of(_authserv_id), "list")
    trusted_arc_sealers: tuple[str, ...] = _key((), _list_of(_domain_name), "list")
    max_signatures: int = _key(5, _positive_int, "int")
    min_rsa_bits: int = _key(1024, _positive_int, "int")
    max_age_hours: float = _key(72.0, _positive_float, "float")
    max_clock_skew_minutes: float = _key(15.0, _positive_float, "float")
    retry_max_minutes: float = _key(60.0, _positive_float, "float")


@dataclass(frozen=True)
class LoggingSettings:
    level: str = _key("info", _log_level, "str")
    format: str = _key("auto", _one_of("auto", "json", "text"), "str")


def _any_database_url(value: Any) -> str:
    text = _str(value)
    if not text:
        return text
    try:
        make_url(text)
    except ArgumentError:
        raise ValueError(f"not a database URL: {text!r}") from None
    return text


@dataclass(frozen=True)
class AccountsSettings:
    url: str = _key("", _any_database_url, "str")
    query: str = _key("SELECT id, email FROM accounts WHERE lower(email) = :email", _str, "str")
    csv_file: str = _key("", _existing_file_or_empty, "str")
    timeout_seconds: float = _key(5.0, _positive_float, "float")


@dataclass(frozen=True)
class RulesSettings:
    path: str = _key("", _existing_dir_or_empty, "str")
    helpdesk_address: str = _key("", _address_or_empty, "str")


@dataclass(frozen=True)
class ModeSettings:
    shadow: bool = _key(False, _bool, "bool")


@dataclass(frozen=True)
class QueueSettings:
    expire_after_days: float = _key(7.0, _positive_float, "float")
    owner_notices_per_day: int = _key(1, _positive_int, "int")
    expire_check_seconds: float = _key(60.0, _positive_float, "float")
    staff_addresses: tuple[str, ...] = _key((), _list_of(_address), "list")
    remind_after_hours: float = _key(24.0, _positive_float, "float")
    remind_every_hours: float = _key(24.0, _positive_float, "float")


@dataclass(frozen=True)
class TemplatesSettings:
    path: str = _key("", _existing_dir_or_empty, "str")
    product_name: str = _key("Example", _str, "str")
    forgot_password_url: str = _key("https://example.com/forgot-password", _url, "str")
    default_locale: str = _key("en", _str, "str")


@dataclass(frozen=True)
class OutboundSettings:
    relay: ListenAddress = _key(ListenAddress("127.0.0.1", 2526), _listen, "str")
    from_address: str = _key("support@example.com", _address, "str")
    starttls: bool = _key(False, _bool, "bool")
    username: str = _key("", _str, "str")
    password: str = _key("", _str, "str")
    timeout_seconds: float = _key(30.0, _positive_float, "float")
    dkim_selector: str = _key("", _str, "str")
    dkim_domain: str = _key("", _hostname, "str")
    dkim_private_key_file: str = _key("", _existing_file_or_empty, "str")
    max_attempts: int = _key(10, _positive_int, "int")
    retry_base_seconds: float = _key(60.0, _positive_float, "float")
    retry_max_seconds: float = _key(3600.0, _positive_float, "float")
    poll_interval_seconds: float = _key(10.0, _positive_float, "float")
    lease_seconds: float = _key(120.0, _positive_float, "float")
    replies_per_recipient_per_day: int = _key(5, _positive_int, "int")


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {_type_name(value)}")
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return value


@dataclass(frozen=True)
class RetentionSettings:
    raw_message_days: int = _key(30, _non_negative_int, "int")
    check_interval_seconds: float = _key(3600.0, _positive_float, "float")


@dataclass(frozen=True)
class WebSettings:
    listen: ListenAddress | None = _key(
        ListenAddress("127.0.0.1", 8025), lambda v: _listen(v) if _str(v) else None, "str"
    )
    base_url: str = _key("http://127.0.0.1:8025", _url, "str")
    secret_key: str = _key("", _str, "str")
    session_idle_minutes: float = _key(30.0, _positive_float, "float")
    session_max_hours: float = _key(12.0, _positive_float, "float")
    login_attempts: int = _key(5, _positive_int, "int")
    lockout_seconds: float = _key(60.0, _positive_float, "float")


@dataclass(frozen=True)
class ApprovalSettings:
    four_eyes_for_flagged: bool = _key(True, _bool, "bool")


@dataclass(frozen=True)
class ResetSettings:
    method: str = _key("manual", _one_of("manual", "webhook", "sql"), "str")
    webhook_url: str = _key("", _url_or_empty, "str")
    webhook_secret: str = _key("", _str, "str")
    sql: str = _key("", _str, "str")
    timeout_seconds: float = _key(10.0, _positive_float, "float")
    max_attempts: int = _key(8, _positive_int, "int")
    retry_base_seconds: float = _key(30.0, _positive_float, "float")
    retry_max_seconds: float = _key(3600.0, _positive_float, "float")
    poll_interval_seconds: float = _key(5.0, _positive_float, "float")
    lease_seconds: float = _key(60.0, _positive_float, "float")


@dataclass(frozen=True)
class Settings:
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    templates: TemplatesSettings = field(default_factory=TemplatesSettings)
    outbound: OutboundSettings = field(default_factory=OutboundSettings)
    accounts: AccountsSettings = field(default_factory=AccountsSettings)
    rules: RulesSettings = field(default_factory=RulesSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    mode: ModeSettings = field(default_factory=ModeSettings)
    approval: ApprovalSettings = field(default_factory=ApprovalSettings)
    reset: ResetSettings = field(default_factory=ResetSettings)
    web: WebSettings = field(default_factory=WebSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    source: str = "built-in defaults"
    # Where each explicitly set "section.key" came from, for error messages.
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    # Things worth telling the operator that do not stop mailproc.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def where(self, section: str, key: str) -> str:
        """The source of a key, as error messages name it."""
        return self.origins.get(f"{section}.{key}", f"{self.source}: [{section}] {key}")


SECTIONS: dict[str, type[Any]] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in fields(Settings)
    if f.init and f.default_factory is not MISSING and f.name != "origins"
}


def _env_value(text: str, kind: str) -> Any:
    """Read an environment variable's text as the TOML value its key expects."""
    if kind == "str":
        return text
    if kind == "list" and not text.lstrip().startswith("["):
        return [part.strip() for part in text.split(",") if part.strip()]
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _build(
    section: str,
    cls: type[Any],
    raw: Mapping[str, Any],
    source: str,
    env: Mapping[str, str],
    origins: dict[str, str],
) -> Any:
    keys = {f.name: f.metadata["key"] for f in fields(cls)}
    for name in raw:
        if name not in keys:
            known = ", ".join(keys)
            raise ConfigError(f"{source}: [{section}] {name}: unknown key (known keys: {known})")
    values: dict[str, Any] = {}
    for name, spec in keys.items():
        env_name = f"{ENV_PREFIX}{section}_{name}".upper()
        if env_name in env:
            where, value = f"environment {env_name}", _env_value(env[env_name], spec.kind)
        elif name in raw:
            where, value = f"{source}: [{section}] {name}", raw[name]
        else:
            continue
        origins[f"{section}.{name}"] = where
        try:
            values[name] = spec.parse(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return cls(**values)


def _check_env_names(env: Mapping[str, str]) -> list[str]:
    """Errors for unknown keys of known sections; warnings for other MAILPROC_* names, which
    may belong to something else (a container platform's service variables, say)."""
    warnings = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        for section, cls in SECTIONS.items():
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                if key not in {f.name for f in fields(cls)}:
                    raise ConfigError(f"environment {name}: unknown key [{section}] {key}")
                break
        else:
            warnings.append(
                f"environment {name}: ignored, not a setting (MAILPROC_<SECTION>_<KEY> with "
                f"a section among {', '.join(SECTIONS)})"
            )
    return warnings


def _cross_checks(settings: Settings) -> None:
    smtp = settings.smtp
    if bool(smtp.tls_cert_file) != bool(smtp.tls_key_file):
        missing = "tls_key_file" if smtp.tls_cert_file else "tls_cert_file"
        given = "tls_cert_file" if smtp.tls_cert_file else "tls_key_file"
        raise ConfigError(f"{settings.where('smtp', given)}: needs {missing} too (both or neither)")
    if smtp.require_starttls and not smtp.tls_cert_file:
        raise ConfigError(
            f"{settings.where('smtp', 'require_starttls')}: needs tls_cert_file and tls_key_file"
        )
    if settings.auth.min_rsa_bits < 1024:
        raise ConfigError(
            f"{settings.where('auth', 'min_rsa_bits')}: RFC 8301 forbids accepting RSA keys "
            "shorter than 1024 bits"
        )
    if settings.accounts.url and settings.accounts.csv_file:
        raise ConfigError(
            f"{settings.where('accounts', 'csv_file')}: give url or csv_file, not both"
        )
    outbound = settings.outbound
    dkim = {
        "dkim_selector": outbound.dkim_selector,
        "dkim_domain": outbound.dkim_domain,
        "dkim_private_key_file": outbound.dkim_private_key_file,
    }
    if any(dkim.values()) and not all(dkim.values()):
        given = next(key for key, value in dkim.items() if value)
        missing = ", ".join(key for key, value in dkim.items() if not value)
        raise ConfigError(
            f"{settings.where('outbound', given)}: outbound DKIM signing needs {missing} too "
            "(all three or none)"
        )
    if outbound.lease_seconds < 4 * outbound.timeout_seconds:
        raise ConfigError(
            f"{settings.where('outbound', 'lease_seconds')}: must be at least 4 times "
            f"timeout_seconds ({outbound.timeout_seconds:g}), so that no reply still being sent "
            "is taken over and sent twice"
        )
    _check_reset(settings)
    web = settings.web
    if web.secret_key and len(web.secret_key) < WEBHOOK_SECRET_MIN_LENGTH:
        raise ConfigError(
            f"{settings.where('web', 'secret_key')}: at least {WEBHOOK_SECRET_MIN_LENGTH} "
            "characters (or leave it empty: mailproc then keeps a generated key in its database)"
        )
    if web.base_url.rstrip("/") != web.base_url.rstrip("/").split("?")[0].split("#")[0]:
        raise ConfigError(f"{settings.where('web', 'base_url')}: no query or fragment")
    if outbound.password and not outbound.username:
        raise ConfigError(f"{settings.where('outbound', 'password')}: needs username too")
    if smtp.tls_cert_file:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                smtp.tls_cert_file, smtp.tls_key_file
            )
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{settings.where('smtp', 'tls_cert_file')}: cannot load the certificate and "
                f"key: {exc.strerror or exc}"
            ) from None


WEBHOOK_SECRET_MIN_LENGTH = 32


def _check_reset(settings: Settings) -> None:
    reset = settings.reset
    where = settings.where
    if reset.lease_seconds < 4 * reset.timeout_seconds:
        raise ConfigError(
            f"{where('reset', 'lease_seconds')}: must be at least 4 times timeout_seconds "
            f"({reset.timeout_seconds:g}), so that no reset still running is taken over and run "
            "twice"
        )
    if reset.method == "webhook":
        if not reset.webhook_url:
            raise ConfigError(f'{where("reset", "method")}: "webhook" needs webhook_url')
        if len(reset.webhook_secret) < WEBHOOK_SECRET_MIN_LENGTH:
            raise ConfigError(
                f"{where('reset', 'webhook_secret')}: the webhook needs a secret of at least "
                f"{WEBHOOK_SECRET_MIN_LENGTH} characters (set MAILPROC_RESET_WEBHOOK_SECRET, for "
                "example to the output of: openssl rand -hex 32)"
            )
    if reset.method == "sql":
        if not reset.sql.strip():
            raise ConfigError(
                f'{where("reset", "method")}: "sql" needs sql, one statement with the '
                "parameter :account_id (see config.example.toml)"
            )
        if not settings.accounts.url:
            raise ConfigError(
                f'{where("reset", "method")}: "sql" runs against the accounts database: '
                "set [accounts] url"
            )
        names = set(text(reset.sql).compile().params)
        if ":account_id::" in reset.sql:
            raise ConfigError(
                f"{where('reset', 'sql')}: a parameter followed by :: is not bound; write "
                "CAST(:account_id AS bigint) instead of :account_id::bigint"
            )
        if names != {"account_id"}:
            problem = (
                "must use the parameter :account_id"
                if "account_id" not in names
                else f"may use only :account_id, not {', '.join(sorted(names - {'account_id'}))}"
            )
            raise ConfigError(f"{where('reset', 'sql')}: {problem}")


def parse_settings(
    data: Mapping[str, Any], source: str, env: Mapping[str, str] | None = None
) -> Settings:
    """Validate already-parsed TOML data (and the environment) into Settings."""
    env = dict(os.environ) if env is None else env
    for section, value in data.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}: [{section}]: unknown section (known: {', '.join(SECTIONS)})"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {section}: expected a [{section}] table")
    warnings = _check_env_names(env)
    origins: dict[str, str] = {}
    built = {
        section: _build(section, cls, data.get(section, {}), source, env, origins)
        for section, cls in SECTIONS.items()
    }
    reset = built["reset"]
    if reset.method == "webhook" and reset.webhook_url.startswith("http://"):
        host = urlsplit(reset.webhook_url).hostname or ""
        if host not in ("localhost", "127.0.0.1", "::1"):
            where = origins.get("reset.webhook_url", "[reset] webhook_url")
            warnings.append(
                f"{where}: {reset.webhook_url} is plain http: the signature keeps "
                "the call from being forged, but the account's address travels unencrypted"
            )
    web = built["web"]
    if web.listen is not None and web.base_url.startswith("http://"):
        host = urlsplit(web.base_url).hostname or ""
        if host not in ("localhost", "127.0.0.1", "::1"):
            where = origins.get("web.base_url", "[web] base_url")
            warnings.append(
                f"{where}: {web.base_url} is plain http: console cookies cannot be Secure and "
                "passwords travel unencrypted; serve the console behind TLS (https)"
            )
    settings = Settings(**built, source=source, origins=origins, warnings=tuple(warnings))
    _cross_checks(settings)
    return settings


def load_settings(
    path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> Settings:
    """Settings from ``path`` (or ``$MAILPROC_CONFIG``), or the built-in defaults if neither."""
    env = dict(os.environ) if env is None else env
    if path is None:
        path = env.get(CONFIG_ENV) or None
    if path is None:
        return parse_settings({}, "built-in defaults", env)
    source = str(path)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return parse_settings(data, source, env)
