"""Agents: the people who decide requests. Passwords are hashed with argon2id; an agent is
never deleted (the audit log names them), only disabled, and a disabled agent decides nothing."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailproc.db import Database
from mailproc.errors import InvalidState, NotFound
from mailproc.models import Agent, AgentRole, utcnow
from mailproc.requests import audit

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
PASSWORD_MIN_LENGTH = 12
PASSWORD_MAX_LENGTH = 1024

# argon2-cffi's defaults are RFC 9106's second recommended option for argon2id (64 MiB, t=3).
_hasher = PasswordHasher()
# Verified against when the name is unknown, so that the answer takes as long as for a real one.
_DUMMY_HASH = _hasher.hash("not a password of anyone's")


class AgentError(ValueError):
    """A name, role or password that cannot be used; the message says why."""


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise AgentError(
            f"invalid agent name {name!r}: 1 to 64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_password(password: str) -> str:
    if len(password) < PASSWORD_MIN_LENGTH:
        raise AgentError(f"the password must have at least {PASSWORD_MIN_LENGTH} characters")
    if len(password) > PASSWORD_MAX_LENGTH:
        raise AgentError(f"the password must have at most {PASSWORD_MAX_LENGTH} characters")
    return password


def hash_password(password: str) -> str:
    return _hasher.hash(check_password(password))


def password_matches(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True)
class AgentInfo:
    id: int
    name: str
    role: AgentRole
    created_at: datetime
    disabled_at: datetime | None

    @property
    def active(self) -> bool:
        return self.disabled_at is None

    @classmethod
    def of(cls, agent: Agent) -> AgentInfo:
        return cls(agent.id, agent.name, agent.role, agent.created_at, agent.disabled_at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role.value,
            "active": self.active,
            "created_at": self.created_at.isoformat(),
            "disabled_at": self.disabled_at.isoformat() if self.disabled_at else None,
        }


def active_agent(session: Session, name: str, *, admin: bool = False) -> Agent:
    """The agent called ``name``, locked for the caller's transaction; refused when unknown,
    disabled, or (``admin``) not an admin."""
    agent = session.scalars(select(Agent).where(Agent.name == name).with_for_update()).first()
    if agent is None:
        raise NotFound(f"no agent named {name!r} (mailproc agents list shows them)")
    if agent.disabled_at is not None:
        raise InvalidState(f"agent {name} is disabled and cannot decide")
    if admin and agent.role != AgentRole.ADMIN:
        raise InvalidState(f"agent {name} is not an admin; this needs an admin")
    return agent


class AgentService:
    def __init__(self, database: Database) -> None:
        self.db = database

    def add(self, name: str, password: str, role: AgentRole = AgentRole.AGENT) -> AgentInfo:
        check_name(name)
        password_hash = hash_password(password)
        now = utcnow()
        try:
            with self.db.writing() as session:
                agent = Agent(
                    name=name,
                    role=role,
                    password_hash=password_hash,
                    created_at=now,
                    updated_at=now,
                )
                session.add(agent)
                session.flush()
                audit(
                    session.connection(),
                    None,
                    action="agent_added",
                    at=now,
                    reason=f"{name} ({role.value})",
                )
                return AgentInfo.of(agent)
        except IntegrityError:
            raise InvalidState(f"an agent named {name} exists already") from None

    def list(self) -> list[AgentInfo]:
        with self.db.reading() as session:
            return [AgentInfo.of(a) for a in session.scalars(select(Agent).order_by(Agent.name))]

    def get(self, name: str) -> AgentInfo:
        with self.db.reading() as session:
            agent = session.scalars(select(Agent).where(Agent.name == name)).first()
            if agent is None:
                raise NotFound(f"no agent named {name!r}")
            return AgentInfo.of(agent)

    def _change(self, name: str, action: str, change: Any) -> AgentInfo:
        now = utcnow()
        with self.db.writing() as session:
            agent = session.scalars(
                select(Agent).where(Agent.name == name).with_for_update()
            ).first()
            if agent is None:
                raise NotFound(f"no agent named {name!r}")
            reason = change(agent, now)
            agent.updated_at = now
            audit(session.connection(), None, action=action, at=now, reason=reason)
            return AgentInfo.of(agent)

    def disable(self, name: str) -> AgentInfo:
        def change(agent: Agent, now: datetime) -> str:
            if agent.disabled_at is not None:
                raise InvalidState(f"agent {name} is disabled already")
            agent.disabled_at = now
            return name

        return self._change(name, "agent_disabled", change)

    def enable(self, name: str) -> AgentInfo:
        def change(agent: Agent, now: datetime) -> str:
            if agent.disabled_at is None:
                raise InvalidState(f"agent {name} is active already")
            agent.disabled_at = None
            return name

        return self._change(name, "agent_enabled", change)

    def set_password(self, name: str, password: str) -> AgentInfo:
        password_hash = hash_password(password)

        def change(agent: Agent, now: datetime) -> str:
            agent.password_hash = password_hash
            return name

        return self._change(name, "agent_password_set", change)

    def authenticate(self, name: str, password: str) -> AgentInfo | None:
        """The active agent with this name and password, or None. Takes about as long for an
        unknown name as for a wrong password; upgrades the hash when its parameters are old."""
        with self.db.reading() as session:
            agent = session.scalars(select(Agent).where(Agent.name == name)).first()
            stored = agent.password_hash if agent is not None else _DUMMY_HASH
            if not password_matches(stored, password) or agent is None:
                return None
            if agent.disabled_at is not None:
                return None
            info = AgentInfo.of(agent)
            stale = _hasher.check_needs_rehash(stored)
        if stale:
            with self.db.writing() as session:
                fresh = session.get(Agent, info.id)
                if fresh is not None and fresh.password_hash == stored:
                    fresh.password_hash = _hasher.hash(password)
        return info
