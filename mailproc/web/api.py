"""The JSON API under /api/v1 (bearer tokens), on the same services as the console.

Every call but ``GET /api/v1/openapi.json`` needs ``Authorization: Bearer mpt_...``: a live
token (``mailproc tokens create``) of an active agent, whose role counts at every call. A call
without one is answered 401 before anything is read or changed. Request bodies are JSON
objects (``application/json``, UTF-8, at most 64 KiB) with exactly the documented fields;
every error is ``{"error": "..."}`` with its status. The OpenAPI 3.1 description below is the
contract, and the tests check the routes and real answers against it."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from mailproc import __version__
from mailproc.config import Settings
from mailproc.db import Database
from mailproc.decisions import NOTE_MAX_LENGTH, DecisionService, Outcome
from mailproc.errors import InvalidState, NotFound
from mailproc.models import ExecutionState, RequestState
from mailproc.requests import (
    RequestService,
    event_dict,
    execution_dict,
    request_dict,
)
from mailproc.tokens import Caller, TokenService

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
MAX_BODY = 64 * 1024
MAX_LIMIT = 200
DEFAULT_LIMIT = 50
MAX_OFFSET = 1_000_000
MAX_SEARCH = 200
# Ids are 64-bit in the database; a larger one is simply not there.
MAX_ID = 2**63 - 1
_NUMBER = re.compile(r"^[0-9]{1,9}$")
_BEARER = re.compile(r"^Bearer +([!-~]+) *$", re.IGNORECASE)
REALM = 'Bearer realm="mailproc"'
NOTE_WHAT = "how the owner was verified (kept on record)"
REASON_WHAT = "why (it is sent to the owner)"


class ApiError(Exception):
    """An answer other than success: its status, the one-line message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, self.status, headers=self.headers)


Endpoint = Callable[[Request], Awaitable[Response]]


