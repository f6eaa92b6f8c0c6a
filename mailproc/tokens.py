"""Bearer tokens for the JSON API. Each acts as one agent (whose role and state count at every
call); the token is shown once, at creation, and only its SHA-256 is stored."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from mailproc.agents import AgentInfo
from mailproc.db import Database
from mailproc.errors import InvalidState, NotFound
from mailproc.models import Agent, ApiToken, utcnow
from mailproc.requests import audit

PREFIX = "mpt_"
# Record last_used_at at most this often.
_TOUCH_EVERY = timedelta(minutes=1)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class TokenError(ValueError):
    """A token name that cannot be used; the message says why."""


def check_token_name(name: str) -> str:
    if not _NAME.match(name):
        raise TokenError(
            f"invalid token name {name!r}: 1 to 64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """Who a request with a live token comes from: the token's name and its agent."""

    token: str
    agent: AgentInfo


@dataclass(frozen=True)
class TokenInfo:
    name: str
    agent: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "agent": self.agent,
            "created_at": self.created_at.isoformat(),
            "last_used_at": self.last_used_at.isoformat() if self.last_used_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


class TokenService:
    def __init__(self, database: Database) -> None:
        self.db = database

    def create(self, name: str, agent_name: str) -> tuple[TokenInfo, str]:
        """A new token acting as ``agent_name``; returns it with its secret (shown once)."""
        check_token_name(name)
        secret = PREFIX + secrets.token_urlsafe(32)
        now = utcnow()
        try:
            with self.db.writing() as session:
                agent = session.scalars(select(Agent).where(Agent.name == agent_name)).first()
                if agent is None:
                    raise NotFound(f"no agent named {agent_name!r}")
                if agent.disabled_at is not None:
                    raise InvalidState(f"agent {agent_name} is disabled")
                session.add(
                    ApiToken(
                        name=name, agent_id=agent.id, token_hash=_digest(secret), created_at=now
                    )
                )
                session.flush()
                audit(
                    session.connection(),
                    None,
                    action="token_created",
                    at=now,
                    reason=f"{name} (acting as {agent_name})",
                )
        except IntegrityError:
            raise InvalidState(f"a token named {name} exists already") from None
        return TokenInfo(name, agent_name, now, None, None), secret

    def revoke(self, name: str) -> TokenInfo:
        now = utcnow()
        with self.db.writing() as session:
            row = session.execute(
                select(ApiToken, Agent.name)
                .join(Agent, Agent.id == ApiToken.agent_id)
                .where(ApiToken.name == name)
                .with_for_update(of=ApiToken)
            ).one_or_none()
            if row is None:
                raise NotFound(f"no token named {name!r}")
            token, agent_name = row
            if token.revoked_at is not None:
                raise InvalidState(f"token {name} is revoked already")
            token.revoked_at = now
            audit(session.connection(), None, action="token_revoked", at=now, reason=name)
            return TokenInfo(name, agent_name, token.created_at, token.last_used_at, now)

    def list(self) -> list[TokenInfo]:
        with self.db.reading() as session:
            rows = session.execute(
                select(ApiToken, Agent.name)
                .join(Agent, Agent.id == ApiToken.agent_id)
                .order_by(ApiToken.name)
            ).all()
            return [
                TokenInfo(t.name, agent, t.created_at, t.last_used_at, t.revoked_at)
                for t, agent in rows
            ]

    def authenticate(self, secret: str) -> AgentInfo | None:
        """The active agent this live token acts as, or None."""
        caller = self.identify(secret)
        return caller.agent if caller is not None else None

    def identify(self, secret: str) -> Caller | None:
        """The live token and the active agent it acts as, or None (unknown or revoked token,
        disabled agent). Writes nothing unless the token is good."""
        if not secret.startswith(PREFIX) or len(secret) > 100:
            return None
        now = utcnow()
        key = _digest(secret)
        with self.db.reading() as session:
            row = session.execute(
                select(ApiToken, Agent)
                .join(Agent, Agent.id == ApiToken.agent_id)
                .where(ApiToken.token_hash == key)
            ).one_or_none()
        if row is None:
            return None
        token, agent = row
        if token.revoked_at is not None or agent.disabled_at is not None:
            return None
        if token.last_used_at is None or now - token.last_used_at > _TOUCH_EVERY:
            with self.db.writing() as session:
                found = session.get(ApiToken, token.id)
                if found is not None:
                    found.last_used_at = now
        return Caller(token.name, AgentInfo.of(agent))
