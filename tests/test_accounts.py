"""The account directory: exact matching after the one normalisation, a read-only view of a
real SQLite or PostgreSQL database or a CSV file, clear setup and outage errors, and
lookalike addresses flagged, never matched."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import idna
import pytest
from sqlalchemy import create_engine, text

from mailproc.accounts import (
    Account,
    CsvDirectory,
    DirectoryError,
    DirectorySetupError,
    NoDirectory,
    SqlDirectory,
    directory_from_settings,
)
from mailproc.config import AccountsSettings
from tests.conftest import PostgresCluster, create_pg_database, drop_pg_database, free_port

QUERY = "SELECT id, email FROM accounts WHERE lower(email) = :email"
FULL_QUERY = (
    "SELECT id, email, name, locale, email_changed_at FROM accounts WHERE lower(email) = :email"
)

ROWS = [
    (1, "alice@example.org", "Alice", "en", "2024-05-01 10:00:00"),
    (2, "Bob@Example.ORG", None, None, None),
    (3, "carol@example.org", None, None, None),
    (4, "carol@example.org", None, None, None),
    (5, "dora@xn--bcher-kva.example", None, None, None),
    (6, "eve+news@example.org", None, None, None),
    (7, "ape@example.org", None, None, None),
]


@pytest.fixture
def accounts_db(tmp_path: Path) -> Path:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE accounts (id INTEGER PRIMARY KEY, email TEXT, name TEXT, locale TEXT,"
            " email_changed_at TEXT)"
        )
        db.executemany("INSERT INTO accounts VALUES (?, ?, ?, ?, ?)", ROWS)
    db.close()
    return path


@pytest.fixture
def directory(accounts_db: Path) -> Iterator[SqlDirectory]:
    found = SqlDirectory(f"sqlite:///{accounts_db}", FULL_QUERY, timeout_seconds=2)
    yield found
    found.close()


def write_csv(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


# -- matching -------------------------------------------------------------------------------


def test_registered_address_finds_its_one_account(directory: SqlDirectory) -> None:
    found = directory.lookup("alice@example.org")

    assert found.status == "registered"
    assert found.address == "alice@example.org"
    assert found.account is not None
    assert found.account.id == "1"
    assert found.account.email == "alice@example.org"


def test_address_on_no_account_is_unknown(directory: SqlDirectory) -> None:
    found = directory.lookup("mallory@example.org")

    assert found.status == "unknown"
    assert found.accounts == ()
    assert found.account is None


def test_address_on_two_accounts_is_ambiguous(directory: SqlDirectory) -> None:
    found = directory.lookup("carol@example.org")

    assert found.status == "ambiguous"
    assert {account.id for account in found.accounts} == {"3", "4"}
    assert found.account is None


def test_case_and_unicode_domain_are_normalised_before_the_lookup(
    directory: SqlDirectory,
) -> None:
    assert (
        directory.lookup("ALICE@Example.Org").account
        == directory.lookup("alice@example.org").account
    )
    bob = directory.lookup("bob@example.org")
    assert bob.status == "registered"
    assert bob.account is not None
    assert bob.account.email == "bob@example.org"
    dora = directory.lookup("Dora@Bücher.example")
    assert dora.address == "dora@xn--bcher-kva.example"
    assert dora.status == "registered"


def test_plus_tag_is_part_of_the_address(directory: SqlDirectory) -> None:
    assert directory.lookup("alice+x@example.org").status == "unknown"
    assert directory.lookup("eve@example.org").status == "unknown"
    assert directory.lookup("eve+news@example.org").status == "registered"


def test_text_that_is_not_an_address_is_unknown(directory: SqlDirectory) -> None:
    found = directory.lookup("alice at example.org")

    assert found.status == "unknown"
    assert found.address == "alice at example.org"


def test_optional_columns_are_read_and_a_naive_time_is_utc(directory: SqlDirectory) -> None:
    account = directory.lookup("alice@example.org").account

    assert account == Account(
        id="1",
        email="alice@example.org",
        name="Alice",
        locale="en",
        email_changed_at=datetime(2024, 5, 1, 10, 0, tzinfo=UTC),
    )


def test_time_with_an_offset_is_converted_to_utc(accounts_db: Path) -> None:
    with sqlite3.connect(accounts_db) as db:
        db.execute(
            "UPDATE accounts SET email_changed_at = '2024-05-01T12:00:00+02:00' WHERE id = 1"
        )
    db.close()
    directory = SqlDirectory(f"sqlite:///{accounts_db}", FULL_QUERY)

    account = directory.lookup("alice@example.org").account

    assert account is not None
    assert account.email_changed_at == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert account.email_changed_at.utcoffset() is not None
    directory.close()


def test_only_id_and_email_are_required(accounts_db: Path) -> None:
    directory = SqlDirectory(f"sqlite:///{accounts_db}", QUERY)
    directory.check()

    assert directory.lookup("alice@example.org").account == Account(
        id="1", email="alice@example.org"
    )
    directory.close()


def test_sloppy_like_query_does_not_match_another_address(accounts_db: Path) -> None:
    sloppy = "SELECT id, email FROM accounts WHERE lower(email) LIKE '%' || :email || '%'"
    directory = SqlDirectory(f"sqlite:///{accounts_db}", sloppy)

    # "ice@example.org" is inside "alice@example.org", "eve@..." inside "eve+news@...".
    assert directory.lookup("ice@example.org").status == "unknown"
    assert directory.lookup("news@example.org").status == "unknown"
    assert directory.lookup("alice@example.org").status == "registered"
    directory.close()


def test_broken_row_is_a_temporary_error(accounts_db: Path) -> None:
    with sqlite3.connect(accounts_db) as db:
        db.execute("UPDATE accounts SET email_changed_at = 'last tuesday' WHERE id = 1")
    db.close()
    directory = SqlDirectory(f"sqlite:///{accounts_db}", FULL_QUERY)

    with pytest.raises(DirectoryError, match="email_changed_at"):
        directory.lookup("alice@example.org")
    directory.close()


# -- setup errors and outages ---------------------------------------------------------------


def test_query_without_email_column_is_a_setup_error_naming_the_key(accounts_db: Path) -> None:
    directory = SqlDirectory(
        f"sqlite:///{accounts_db}", "SELECT id FROM accounts WHERE email = :email"
    )

    with pytest.raises(DirectorySetupError, match=r"^\[accounts\] query: .*email"):
        directory.check()
    with pytest.raises(DirectoryError, match=r"\[accounts\] query"):
        directory.lookup("alice@example.org")
    directory.close()


@pytest.mark.parametrize(
    "query",
    [
        "SELECT id, email FROM no_such_table WHERE email = :email",
        "SELEKT id, email FROM accounts WHERE email = :email",
        "SELECT id, email FROM accounts WHERE email = :email AND id = :other",
    ],
)
def test_query_that_fails_is_a_setup_error(accounts_db: Path, query: str) -> None:
    directory = SqlDirectory(f"sqlite:///{accounts_db}", query)

    with pytest.raises(DirectorySetupError, match=r"^\[accounts\] query: "):
        directory.check()
    directory.close()


def test_query_without_the_email_parameter_is_a_setup_error(accounts_db: Path) -> None:
    directory = SqlDirectory(f"sqlite:///{accounts_db}", "SELECT id, email FROM accounts")

    with pytest.raises(DirectorySetupError, match=r"^\[accounts\] query: .*:email"):
        directory.check()
    directory.close()


def test_sqlite_database_is_opened_read_only(accounts_db: Path) -> None:
    writing = "DELETE FROM accounts WHERE lower(email) = :email RETURNING id, email"
    directory = SqlDirectory(f"sqlite:///{accounts_db}", writing)

    with pytest.raises(DirectorySetupError, match=r"^\[accounts\] query: .*readonly"):
        directory.check()
    with pytest.raises(DirectoryError):
        directory.lookup("alice@example.org")
    directory.close()
    with sqlite3.connect(accounts_db) as db:
        assert db.execute("SELECT count(*) FROM accounts").fetchone() == (len(ROWS),)
    db.close()


def test_sqlite_file_in_a_missing_folder_is_unreachable(tmp_path: Path) -> None:
    missing = tmp_path / "gone" / "app.db"
    directory = SqlDirectory(f"sqlite:///{missing}", QUERY)

    with pytest.raises(DirectoryError, match="unable to open"):
        directory.check()
    with pytest.raises(DirectoryError, match="unable to open"):
        directory.lookup("alice@example.org")
    assert not missing.parent.exists()
    directory.close()


def test_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "app.db"
    directory = SqlDirectory(f"sqlite:///{missing}", QUERY)

    with pytest.raises(DirectoryError):
        directory.lookup("alice@example.org")
    assert not missing.exists()
    directory.close()


def test_unreachable_postgresql_is_temporary_and_hides_the_password() -> None:
    password = "Sup3r-Secret-Pw"
    url = f"postgresql+psycopg://app:{password}@127.0.0.1:{free_port()}/app"
    directory = SqlDirectory(url, QUERY, timeout_seconds=2)

    with pytest.raises(DirectoryError) as at_check:
        directory.check()
    with pytest.raises(DirectoryError) as at_lookup:
        directory.lookup("alice@example.org")

    for error in (at_check.value, at_lookup.value):
        message = str(error)
        assert password not in message
        assert "127.0.0.1" in message
        assert "\n" not in message
        assert "Traceback" not in message
        assert "[SQL:" not in message
    directory.close()


def test_unknown_database_driver_is_a_setup_error_naming_the_url_key() -> None:
    directory = SqlDirectory("nosuchdb://app:pw@db.internal/app", QUERY)

    with pytest.raises(DirectorySetupError, match=r"^\[accounts\] url: "):
        directory.check()


# -- both backends --------------------------------------------------------------------------


@pytest.fixture
def accounts_table(database_url: str) -> Iterator[str]:
    """An ``accounts`` table in the test's fresh database (SQLite file or PostgreSQL),
    dropped afterwards."""
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE accounts (id INTEGER PRIMARY KEY, email VARCHAR(320) NOT NULL,"
                " name VARCHAR(200), locale VARCHAR(20), email_changed_at TIMESTAMP)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO accounts (id, email, name, locale, email_changed_at) VALUES"
                " (1, 'Alice@Example.org', 'Alice', 'de-at', :changed),"
                " (2, 'carol@example.org', NULL, NULL, NULL),"
                " (3, 'carol@example.org', NULL, NULL, NULL)"
            ),
            {"changed": datetime(2024, 5, 1, 10, 0)},
        )
    try:
        yield database_url
    finally:
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE accounts"))
        engine.dispose()


def test_sql_directory_on_sqlite_and_postgresql(accounts_table: str) -> None:
    directory = SqlDirectory(accounts_table, FULL_QUERY, timeout_seconds=5)
    directory.check()

    alice = directory.lookup("ALICE@example.ORG")
    assert alice.status == "registered"
    assert alice.account == Account(
        id="1",
        email="alice@example.org",
        name="Alice",
        locale="de-at",
        email_changed_at=datetime(2024, 5, 1, 10, 0, tzinfo=UTC),
    )
    assert directory.lookup("carol@example.org").status == "ambiguous"
    assert directory.lookup("alice+x@example.org").status == "unknown"
    directory.close()


def test_sql_directory_never_writes_on_either_backend(accounts_table: str) -> None:
    writing = "DELETE FROM accounts WHERE lower(email) = :email RETURNING id, email"
    directory = SqlDirectory(accounts_table, writing, timeout_seconds=5)

    with pytest.raises(DirectorySetupError, match=r"^\[accounts\] query: .*read"):
        directory.check()
    with pytest.raises(DirectoryError):
        directory.lookup("carol@example.org")
    directory.close()
    engine = create_engine(accounts_table)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM accounts")).scalar_one() == 3
    engine.dispose()


@pytest.mark.postgres
def test_slow_postgresql_query_times_out_as_a_temporary_error(postgres: PostgresCluster) -> None:
    name = create_pg_database(postgres)
    try:
        slow = "SELECT 1 AS id, :email AS email FROM pg_sleep(5)"
        directory = SqlDirectory(postgres.url(name), slow, timeout_seconds=0.3)

        with pytest.raises(DirectoryError, match="statement timeout"):
            directory.lookup("alice@example.org")
        directory.close()
    finally:
        drop_pg_database(postgres, name)


# -- CSV ------------------------------------------------------------------------------------


def test_csv_file_is_looked_up_like_a_database(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "accounts.csv",
        "\ufeffid,Email,name,locale,email_changed_at\n"
        "1,Alice@Example.org,Alice,en,2024-05-01 10:00:00\n"
        "2,carol@example.org,,,\n"
        "3,carol@example.org,,,\n"
        "\n"
        "4,dora@bücher.example,Dora,de,2024-05-01T12:00:00+02:00\n",
    )
    directory = CsvDirectory(path)
    directory.check()

    assert directory.lookup("alice@example.org").account == Account(
        id="1",
        email="alice@example.org",
        name="Alice",
        locale="en",
        email_changed_at=datetime(2024, 5, 1, 10, 0, tzinfo=UTC),
    )
    assert directory.lookup("carol@example.org").status == "ambiguous"
    dora = directory.lookup("dora@xn--bcher-kva.example").account
    assert dora is not None
    assert dora.email_changed_at == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert directory.lookup("alice+x@example.org").status == "unknown"


def test_csv_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "accounts.csv", "id,email\n1,alice@example.org\n")
    directory = CsvDirectory(path)
    assert directory.lookup("alice@example.org").status == "registered"
    assert directory.lookup("bob@example.org").status == "unknown"
    before = path.stat().st_mtime_ns

    write_csv(path, "id,email\n2,bob@example.org\n")
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))

    assert directory.lookup("alice@example.org").status == "unknown"
    assert directory.lookup("bob@example.org").status == "registered"


def test_csv_rows_without_a_valid_address_are_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_csv(
        tmp_path / "accounts.csv",
        "id,email\n1,alice@example.org\n2,bob at example.org\n3,\n,dora@example.org\n"
        "5,eve@example.org\n",
    )
    directory = CsvDirectory(path)

    with caplog.at_level(logging.WARNING, logger="mailproc.accounts"):
        assert directory.lookup("alice@example.org").status == "registered"
        assert directory.lookup("eve@example.org").status == "registered"
        assert directory.lookup("dora@example.org").status == "unknown"

    warnings = [record for record in caplog.records if record.name == "mailproc.accounts"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "skipped 3 row(s)" in message
    assert "line 3" in message
    assert "bob at example.org" in message


def test_csv_without_id_and_email_header_is_a_setup_error(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "accounts.csv", "alice@example.org,1\n")
    directory = CsvDirectory(path)

    with pytest.raises(DirectorySetupError, match=r"^\[accounts\] csv_file: .*id and email"):
        directory.check()
    with pytest.raises(DirectoryError, match=r"\[accounts\] csv_file"):
        directory.lookup("alice@example.org")


def test_csv_file_that_disappears_is_a_temporary_error(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "accounts.csv", "id,email\n1,alice@example.org\n")
    directory = CsvDirectory(path)
    directory.check()
    path.unlink()

    with pytest.raises(DirectoryError, match="cannot read"):
        directory.lookup("alice@example.org")


# -- no directory, settings -----------------------------------------------------------------


def test_no_directory_knows_no_address() -> None:
    directory = NoDirectory()
    directory.check()

    assert directory.configured is False
    assert directory.lookup("alice@example.org").status == "unknown"
    assert directory.lookup("Alice@Example.org").address == "alice@example.org"
    directory.close()


def test_directory_from_settings(tmp_path: Path, accounts_db: Path) -> None:
    csv_path = write_csv(tmp_path / "accounts.csv", "id,email\n1,alice@example.org\n")

    none = directory_from_settings(AccountsSettings())
    sql = directory_from_settings(AccountsSettings(url=f"sqlite:///{accounts_db}"))
    from_csv = directory_from_settings(AccountsSettings(csv_file=str(csv_path)))

    assert isinstance(none, NoDirectory)
    assert isinstance(sql, SqlDirectory)
    assert isinstance(from_csv, CsvDirectory)
    assert sql.configured
    assert from_csv.configured
    # The default query works on a table shaped like the default.
    assert sql.lookup("alice@example.org").status == "registered"
    assert from_csv.lookup("alice@example.org").status == "registered"
    sql.close()


# -- lookalikes -----------------------------------------------------------------------------


def test_cyrillic_letter_in_the_local_part_resembles_a_registered_address(
    directory: SqlDirectory,
) -> None:
    address = "\u0430lice@example.org"  # CYRILLIC SMALL LETTER A
    assert directory.lookup(address).status == "unknown"

    found = directory.lookalike(address)

    assert found is not None
    assert found.address == address
    assert found.resembles == "alice@example.org"
    assert any("mixed scripts in the local part" in reason for reason in found.reasons)
    assert any("homoglyph" in reason and "CYRILLIC" in reason for reason in found.reasons)


def test_homoglyph_domain_in_idna_form_resembles_a_registered_address(
    directory: SqlDirectory,
) -> None:
    a_label = idna.encode("ex\u0430mple.org").decode("ascii")
    assert a_label.startswith("xn--")

    found = directory.lookalike(f"alice@{a_label}")

    assert found is not None
    assert found.resembles == "alice@example.org"
    assert any("mixed scripts in the domain" in reason for reason in found.reasons)
    assert any("homoglyph" in reason for reason in found.reasons)


def test_whole_script_homoglyph_resembles_a_registered_address(directory: SqlDirectory) -> None:
    found = directory.lookalike("\u0430\u0440\u0435@example.org")  # Cyrillic a, er, ie

    assert found is not None
    assert found.resembles == "ape@example.org"
    assert any("Cyrillic letters that look like 'ape'" in reason for reason in found.reasons)


def test_latin_homoglyph_counts_once_it_imitates_a_registered_address(
    directory: SqlDirectory,
) -> None:
    found = directory.lookalike("\u0251lice@example.org")  # LATIN SMALL LETTER ALPHA

    assert found is not None
    assert found.resembles == "alice@example.org"
    assert found.reasons == (
        "homoglyphs of ASCII letters: '\u0251' (LATIN SMALL LETTER ALPHA) looks like 'a'",
    )
    assert directory.lookalike("\u0251nna@example.org") is None


def test_non_ascii_local_part_in_another_case_resembles_the_registered_one(
    directory: SqlDirectory,
) -> None:
    with sqlite3.connect(directory.url.removeprefix("sqlite:///")) as db:
        db.execute("INSERT INTO accounts (id, email) VALUES (8, '\u0436\u0438\u043b@example.org')")
    db.close()
    capitalised = "\u0416\u0438\u043b@example.org"
    assert directory.lookup(capitalised).status == "unknown"

    found = directory.lookalike(capitalised)

    assert found is not None
    assert found.resembles == "\u0436\u0438\u043b@example.org"
    assert found.reasons == ("differs from a registered address only in the case of its letters",)


def test_lookalike_that_imitates_no_registered_address_is_still_flagged(
    directory: SqlDirectory,
) -> None:
    found = directory.lookalike("m\u0430llory@example.org")

    assert found is not None
    assert found.resembles is None
    assert found.reasons


@pytest.mark.parametrize(
    "address", ["alice@example.org", "ALICE@EXAMPLE.ORG", "mallory@example.org", "not an address"]
)
def test_plain_ascii_address_is_no_lookalike(directory: SqlDirectory, address: str) -> None:
    assert directory.lookalike(address) is None


@pytest.mark.parametrize(
    "address",
    [
        "\u0438\u0432\u0430\u043d@\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444",
        "\u0430\u043b\u0438\u0441\u0435@example.org",  # алисе: Cyrillic, imitates nothing
        "\u03b1\u03bb\u03af\u03ba\u03b7@example.gr",  # αλίκη
        "\u7530\u4e2d\u305f\u308d\u3046@example.jp",  # 田中たろう: Han with Hiragana
        "jos\u00e9@b\u00fccher.example",  # josé@bücher.example
    ],
)
def test_genuine_single_script_address_is_no_lookalike(
    directory: SqlDirectory, address: str
) -> None:
    assert directory.lookalike(address) is None


def test_lookalike_check_works_without_a_directory() -> None:
    found = NoDirectory().lookalike("\u0430lice@example.org")

    assert found is not None
    assert found.resembles is None
    assert any("mixed scripts" in reason for reason in found.reasons)
