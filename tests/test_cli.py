"""The operator command line, run as a user would: through click and as a real process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from mailproc import db
from mailproc.cli import main
from tests.support import make_message, settings_for, wire, write_config
from tests.test_services import arrival


def run(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--config", str(config), *args], catch_exceptions=False)
    return result.exit_code, result.output


def seeded(config_file: Path, database_url: str, count: int = 2) -> list[int]:
    from mailproc.services import MessageService

    assert run(config_file, "db", "upgrade")[0] == 0
    database = db.Database(database_url)
    service = MessageService.from_settings(database, settings_for(database_url))
    ids = service.store_batch(
        [arrival(wire(make_message(subject=f"subject {n}"))) for n in range(count)]
    )
    while service.process_next("cli-test"):
        pass
    database.dispose()
    return ids


def test_db_upgrade_is_idempotent_and_current_reports_it(config_file: Path) -> None:
    code, output = run(config_file, "db", "current")
    assert code == 0
    assert "current none" in output
    assert "needs `mailproc db upgrade`" in output
    for _ in range(2):
        code, output = run(config_file, "db", "upgrade")
        assert code == 0, output
        assert f"revision {db.head_revision()}" in output
    code, output = run(config_file, "db", "current")
    assert "up to date" in output


def test_messages_list_and_show(config_file: Path, database_url: str) -> None:
    first, second = seeded(config_file, database_url)
    code, output = run(config_file, "messages", "list", "--json")
    assert code == 0
    listed = json.loads(output)
    assert [m["id"] for m in listed] == [second, first]
    assert {m["state"] for m in listed} == {"processed"}
    assert listed[1]["subject"] == "subject 0"

    code, output = run(config_file, "messages", "list", "--state", "failed")
    assert code == 0
    assert "no messages" in output

    code, output = run(config_file, "messages", "list")
    assert code == 0
    assert output.splitlines()[-1] == "all messages: 2 processed"
    assert "subject 1" in output.splitlines()[1]

    code, output = run(config_file, "messages", "show", str(first), "--json")
    shown = json.loads(output)
    assert shown["id"] == first
    assert shown["parsed"]["from_addresses"] == ["alice@example.org"]
    assert shown["mail_from"] == "alice@example.org"

    code, output = run(config_file, "messages", "show", str(first))
    assert code == 0
    assert "subject 0" in output
    assert "defects:          none" in output


def test_messages_show_raw_writes_the_exact_bytes(config_file: Path, database_url: str) -> None:
    from mailproc.services import MessageService

    assert run(config_file, "db", "upgrade")[0] == 0
    raw = wire(make_message(subject="exact")) + b"trailing bytes \xff\x00 kept\r\n"
    database = db.Database(database_url)
    service = MessageService.from_settings(database, settings_for(database_url))
    [message_id] = service.store_batch([arrival(raw)])
    database.dispose()
    result = CliRunner().invoke(
        main, ["--config", str(config_file), "messages", "show", str(message_id), "--raw"]
    )
    assert result.exit_code == 0
    assert result.stdout_bytes == raw


def test_retry_errors_are_one_clear_line(config_file: Path, database_url: str) -> None:
    [message_id] = seeded(config_file, database_url, count=1)
    code, output = run(config_file, "messages", "retry", str(message_id))
    assert code == 1
    assert (
        output == f"Error: message {message_id} is processed; only failed messages can be retried\n"
    )
    code, output = run(config_file, "messages", "show", "999999")
    assert (code, output) == (1, "Error: message 999999 not found\n")


def test_unreachable_database_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    code, output = run(config, "messages", "list")
    assert code == 1
    assert output.startswith("Error: database error: ")
    assert output.count("\n") == 1


def test_serve_with_bad_config_exits_78_naming_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[smtp]\nlisten = "nowhere"\n')
    result = subprocess.run(
        [sys.executable, "-m", "mailproc", "--config", str(config), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78
    assert result.stderr.count("\n") == 1
    assert f"{config}: [smtp] listen:" in result.stderr


def test_serve_on_a_busy_port_says_so(tmp_path: Path, sqlite_url: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path / "c.toml", sqlite_url, port=port)
        result = subprocess.run(
            [sys.executable, "-m", "mailproc", "--config", str(config), "serve"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: cannot listen on 127.0.0.1:{port}: address already in use"
    )


def test_config_option_works_after_the_command_name_too(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[smtp]\nprotocol = "smtp"\nbogus = 1\n')
    for args in (
        ["--config", str(config), "config", "check"],
        ["config", "check", "--config", str(config)],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 78
        assert f"{config}: [smtp] bogus: unknown key" in result.output
