"""The JSON API over real HTTP against the running service, on both databases: listing,
showing, approving (four-eyes), denying and cancelling with bearer tokens made by `mailproc
tokens create`; without a live token of an active agent, with an agent's token on an admin's
call, or with a body that does not fit, nothing changes. Every answer is checked against the
OpenAPI description the API serves, and that description against the routes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher
from click.testing import CliRunner, Result
from sqlalchemy.exc import OperationalError
from starlette.routing import Mount, Route

import mailproc.agents
from mailproc.accounts import Account
from mailproc.agents import AgentService
from mailproc.cli import main
from mailproc.models import AgentRole, RequestState
from mailproc.requests import RequestService, event_dict, request_dict
from mailproc.tokens import TokenService
from mailproc.web.api import MAX_BODY
from mailproc.web.app import create_app
from tests.support import AppThread, write_config
from tests.test_decisions import request as open_request

PASSWORD = "correct horse battery"
ALICE = Account("42", "alice@example.org", "Alice", "de")
BOB = Account("43", "bob@example.org", "Bob", "en")
CAROL = Account("44", "carol@example.org", None, None)


@pytest.fixture(autouse=True)
def _cheap_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Agents' passwords play no part here: hash them cheaply (argon2id all the same)."""
    monkeypatch.setattr(
        mailproc.agents, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    )


@pytest.fixture
def app(database_url: str) -> Iterator[AppThread]:
    # No worker: the messages behind the requests stay as they are, so the audit log only
    # changes through the API.
    with AppThread.running(database_url, worker={"processes": 0}) as running:
        yield running


@pytest.fixture
def tokens(app: AppThread) -> dict[str, str]:
    """Agents alice and bob, admin root and a token for each (named after them)."""
    agents = AgentService(app.app.database)
    service = TokenService(app.app.database)
    made = {}
    for name, role in (("alice", AgentRole.AGENT), ("bob", AgentRole.AGENT)):
        agents.add(name, PASSWORD, role)
    agents.add("root", PASSWORD, AgentRole.ADMIN)
    for name in ("alice", "bob", "root"):
        made[name] = service.create(name, name)[1]
    return made


# -- the OpenAPI description, used to check every answer -------------------------------------


