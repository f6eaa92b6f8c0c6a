"""Logging set-up shared by every mailproc process."""

from __future__ import annotations

import logging


def setup_logging(level: str) -> None:
    # The logging HOWTO's "Optimization": our format shows none of the caller's file and line,
    # thread or process, so do not collect them for every record (one per stored message).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiosmtpd logs every command at INFO, APScheduler every run of every job and httpx every
    # request: debugging detail for us (a job's own outcome is logged by the job).
    quiet = max(logging.WARNING, logging.getLevelName(level.upper()))
    for name in ("mail.log", "apscheduler", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(quiet)
