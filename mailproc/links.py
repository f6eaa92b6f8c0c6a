"""Signed links in replies: the owner's "this wasn't me" cancel link. A link names the request
and when it stops working, signed with HMAC-SHA256 under the console's key; it is single-use
because a cancelled (or otherwise decided) request cannot be cancelled again."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.exc import IntegrityError

from mailproc.config import Settings
from mailproc.db import Database
from mailproc.models import StoredSecret, utcnow

_KEY_NAME = "link_signing_key"
_PURPOSE = b"mailproc cancel link v1\n"


def signing_key(settings: Settings, database: Database) -> bytes:
    """``[web] secret_key``, or the key generated once and kept in the database."""
    if settings.web.secret_key:
        return settings.web.secret_key.encode()
    with database.reading() as session:
        found = session.get(StoredSecret, _KEY_NAME)
        if found is not None:
            return found.value.encode()
    try:
        with database.writing() as session:
            session.add(
                StoredSecret(name=_KEY_NAME, value=secrets.token_hex(32), created_at=utcnow())
            )
    except IntegrityError:
        pass  # another instance made it first: use theirs
    with database.reading() as session:
        made = session.get(StoredSecret, _KEY_NAME)
        assert made is not None
        return made.value.encode()


@dataclass(frozen=True)
class CancelLink:
    request_id: int
    expires_at: datetime


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, _PURPOSE + payload, hashlib.sha256).digest()[:20]


def make_cancel_token(key: bytes, request_id: int, expires_at: datetime) -> str:
    payload = struct.pack(">QQ", request_id, int(expires_at.timestamp()))
    return base64.urlsafe_b64encode(payload + _mac(key, payload)).decode().rstrip("=")


def read_cancel_token(key: bytes, token: str, now: datetime | None = None) -> CancelLink | None:
    """The link's request, if the token is genuine and not expired; else None."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (ValueError, TypeError):
        return None
    if len(raw) != 36:
        return None
    payload, mac = raw[:16], raw[16:]
    if not hmac.compare_digest(mac, _mac(key, payload)):
        return None
    request_id, expires = struct.unpack(">QQ", payload)
    expires_at = datetime.fromtimestamp(expires, UTC)
    if (now or utcnow()) >= expires_at:
        return None
    return CancelLink(request_id, expires_at)


def cancel_url(base_url: str, key: bytes, request_id: int, expires_at: datetime) -> str:
    return f"{base_url.rstrip('/')}/cancel/{make_cancel_token(key, request_id, expires_at)}"
