"""Retention: after ``[retention] raw_message_days`` a stored message's raw bytes are replaced
by its header block. What was decided about it stays: its verdict, decision, requests, replies
and audit events, and its size and SHA-256 as received."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from mailproc.db import Database
from mailproc.models import Message, MessageState, utcnow
from mailproc.requests import audit

# Only messages whose processing is over: nothing still to read them.
FINAL_STATES = (MessageState.PROCESSED, MessageState.FAILED)
# A batch stops at this many raw bytes, however few messages that is.
BATCH_BYTES = 16 * 1024 * 1024
MIN_PAUSE_SECONDS = 0.01


def header_block(raw: bytes) -> bytes:
    """The header section, up to and including the blank line that ends it."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = raw.find(separator)
        if end != -1:
            return raw[: end + len(separator)]
    return raw


@dataclass(frozen=True)
class PurgeReport:
    cutoff: datetime
    messages: int
    bytes_before: int
    bytes_after: int
    oldest: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "cutoff": self.cutoff.isoformat(),
            "messages": self.messages,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "oldest": self.oldest.isoformat() if self.oldest else None,
        }


class Retention:
    def __init__(self, database: Database, days: int) -> None:
        self.db = database
        self.days = days

    def _due(self, cutoff: datetime) -> Any:
        return (
            Message.received_at < cutoff,
            Message.raw_purged_at.is_(None),
            Message.state.in_(FINAL_STATES),
        )

    def purge(
        self, *, dry_run: bool = False, batch: int = 200, now: datetime | None = None
    ) -> PurgeReport:
        """Replace the raw bytes of every message past the cutoff (or, ``dry_run``, only say
        what would be replaced). Safe on several instances at once (``SKIP LOCKED``)."""
        now = now or utcnow()
        cutoff = now - timedelta(days=self.days)
        if dry_run or self.days == 0:
            with self.db.reading() as session:
                count, size, first = session.execute(
                    select(
                        func.count(),
                        func.coalesce(func.sum(Message.size), 0),
                        func.min(Message.received_at),
                    ).where(*self._due(cutoff))
                ).one()
            if self.days == 0:
                return PurgeReport(cutoff, 0, 0, 0, None)
            return PurgeReport(cutoff, count, int(size), 0, first)
        total = before = after = 0
        oldest: datetime | None = None
        last_id = 0
        while True:
            # Found outside the write transaction, in id order from where the last batch
            # ended: the scan past rows purged earlier never holds the write lock that intake
            # and the workers need, and no row is looked at twice in one run.
            with self.db.reading() as session:
                found = session.execute(
                    select(Message.id, Message.size)
                    .where(Message.id > last_id, *self._due(cutoff))
                    .order_by(Message.id)
                    .limit(batch)
                ).all()
            if not found:
                break
            last_id = found[-1].id
            ids: list[int] = []
            size = 0
            for candidate in found:
                ids.append(candidate.id)
                size += candidate.size or 0
                if size >= BATCH_BYTES:  # a few large messages make a batch of their own
                    last_id = candidate.id
                    break
            started = time.monotonic()
            with self.db.writing() as session:
                rows = session.execute(
                    select(Message.id, Message.raw, Message.received_at)
                    .where(Message.id.in_(ids), *self._due(cutoff))
                    .order_by(Message.id)
                    .with_for_update(skip_locked=True)
                ).all()
                if rows:
                    changes = []
                    for row in rows:
                        kept = header_block(row.raw)
                        changes.append(
                            {"id": row.id, "raw": kept, "raw_purged_at": now, "updated_at": now}
                        )
                        before += len(row.raw)
                        after += len(kept)
                        if oldest is None or row.received_at < oldest:
                            oldest = row.received_at
                    session.execute(update(Message), changes)
                    total += len(rows)
                    audit(
                        session.connection(),
                        None,
                        action="raw_messages_purged",
                        at=now,
                        reason=(
                            f"{len(rows)} messages older than {self.days} days: raw bytes "
                            f"replaced by their headers (ids {rows[0].id}-{rows[-1].id})"
                        ),
                    )
            # Give way: intake and the workers get the write lock for at least as long as
            # this batch held it, so a large first purge (after retention was turned on, or
            # an upgrade) does not hold up mail.
            time.sleep(max(time.monotonic() - started, MIN_PAUSE_SECONDS))
        return PurgeReport(cutoff, total, before, after, oldest)
