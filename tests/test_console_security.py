"""The console's safety, over real HTTP against the running service: without a session, with a
bad CSRF token or a foreign Origin, as an agent on admin pages, or with a reused, forged or
expired cancel link, nothing changes; sign-in needs both factors, locks out after repeated
failures and never accepts a code twice; every answer carries the security headers."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pyotp
import pytest
from sqlalchemy import select

from mailproc.agents import AgentService
from mailproc.links import make_cancel_token, signing_key
from mailproc.models import Agent, AgentRole, RequestState, utcnow
from mailproc.requests import RequestService
from tests.support import AppThread
from tests.test_decisions import request as open_request

PASSWORD = "correct horse battery"


@pytest.fixture
def app(database_url: str) -> Iterator[AppThread]:
    with AppThread.running(database_url) as running:
        yield running


OPEN: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


def client(app: AppThread) -> httpx.Client:
    """A client of its own (its own cookies), like a separate browser."""
    opened = httpx.Client(base_url=f"http://127.0.0.1:{app.app.web_port}", follow_redirects=False)
    OPEN.append(opened)
    return opened


def field(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no {name} field in:\n{html[:2000]}"
    return match.group(1)


def sign_in(app: AppThread, name: str, role: AgentRole = AgentRole.AGENT) -> httpx.Client:
    """A browser-like client signed in with both factors (enrolling at first sign-in)."""
    agents = AgentService(app.app.database)
    if name not in {a.name for a in agents.list()}:
        agents.add(name, PASSWORD, role)
    browser = client(app)
    page = browser.get("/login")
    answer = browser.post(
        "/login", data={"csrf": field(page.text, "csrf"), "name": name, "password": PASSWORD}
    )
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"].startswith("/login/enrol")
    enrol = browser.get(answer.headers["location"])
    secret = re.search(r"Key: <code>([A-Z2-7 ]+)</code>", enrol.text)
    assert secret, enrol.text
    code = pyotp.TOTP(secret.group(1).replace(" ", "")).now()
    done = browser.post("/login/enrol", data={"csrf": field(enrol.text, "csrf"), "code": code})
    assert done.status_code == 303, done.text
    return browser


def csrf_of(browser: httpx.Client, path: str = "/") -> str:
    return field(browser.get(path).text, "csrf")


def audit_count(app: AppThread) -> int:
    """Events of people's doings (the worker deciding the stored test messages aside)."""
    events = RequestService(app.app.database).events(limit=100_000)
    return sum(1 for event in events if event.action != "message_decided")


def state(app: AppThread, request_id: int) -> RequestState:
    return RequestService(app.app.database).get(request_id).request.state


def test_without_a_session_nothing_is_shown_or_changed(app: AppThread, database_url: str) -> None:
    request_id = open_request(app.app.database, database_url)
    anonymous = client(app)
    for path in ("/", f"/requests/{request_id}", "/admin/agents", "/admin/audit"):
        answer = anonymous.get(path)
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/login")
    before = audit_count(app)
    for action in ("approve", "deny", "cancel", "claim"):
        answer = anonymous.post(f"/requests/{request_id}/{action}", data={"text": "x", "csrf": "x"})
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/login")
    assert (
        anonymous.post("/requests/bulk-deny", data={"request": str(request_id)}).status_code == 303
    )
    assert state(app, request_id) == RequestState.PENDING
    assert audit_count(app) == before
    # A password alone is not a session: the second factor is still owed.
    AgentService(app.app.database).add("alice", PASSWORD)
    half = client(app)
    page = half.get("/login")
    half.post(
        "/login", data={"csrf": field(page.text, "csrf"), "name": "alice", "password": PASSWORD}
    )
    assert half.get("/").status_code == 303
    assert half.post(f"/requests/{request_id}/approve", data={"text": "x"}).status_code == 303
    assert state(app, request_id) == RequestState.PENDING


