"""The account directory: a read-only view of the registered address on each customer account
(the company's application database, or a CSV file), and the homoglyph check that flags an
address imitating a registered one.

Addresses are compared only in the form ``normalize_address`` gives them; an address that
merely looks like a registered one is never a match, only a ``Lookalike``."""

from __future__ import annotations

import abc
import csv
import logging
import math
import os
import re
import sqlite3
import threading
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import idna
from confusable_homoglyphs import categories, confusables
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    InvalidRequestError,
    NotSupportedError,
    ProgrammingError,
    SQLAlchemyError,
    StatementError,
)

from mailproc.addresses import AddressError, normalize_address
from mailproc.config import AccountsSettings

log = logging.getLogger(__name__)

Status = Literal["registered", "unknown", "ambiguous"]

# What ``check()`` looks up: a syntactically valid address no account can have (RFC 2606).
PLACEHOLDER_ADDRESS = "mailproc-check@example.invalid"

OPTIONAL_COLUMNS = ("name", "locale", "email_changed_at")


@dataclass(frozen=True)
class Account:
    id: str
    email: str
    name: str | None = None
    locale: str | None = None
    email_changed_at: datetime | None = None


class DirectoryError(Exception):
    """The directory could not answer (down, timeout, broken row): temporary, the message is
    evaluated again later."""


class DirectorySetupError(Exception):
    """The directory is configured wrongly (the query fails or lacks id/email columns): a
    configuration error; the message names [accounts] and the key."""


@dataclass(frozen=True)
class Lookup:
    address: str
    accounts: tuple[Account, ...]

    @property
    def status(self) -> Status:
        if not self.accounts:
            return "unknown"
        return "registered" if len(self.accounts) == 1 else "ambiguous"

    @property
    def account(self) -> Account | None:
        return self.accounts[0] if len(self.accounts) == 1 else None


@dataclass(frozen=True)
class Lookalike:
    address: str
    reasons: tuple[str, ...]
    resembles: str | None


class Directory(abc.ABC):
    """Where registered addresses are looked up; read-only."""

    configured: bool = True

    @abc.abstractmethod
    def _find(self, address: str) -> tuple[Account, ...]:
        """Accounts whose registered address is ``address`` (already normalised)."""

    def lookup(self, address: str) -> Lookup:
        """The accounts registered with ``address``; raises DirectoryError."""
        try:
            normalised = normalize_address(address)
        except AddressError:
            return Lookup(address, ())
        return Lookup(normalised, self._find(normalised))

    @abc.abstractmethod
    def check(self) -> None:
        """At start: DirectorySetupError if misconfigured, DirectoryError if unreachable."""

    def close(self) -> None:
        """Releases connections; the directory may still be used afterwards."""
        return None

    def lookalike(self, address: str) -> Lookalike | None:
        """Whether ``address`` looks like another address (homoglyphs, mixed scripts), and the
        registered address it imitates if there is one; None for plain ASCII addresses, for
        genuine single-script ones and for text that is not an address. Raises
        DirectoryError."""
        try:
            normalised = normalize_address(address)
        except AddressError:
            return None
        local, _, domain = normalised.rpartition("@")
        labels = [_unicode_label(label) for label in domain.split(".")]
        if local.isascii() and all(label.isascii() for label in labels):
            return None
        reasons = _part_reasons(local, "the local part")
        for label in labels:
            reasons += _part_reasons(label, f"the domain ('{label}')")
        resembles = None
        skeleton_text = f"{_skeleton(local)}@{'.'.join(_skeleton(label) for label in labels)}"
        try:
            skeleton = normalize_address(skeleton_text)
        except AddressError:
            skeleton = normalised
        if skeleton != normalised:
            found = self.lookup(skeleton)
            if found.accounts:
                resembles = found.address
        if resembles is not None and not any("homoglyph" in reason for reason in reasons):
            # Homoglyphs within one script (a Latin alpha for an "a", fullwidth letters) are
            # ordinary letters somewhere; they count once they imitate a registered address.
            replaced = _describe(char for char in local + "".join(labels) if _ascii_glyph(char))
            reasons.append(
                f"homoglyphs of ASCII letters: {replaced}"
                if replaced
                else "differs from a registered address only in the case of its letters"
            )
        if not reasons:
            return None
        return Lookalike(normalised, tuple(reasons), resembles)


