"""Agents and decisions through the command line, as an operator runs them: `mailproc agents
...` and `mailproc requests approve|deny|cancel|complete|retry|show`, on both databases."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from mailproc import db
from mailproc.accounts import Account
from mailproc.actions import ResetExecutor
from mailproc.agents import AgentService
from mailproc.cli import main
from mailproc.config import load_settings
from mailproc.models import OutboxEntry
from tests.support import write_config
from tests.test_decisions import request as open_request

PASSWORD = "correct horse battery"
NOBODY = Account("99", "nobody@example.net", None, None)


def cli(config: Path, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(
        main, ["--config", str(config), *args], input=input, catch_exceptions=False
    )


def ok(config: Path, *args: str, input: str | None = None) -> str:
    """stdout of a command that must succeed (and say nothing on stderr)."""
    result = cli(config, *args, input=input)
    assert result.exit_code == 0, result.output
    assert result.stderr == "", result.stderr
    return result.stdout


def error(config: Path, *args: str, input: str | None = None) -> str:
    """The single error line of a command that must fail with exit status 1."""
    result = cli(config, *args, input=input)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def add_agents(config: Path, *names: str, admin: tuple[str, ...] = ()) -> None:
    for name in names:
        role = "admin" if name in admin else "agent"
        output = ok(
            config, "agents", "add", name, "--role", role, "--password-stdin", input=PASSWORD + "\n"
        )
        assert output == f"agent {name} added ({role})\n"


def shown(config: Path, request_id: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ok(config, "requests", "show", str(request_id), "--json"))
    return data


@pytest.fixture
def config(tmp_path: Path, database_url: str) -> Path:
    path = write_config(tmp_path / "mailproc.toml", database_url=database_url)
    assert ok(path, "db", "upgrade").startswith("database at revision ")
    return path


@pytest.fixture
def database(config: Path, database_url: str) -> Iterator[db.Database]:
    database = db.Database(database_url)
    yield database
    database.dispose()


# -- agents ---------------------------------------------------------------------------------


def test_agents_add_with_password_stdin_list_and_password(
    config: Path, database: db.Database
) -> None:
    assert ok(config, "agents", "list") == "no agents (mailproc agents add NAME adds one)\n"
    add_agents(config, "alice")
    added = json.loads(
        ok(
            config,
            "agents",
            "add",
            "root",
            "--role",
            "admin",
            "--password-stdin",
            "--json",
            input="another long password\r\nsecond line is ignored\n",
        )
    )
    assert added["name"] == "root"
    assert added["role"] == "admin"
    assert added["active"] is True
    assert added["disabled_at"] is None

    agents = AgentService(database)
    # Exactly the first line, without its line end, became the password.
    assert agents.authenticate("alice", PASSWORD) is not None
    assert agents.authenticate("root", "another long password") is not None

    table = ok(config, "agents", "list").splitlines()
    assert re.split(r"\s{2,}", table[0]) == ["NAME", "ROLE", "STATE", "CREATED"]
    assert [re.split(r"\s{2,}", line)[:3] for line in table[1:]] == [
        ["alice", "agent", "active"],
        ["root", "admin", "active"],
    ]
    assert all(re.search(r"\s\d{4}-\d{2}-\d{2}$", line) for line in table[1:])
    listed = json.loads(ok(config, "agents", "list", "--json"))
    assert [(a["name"], a["role"], a["active"]) for a in listed] == [
        ("alice", "agent", True),
        ("root", "admin", True),
    ]
    assert listed[1] == added

    # A second agent of the same name is refused, and the first one is untouched.
    assert error(
        config, "agents", "add", "alice", "--password-stdin", input="a different password\n"
    ) == ("Error: an agent named alice exists already")
    assert len(json.loads(ok(config, "agents", "list", "--json"))) == 2

    assert ok(
        config, "agents", "password", "alice", "--password-stdin", input="a brand new password\n"
    ) == ("password of agent alice set\n")
    assert agents.authenticate("alice", "a brand new password") is not None
    assert error(
        config, "agents", "password", "mallory", "--password-stdin", input=PASSWORD + "\n"
    ) == ("Error: no agent named 'mallory'")


def test_agents_add_refuses_bad_input_before_touching_the_database(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = write_config(tmp_path / "mailproc.toml", database_url=sqlite_url)

    assert error(config, "agents", "add", "alice", "--password-stdin", input="short\n") == (
        "Error: the password must have at least 12 characters"
    )
    # Only the first line counts: a long second line does not make up for a short first one.
    assert error(
        config, "agents", "add", "alice", "--password-stdin", input="short\n" + PASSWORD + "\n"
    ) == ("Error: the password must have at least 12 characters")
    assert error(config, "agents", "add", "alice", "--password-stdin", input="") == (
        "Error: the password must have at least 12 characters"
    )

    invalid = cli(config, "agents", "add", "Carol Smith", "--password-stdin", input=PASSWORD)
    assert invalid.exit_code == 2
    assert invalid.stdout == ""
    assert (
        "Error: Invalid value for NAME: invalid agent name 'Carol Smith': 1 to 64 lowercase "
        "letters, digits, '.', '_' or '-', starting with a letter or digit"
    ) in invalid.stderr.splitlines()

    # CliRunner's stdin is no terminal: nothing to prompt on, so the operator is told what to
    # do instead of the command hanging or reading a password from a pipe unasked.
    for args in (["agents", "add", "alice"], ["agents", "password", "alice"]):
        no_tty = cli(config, *args, input=PASSWORD + "\n")
        assert no_tty.exit_code == 2, no_tty.output
        assert no_tty.stdout == ""
        assert (
            "Error: no terminal to ask for the password: give --password-stdin"
            in no_tty.stderr.splitlines()
        )
        assert no_tty.stderr.startswith("Usage: ")

    # None of these reached the database.
    assert not (tmp_path / "mailproc.db").exists()


def test_a_disabled_agent_cannot_decide_until_enabled_again(
    config: Path, database: db.Database, database_url: str
) -> None:
    add_agents(config, "bob")
    request_id = open_request(database, database_url)

    assert ok(config, "agents", "disable", "bob") == "agent bob disabled\n"
    assert json.loads(ok(config, "agents", "list", "--json"))[0]["active"] is False
    [row] = ok(config, "agents", "list").splitlines()[1:]
    assert re.split(r"\s{2,}", row)[:3] == ["bob", "agent", "disabled"]
    assert error(config, "agents", "disable", "bob") == "Error: agent bob is disabled already"
    for args in (
        ["approve", str(request_id), "--agent", "bob", "--note", "called back"],
        ["deny", str(request_id), "--agent", "bob", "--reason", "no"],
        ["complete", str(request_id), "--agent", "bob"],
    ):
        assert error(config, "requests", *args) == (
            "Error: agent bob is disabled and cannot decide"
        )
    assert shown(config, request_id)["state"] == "pending"
    assert shown(config, request_id)["votes"] == []

    assert ok(config, "agents", "enable", "bob") == "agent bob enabled\n"
    assert error(config, "agents", "enable", "bob") == "Error: agent bob is active already"
    assert error(config, "agents", "disable", "mallory") == "Error: no agent named 'mallory'"
    output = ok(config, "requests", "approve", str(request_id), "--agent", "bob", "--note", "ok")
    assert output.splitlines()[0].endswith(": approved")


# -- decisions ------------------------------------------------------------------------------


def test_approve_and_complete_a_manual_reset(
    config: Path, database: db.Database, database_url: str
) -> None:
    add_agents(config, "alice", "bob")
    request_id = open_request(database, database_url)
    reference = shown(config, request_id)["reference"]

    assert (
        error(config, "requests", "complete", str(request_id), "--agent", "bob")
        == f"Error: request {request_id} is pending; only an approved request can be completed"
    )
    assert error(
        config, "requests", "approve", str(request_id), "--agent", "alice", "--note", "   "
    ) == ("Error: a verification note (how the owner was verified) is required")
    assert error(
        config, "requests", "approve", "999999", "--agent", "alice", "--note", "called back"
    ) == ("Error: request 999999 not found")
    assert error(
        config, "requests", "approve", str(request_id), "--agent", "mallory", "--note", "x"
    ) == ("Error: no agent named 'mallory' (mailproc agents list shows them)")
    assert shown(config, request_id)["state"] == "pending"

    output = ok(
        config, "requests", "approve", str(request_id), "--agent", "alice", "--note", "called back"
    )
    assert output == (
        f"request {request_id} ({reference}): approved\n"
        "approved; reset the security question in the application, then run: "
        f"mailproc requests complete {request_id} --agent NAME\n"
    )
    assert re.match(
        r"Error: request \d+ is approved by alice at \d{4}-\d\d-\d\d \d\d:\d\d UTC; it cannot be "
        r"decided again$",
        error(config, "requests", "deny", str(request_id), "--agent", "bob", "--reason", "no"),
    )

    text = ok(config, "requests", "show", str(request_id))
    assert "decided_by:    alice\n" in text
    assert re.search(
        r"^approval:      alice at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: called back$", text, re.M
    ), text
    assert (
        "\nreset:         manual: waiting for an agent to reset by hand and run requests complete\n"
        in text
    )
    data = shown(config, request_id)
    assert [(v["agent"], v["note"]) for v in data["votes"]] == [("alice", "called back")]
    assert (data["execution"]["method"], data["execution"]["state"]) == ("manual", "manual")

    completed = json.loads(
        ok(
            config,
            "requests",
            "complete",
            str(request_id),
            "--agent",
            "bob",
            "--note",
            "reset in the admin tool",
            "--json",
        )
    )
    assert completed["id"] == request_id
    assert completed["state"] == "completed"
    assert completed["completed_at"] is not None
    assert completed["decided_by"] == ["alice"]
    assert completed["summary"] == "completed; the owner is told"

    text = ok(config, "requests", "show", str(request_id))
    assert "\nreset:         manual, succeeded after 0 attempt(s): done by hand by bob\n" in text
    assert re.search(
        r"  bob  completed approved -> completed: reset in the admin tool$", text, re.M
    )
    with database.reading() as session:
        [reply] = session.scalars(
            select(OutboxEntry).where(OutboxEntry.template == "request_completed")
        ).all()
        assert reply.recipient == "alice@example.org"


def test_deny_and_cancel_and_only_an_admin_cancels(
    config: Path, database: db.Database, database_url: str
) -> None:
    add_agents(config, "alice", "root", admin=("root",))
    denied = open_request(database, database_url)

    assert error(config, "requests", "deny", str(denied), "--agent", "alice", "--reason", " ") == (
        "Error: a reason (it is sent to the owner) is required"
    )
    result = json.loads(
        ok(
            config,
            "requests",
            "deny",
            str(denied),
            "--agent",
            "alice",
            "--reason",
            "We could not reach you on the number on file.",
            "--json",
        )
    )
    assert result["id"] == denied
    assert result["state"] == "denied"
    assert result["decided_by"] == ["alice"]
    assert result["decision_note"] == "We could not reach you on the number on file."
    assert result["summary"] == "denied; the owner is told why"
    with database.reading() as session:
        [reply] = session.scalars(
            select(OutboxEntry).where(OutboxEntry.template == "request_denied")
        ).all()
        assert b"We could not reach you on the number on file." in reply.content

    cancelled = open_request(database, database_url)  # the account's next request
    assert error(config, "requests", "cancel", str(cancelled), "--agent", "alice") == (
        "Error: agent alice is not an admin; this needs an admin"
    )
    assert shown(config, cancelled)["state"] == "pending"
    reference = shown(config, cancelled)["reference"]
    output = ok(
        config, "requests", "cancel", str(cancelled), "--agent", "root", "--reason", "duplicate"
    )
    assert output == f"request {cancelled} ({reference}): cancelled\ncancelled; the owner is told\n"
    data = shown(config, cancelled)
    assert data["state"] == "cancelled"
    assert data["decision_note"] == "duplicate"
    assert data["execution"] is None
    assert [e["action"] for e in data["events"]] == ["created", "cancelled"]
    # Closed requests cannot be cancelled again (nor a denied one at all).
    for request_id in (cancelled, denied):
        assert "it cannot be decided again" in error(
            config, "requests", "cancel", str(request_id), "--agent", "root"
        )


def test_four_eyes_through_the_cli(config: Path, database: db.Database, database_url: str) -> None:
    add_agents(config, "alice", "bob")
    request_id = open_request(database, database_url, flags=["first_contact"])
    reference = shown(config, request_id)["reference"]

    first = ok(
        config,
        "requests",
        "approve",
        str(request_id),
        "--agent",
        "alice",
        "--note",
        "checked the phone number",
    )
    assert first == (
        f"request {request_id} ({reference}): pending\n"
        "approval by alice recorded; flagged (first_contact): a second, different agent must "
        "approve\n"
    )
    assert error(
        config, "requests", "approve", str(request_id), "--agent", "alice", "--note", "sure"
    ) == (
        f"Error: alice approved request {request_id} already; a second, different agent must "
        "approve it"
    )
    data = shown(config, request_id)
    assert data["state"] == "pending"
    assert [v["agent"] for v in data["votes"]] == ["alice"]
    assert data["execution"] is None
    assert "\nreset:" not in ok(config, "requests", "show", str(request_id))

    second = json.loads(
        ok(
            config,
            "requests",
            "approve",
            str(request_id),
            "--agent",
            "bob",
            "--note",
            "second look: matches",
            "--json",
        )
    )
    assert second["state"] == "approved"
    assert second["decided_by"] == ["alice", "bob"]
    assert second["decision_note"] == "second look: matches"
    assert second["summary"].startswith("approved; reset the security question")

    text = ok(config, "requests", "show", str(request_id))
    approvals = [line for line in text.splitlines() if line.startswith("approval:")]
    assert [re.sub(r" at .*?: ", " | ", line) for line in approvals] == [
        "approval:      alice | checked the phone number",
        "approval:      bob | second look: matches",
    ]
    assert "\ndecided_by:    alice, bob\n" in text
    assert "\nrisk_flags:    first_contact\n" in text
    assert (
        "\nreset:         manual: waiting for an agent to reset by hand and run requests complete\n"
        in text
    )
    data = shown(config, request_id)
    assert [(v["agent"], v["note"]) for v in data["votes"]] == [
        ("alice", "checked the phone number"),
        ("bob", "second look: matches"),
    ]
    assert [e["action"] for e in data["events"]] == ["created", "vote", "approved"]


@pytest.fixture
def app_db(tmp_path: Path) -> str:
    """The company's accounts database, with the column a reset clears."""
    path = tmp_path / "app.db"
    connection = sqlite3.connect(path)
    with connection:
        connection.execute(
            "CREATE TABLE accounts (id INTEGER PRIMARY KEY, email TEXT, security_question TEXT)"
        )
        connection.execute("INSERT INTO accounts VALUES (42, 'alice@example.org', 'first pet?')")
    connection.close()
    return f"sqlite:///{path}"