def test_a_bad_csrf_token_or_a_foreign_origin_changes_nothing(
    app: AppThread, database_url: str
) -> None:
    request_id = open_request(app.app.database, database_url)
    alice = sign_in(app, "alice")
    assert alice.get("/requests/99999999999999999999").status_code == 404
    token = csrf_of(alice, f"/requests/{request_id}")
    before = audit_count(app)
    for data in ({"text": "verified"}, {"text": "verified", "csrf": "forged"}):
        answer = alice.post(f"/requests/{request_id}/approve", data=data)
        assert answer.status_code == 403
    answer = alice.post(
        f"/requests/{request_id}/approve",
        data={"text": "verified", "csrf": token},
        headers={"Origin": "https://evil.example"},
    )
    assert answer.status_code == 403
    answer = alice.post(
        f"/requests/{request_id}/approve",
        data={"text": "verified", "csrf": token},
        headers={"Sec-Fetch-Site": "cross-site", "Origin": "null"},
    )
    assert answer.status_code == 403
    assert state(app, request_id) == RequestState.PENDING
    assert audit_count(app) == before
    # Another agent's token is no good either.
    bob = sign_in(app, "bob")
    answer = bob.post(f"/requests/{request_id}/deny", data={"text": "no", "csrf": token})
    assert answer.status_code == 403
    assert state(app, request_id) == RequestState.PENDING
    # The right token from our own page works, with what a browser sends under no-referrer.
    answer = alice.post(
        f"/requests/{request_id}/approve",
        data={"text": "verified", "csrf": token},
        headers={"Sec-Fetch-Site": "same-origin", "Origin": "null"},
    )
    assert answer.status_code == 303
    assert state(app, request_id) == RequestState.APPROVED


def test_an_agent_cannot_reach_admin_pages_or_actions(app: AppThread, database_url: str) -> None:
    request_id = open_request(app.app.database, database_url)
    alice = sign_in(app, "alice")
    sign_in(app, "root", AgentRole.ADMIN)
    token = csrf_of(alice)
    before = audit_count(app)
    for path in ("/admin/agents", "/admin/failed", "/admin/audit"):
        assert alice.get(path).status_code == 403
    answer = alice.post("/admin/agents", data={"csrf": token, "action": "disable", "name": "root"})
    assert answer.status_code == 403
    answer = alice.post(
        "/admin/agents",
        data={
            "csrf": token,
            "action": "add",
            "name": "mallory",
            "password": PASSWORD,
            "role": "admin",
        },
    )
    assert answer.status_code == 403
    assert alice.post(f"/requests/{request_id}/cancel", data={"csrf": token}).status_code == 403
    assert audit_count(app) == before, RequestService(app.app.database).events()[-1].action
    assert [a.name for a in AgentService(app.app.database).list()] == ["alice", "root"]
    assert state(app, request_id) == RequestState.PENDING


def test_the_owners_cancel_link_works_once_and_forged_or_expired_ones_never(
    app: AppThread, database_url: str
) -> None:
    database = app.app.database
    request_id = open_request(database, database_url)
    key = signing_key(app.settings, database)
    request = RequestService(database).get(request_id).request
    token = make_cancel_token(key, request_id, request.expires_at)
    owner = client(app)
    page = owner.get(f"/cancel/{token}")
    assert page.status_code == 200
    assert request.reference in page.text
    assert state(app, request_id) == RequestState.PENDING  # a GET (a mail scanner) cancels nothing
    form = field(page.text, "csrf")
    assert owner.post(f"/cancel/{token}", data={"csrf": "forged"}).status_code == 403
    assert state(app, request_id) == RequestState.PENDING
    done = owner.post(f"/cancel/{token}", data={"csrf": form})
    assert done.status_code == 200
    assert "Request cancelled" in done.text
    assert state(app, request_id) == RequestState.CANCELLED
    events = RequestService(database).get(request_id).events
    assert (events[-1].actor, events[-1].action) == ("owner", "cancelled")
    before = audit_count(app)
    # Used: the link does nothing more, however it is replayed.
    again = client(app)
    reused = again.get(f"/cancel/{token}")
    assert reused.status_code == 410
    assert "no longer does anything" in reused.text
    assert again.post(f"/cancel/{token}", data={"csrf": form}).status_code in (403, 410)
    assert audit_count(app) == before

    other = open_request(database, database_url)
    forged = make_cancel_token(b"not the key" * 4, other, utcnow() + timedelta(days=1))
    expired = make_cancel_token(key, other, utcnow() - timedelta(seconds=1))
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    for bad in (forged, expired, tampered, "garbage"):
        assert client(app).get(f"/cancel/{bad}").status_code == 404
    assert state(app, other) == RequestState.PENDING