class NoDirectory(Directory):
    """No directory configured: no address is registered."""

    configured = False

    def check(self) -> None:
        return None

    def _find(self, address: str) -> tuple[Account, ...]:
        return ()


class SqlDirectory(Directory):
    """The company's own database through any SQLAlchemy URL, queried read-only."""

    def __init__(self, url: str, query: str, timeout_seconds: float = 5.0) -> None:
        self.url = url
        self.query = query
        self.timeout_seconds = timeout_seconds
        self._statement = text(query)
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        try:
            parsed: URL | None = make_url(url)
        except (SQLAlchemyError, ValueError):
            parsed = None
        self._password = parsed.password if parsed is not None else None
        self.display = (
            parsed.render_as_string(hide_password=True) if parsed is not None else "(invalid URL)"
        )

    def check(self) -> None:
        if "email" not in self._statement.compile().params:
            raise DirectorySetupError(
                "[accounts] query: must compare the address with the :email parameter, as in "
                "SELECT id, email FROM accounts WHERE lower(email) = :email"
            )
        self._rows(PLACEHOLDER_ADDRESS)

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def _find(self, address: str) -> tuple[Account, ...]:
        try:
            columns, rows = self._rows(address)
        except DirectorySetupError as exc:
            message = str(exc)
            raise DirectoryError(
                message if self.display in message else f"{self.display}: {message}"
            ) from None
        accounts: list[Account] = []
        for row in rows:
            values = {name: row[index] for name, index in columns.items()}
            # Only rows whose own address is the one asked for: a query with LIKE, a join or
            # no WHERE at all must not hand a message someone else's account.
            try:
                email = normalize_address(str(values["email"]))
            except AddressError:
                continue
            if email != address:
                continue
            try:
                accounts.append(_account(values, email))
            except ValueError as exc:
                raise DirectoryError(f"{self.display}: broken row for {address}: {exc}") from None
        return _distinct(accounts)

    def _get_engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                try:
                    self._engine = _sql_engine(self.url, self.timeout_seconds)
                except (SQLAlchemyError, ImportError, ValueError, TypeError) as exc:
                    raise DirectorySetupError(
                        f"[accounts] url: cannot use {self.display}: {self._reason(exc)}"
                    ) from None
            return self._engine

    def _rows(self, address: str) -> tuple[dict[str, int], Sequence[Sequence[Any]]]:
        """Column positions by lower-case name, and the rows the query returns."""
        engine = self._get_engine()
        try:
            connection = engine.connect()
        except (SQLAlchemyError, OSError) as exc:
            if _is_setup_error(exc):
                raise DirectorySetupError(
                    f"[accounts] url: {self.display}: {self._reason(exc)}"
                ) from None
            raise DirectoryError(f"{self.display} unreachable: {self._reason(exc)}") from None
        try:
            with connection:
                result = connection.execute(self._statement, {"email": address})
                columns: dict[str, int] = {}
                for index, name in enumerate(result.keys()):
                    columns.setdefault(str(name).lower(), index)
                rows = result.fetchall()
        except (SQLAlchemyError, OSError) as exc:
            if _is_setup_error(exc):
                raise DirectorySetupError(f"[accounts] query: {self._reason(exc)}") from None
            raise DirectoryError(f"{self.display}: query failed: {self._reason(exc)}") from None
        missing = [name for name in ("id", "email") if name not in columns]
        if missing:
            raise DirectorySetupError(
                f"[accounts] query: the result has no {' and no '.join(missing)} column "
                f"(columns: {', '.join(columns) or 'none'}); select id and email, and "
                f"optionally {', '.join(OPTIONAL_COLUMNS)}"
            )
        wanted = {
            name: columns[name] for name in ("id", "email", *OPTIONAL_COLUMNS) if name in columns
        }
        return wanted, rows

    def _reason(self, exc: BaseException) -> str:
        """One short line: the driver's message without SQL, traceback or password."""
        while isinstance(exc, StatementError) and exc.orig is not None:
            exc = exc.orig
        # str() of SQLAlchemy's own errors appends the statement and a link.
        message = str(exc.args[0]) if isinstance(exc, SQLAlchemyError) and exc.args else str(exc)
        message = " ".join(message.split()) or type(exc).__name__
        if self._password:
            # Only where it stands on its own: a password "p" must not garble "psycopg".
            word = rf"(?<![A-Za-z0-9]){re.escape(self._password)}(?![A-Za-z0-9])"
            message = re.sub(word, "***", message)
        return message if len(message) <= 300 else message[:297] + "..."


