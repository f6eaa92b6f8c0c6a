"""Log lines: JSON events for collectors, text in a terminal, addresses partly masked."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from mailproc.logs import mask_addresses, setup_logging


@pytest.fixture
def captured(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    yield capsys
    logging.basicConfig(handlers=[logging.NullHandler()], force=True)
    logging.getLogger().setLevel(logging.WARNING)


def test_json_lines_carry_the_event_and_its_ids(captured: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "json")
    log = logging.getLogger("mailproc.test")
    log.info("reply %d sent to %s", 7, "alice@example.org", extra={"message_id": 12})
    log.debug("not shown at info")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"request_id": 3})
    lines = captured.readouterr().err.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "info"
    assert first["logger"] == "mailproc.test"
    assert first["message"] == "reply 7 sent to a***@example.org"
    assert first["message_id"] == 12
    assert first["time"].endswith("+00:00")
    assert second["request_id"] == 3
    # Ids named in the message are fields too.
    log.warning("reset of request %d: %s", 42, "HTTP 503")
    named = json.loads(captured.readouterr().err)
    assert (named["request_id"], named["message"]) == (42, "reset of request 42: HTTP 503")
    assert "ValueError: boom" in second["exception"]


def test_text_in_a_terminal_and_addresses_in_full_at_debug(
    captured: pytest.CaptureFixture[str],
) -> None:
    setup_logging("debug", "text")
    logging.getLogger("mailproc.test").debug("from bob.smith@example.net")
    line = captured.readouterr().err.strip()
    assert line.endswith("DEBUG mailproc.test: from bob.smith@example.net")


def test_auto_is_json_when_not_a_terminal(captured: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "auto")
    logging.getLogger("mailproc.test").warning("hello")
    assert json.loads(captured.readouterr().err)["message"] == "hello"


def test_masking() -> None:
    assert (
        mask_addresses("to alice@example.org and <b@x.co>") == "to a***@example.org and <b***@x.co>"
    )
    assert mask_addresses("no address here: 10:30 @home") == "no address here: 10:30 @home"