def test_sign_in_locks_out_after_repeated_failures_and_never_takes_a_code_twice(
    database_url: str,
) -> None:
    with AppThread.running(database_url, web={"login_attempts": 3, "lockout_seconds": 60}) as app:
        AgentService(app.app.database).add("alice", PASSWORD)
        browser = client(app)
        for _ in range(3):
            page = browser.get("/login")
            answer = browser.post(
                "/login",
                data={"csrf": field(page.text, "csrf"), "name": "alice", "password": "wrong"},
            )
            assert answer.status_code == 401
        assert "Too many failed sign-ins" in answer.text
        # Locked: even the right password does not get in.
        page = browser.get("/login")
        answer = browser.post(
            "/login", data={"csrf": field(page.text, "csrf"), "name": "alice", "password": PASSWORD}
        )
        assert answer.status_code == 401
        assert "Too many failed sign-ins" in answer.text
        with app.app.database.reading() as session:
            agent = session.scalars(select(Agent).where(Agent.name == "alice")).one()
            assert agent.locked_until is not None
        # An admin lifts it (the CLI's agents reset-mfa does the same).
        AgentService(app.app.database).reset_mfa("alice")

        alice = sign_in(app, "alice")
        with app.app.database.reading() as session:
            secret = session.scalars(select(Agent.totp_secret).where(Agent.name == "alice")).one()
        assert secret is not None
        code = pyotp.TOTP(secret).now()
        # The code used at enrolment (same time step) is refused at the next sign-in.
        second = client(app)
        page = second.get("/login")
        step = second.post(
            "/login", data={"csrf": field(page.text, "csrf"), "name": "alice", "password": PASSWORD}
        )
        assert step.headers["location"].startswith("/login/code")
        code_page = second.get(step.headers["location"])
        used = second.post(
            "/login/code", data={"csrf": field(code_page.text, "csrf"), "code": code}
        )
        assert used.status_code == 401
        assert second.get("/").status_code == 303
        assert alice.get("/").status_code == 200


def test_sessions_end_when_idle_and_when_the_agent_is_disabled(database_url: str) -> None:
    with AppThread.running(database_url, web={"session_idle_minutes": 0.02}) as app:
        alice = sign_in(app, "alice")
        assert alice.get("/").status_code == 200
        time.sleep(1.5)
        assert alice.get("/").status_code == 303  # idle for longer than 1.2 s
    with AppThread.running(database_url) as app:
        bob = sign_in(app, "bob")
        assert bob.get("/").status_code == 200
        AgentService(app.app.database).disable("bob")
        assert bob.get("/").status_code == 303


def test_security_headers_and_cookies(app: AppThread) -> None:
    anonymous = client(app)
    for answer in (
        anonymous.get("/login"),
        anonymous.get("/"),
        anonymous.get("/static/console.css"),
    ):
        headers = answer.headers
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
    page = anonymous.get("/login")
    assert "<script" not in page.text
    assert ' style="' not in page.text
    alice = sign_in(app, "alice")
    fresh = client(app)
    page = fresh.get("/login")
    answer = fresh.post(
        "/login", data={"csrf": field(page.text, "csrf"), "name": "alice", "password": PASSWORD}
    )
    cookies = answer.headers.get_list("set-cookie")
    session_cookie = next(c for c in cookies if c.startswith("mailproc_session="))
    assert "HttpOnly" in session_cookie
    assert "SameSite=strict" in session_cookie or "SameSite=Strict" in session_cookie
    assert alice.get("/").status_code == 200


def test_mail_is_shown_as_text_never_as_html(app: AppThread, database_url: str) -> None:
    from mailproc.models import Message

    database = app.app.database
    request_id = open_request(database, database_url)
    raw = (
        b"From: <alice@example.org>\r\nTo: <support@example.com>\r\nSubject: Reset\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        b'<p onclick="x()">Hi</p><script>alert(1)</script><img src="https://evil.example/x">\r\n'
    )
    with database.writing() as session:
        message_id = RequestService(database).get(request_id).request.message_id
        stored = session.get(Message, message_id)
        assert stored is not None
        stored.raw = raw
    alice = sign_in(app, "alice")
    page = alice.get(f"/requests/{request_id}")
    assert page.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "<script>alert(1)" not in page.text
    assert '<img src="https://evil.example' not in page.text