class CsvDirectory(Directory):
    """A CSV file with a header row ``id,email[,name,locale,email_changed_at]``, read again
    whenever it changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._index: dict[str, tuple[Account, ...]] = {}

    def check(self) -> None:
        self._current()

    def _find(self, address: str) -> tuple[Account, ...]:
        try:
            index = self._current()
        except DirectorySetupError as exc:
            raise DirectoryError(str(exc)) from None
        return index.get(address, ())

    def _current(self) -> Mapping[str, tuple[Account, ...]]:
        # The stamp is taken before reading, so a change during the read loads again next time.
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            raise DirectoryError(f"{self.path}: cannot read: {exc.strerror}") from None
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        with self._lock:
            if stamp != self._stamp:
                self._index = self._load()
                self._stamp = stamp
            return self._index

    def _load(self) -> dict[str, tuple[Account, ...]]:
        skipped: list[str] = []
        found: dict[str, list[Account]] = {}
        try:
            with open(self.path, encoding="utf-8-sig", newline="") as handle:
                reader = csv.reader(handle)
                header = [name.strip().lower() for name in next(reader, [])]
                missing = [name for name in ("id", "email") if name not in header]
                if missing:
                    raise DirectorySetupError(
                        f"[accounts] csv_file: {self.path}: the header row must name the columns "
                        f"id and email (optionally {', '.join(OPTIONAL_COLUMNS)}), found "
                        f"{','.join(header) or 'nothing'}"
                    )
                columns = {
                    name: header.index(name)
                    for name in ("id", "email", *OPTIONAL_COLUMNS)
                    if name in header
                }
                for row in reader:
                    if not any(cell.strip() for cell in row):
                        continue
                    values = {
                        name: row[index].strip() if index < len(row) else ""
                        for name, index in columns.items()
                    }
                    try:
                        email = normalize_address(values["email"])
                        account = _account(values, email)
                    except ValueError as exc:
                        skipped.append(f"line {reader.line_num}: {exc}")
                        continue
                    found.setdefault(email, []).append(account)
        except UnicodeDecodeError:
            raise DirectorySetupError(f"[accounts] csv_file: {self.path}: not UTF-8 text") from None
        except csv.Error as exc:
            raise DirectorySetupError(f"[accounts] csv_file: {self.path}: {exc}") from None
        except OSError as exc:
            raise DirectoryError(f"{self.path}: cannot read: {exc.strerror}") from None
        if skipped:
            shown = "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
            log.warning("%s: skipped %d row(s): %s", self.path, len(skipped), shown)
        return {email: _distinct(accounts) for email, accounts in found.items()}


def directory_from_settings(settings: AccountsSettings) -> Directory:
    if settings.url:
        return SqlDirectory(settings.url, settings.query, settings.timeout_seconds)
    if settings.csv_file:
        return CsvDirectory(settings.csv_file)
    return NoDirectory()


# -- rows -----------------------------------------------------------------------------------


def _account(values: Mapping[str, Any], email: str) -> Account:
    """An Account from one row (SQL values or CSV text); ValueError for a broken row."""
    raw_id = values["id"]
    if raw_id is None or str(raw_id).strip() == "":
        raise ValueError(f"{email}: no id")
    return Account(
        id=str(raw_id),
        email=email,
        name=_optional_text(values.get("name")),
        locale=_optional_text(values.get("locale")),
        email_changed_at=_timestamp(values.get("email_changed_at")),
    )


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    return str(value).strip() or None


def _timestamp(value: Any) -> datetime | None:
    """A timezone-aware UTC datetime; a value without a zone is taken as UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"email_changed_at: not a time: {value!r}")
        moment = datetime.fromtimestamp(value, UTC)
    else:
        try:
            moment = datetime.fromisoformat(str(value).strip())
        except ValueError:
            raise ValueError(f"email_changed_at: not an ISO 8601 time: {value!r}") from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _distinct(accounts: Iterable[Account]) -> tuple[Account, ...]:
    """One entry per account id (a join may repeat a row)."""
    seen: dict[str, Account] = {}
    for account in accounts:
        seen.setdefault(account.id, account)
    return tuple(seen.values())


