"""Logging set-up shared by every mailproc process: JSON lines (one event per line) for log
collectors, or text in a terminal; mail addresses partly masked unless the level is debug."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

# What a log line may carry besides its message: passed with extra=, or named in the message
# the way mailproc's messages name them ("message 12", "request 3", "reply 7").
CONTEXT_FIELDS = ("message_id", "request_id", "outbox_id", "agent")
_NAMED_IDS = (
    ("message_id", re.compile(r"\bmessage (\d+)\b")),
    ("request_id", re.compile(r"\brequest (\d+)\b")),
    ("outbox_id", re.compile(r"\breply (\d+)\b")),
)
_ADDRESS = re.compile(r"([A-Za-z0-9._%+'-])[A-Za-z0-9._%+'-]*@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")


def mask_addresses(text: str) -> str:
    """``alice@example.org`` → ``a***@example.org``: enough to tell owners apart in a log,
    not enough to collect their addresses from it."""
    return _ADDRESS.sub(r"\1***@\2", text)


class MaskAddresses(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_addresses(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                event[name] = value
        for name, pattern in _NAMED_IDS:
            if name not in event and (found := pattern.search(event["message"])):
                event[name] = int(found.group(1))
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False, default=str)


def setup_logging(level: str, style: str = "auto") -> None:
    """``style``: "json", "text", or "auto" (text when stderr is a terminal, else JSON)."""
    # The logging HOWTO's "Optimization": our format shows none of the caller's file and line,
    # thread or process, so do not collect them for every record (one per stored message).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if style == "auto":
        style = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler()
    if style == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if level.lower() != "debug":
        handler.addFilter(MaskAddresses())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # aiosmtpd logs every command at INFO, APScheduler every run of every job and httpx every
    # request: debugging detail for us (a job's own outcome is logged by the job).
    quiet = max(logging.WARNING, logging.getLevelName(level.upper()))
    for name in ("mail.log", "apscheduler", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(quiet)