def _guarded(handler: Endpoint) -> Endpoint:
    """Errors as JSON: ours with their status, a database that cannot answer as 503, anything
    unexpected as 500 (logged with its traceback, never shown)."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except (HTTPException, ClientDisconnect):
            raise
        except OperationalError:
            log.exception("API %s %s: database error", request.method, request.url.path)
            return ApiError(503, "the database is not available; try again later").response()
        except Exception:
            log.exception("API %s %s failed", request.method, request.url.path)
            return ApiError(500, "internal error (details are in the server's log)").response()

    return endpoint


class MethodNotAllowed:
    """The answer to any other method on one of our paths: 405 with Allow, as JSON (an ASGI
    app rather than a function, so that its route matches every method)."""

    def __init__(self, allowed: list[str]) -> None:
        self.allow = ", ".join(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ApiError(
            405,
            f"method {scope['method']} not allowed here (allowed: {self.allow})",
            {"Allow": self.allow},
        )
        await error.response()(scope, receive, send)


# -- request bodies ------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; an empty body (with no Content-Type) is an empty object."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media_type, *params = (part.strip().lower() for part in content_type.split(";"))
        charset = [p.split("=", 1)[1].strip('"') for p in params if p.startswith("charset=")]
        if media_type != "application/json" or any(c != "utf-8" for c in charset):
            raise ApiError(415, "request bodies must be JSON (Content-Type: application/json)")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise ApiError(413, f"the body is larger than {MAX_BODY} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the body is larger than {MAX_BODY} bytes")
    if not body:
        return {}
    if content_type is None:
        raise ApiError(415, "request bodies must be JSON (Content-Type: application/json)")
    try:
        data = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
        )
    except UnicodeDecodeError:
        raise ApiError(422, "the body is not valid UTF-8") from None
    except RecursionError:
        raise ApiError(422, "the body is nested too deeply") from None
    except ValueError as exc:
        raise ApiError(422, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(422, "the body must be a JSON object")
    return data


def text_field(
    body: dict[str, Any], fields: tuple[str, ...], name: str, what: str, *, required: bool
) -> str | None:
    """``body[name]`` as text of at most NOTE_MAX_LENGTH characters, after checking that the
    body has no other fields than ``fields``; 422 when it does not fit."""
    unknown = sorted(set(body) - set(fields))
    if unknown:
        allowed = ", ".join(fields)
        raise ApiError(422, f"unknown field(s): {', '.join(unknown)} (allowed: {allowed})")
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        if name not in body:
            raise ApiError(422, f'"{name}" is required: {what}')
        raise ApiError(422, f'"{name}" must be a string')
    text = value.strip()
    if required and not text:
        raise ApiError(422, f'"{name}" is required: {what}')
    if len(text) > NOTE_MAX_LENGTH:
        raise ApiError(
            422, f'"{name}" is too long ({len(text)} characters; at most {NOTE_MAX_LENGTH})'
        )
    return text or None


# -- query parameters --------------------------------------------------------------------------


def _number(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not _NUMBER.match(raw) or not low <= int(raw) <= high:
        raise ApiError(422, f"{name} must be a whole number from {low} to {high}")
    return int(raw)


def _request_id(request: Request) -> int:
    request_id = int(request.path_params["request_id"])
    if request_id > MAX_ID:
        raise ApiError(404, f"request {request_id} not found")
    return request_id


# -- the routes ------------------------------------------------------------------------------


def api_routes(
    settings: Settings, database: Database, decisions: DecisionService
) -> list[BaseRoute]:
    requests = RequestService(database)
    tokens = TokenService(database)
    document = openapi_document(settings)

    async def caller(request: Request) -> Caller:
        header = request.headers.get("authorization")
        if header is None:
            raise ApiError(
                401,
                "a bearer token is required (Authorization: Bearer ...)",
                {"WWW-Authenticate": REALM},
            )
        match = _BEARER.match(header)
        found = await run_in_threadpool(tokens.identify, match.group(1)) if match else None
        if found is None:
            raise ApiError(
                401,
                "the bearer token is not valid (unknown, revoked, or its agent is disabled)",
                {"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
            )
        return found

    async def list_requests(request: Request) -> Response:
        await caller(request)
        state_name = request.query_params.get("state") or None
        if state_name is not None and state_name not in {s.value for s in RequestState}:
            states = ", ".join(s.value for s in RequestState)
            raise ApiError(422, f"state must be one of: {states}")
        search = (request.query_params.get("q") or "").strip() or None
        if search is not None and len(search) > MAX_SEARCH:
            raise ApiError(422, f"q must have at most {MAX_SEARCH} characters")
        limit = _number(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        offset = _number(request, "offset", 0, 0, MAX_OFFSET)
        state = RequestState(state_name) if state_name else None
        rows, total = await run_in_threadpool(requests.queue, state, search, limit, offset)
        return JSONResponse(
            {
                "requests": [request_dict(r.request) | {"vote_count": r.votes} for r in rows],
                "total": total,
                "limit": limit,
                "offset": offset,
            }
        )

    async def show_request(request: Request) -> Response:
        await caller(request)
        request_id = _request_id(request)
        try:
            detail = await run_in_threadpool(requests.get, request_id)
        except NotFound as exc:
            raise ApiError(404, str(exc)) from None
        return JSONResponse(
            request_dict(detail.request)
            | {
                "message_ids": detail.message_ids,
                "decision": detail.request.decision,
                "votes": [vote.to_dict() for vote in detail.votes],
                "execution": execution_dict(detail.execution) if detail.execution else None,
                "events": [event_dict(event) for event in detail.events],
            }
        )

    def decide(action: str) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            who = await caller(request)
            request_id = _request_id(request)
            if action == "cancel" and not who.agent.admin:
                raise ApiError(403, "only an admin's token may cancel a request")
            body = await read_body(request)
            name = who.agent.name
            call: Callable[[], Outcome]
            if action == "approve":
                note = text_field(body, ("note",), "note", NOTE_WHAT, required=True)
                call = partial(decisions.approve, request_id, name, note or "")
            elif action == "deny":
                reason = text_field(body, ("reason",), "reason", REASON_WHAT, required=True)
                call = partial(decisions.deny, request_id, name, reason or "")
            else:
                why = text_field(body, ("reason",), "reason", "", required=False)
                call = partial(decisions.cancel, request_id, name, why)
            try:
                outcome = await run_in_threadpool(call)
            except NotFound as exc:
                raise ApiError(404, str(exc)) from None
            except InvalidState as exc:
                raise ApiError(409, str(exc)) from None
            log.info(
                "API: %s (token %s) %s request %d: %s",
                name,
                who.token,
                action,
                request_id,
                outcome.request.state.value,
            )
            return JSONResponse(
                {"request": request_dict(outcome.request), "summary": outcome.summary}
            )

        return endpoint

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    routes: list[BaseRoute] = []
    table: list[tuple[str, str, Endpoint]] = [
        ("/requests", "GET", list_requests),
        ("/requests/{request_id:int}", "GET", show_request),
        ("/requests/{request_id:int}/approve", "POST", decide("approve")),
        ("/requests/{request_id:int}/deny", "POST", decide("deny")),
        ("/requests/{request_id:int}/cancel", "POST", decide("cancel")),
        ("/openapi.json", "GET", openapi),
    ]
    for path, method, handler in table:
        routes.append(Route(path, _guarded(handler), methods=[method]))
    # Any other method on these paths: 405 with Allow, as JSON (after the real routes, which
    # match first).
    allowed: dict[str, list[str]] = {}
    for path, method, _handler in table:
        allowed.setdefault(path, []).append(method)
    for path, methods in allowed.items():
        if "GET" in methods:
            methods = [*methods, "HEAD"]
        routes.append(Route(path, MethodNotAllowed(methods), name="method_not_allowed"))
    return routes


# -- the OpenAPI description ---------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _nullable(kind: str, **extra: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **extra}


_TIME = {"type": "string", "format": "date-time"}
_TIME_OR_NULL = _nullable("string", format="date-time")


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


def _error_response(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": _json(_ref("Error"))}
    if headers:
        answer["headers"] = headers
    return answer


def _schemas() -> dict[str, Any]:
    request_properties: dict[str, Any] = {
        "id": {"type": "integer", "minimum": 1},
        "reference": {"type": "string", "description": "read out to the owner, e.g. R-7KQ2M9XD"},
        "state": {"type": "string", "enum": [s.value for s in RequestState]},
        "account_id": {"type": "string"},
        "email": {"type": "string", "description": "the registered address"},
        "account_name": _nullable("string"),
        "locale": _nullable("string"),
        "message_id": _nullable("integer", description="the message that opened it"),
        "auth_strength": {"type": "string", "enum": ["strong", "weak", "none"]},
        "risk_flags": {
            "type": "array",
            "items": {"type": "string"},
            "description": "what to look at twice; a flagged request needs two approvals when "
            "[approval] four_eyes_for_flagged is on",
        },
        "created_at": _TIME,
        "updated_at": _TIME,
        "expires_at": _TIME,
        "decided_at": _TIME_OR_NULL,
        "decided_by": {"type": "array", "items": {"type": "string"}},
        "claimed_by": _nullable("string", description="the agent working on it in the console"),
        "decision_note": _nullable("string"),
        "completed_at": _TIME_OR_NULL,
    }
    return {
        "Error": _object({"error": {"type": "string", "description": "what went wrong"}}),
        "Request": _object(request_properties),
        "QueuedRequest": _object(
            request_properties
            | {"vote_count": {"type": "integer", "minimum": 0, "description": "approvals so far"}}
        ),
        "RequestList": _object(
            {
                "requests": {"type": "array", "items": _ref("QueuedRequest")},
                "total": {"type": "integer", "minimum": 0, "description": "all that match"},
                "limit": {"type": "integer"},
                "offset": {"type": "integer"},
            }
        ),
        "Vote": _object(
            {
                "agent": {"type": "string"},
                "note": {"type": "string"},
                "at": _TIME,
            }
        ),
        "Execution": _object(
            {
                "method": {"type": "string", "enum": ["manual", "webhook", "sql"]},
                "state": {"type": "string", "enum": [s.value for s in ExecutionState]},
                "attempts": {"type": "integer", "minimum": 0},
                "next_attempt_at": _TIME_OR_NULL,
                "last_error": _nullable("string"),
                "response": _nullable("string"),
                "finished_at": _TIME_OR_NULL,
            }
        ),
        "Event": _object(
            {
                "id": {"type": "integer"},
                "request_id": _nullable("integer"),
                "at": _TIME,
                "actor": {"type": "string", "description": "an agent, 'owner' or 'mailproc'"},
                "action": {"type": "string"},
                "from_state": _nullable("string"),
                "to_state": _nullable("string"),
                "reason": _nullable("string"),
                "details": _nullable("object"),
                "message_id": _nullable("integer"),
                "hash": {"type": "string", "description": "this event's link in the chain"},
            }
        ),
        "RequestDetail": _object(
            request_properties
            | {
                "message_ids": {"type": "array", "items": {"type": "integer"}},
                "decision": {
                    "type": "object",
                    "description": "the rules tried on the message that opened it, and why",
                },
                "votes": {"type": "array", "items": _ref("Vote")},
                "execution": {"oneOf": [_ref("Execution"), {"type": "null"}]},
                "events": {
                    "type": "array",
                    "items": _ref("Event"),
                    "description": "the request's audit trail, oldest first",
                },
            }
        ),
        "Decided": _object(
            {
                "request": _ref("Request"),
                "summary": {"type": "string", "description": "what happened, in a few words"},
            }
        ),
        "ApproveBody": _object(
            {
                "note": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": NOTE_MAX_LENGTH,
                    "description": NOTE_WHAT,
                }
            }
        ),
        "DenyBody": _object(
            {
                "reason": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": NOTE_MAX_LENGTH,
                    "description": REASON_WHAT,
                }
            }
        ),
        "CancelBody": _object(
            {
                "reason": _nullable(
                    "string", maxLength=NOTE_MAX_LENGTH, description="why (kept on record)"
                )
            },
            required=[],
        ),
    }


def _decision(
    action: str, summary: str, description: str, body: str, required: bool, errors: list[str]
) -> dict[str, Any]:
    return {
        "post": {
            "operationId": f"{action}Request",
            "summary": summary,
            "description": description,
            "tags": ["requests"],
            "parameters": [{"$ref": "#/components/parameters/RequestId"}],
            "requestBody": {"required": required, "content": _json(_ref(body))},
            "responses": {
                "200": {"description": "done", "content": _json(_ref("Decided"))},
                **{code: {"$ref": f"#/components/responses/{code}"} for code in errors},
            },
        }
    }


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The API's OpenAPI 3.1 description, served at /api/v1/openapi.json."""
    body_errors = ["401", "404", "409", "413", "415", "422", "503"]
    www = {
        "WWW-Authenticate": {
            "description": 'Bearer realm="mailproc" (with error="invalid_token" for a bad one)',
            "schema": {"type": "string"},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mailproc API",
            "version": __version__,
            "description": (
                "Reset requests and their decisions, for scripts and other tools. Every call "
                "acts as the agent of its bearer token (`mailproc tokens create NAME --agent "
                "AGENT`), with that agent's role; the audit log names the agent. Errors are "
                '`{"error": "..."}`.'
            ),
        },
        "servers": [{"url": settings.web.base_url.rstrip("/") + PREFIX}],
        "security": [{"bearerToken": []}],
        "tags": [{"name": "requests", "description": "reset requests"}],
        "paths": {
            "/requests": {
                "get": {
                    "operationId": "listRequests",
                    "summary": "The queue: open requests (or those in one state), oldest first",
                    "tags": ["requests"],
                    "parameters": [
                        {
                            "name": "state",
                            "in": "query",
                            "description": "only requests in this state (default: the open "
                            "ones, pending and approved)",
                            "schema": {"type": "string", "enum": [s.value for s in RequestState]},
                        },
                        {
                            "name": "q",
                            "in": "query",
                            "description": "part of the address, or the whole reference or "
                            "account id",
                            "schema": {"type": "string", "maxLength": MAX_SEARCH},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_LIMIT,
                                "default": DEFAULT_LIMIT,
                            },
                        },
                        {
                            "name": "offset",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 0,
                                "maximum": MAX_OFFSET,
                                "default": 0,
                            },
                        },
                    ],
                    "responses": {
                        "200": {"description": "a page", "content": _json(_ref("RequestList"))},
                        "401": {"$ref": "#/components/responses/401"},
                        "422": {"$ref": "#/components/responses/422"},
                        "503": {"$ref": "#/components/responses/503"},
                    },
                }
            },
            "/requests/{request_id}": {
                "get": {
                    "operationId": "getRequest",
                    "summary": "One request with its votes, reset, messages and audit trail",
                    "tags": ["requests"],
                    "parameters": [{"$ref": "#/components/parameters/RequestId"}],
                    "responses": {
                        "200": {
                            "description": "the request",
                            "content": _json(_ref("RequestDetail")),
                        },
                        "401": {"$ref": "#/components/responses/401"},
                        "404": {"$ref": "#/components/responses/404"},
                        "503": {"$ref": "#/components/responses/503"},
                    },
                }
            },
            "/requests/{request_id}/approve": _decision(
                "approve",
                "Approve a pending request",
                "A flagged request needs two different agents when four-eyes is on: the first "
                "approval is recorded as a vote and the request stays pending.",
                "ApproveBody",
                True,
                body_errors,
            ),
            "/requests/{request_id}/deny": _decision(
                "deny",
                "Deny a pending request",
                "The owner gets the reason in the denial reply.",
                "DenyBody",
                True,
                body_errors,
            ),
            "/requests/{request_id}/cancel": _decision(
                "cancel",
                "Close a request without a reset (admin tokens only)",
                "Pending, approved and failed requests can be cancelled, unless the reset is "
                "being carried out at that moment. The body may be empty.",
                "CancelBody",
                False,
                ["401", "403", *body_errors[1:]],
            ),
            "/openapi.json": {
                "get": {
                    "operationId": "getOpenApi",
                    "summary": "This description",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "the OpenAPI 3.1 document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearerToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "mpt_...",
                    "description": "a token from `mailproc tokens create NAME --agent AGENT`",
                }
            },
            "parameters": {
                "RequestId": {
                    "name": "request_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "integer", "minimum": 1},
                }
            },
            "schemas": _schemas(),
            "responses": {
                "401": _error_response(
                    "no bearer token, or not a live one of an active agent; nothing was done",
                    **www,
                ),
                "403": _error_response("the token's agent may not do this (admins only)"),
                "404": _error_response("no such request"),
                "409": _error_response(
                    "the request is not in a state that allows this (decided already, expired, "
                    "the same agent approving twice, its reset running)"
                ),
                "413": _error_response(f"the body is larger than {MAX_BODY} bytes"),
                "415": _error_response("the body is not application/json"),
                "422": _error_response(
                    "the body or a parameter does not fit (not JSON, not an object, a field "
                    "missing, empty, too long or unknown)"
                ),
                "503": _error_response("the database is not available; try again later"),
            },
        },
    }