# -- SQL ------------------------------------------------------------------------------------

# SQLSTATE classes that mean the setup is wrong, not that the database is away: syntax or
# access rule (42), data exception (22), feature not supported (0A), authorization (28),
# unknown catalog or schema (3D, 3F), and a write in a read-only transaction.
_SETUP_SQLSTATE_CLASSES = ("42", "22", "0A", "28", "3D", "3F")
_SETUP_SQLSTATES = ("25006",)
# SQLite's generic SQL error (no such table or column, syntax) and a write to a read-only file.
_SETUP_SQLITE_CODES = (sqlite3.SQLITE_ERROR, sqlite3.SQLITE_READONLY)


def _is_setup_error(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return False
        if isinstance(exc, ProgrammingError | DataError | NotSupportedError | IntegrityError):
            return True
        orig = exc.orig
        sqlstate = getattr(orig, "sqlstate", None)
        if isinstance(sqlstate, str):
            return sqlstate in _SETUP_SQLSTATES or sqlstate[:2] in _SETUP_SQLSTATE_CLASSES
        if isinstance(orig, sqlite3.Error):
            return getattr(orig, "sqlite_errorcode", None) in _SETUP_SQLITE_CODES
        return False
    # Errors raised before the database saw anything: a missing bind parameter, a statement
    # that returns no rows, a URL or driver SQLAlchemy cannot use.
    return isinstance(exc, StatementError | InvalidRequestError) or (
        isinstance(exc, SQLAlchemyError) and not isinstance(exc, DBAPIError)
    )


def _sql_engine(url_text: str, timeout_seconds: float) -> Engine:
    url = make_url(url_text)
    backend, driver = url.get_backend_name(), url.get_driver_name()
    connect_args: dict[str, Any] = {}
    if backend == "sqlite":
        url = _sqlite_read_only(url)
        connect_args["timeout"] = timeout_seconds
    elif backend == "postgresql" and driver in ("psycopg", "psycopg2"):
        # libpq: connect_timeout in whole seconds; a statement timeout and read-only
        # transactions for every session.
        options = (
            f"-c statement_timeout={max(1, round(timeout_seconds * 1000))} "
            "-c default_transaction_read_only=on"
        )
        given = url.query.get("options")
        if isinstance(given, str) and given:
            options = f"{given} {options}"
        connect_args["connect_timeout"] = max(2, math.ceil(timeout_seconds))
        connect_args["options"] = options
    elif backend in ("mysql", "mariadb") and driver in ("pymysql", "mysqldb"):
        connect_args["connect_timeout"] = max(1, math.ceil(timeout_seconds))
        connect_args["read_timeout"] = max(1, math.ceil(timeout_seconds))
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "connect_args": connect_args}
    if backend != "sqlite":
        kwargs["pool_timeout"] = timeout_seconds
    return create_engine(url, **kwargs)


