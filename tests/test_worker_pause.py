"""The worker's "intake first" rest: only while the listener is storing mail."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any, cast

from mailproc.worker import INTAKE_ACTIVE_SECONDS, pause_for_intake
from tests.support import settings_for


class RecordingStop:
    def __init__(self) -> None:
        self.waits: list[float] = []

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        return False


def run(intake_yield: float, since_commit: float | None, worked: float = 0.2) -> list[float]:
    settings = settings_for("sqlite:///unused.db", worker={"intake_yield": intake_yield})
    last_commit = None
    if since_commit is not None:
        last_commit = multiprocessing.get_context("spawn").Value(
            "d", time.monotonic() - since_commit
        )
    stop = RecordingStop()
    pause_for_intake(settings, last_commit, cast(Any, stop), worked)
    return stop.waits


def test_rests_in_proportion_to_the_batch_while_intake_is_busy() -> None:
    assert run(1.0, since_commit=0.0) == [0.2]
    assert run(2.5, since_commit=0.0, worked=0.1) == [0.25]


def test_does_not_rest_once_intake_is_quiet() -> None:
    assert run(1.0, since_commit=INTAKE_ACTIVE_SECONDS + 1) == []


def test_zero_or_no_listener_means_never_rest() -> None:
    assert run(0.0, since_commit=0.0) == []
    assert run(1.0, since_commit=None) == []  # `mailproc worker` on its own