def resolve(document: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        node = document
        for part in ref[2:].split("/"):
            node = node[part]
    return node


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def conforms(document: dict[str, Any], schema: Any, value: Any, where: str = "$") -> None:
    """Check ``value`` against the JSON Schema subset the description uses."""
    schema = resolve(document, schema)
    if "oneOf" in schema:
        fits = 0
        for option in schema["oneOf"]:
            try:
                conforms(document, option, value, where)
                fits += 1
            except AssertionError:
                pass
        assert fits == 1, f"{where}: {value!r} fits {fits} of oneOf"
        return
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(
            isinstance(value, _TYPES[kind])
            and not (kind in ("integer", "number") and isinstance(value, bool))
            for kind in kinds
        )
        assert ok, f"{where}: {value!r} is not {kinds}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"{where}: {key} missing"
        if schema.get("additionalProperties") is False:
            extra = set(value) - set(properties)
            assert not extra, f"{where}: undocumented {sorted(extra)}"
        for key, item in value.items():
            if key in properties:
                conforms(document, properties[key], item, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            conforms(document, schema["items"], item, f"{where}[{index}]")
    if isinstance(value, str):
        assert len(value) >= schema.get("minLength", 0), where
        assert len(value) <= schema.get("maxLength", len(value)), where
    if isinstance(value, int) and "minimum" in schema:
        assert value >= schema["minimum"], where


class Api:
    """A real HTTP client for /api/v1 that checks every answer against the description."""

    def __init__(self, app: AppThread) -> None:
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{app.app.web_port}/api/v1")
        self.document: dict[str, Any] = self.http.get("/openapi.json").json()

    def close(self) -> None:
        self.http.close()

    def call(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        response = self.http.request(method, path, headers=headers, **kwargs)
        template = re.sub(r"^/requests/\d+", "/requests/{request_id}", path)
        operation = self.document["paths"][template][method.lower()]
        answers = operation["responses"]
        status = str(response.status_code)
        assert status in answers, f"{method} {path}: {status} is not documented ({response.text})"
        answer = resolve(self.document, answers[status])
        assert response.headers["content-type"] == "application/json"
        conforms(self.document, answer["content"]["application/json"]["schema"], response.json())
        for header in answer.get("headers", {}):
            assert header in response.headers, f"{method} {path}: no {header}"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-content-type-options"] == "nosniff"
        return response

    def get(self, path: str, token: str | None, **kwargs: Any) -> httpx.Response:
        return self.call("GET", path, token, **kwargs)

    def post(self, path: str, token: str | None, **kwargs: Any) -> httpx.Response:
        return self.call("POST", path, token, **kwargs)


@pytest.fixture
def api(app: AppThread) -> Iterator[Api]:
    client = Api(app)
    yield client
    client.close()


def snapshot(app: AppThread, request_id: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The request and the whole audit log, to show that nothing changed."""
    service = RequestService(app.app.database)
    request = request_dict(service.get(request_id).request)
    return request, [event_dict(e) for e in service.events(None, 10_000)]


def opened(app: AppThread, account: Account = ALICE, flags: list[str] | None = None) -> int:
    return open_request(app.app.database, app.database_url, flags=flags, account=account)


# -- reading -------------------------------------------------------------------------------


def test_list_is_the_queue_oldest_first_with_filters_and_paging(
    app: AppThread, api: Api, tokens: dict[str, str]
) -> None:
    first = opened(app, ALICE)
    second = opened(app, BOB, flags=["first_contact"])
    third = opened(app, CAROL)
    api.post(f"/requests/{third}/deny", tokens["alice"], json={"reason": "not you"})

    listed = api.get("/requests", tokens["bob"]).json()
    assert [r["id"] for r in listed["requests"]] == [first, second]
    assert listed["total"] == 2
    assert (listed["limit"], listed["offset"]) == (50, 0)
    assert listed["requests"][1]["risk_flags"] == ["first_contact"]
    assert listed["requests"][0]["vote_count"] == 0

    denied = api.get("/requests", tokens["bob"], params={"state": "denied"}).json()
    assert [r["id"] for r in denied["requests"]] == [third]
    assert denied["requests"][0]["decided_by"] == ["alice"]

    found = api.get("/requests", tokens["bob"], params={"q": "BOB@example"}).json()
    assert [r["id"] for r in found["requests"]] == [second]
    reference = listed["requests"][0]["reference"]
    found = api.get("/requests", tokens["bob"], params={"q": reference.lower()}).json()
    assert [r["id"] for r in found["requests"]] == [first]

    page = api.get("/requests", tokens["bob"], params={"limit": 1, "offset": 1}).json()
    assert [r["id"] for r in page["requests"]] == [second]
    assert page["total"] == 2

    for params, what in (
        ({"state": "open"}, "state must be one of"),
        ({"limit": "0"}, "limit must be"),
        ({"limit": "201"}, "limit must be"),
        ({"limit": "ten"}, "limit must be"),
        ({"offset": "-1"}, "offset must be"),
        ({"q": "x" * 201}, "q must have at most 200"),
    ):
        answer = api.get("/requests", tokens["bob"], params=params)
        assert answer.status_code == 422, params
        assert what in answer.json()["error"]


def test_show_has_votes_execution_events_and_messages(
    app: AppThread, api: Api, tokens: dict[str, str]
) -> None:
    request_id = opened(app, ALICE, flags=["email_changed_recently"])
    api.post(f"/requests/{request_id}/approve", tokens["alice"], json={"note": "called back"})

    shown = api.get(f"/requests/{request_id}", tokens["bob"]).json()
    detail = RequestService(app.app.database).get(request_id)
    assert {k: shown[k] for k in request_dict(detail.request)} == request_dict(detail.request)
    assert shown["state"] == "pending"
    assert [(v["agent"], v["note"]) for v in shown["votes"]] == [("alice", "called back")]
    assert shown["execution"] is None
    assert shown["message_ids"] == detail.message_ids
    assert shown["decision"] == {"rule": "test"}
    assert [(e["actor"], e["action"]) for e in shown["events"]] == [
        ("mailproc", "created"),
        ("alice", "vote"),
    ]

    answer = api.get("/requests/999999", tokens["bob"])
    assert answer.status_code == 404
    assert answer.json() == {"error": "request 999999 not found"}
    # Larger than any id the database can hold: still simply not there.
    assert api.get("/requests/99999999999999999999", tokens["bob"]).status_code == 404


# -- deciding ------------------------------------------------------------------------------


def test_approve_deny_and_cancel(app: AppThread, api: Api, tokens: dict[str, str]) -> None:
    approved, denied, cancelled = opened(app, ALICE), opened(app, BOB), opened(app, CAROL)

    answer = api.post(
        f"/requests/{approved}/approve", tokens["alice"], json={"note": " called back "}
    ).json()
    assert answer["request"]["state"] == "approved"
    assert answer["request"]["decided_by"] == ["alice"]
    assert answer["request"]["decision_note"] == "called back"
    assert answer["summary"].startswith("approved; reset the security question")

    answer = api.post(
        f"/requests/{denied}/deny", tokens["bob"], json={"reason": "the number did not answer"}
    ).json()
    assert answer == {
        "request": answer["request"] | {"state": "denied", "decided_by": ["bob"]},
        "summary": "denied; the owner is told why",
    }

    # An admin's cancel needs no body at all.
    answer = api.post(f"/requests/{cancelled}/cancel", tokens["root"]).json()
    assert answer["request"]["state"] == "cancelled"
    assert answer["request"]["decision_note"] == "cancelled by root"
    assert answer["summary"] == "cancelled; the owner is told"

    service = RequestService(app.app.database)
    trail = [(e.request_id, e.actor, e.action, e.to_state) for e in service.events(None)]
    assert (approved, "alice", "approved", "approved") in trail
    assert (denied, "bob", "denied", "denied") in trail
    assert (cancelled, "root", "cancelled", "cancelled") in trail

    # Decided is decided: 409, and nothing changes.
    before = snapshot(app, denied)
    for action, body in (("approve", {"note": "n"}), ("deny", {"reason": "r"})):
        refused = api.post(f"/requests/{denied}/{action}", tokens["alice"], json=body)
        assert refused.status_code == 409
        assert "is denied by bob" in refused.json()["error"]
    refused = api.post(f"/requests/{cancelled}/cancel", tokens["root"], json={"reason": "again"})
    assert refused.status_code == 409
    assert snapshot(app, denied) == before

    # The approved one can still be cancelled by an admin, with a reason.
    answer = api.post(f"/requests/{approved}/cancel", tokens["root"], json={"reason": "dup"})
    assert answer.json()["request"]["decision_note"] == "dup"

    for action, body in (("approve", {"note": "x"}), ("deny", {"reason": "x"}), ("cancel", {})):
        missing = api.post(f"/requests/424242/{action}", tokens["root"], json=body)
        assert missing.status_code == 404, action
        assert missing.json() == {"error": "request 424242 not found"}


def test_four_eyes_needs_two_different_agents_tokens(
    app: AppThread, api: Api, tokens: dict[str, str]
) -> None:
    request_id = opened(app, ALICE, flags=["first_contact"])
    first = api.post(f"/requests/{request_id}/approve", tokens["alice"], json={"note": "one"})
    assert first.json()["request"]["state"] == "pending"
    assert "a second, different agent must approve" in first.json()["summary"]

    again = api.post(f"/requests/{request_id}/approve", tokens["alice"], json={"note": "two"})
    assert again.status_code == 409
    assert "alice approved request" in again.json()["error"]

    second = api.post(f"/requests/{request_id}/approve", tokens["bob"], json={"note": "two"})
    assert second.json()["request"]["state"] == "approved"
    assert second.json()["request"]["decided_by"] == ["alice", "bob"]
    votes = api.get(f"/requests/{request_id}", tokens["root"]).json()["votes"]
    assert [v["agent"] for v in votes] == ["alice", "bob"]


# -- who may call ----------------------------------------------------------------------------


def test_without_a_live_token_of_an_active_agent_nothing_changes(
    app: AppThread, api: Api, tokens: dict[str, str]
) -> None:
    request_id = opened(app, ALICE)
    service = TokenService(app.app.database)
    _info, revoked = service.create("old", "alice")
    service.revoke("old")
    agents = AgentService(app.app.database)
    agents.add("dave", PASSWORD, AgentRole.ADMIN)
    _info, disabled = service.create("daves", "dave")
    agents.disable("dave")
    before = snapshot(app, request_id)

    def refused(headers: dict[str, str]) -> None:
        calls = [
            ("GET", "/requests", None),
            ("GET", f"/requests/{request_id}", None),
            ("POST", f"/requests/{request_id}/approve", {"note": "trust me"}),
            ("POST", f"/requests/{request_id}/deny", {"reason": "no"}),
            ("POST", f"/requests/{request_id}/cancel", {"reason": "no"}),
        ]
        for method, path, body in calls:
            answer = api.call(method, path, headers=headers, json=body)
            assert answer.status_code == 401, (headers, path)
            assert answer.headers["www-authenticate"].startswith('Bearer realm="mailproc"')
            assert set(answer.json()) == {"error"}

    refused({})
    for header in (
        f"Bearer {tokens['alice']}x",
        f"Bearer {tokens['alice'][:-1]}",
        "Bearer mpt_" + "A" * 43,
        "Bearer",
        f"Basic {tokens['alice']}",
        tokens["alice"],
        f"Bearer {tokens['alice']} {tokens['alice']}",
        f"Bearer {revoked}",
        f"Bearer {disabled}",
    ):
        refused({"Authorization": header})
    assert snapshot(app, request_id) == before

    # The scheme's name is case-insensitive; a live token works as ever.
    answer = api.get("/requests", None, headers={"Authorization": f"bearer {tokens['alice']}"})
    assert answer.status_code == 200


def test_an_agents_token_cannot_cancel(app: AppThread, api: Api, tokens: dict[str, str]) -> None:
    request_id = opened(app, ALICE)
    before = snapshot(app, request_id)
    for body in ({"reason": "mine"}, None, {"nonsense": True}):
        answer = api.post(f"/requests/{request_id}/cancel", tokens["alice"], json=body)
        assert answer.status_code == 403
        assert answer.json() == {"error": "only an admin's token may cancel a request"}
    assert snapshot(app, request_id) == before


def test_role_and_state_count_at_every_call(
    app: AppThread, api: Api, tokens: dict[str, str]
) -> None:
    agents = AgentService(app.app.database)
    agents.disable("alice")
    assert api.get("/requests", tokens["alice"]).status_code == 401
    agents.enable("alice")
    assert api.get("/requests", tokens["alice"]).status_code == 200


# -- bodies --------------------------------------------------------------------------------


def test_bodies_that_do_not_fit_change_nothing(
    app: AppThread, api: Api, tokens: dict[str, str]
) -> None:
    request_id = opened(app, ALICE)
    path = f"/requests/{request_id}/approve"
    before = snapshot(app, request_id)
    json_type = {"Content-Type": "application/json"}
    too_long = "x" * 2001
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"content": b"{", "headers": json_type}, 422, "not valid JSON"),
        ({"content": b'{"note": NaN}', "headers": json_type}, 422, "not valid JSON"),
        ({"content": b'{"note": "a", "note": "b"}', "headers": json_type}, 422, "duplicate key"),
        ({"content": b"\xff\xfe", "headers": json_type}, 422, "not valid UTF-8"),
        ({"content": b"[" * 60_000, "headers": json_type}, 422, "nested too deeply"),
        ({"json": ["note"]}, 422, "must be a JSON object"),
        ({"json": {}}, 422, '"note" is required'),
        ({}, 422, '"note" is required'),
        ({"json": {"note": "   "}}, 422, '"note" is required'),
        ({"json": {"note": 7}}, 422, '"note" must be a string'),
        ({"json": {"note": None}}, 422, '"note" must be a string'),
        ({"json": {"note": "ok", "agent": "root"}}, 422, "unknown field(s): agent"),
        ({"json": {"note": too_long}}, 422, "too long (2001 characters; at most 2000)"),
        ({"data": {"note": "called back"}}, 415, "must be JSON"),
        ({"content": b'{"note": "x"}', "headers": {"Content-Type": "text/plain"}}, 415, "JSON"),
        ({"content": b'{"note": "x"}'}, 415, "must be JSON"),
        (
            {
                "content": b'{"note": "x"}',
                "headers": {"Content-Type": "application/json; charset=latin-1"},
            },
            415,
            "must be JSON",
        ),
        ({"json": {"note": "x" * MAX_BODY}}, 413, f"larger than {MAX_BODY} bytes"),
        (
            # Chunked, so no Content-Length tells the size up front.
            {"content": iter([b'{"note": "', b"x" * MAX_BODY, b'"}']), "headers": json_type},
            413,
            "larger than",
        ),
    ]
    for kwargs, status, message in cases:
        answer = api.post(path, tokens["alice"], **kwargs)
        assert answer.status_code == status, (kwargs, answer.text)
        assert message in answer.json()["error"], (kwargs, answer.json())
    deny = api.post(f"/requests/{request_id}/deny", tokens["alice"], json={"note": "x"})
    assert deny.status_code == 422
    assert deny.json()["error"] == "unknown field(s): note (allowed: reason)"
    assert snapshot(app, request_id) == before

    # A charset of utf-8 is fine, and so is a body just under the limit.
    answer = api.post(
        path,
        tokens["alice"],
        content=json.dumps({"note": "called back"}).encode(),
        headers={"Content-Type": "application/json; charset=UTF-8"},
    )
    assert answer.status_code == 200
    assert answer.json()["request"]["state"] == "approved"


def test_failures_of_ours_are_json_and_say_nothing_inside(
    app: AppThread, api: Api, tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def locked(*_args: Any) -> Any:
        raise OperationalError("SELECT 1", {}, Exception("database is locked"))

    def broken(*_args: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(RequestService, "queue", locked)
    answer = api.get("/requests", tokens["alice"])
    assert answer.status_code == 503
    assert answer.json() == {"error": "the database is not available; try again later"}
    monkeypatch.setattr(RequestService, "queue", broken)
    answer = api.http.get("/requests", headers={"Authorization": f"Bearer {tokens['alice']}"})
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal error (details are in the server's log)"}


# -- tokens through the command line -------------------------------------------------------


def cli(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(config), *args])


def test_a_token_from_the_command_line_works_until_revoked(
    app: AppThread, api: Api, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "mailproc.toml", database_url=app.database_url)
    AgentService(app.app.database).add("alice", PASSWORD)
    request_id = opened(app, ALICE)

    result = cli(config, "tokens", "create", "ci-bot", "--agent", "alice")
    assert result.exit_code == 0, result.output
    # Only the token on stdout (TOKEN=$(mailproc tokens create ...)), the notes on stderr.
    secret = result.stdout.removesuffix("\n")
    assert re.fullmatch(r"mpt_[A-Za-z0-9_-]{43}", secret)
    notes = result.stderr.splitlines()
    assert notes[0] == "token ci-bot created, acting as agent alice:"
    assert notes[1] == "It is shown only this once: store it now (only its hash is kept)."

    result = cli(config, "tokens", "create", "script", "--agent", "alice", "--json")
    assert result.exit_code == 0, result.output
    made = json.loads(result.stdout)
    assert made["name"] == "script"
    assert made["agent"] == "alice"
    assert made["token"].startswith("mpt_")
    assert made["revoked_at"] is None

    assert api.get(f"/requests/{request_id}", secret).status_code == 200

    listed = cli(config, "tokens", "list")
    assert listed.exit_code == 0
    assert secret not in listed.stdout
    assert made["token"] not in listed.stdout
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows["ci-bot"][1:3] == ["alice", "live"]
    assert rows["script"][-1] == "never"
    listed_json = json.loads(cli(config, "tokens", "list", "--json").stdout)
    assert [t["name"] for t in listed_json] == ["ci-bot", "script"]
    assert listed_json[0]["last_used_at"] is not None
    assert "token" not in listed_json[0]

    result = cli(config, "tokens", "revoke", "ci-bot")
    assert (result.exit_code, result.stdout) == (0, "token ci-bot revoked\n")
    before = snapshot(app, request_id)
    answer = api.post(f"/requests/{request_id}/approve", secret, json={"note": "called back"})
    assert answer.status_code == 401
    assert snapshot(app, request_id) == before
    assert "revoked" in cli(config, "tokens", "list").stdout.splitlines()[1]
    # The other token still works.
    answer = api.post(
        f"/requests/{request_id}/approve", made["token"], json={"note": "called back"}
    )
    assert answer.json()["request"]["decided_by"] == ["alice"]

    for args, message in (
        (("revoke", "ci-bot"), "Error: token ci-bot is revoked already"),
        (("revoke", "nope"), "Error: no token named 'nope'"),
        (("create", "ci-bot", "--agent", "alice"), "Error: a token named ci-bot exists already"),
        (("create", "other", "--agent", "zed"), "Error: no agent named 'zed'"),
    ):
        result = cli(config, "tokens", *args)
        assert result.exit_code == 1, result.output
        assert result.stdout == ""
        assert result.stderr == message + "\n"
    result = cli(config, "tokens", "create", "Bad Name", "--agent", "alice")
    assert result.exit_code == 2
    assert "invalid token name 'Bad Name'" in result.stderr

    AgentService(app.app.database).disable("alice")
    result = cli(config, "tokens", "create", "late", "--agent", "alice")
    assert result.stderr == "Error: agent alice is disabled\n"


# -- the description -----------------------------------------------------------------------


def test_the_description_lists_exactly_what_is_served(app: AppThread, api: Api) -> None:
    answer = httpx.get(f"http://127.0.0.1:{app.app.web_port}/api/v1/openapi.json")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    document = json.loads(answer.text)
    assert document["openapi"] == "3.1.0"
    assert document["servers"] == [{"url": "http://127.0.0.1:8025/api/v1"}]
    assert document["components"]["securitySchemes"]["bearerToken"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "mpt_...",
        "description": "a token from `mailproc tokens create NAME --agent AGENT`",
    }

    served: set[tuple[str, str]] = set()
    refusing: dict[str, set[str]] = {}
    [mount] = [
        r
        for r in create_app(app.settings, app.app.database).routes
        if isinstance(r, Mount) and r.path == "/api/v1"
    ]
    for route in mount.routes:
        assert isinstance(route, Route)
        path = re.sub(r"\{(\w+):int\}", r"{\1}", route.path)
        if route.methods is None:
            refusing[path] = set()
            continue
        served |= {(path, m.lower()) for m in route.methods if m != "HEAD"}
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert served == documented
    assert set(refusing) == {path for path, _ in served}

    # Every operation: an id, its answers, and the 401 wherever a token is needed; every
    # reference resolves.
    ids = set()
    for path, item in document["paths"].items():
        for operation in item.values():
            ids.add(operation["operationId"])
            assert "200" in operation["responses"]
            public = operation.get("security") == []
            assert public == (path == "/openapi.json")
            assert ("401" in operation["responses"]) != public
            for parameter in operation.get("parameters", []):
                if resolve(document, parameter)["in"] == "path":
                    assert "{" + resolve(document, parameter)["name"] + "}" in path
    assert len(ids) == len(served)

    def refs(node: Any) -> Iterator[Any]:
        if isinstance(node, dict):
            if "$ref" in node:
                yield node
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(document):
        assert isinstance(resolve(document, ref), dict), ref

    # Other methods on these paths: 405 with Allow; other paths: 404; both as JSON errors.
    http = api.http
    answer = http.delete("/requests/1")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET, HEAD"
    assert answer.json() == {"error": "method DELETE not allowed here (allowed: GET, HEAD)"}
    answer = http.get("/requests/1/approve")
    assert (answer.status_code, answer.headers["allow"]) == (405, "POST")
    answer = http.get("/nothing-here")
    assert answer.status_code == 404
    assert answer.json() == {"error": "Not Found"}
    assert http.get("/requests/abc").status_code == 404

    schemas = document["components"]["schemas"]
    assert schemas["Request"]["properties"]["state"]["enum"] == [s.value for s in RequestState]
    assert schemas["ApproveBody"]["required"] == ["note"]
    assert schemas["DenyBody"]["required"] == ["reason"]
    assert schemas["CancelBody"]["required"] == []
