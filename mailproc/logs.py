"""Logging set-up shared by every mailproc process."""

from __future__ import annotations

import logging


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiosmtpd logs every command at INFO; that is debugging detail for us.
    logging.getLogger("mail.log").setLevel(
        max(logging.WARNING, logging.getLevelName(level.upper()))
    )