def test_a_failed_sql_reset_is_retried_by_an_admin(
    config: Path,
    database: db.Database,
    database_url: str,
    tmp_path: Path,
    app_db: str,
    request: pytest.FixtureRequest,
) -> None:
    sql_config = write_config(
        tmp_path / "sql.toml",
        database_url=database_url,
        accounts={"url": app_db},
        reset={
            "method": "sql",
            "sql": "UPDATE accounts SET security_question = NULL WHERE id = :account_id",
        },
    )
    settings = load_settings(sql_config, env={})
    executor = ResetExecutor(settings, database, "cli-test")
    request.addfinalizer(executor.close)
    add_agents(sql_config, "alice", "root", admin=("root",))
    request_id = open_request(database, database_url, account=NOBODY)  # not in the app's db

    output = ok(
        sql_config, "requests", "approve", str(request_id), "--agent", "alice", "--note", "ok"
    )
    assert output.splitlines()[1] == "approved; the reset will be carried out by sql"
    assert error(sql_config, "requests", "complete", str(request_id), "--agent", "alice") == (
        f"Error: request {request_id} is carried out by sql; it completes by itself (or fails, "
        "and mailproc requests retry tries again)"
    )
    assert error(sql_config, "requests", "retry", str(request_id), "--agent", "root") == (
        f"Error: request {request_id} is approved; only a failed request can be retried"
    )

    assert asyncio.run(executor.run_once()) == 1
    data = shown(sql_config, request_id)
    assert data["state"] == "failed"
    text = ok(sql_config, "requests", "show", str(request_id))
    [reset_line] = [line for line in text.splitlines() if line.startswith("reset:")]
    assert reset_line.startswith("reset:         sql, failed after 1 attempt(s): "), reset_line
    assert "affected 0 rows for account 99, not exactly one; rolled back" in reset_line

    assert error(sql_config, "requests", "retry", str(request_id), "--agent", "alice") == (
        "Error: agent alice is not an admin; this needs an admin"
    )
    retried = json.loads(
        ok(sql_config, "requests", "retry", str(request_id), "--agent", "root", "--json")
    )
    assert retried["state"] == "approved"
    assert retried["summary"] == "approved again; the reset will be carried out by sql"
    data = shown(sql_config, request_id)
    assert (data["execution"]["state"], data["execution"]["attempts"]) == ("pending", 0)
    assert data["events"][-1]["action"] == "retry"
    assert data["events"][-1]["actor"] == "root"

    # The account now exists in the application: this time the reset goes through.
    connection = sqlite3.connect(app_db.removeprefix("sqlite:///"))
    with connection:
        connection.execute("INSERT INTO accounts VALUES (99, 'nobody@example.net', 'first car?')")
    connection.close()
    assert asyncio.run(executor.run_once()) == 1
    data = shown(sql_config, request_id)
    assert data["state"] == "completed"
    assert (data["execution"]["state"], data["execution"]["attempts"]) == ("succeeded", 1)
    connection = sqlite3.connect(app_db.removeprefix("sqlite:///"))
    try:
        assert dict(connection.execute("SELECT id, security_question FROM accounts")) == {
            42: "first pet?",
            99: None,
        }
    finally:
        connection.close()
    assert "only a failed request can be retried" in error(
        sql_config, "requests", "retry", str(request_id), "--agent", "root"
    )
