"""What each reliability test reports: how many messages it sent, how many were accepted
(answered 250), decided, lost and duplicated, plus anything else it counted. The figures are
printed in the test's own output and gathered into a table at the end of the run."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

STASH = pytest.StashKey[list["Counts"]]()


@dataclass
class Counts:
    """One test's figures. ``lost`` and ``duplicated`` are what the test must prove zero."""

    test: str
    sent: int = 0
    accepted: int = 0
    decided: int = 0
    lost: int = 0
    duplicated: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        extra = "".join(f" {key}={value}" for key, value in self.extra.items())
        return (
            f"sent={self.sent} accepted={self.accepted} decided={self.decided}"
            f" lost={self.lost} duplicated={self.duplicated}{extra}"
        )

    def report(self) -> None:
        print(f"[reliability] {self.test}: {self.line()}", flush=True)


def record(config: pytest.Config, counts: Counts) -> None:
    config.stash.setdefault(STASH, []).append(counts)
    counts.report()


def summary(config: pytest.Config) -> list[str]:
    rows = config.stash.get(STASH, [])
    return [f"{counts.test}: {counts.line()}" for counts in rows]