def _sqlite_read_only(url: URL) -> URL:
    """The same SQLite file opened read-only (``mode=ro``), so a missing file is an error
    instead of a new empty database and no query can write."""
    database = url.database or ""
    if (
        url.get_driver_name() != "pysqlite"
        or not database
        or database == ":memory:"
        or database.startswith("file:")
        or "uri" in url.query
        or "mode" in url.query
    ):
        return url
    path = quote(os.path.abspath(database), safe="/")
    return url.set(database=f"file:{path}", query={**url.query, "mode": "ro", "uri": "true"})


# -- lookalikes -----------------------------------------------------------------------------

_NEUTRAL_SCRIPTS = frozenset({"COMMON", "INHERITED"})
# Scripts written together in one name without any intent to deceive (UTS #39, "highly
# restrictive"): Japanese, Chinese with Bopomofo, Korean, each with Latin.
_SCRIPT_SETS = (
    frozenset({"LATIN", "HAN", "HIRAGANA", "KATAKANA"}),
    frozenset({"LATIN", "HAN", "BOPOMOFO"}),
    frozenset({"LATIN", "HAN", "HANGUL"}),
)


def _unicode_label(label: str) -> str:
    if not label.startswith("xn--"):
        return label
    try:
        return str(idna.decode(label))
    except (idna.IDNAError, UnicodeError):
        return label


def _scripts(text: str) -> frozenset[str]:
    return frozenset(categories.unique_aliases(text)) - _NEUTRAL_SCRIPTS


def _ascii_glyph(char: str) -> str | None:
    """The ASCII character(s) ``char`` can be mistaken for, if any."""
    if char.isascii():
        return None
    for entry in confusables.confusables_data.get(char, ()):
        glyph = str(entry["c"])
        if glyph.isascii() and glyph.isprintable() and not glyph.isspace():
            return glyph
    return None


def _skeleton(text: str) -> str:
    return "".join(_ascii_glyph(char) or char for char in text).lower()


def _describe(chars: Iterable[str]) -> str:
    described = []
    for char in dict.fromkeys(chars):
        glyph = _ascii_glyph(char) or _latin_glyph(char)
        name = unicodedata.name(char, f"U+{ord(char):04X}")
        described.append(f"'{char}' ({name}) looks like '{glyph}'")
    return ", ".join(described)


def _latin_glyph(char: str) -> str:
    for entry in confusables.confusables_data.get(char, ()):
        glyph = str(entry["c"])
        if _scripts(glyph) == {"LATIN"}:
            return glyph
    return "?"


def _part_reasons(part: str, where: str) -> list[str]:
    """Why a local part or one domain label looks like something else, if it does."""
    if part.isascii():
        return []
    scripts = _scripts(part)
    reasons = []
    if len(scripts) > 1 and not any(scripts <= allowed for allowed in _SCRIPT_SETS):
        # Checked as a set: Cyrillic with Latin is mixed, Japanese kana with Han is not.
        named = " and ".join(sorted(script.replace("_", " ").title() for script in scripts))
        reasons.append(f"mixed scripts in {where}: {named}")
        found = confusables.is_confusable(part, greedy=True, preferred_aliases=["latin"])
        if found:
            chars = [str(item["character"]) for item in found]
            reasons.append(f"homoglyphs of Latin letters in {where}: {_describe(chars)}")
    elif len(scripts) == 1 and "LATIN" not in scripts:
        # A whole-script homoglyph: every letter of a single-script name has an ASCII twin.
        letters = [char for char in part if _scripts(char)]
        if letters and all(_ascii_glyph(char) for char in letters):
            script = next(iter(scripts)).replace("_", " ").title()
            reasons.append(
                f"homoglyphs of Latin letters in {where}: written in {script} letters that look "
                f"like '{_skeleton(part)}'"
            )
    return reasons
