"""Console sessions, kept in the database: the cookie carries a random token and only its
SHA-256 is stored, so a copy of the database signs nobody in. A session ends when idle for
``[web] session_idle_minutes``, after ``session_max_hours`` in any case, at sign-out, and when
its agent is disabled or their second factor reset. A new session (new token) begins when the
second factor passes, so a token seen before sign-in is worth nothing after it."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from mailproc.agents import AgentInfo
from mailproc.db import Database
from mailproc.models import Agent, WebSession, utcnow

# Touch last_seen_at at most this often (a write per page view would be wasteful).
_TOUCH_EVERY = timedelta(seconds=30)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class SessionInfo:
    token_hash: str
    agent: AgentInfo
    csrf_token: str
    mfa_passed: bool
    pending_totp: str | None
    expires_at: datetime


class SessionStore:
    def __init__(self, database: Database, idle: timedelta, absolute: timedelta) -> None:
        self.db = database
        self.idle = idle
        self.absolute = absolute

    def create(self, agent_id: int, *, mfa_passed: bool, pending_totp: str | None = None) -> str:
        """A new session; returns the token for the cookie."""
        token = secrets.token_urlsafe(32)
        now = utcnow()
        with self.db.writing() as session:
            session.add(
                WebSession(
                    id=_digest(token),
                    agent_id=agent_id,
                    csrf_token=secrets.token_urlsafe(32),
                    mfa_passed=mfa_passed,
                    pending_totp=pending_totp,
                    created_at=now,
                    last_seen_at=now,
                    expires_at=now + self.absolute,
                )
            )
        return token

    def load(self, token: str | None) -> SessionInfo | None:
        """The live session of this token (its agent active), or None; keeps it alive."""
        if not token or len(token) > 100:
            return None
        now = utcnow()
        key = _digest(token)
        with self.db.reading() as session:
            row = session.execute(
                select(WebSession, Agent)
                .join(Agent, Agent.id == WebSession.agent_id)
                .where(WebSession.id == key)
            ).one_or_none()
        if row is None:
            return None
        web, agent = row
        if web.expires_at <= now or web.last_seen_at + self.idle <= now or agent.disabled_at:
            self.destroy_hash(key)
            return None
        if now - web.last_seen_at > _TOUCH_EVERY:
            with self.db.writing() as session:
                found = session.get(WebSession, key)
                if found is not None:
                    found.last_seen_at = now
        return SessionInfo(
            key,
            AgentInfo.of(agent),
            web.csrf_token,
            web.mfa_passed,
            web.pending_totp,
            web.expires_at,
        )

    def set_pending_totp(self, token_hash: str, secret: str) -> None:
        with self.db.writing() as session:
            found = session.get(WebSession, token_hash)
            if found is not None:
                found.pending_totp = secret

    def destroy_hash(self, token_hash: str) -> None:
        with self.db.writing() as session:
            session.execute(delete(WebSession).where(WebSession.id == token_hash))

    def destroy(self, token: str) -> None:
        self.destroy_hash(_digest(token))

    def purge_expired(self) -> int:
        now = utcnow()
        with self.db.writing() as session:
            result = session.execute(
                delete(WebSession).where(
                    (WebSession.expires_at <= now) | (WebSession.last_seen_at <= now - self.idle)
                )
            )
            return int(result.rowcount)  # type: ignore[attr-defined]
