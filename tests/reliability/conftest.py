"""The reliability suite (`make test-reliability`; `make test` runs it too)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.reliability.counts import Counts, record


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[..., Counts]:
    """``report(sent=…, accepted=…, decided=…, lost=…, duplicated=…, **extra)`` records the
    test's counts: printed now and again in the summary at the end of the run."""

    def _report(
        *,
        sent: int,
        accepted: int,
        decided: int,
        lost: int,
        duplicated: int,
        **extra: int,
    ) -> Counts:
        counts = Counts(request.node.nodeid, sent, accepted, decided, lost, duplicated, extra)
        record(request.config, counts)
        return counts

    return _report
