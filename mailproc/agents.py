"""Agents: the people who decide requests. Passwords are hashed with argon2id; an agent is
never deleted (the audit log names them), only disabled, and a disabled agent decides nothing."""

from __future__ import annotations

import enum
import functools
import hmac
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailproc.db import Database
from mailproc.errors import InvalidState, NotFound
from mailproc.models import Agent, AgentRole, WebSession, utcnow
from mailproc.requests import audit

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
PASSWORD_MIN_LENGTH = 12
PASSWORD_MAX_LENGTH = 1024

# argon2-cffi's defaults are RFC 9106's second recommended option for argon2id (64 MiB, t=3).
_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the name is unknown, so that the answer takes as long as for a
    real one. Made at the first sign-in, not at import: hashing takes argon2's 64 MiB, which
    every process importing this module (the SMTP workers among them) would otherwise keep."""
    return _hasher.hash("not a password of anyone's")


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
    mfa_enrolled: bool = False
    locked_until: datetime | None = None

    @property
    def active(self) -> bool:
        return self.disabled_at is None

    @property
    def admin(self) -> bool:
        return self.role == AgentRole.ADMIN

    @classmethod
    def of(cls, agent: Agent) -> AgentInfo:
        return cls(
            agent.id,
            agent.name,
            agent.role,
            agent.created_at,
            agent.disabled_at,
            agent.totp_secret is not None,
            agent.locked_until,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role.value,
            "active": self.active,
            "created_at": self.created_at.isoformat(),
            "disabled_at": self.disabled_at.isoformat() if self.disabled_at else None,
            "mfa_enrolled": self.mfa_enrolled,
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
        """Disable an agent: their console sessions end and their API tokens stop working."""

        def change(agent: Agent, now: datetime) -> str:
            if agent.disabled_at is not None:
                raise InvalidState(f"agent {name} is disabled already")
            agent.disabled_at = now
            session = Session.object_session(agent)
            assert session is not None
            session.execute(delete(WebSession).where(WebSession.agent_id == agent.id))
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

    def reset_mfa(self, name: str) -> AgentInfo:
        """Forget an agent's second factor (a lost phone): they enrol again at next sign-in.
        Their sessions end, and a lockout is lifted."""

        def change(agent: Agent, now: datetime) -> str:
            agent.totp_secret = None
            agent.mfa_enrolled_at = None
            agent.totp_last_step = None
            agent.failed_logins = 0
            agent.locked_until = None
            session = Session.object_session(agent)
            assert session is not None
            session.execute(delete(WebSession).where(WebSession.agent_id == agent.id))
            return name

        return self._change(name, "agent_mfa_reset", change)

    def authenticate(self, name: str, password: str) -> AgentInfo | None:
        """The active agent with this name and password, or None. Takes about as long for an
        unknown name as for a wrong password; upgrades the hash when its parameters are old."""
        with self.db.reading() as session:
            agent = session.scalars(select(Agent).where(Agent.name == name)).first()
            stored = agent.password_hash if agent is not None else _dummy_hash()
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


# -- signing in to the console ----------------------------------------------------------------

TOTP_DIGITS = 6
TOTP_PERIOD = 30
# Codes from the step before and after the current one are accepted (clock drift).
TOTP_WINDOW = 1
LOCKOUT_MAX = timedelta(days=1)


class SignIn(enum.Enum):
    BAD = "bad"  # unknown name, wrong password or code, or disabled
    LOCKED = "locked"  # too many failures: wait
    ENROL = "enrol"  # the password is right; the agent must set up a second factor
    CODE = "code"  # the password is right; the agent must give a code


@dataclass(frozen=True)
class SignInResult:
    outcome: SignIn
    agent: AgentInfo | None = None
    locked_until: datetime | None = None


def new_totp_secret() -> str:
    return pyotp.random_base32()


def totp_uri(secret: str, name: str, issuer: str) -> str:
    return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_PERIOD).provisioning_uri(
        name=name, issuer_name=issuer
    )


def _matching_step(secret: str, code: str, at: datetime) -> int | None:
    """The time step whose code ``code`` is (within the window), or None."""
    code = code.strip().replace(" ", "")
    if not (code.isdigit() and len(code) == TOTP_DIGITS):
        return None
    totp = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_PERIOD)
    now_step = totp.timecode(at)
    for step in range(now_step - TOTP_WINDOW, now_step + TOTP_WINDOW + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None


class SignInService:
    """Password, then a TOTP code, with a lockout that doubles after repeated failures."""

    def __init__(self, database: Database, attempts: int, lockout: timedelta) -> None:
        self.db = database
        self.attempts = attempts
        self.lockout = lockout

    def _locked(self, agent: Agent, now: datetime) -> bool:
        return agent.locked_until is not None and agent.locked_until > now

    def _failed(self, agent: Agent, now: datetime) -> SignInResult:
        agent.failed_logins += 1
        over = agent.failed_logins - self.attempts
        if over >= 0:
            agent.locked_until = now + min(LOCKOUT_MAX, self.lockout * 2 ** min(over, 20))
            audit(
                self._connection(agent),
                None,
                action="agent_locked_out",
                at=now,
                reason=f"{agent.name}: {agent.failed_logins} failed sign-ins",
            )
            return SignInResult(SignIn.LOCKED, locked_until=agent.locked_until)
        return SignInResult(SignIn.BAD)

    @staticmethod
    def _connection(agent: Agent) -> Any:
        session = Session.object_session(agent)
        assert session is not None
        return session.connection()

    def password(self, name: str, password: str) -> SignInResult:
        now = utcnow()
        with self.db.writing() as session:
            agent = session.scalars(
                select(Agent).where(Agent.name == name).with_for_update()
            ).first()
            if agent is None:
                password_matches(_dummy_hash(), password)  # as long as for a real name
                return SignInResult(SignIn.BAD)
            if self._locked(agent, now):
                return SignInResult(SignIn.LOCKED, locked_until=agent.locked_until)
            if not password_matches(agent.password_hash, password) or agent.disabled_at:
                return self._failed(agent, now)
            info = AgentInfo.of(agent)
            if agent.totp_secret is None:
                return SignInResult(SignIn.ENROL, info)
            return SignInResult(SignIn.CODE, info)

    def code(self, agent_id: int, code: str, secret: str | None = None) -> SignInResult:
        """Check a TOTP code: against the agent's enrolled secret, or (at enrolment) against
        ``secret``, which is then enrolled. A code is never accepted twice."""
        now = utcnow()
        with self.db.writing() as session:
            agent = session.get(Agent, agent_id, with_for_update=True)
            if agent is None or agent.disabled_at is not None:
                return SignInResult(SignIn.BAD)
            if self._locked(agent, now):
                return SignInResult(SignIn.LOCKED, locked_until=agent.locked_until)
            enrolling = secret is not None and agent.totp_secret is None
            key = secret if enrolling else agent.totp_secret
            step = _matching_step(key, code, now) if key else None
            if step is None or (agent.totp_last_step is not None and step <= agent.totp_last_step):
                return self._failed(agent, now)
            agent.totp_last_step = step
            agent.failed_logins = 0
            agent.locked_until = None
            if enrolling:
                agent.totp_secret = secret
                agent.mfa_enrolled_at = now
                audit(
                    session.connection(),
                    None,
                    action="agent_mfa_enrolled",
                    at=now,
                    reason=agent.name,
                )
            agent.updated_at = now
            return SignInResult(SignIn.CODE, AgentInfo.of(agent))
