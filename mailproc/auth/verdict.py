"""The verdict on who wrote a message, with every piece of evidence behind it, as data."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class Strength(enum.StrEnum):
    """``strong``: an aligned DKIM pass. ``weak``: only an aligned SPF pass or a trusted ARC
    chain (or a trusted upstream verdict of that kind). ``none``: not authenticated."""

    STRONG = "strong"
    WEAK = "weak"
    NONE = "none"


@dataclass
class DkimEvidence:
    domain: str | None
    selector: str | None
    algorithm: str | None
    key_bits: int | None = None
    signed_headers: list[str] = field(default_factory=list)
    body_length: int | None = None
    result: str = "none"  # pass | fail | temperror | permerror
    aligned: bool = False
    counts: bool = False
    reasons: list[str] = field(default_factory=list)
    signature_hash: str | None = None


@dataclass
class SpfEvidence:
    identity: str | None  # the MAIL FROM address checked, or None
    domain: str | None
    client_ip: str | None
    helo: str | None
    result: str = "none"  # pass | fail | softfail | neutral | none | temperror | permerror
    explanation: str = ""
    aligned: bool = False


@dataclass
class UpstreamEvidence:
    authserv_id: str
    trusted: bool
    results: list[dict[str, str]] = field(default_factory=list)
    reason: str = ""


@dataclass
class ArcEvidence:
    result: str = "none"  # pass | fail | none
    sealers: list[str] = field(default_factory=list)
    trusted_sealer: str | None = None
    reason: str = ""


@dataclass
class Verdict:
    authenticated: bool
    strength: Strength
    from_address: str | None
    from_domain: str | None
    alignment: str
    message_id: str | None = None
    organizational_domain: str | None = None
    dkim: list[DkimEvidence] = field(default_factory=list)
    spf: SpfEvidence | None = None
    upstream: list[UpstreamEvidence] = field(default_factory=list)
    arc: ArcEvidence | None = None
    dmarc: dict[str, Any] | None = None
    reasons: list[str] = field(default_factory=list)
    temporary_errors: list[str] = field(default_factory=list)

    @property
    def temporary(self) -> bool:
        """DNS trouble left the outcome open: evaluate again later, decide nothing now."""
        return bool(self.temporary_errors)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["strength"] = self.strength.value
        data["from"] = data.pop("from_address")
        return data
