"""The JSON API under /api/v1 (bearer tokens), on the same services as the console."""

from __future__ import annotations

from starlette.routing import BaseRoute

from mailproc.config import Settings
from mailproc.db import Database
from mailproc.decisions import DecisionService


def api_routes(
    settings: Settings, database: Database, decisions: DecisionService
) -> list[BaseRoute]:
    return []
