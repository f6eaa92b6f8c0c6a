"""The console: server-rendered pages on the same services as the command line.

Safety, in one place: every page but sign-in and the owner's cancel link needs a session that
passed both factors; every POST carries the session's CSRF token (sign-in: a double-submit
token) and, when the browser sends one, an Origin of our own; every answer carries a CSP
without inline script, ``frame-ancestors 'none'`` and ``Referrer-Policy: no-referrer``; admin
pages answer 403 to agents; mail is only ever shown as text.

Under ``no-referrer`` browsers send ``Origin: null`` with our own forms, so where the browser
says where a request comes from (``Sec-Fetch-Site``) that is what counts: only ``same-origin``
(or ``none``, typed by the user) is accepted. The CSRF token is checked in every case."""

from __future__ import annotations

import email
import email.policy
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit

import segno
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailproc import __version__
from mailproc.agents import (
    AgentError,
    AgentService,
    SignIn,
    SignInService,
    new_totp_secret,
    totp_uri,
)
from mailproc.config import Settings
from mailproc.db import Database
from mailproc.decisions import DecisionService
from mailproc.errors import InvalidState, NotFound
from mailproc.links import read_cancel_token, signing_key
from mailproc.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from mailproc.metrics import Metrics
from mailproc.models import AgentRole, RequestState, utcnow
from mailproc.models import Message as StoredMessage
from mailproc.requests import RequestService, verify_chain
from mailproc.web.sessions import SessionInfo, SessionStore

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "mailproc_session"
LOGIN_COOKIE = "mailproc_login"
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# Shown after a redirect: a fixed text per key, so nothing from the query is ever echoed.
NOTICES = {
    "approved": "Approved. The reset is being carried out.",
    "voted": "Your approval is recorded. A second, different agent must approve.",
    "denied": "Denied. The owner is told why.",
    "cancelled": "Cancelled. The owner is told.",
    "completed": "Marked completed. The owner is told.",
    "claimed": "You are working on this request; other agents see it.",
    "released": "Released for other agents.",
    "retried": "The reset will be tried again.",
    "bulk": "The selected requests were denied.",
    "agent_added": "Agent added.",
    "agent_changed": "Agent updated.",
    "signed_out": "Signed out.",
}
MAX_TEXT_BODY = 100_000
# The states in which a notice about a request is still true (the page may be reloaded later).
NOTICE_STATES = {
    "approved": {RequestState.APPROVED},
    "voted": {RequestState.PENDING},
    "retried": {RequestState.APPROVED},
    "claimed": {RequestState.PENDING, RequestState.APPROVED},
}
# What each risk flag means, in the words an agent needs before approving.
FLAG_HELP = {
    "first_contact": "No earlier request for this account, and we have never written to this "
    "address before.",
    "weak_authentication": "The sender is not proven by a DKIM signature of their domain.",
    "email_changed_recently": "The account's address was changed in the last 30 days.",
    "lookalike_seen": "Mail from an address that looks like this one arrived in the last 30 days.",
    "repeated_requests": "Two or more requests for this account in the last 30 days.",
}


class SecurityHeaders:
    """Headers on every answer (pure ASGI, so it costs nothing per streamed chunk)."""

    def __init__(self, app: ASGIApp, hsts: bool) -> None:
        self.app = app
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                extra = [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"cross-origin-opener-policy", b"same-origin"),
                    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
                ]
                if b"cache-control" not in names:
                    extra.append((b"cache-control", b"no-store"))
                if self.hsts:
                    extra.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers + extra
            await send(message)

        await self.app(scope, receive, wrapped)


class Console:
    """The console's state and handlers."""

    def __init__(self, settings: Settings, database: Database) -> None:
        self.settings = settings
        self.db = database
        web = settings.web
        self.secure = web.base_url.startswith("https://")
        self.sessions = SessionStore(
            database,
            idle=timedelta(minutes=web.session_idle_minutes),
            absolute=timedelta(hours=web.session_max_hours),
        )
        self.sign_in = SignInService(
            database, web.login_attempts, timedelta(seconds=web.lockout_seconds)
        )
        self.agents = AgentService(database)
        self.requests = RequestService(database)
        self.decisions = DecisionService(settings, database)
        self._link_key: bytes | None = None
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.globals.update(
            product=settings.templates.product_name,
            version=__version__,
            four_eyes=settings.approval.four_eyes_for_flagged,
            reset_method=settings.reset.method,
            flag_help=FLAG_HELP,
        )
        self.env.filters["age"] = age
        self.env.filters["when"] = when

    def link_key(self) -> bytes:
        if self._link_key is None:
            self._link_key = signing_key(self.settings, self.db)
        return self._link_key

    # -- plumbing ------------------------------------------------------------------------------

    def page(
        self,
        request: Request,
        template: str,
        status: int = 200,
        session: SessionInfo | None = None,
        **context: Any,
    ) -> HTMLResponse:
        context.setdefault("csrf", session.csrf_token if session else None)
        context.setdefault("notice", NOTICES.get(request.query_params.get("done", "")))
        html = self.env.get_template(template).render(
            session=session,
            agent=session.agent if session else None,
            path=request.url.path,
            **context,
        )
        return HTMLResponse(html, status_code=status)

    def set_cookie(self, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/",
            secure=self.secure,
            httponly=True,
            samesite="strict" if name == SESSION_COOKIE else "lax",
        )

    def same_origin(self, request: Request) -> bool:
        """Whether a POST comes from this console's own pages, as far as the browser says:
        ``Sec-Fetch-Site`` when sent (every current browser), else the Origin, when sent."""
        site = request.headers.get("sec-fetch-site")
        if site is not None:
            return site in ("same-origin", "none")
        origin = request.headers.get("origin")
        if origin is None or origin == "null":
            return origin is None
        ours = {f"{request.url.scheme}://{request.url.netloc}"}
        base = urlsplit(self.settings.web.base_url)
        ours.add(f"{base.scheme}://{base.netloc}")
        return origin in ours

    async def session(self, request: Request, *, mfa: bool = True) -> SessionInfo | None:
        found = await run_in_threadpool(self.sessions.load, request.cookies.get(SESSION_COOKIE))
        if found is None or (mfa and not found.mfa_passed):
            return None
        return found

    async def form(self, request: Request, session: SessionInfo) -> FormData:
        """The POSTed form, after the CSRF and Origin checks (403 on failure)."""
        form = await request.form(max_files=0, max_fields=200)
        token = form.get("csrf")
        if (
            not isinstance(token, str)
            or not hmac.compare_digest(token, session.csrf_token)
            or not self.same_origin(request)
        ):
            raise HTTPException(403, "The form expired or did not come from this console.")
        return form

    def to_login(self, request: Request) -> RedirectResponse:
        target = request.url.path
        if request.url.query:
            target += "?" + request.url.query
        query = urlencode({"next": target}) if target not in ("/", "") else ""
        return RedirectResponse("/login" + ("?" + query if query else ""), status_code=303)


def age(value: datetime) -> str:
    seconds = max(0, int((utcnow() - value).total_seconds()))
    if seconds < 60:
        return "under a minute"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400 * 2:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "-"


def text_of(raw: bytes) -> tuple[list[tuple[str, str]], str, bool]:
    """A message's headers and its text, for showing as text (never as HTML): the text/plain
    body, or the HTML source shown as text; and whether there was HTML."""
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    headers = [(name, str(value)) for name, value in parsed.items()]
    has_html = any(part.get_content_type() == "text/html" for part in parsed.walk())
    body = parsed.get_body(("plain", "html"))
    text = ""
    if body is not None:
        try:
            text = str(body.get_content())
        except (LookupError, ValueError, AssertionError):
            payload = body.get_payload(decode=True)
            text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    return headers, text[:MAX_TEXT_BODY], has_html


def safe_next(target: str | None) -> str:
    """Only a path on this console: never another site (open redirects)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


Handler = Callable[[Request], Awaitable[Response]]


class Status(Protocol):
    """What serve tells the health and metrics endpoints about itself."""

    def listening(self) -> bool: ...
    def scheduling(self) -> bool: ...
    def open_sessions(self) -> int: ...


def create_app(settings: Settings, database: Database, status: Status | None = None) -> Starlette:
    console = Console(settings, database)
    metrics = Metrics(database, status.open_sessions if status is not None else None)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def database_reachable() -> bool:
        try:
            with database.reading() as session:
                session.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            log.warning("readiness: database not reachable: %s", exc)
            return False
        return True

    async def readyz(request: Request) -> Response:
        checks = {"database": await run_in_threadpool(database_reachable)}
        if status is not None:
            checks["listener"] = status.listening()
            checks["scheduler"] = status.scheduling()
        ready = all(checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    async def metrics_endpoint(request: Request) -> Response:
        try:
            body = await run_in_threadpool(metrics.render)
        except SQLAlchemyError as exc:
            log.warning("metrics: database not reachable: %s", exc)
            return Response("database not reachable\n", status_code=503, media_type="text/plain")
        return Response(body, media_type=METRICS_CONTENT_TYPE)

    def signed_in(admin: bool = False) -> Callable[[Callable[..., Awaitable[Response]]], Handler]:
        def wrap(handler: Callable[..., Awaitable[Response]]) -> Handler:
            async def endpoint(request: Request) -> Response:
                session = await console.session(request)
                if session is None:
                    return console.to_login(request)
                if admin and session.agent.role != AgentRole.ADMIN:
                    return console.page(
                        request,
                        "error.html",
                        403,
                        session,
                        title="Admins only",
                        message="This page is for admins.",
                    )
                return await handler(request, session)

            return endpoint

        return wrap

    # -- sign-in -------------------------------------------------------------------------------

    async def login(request: Request) -> Response:
        if request.method == "GET":
            token = secrets.token_urlsafe(24)
            response = console.page(
                request, "login.html", login_csrf=token, next=request.query_params.get("next")
            )
            console.set_cookie(response, LOGIN_COOKIE, token, 1800)
            return response
        form = await request.form(max_files=0, max_fields=10)
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        given = form.get("csrf")
        if (
            not cookie
            or not isinstance(given, str)
            or not hmac.compare_digest(given, cookie)
            or not console.same_origin(request)
        ):
            raise HTTPException(403, "The sign-in form expired; load it again.")
        name = str(form.get("name", "")).strip().lower()
        password = str(form.get("password", ""))
        target = safe_next(str(form.get("next", "")))
        result = await run_in_threadpool(console.sign_in.password, name, password)
        if result.outcome in (SignIn.BAD, SignIn.LOCKED) or result.agent is None:
            token = secrets.token_urlsafe(24)
            error = "Wrong name or password."
            if result.outcome == SignIn.LOCKED and result.locked_until is not None:
                error = (
                    f"Too many failed sign-ins. Try again after {result.locked_until:%H:%M:%S} UTC."
                )
            response = console.page(
                request, "login.html", 401, login_csrf=token, error=error, next=target, name=name
            )
            console.set_cookie(response, LOGIN_COOKIE, token, 1800)
            return response
        pending = new_totp_secret() if result.outcome == SignIn.ENROL else None
        token = await run_in_threadpool(
            lambda: console.sessions.create(
                result.agent.id,  # type: ignore[union-attr]
                mfa_passed=False,
                pending_totp=pending,
            )
        )
        step = "/login/enrol" if pending else "/login/code"
        redirect = RedirectResponse(f"{step}?{urlencode({'next': target})}", status_code=303)
        console.set_cookie(
            redirect, SESSION_COOKIE, token, int(settings.web.session_max_hours * 3600)
        )
        redirect.delete_cookie(LOGIN_COOKIE, path="/")
        return redirect

    async def second_factor(request: Request) -> Response:
        session = await console.session(request, mfa=False)
        if session is None:
            return RedirectResponse("/login", status_code=303)
        if session.mfa_passed:
            return RedirectResponse("/", status_code=303)
        enrolling = request.url.path == "/login/enrol"
        if enrolling and session.pending_totp is None:
            return RedirectResponse("/login/code", status_code=303)
        if not enrolling and not session.agent.mfa_enrolled:
            return RedirectResponse("/login", status_code=303)
        target = safe_next(request.query_params.get("next"))
        context: dict[str, Any] = {"next": target, "enrolling": enrolling}
        if enrolling:
            assert session.pending_totp is not None
            uri = totp_uri(
                session.pending_totp,
                session.agent.name,
                f"{console.env.globals['product']} support",
            )
            context["qr"] = segno.make(uri, error="m").svg_data_uri(scale=5, border=2)
            context["secret"] = " ".join(
                session.pending_totp[i : i + 4] for i in range(0, len(session.pending_totp), 4)
            )
        if request.method == "GET":
            return console.page(
                request, "code.html", session=None, csrf=session.csrf_token, **context
            )
        form = await console.form(request, session)
        target = safe_next(str(form.get("next", "")))
        code = str(form.get("code", ""))
        result = await run_in_threadpool(
            console.sign_in.code,
            session.agent.id,
            code,
            session.pending_totp if enrolling else None,
        )
        if result.outcome != SignIn.CODE:
            error = "That code is not right (or was used already). Try the next one."
            if result.outcome == SignIn.LOCKED and result.locked_until is not None:
                error = (
                    f"Too many failed sign-ins. Try again after {result.locked_until:%H:%M:%S} UTC."
                )
                await run_in_threadpool(console.sessions.destroy_hash, session.token_hash)
            return console.page(
                request,
                "code.html",
                401,
                session=None,
                csrf=session.csrf_token,
                error=error,
                **context | {"next": target},
            )
        # Both factors passed: a fresh session, so that the token from before is worth nothing.
        await run_in_threadpool(console.sessions.destroy_hash, session.token_hash)
        token = await run_in_threadpool(
            lambda: console.sessions.create(session.agent.id, mfa_passed=True)
        )
        response = RedirectResponse(target, status_code=303)
        console.set_cookie(
            response, SESSION_COOKIE, token, int(settings.web.session_max_hours * 3600)
        )
        return response

    async def logout(request: Request) -> Response:
        session = await console.session(request, mfa=False)
        if session is not None:
            await console.form(request, session)
            await run_in_threadpool(console.sessions.destroy_hash, session.token_hash)
        response = RedirectResponse("/login?done=signed_out", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # -- the queue -----------------------------------------------------------------------------

    @signed_in()
    async def queue(request: Request, session: SessionInfo) -> Response:
        state_name = request.query_params.get("state", "")
        state = (
            RequestState(state_name) if state_name in RequestState.__members__.values() else None
        )
        search = request.query_params.get("q", "").strip()[:200] or None
        try:
            page_number = max(1, min(10_000, int(request.query_params.get("page", "1"))))
        except ValueError:
            page_number = 1
        per_page = 50
        rows, total = await run_in_threadpool(
            console.requests.queue, state, search, per_page, (page_number - 1) * per_page
        )
        counts = await run_in_threadpool(console.requests.counts)
        return console.page(
            request,
            "queue.html",
            session=session,
            rows=rows,
            total=total,
            counts=counts,
            states=[s.value for s in RequestState],
            state=state.value if state else "",
            search=search or "",
            page=page_number,
            pages=max(1, -(-total // per_page)),
            now=utcnow(),
        )

    @signed_in()
    async def bulk_deny(request: Request, session: SessionInfo) -> Response:
        form = await console.form(request, session)
        ids = [int(v) for v in form.getlist("request") if isinstance(v, str) and v.isdigit()]
        reason = str(form.get("reason", ""))
        try:
            _done, refused = await run_in_threadpool(
                console.decisions.deny_many, ids, session.agent.name, reason
            )
        except InvalidState as exc:
            return await error_page(request, session, str(exc), 400)
        if refused:
            lines = [f"request {i}: {why}" for i, why in refused.items()]
            return await error_page(
                request, session, "Not all were denied: " + "; ".join(lines), 409
            )
        return RedirectResponse("/?done=bulk", status_code=303)

    async def error_page(
        request: Request, session: SessionInfo, message: str, status: int
    ) -> Response:
        return console.page(
            request, "error.html", status, session, title="Not done", message=message
        )

    # -- one request ---------------------------------------------------------------------------

    def load_request(request_id: int) -> dict[str, Any]:
        detail = console.requests.get(request_id)
        req = detail.request
        message = None
        if req.message_id is not None:
            with console.db.reading() as db_session:
                stored = db_session.get(StoredMessage, req.message_id)
                if stored is not None:
                    headers, text, has_html = text_of(stored.raw) if stored.raw else ([], "", False)
                    message = {
                        "id": stored.id,
                        "received_at": stored.received_at,
                        "mail_from": stored.mail_from,
                        "client_ip": stored.client_ip or stored.peer_ip,
                        "helo": stored.client_helo or stored.helo,
                        "tls": stored.tls,
                        "headers": headers,
                        "text": text,
                        "has_html": has_html,
                        "size": stored.size,
                        "purged_at": stored.raw_purged_at,
                    }
        history = console.requests.history(req.account_id, exclude=req.id)
        return {"detail": detail, "req": req, "message": message, "history": history}

    @signed_in()
    async def show_request(request: Request, session: SessionInfo) -> Response:
        request_id = int(request.path_params["request_id"])
        try:
            data = await run_in_threadpool(load_request, request_id)
        except NotFound:
            return console.page(
                request,
                "error.html",
                404,
                session,
                title="Not found",
                message=f"There is no request {request_id}.",
            )
        done = request.query_params.get("done", "")
        if data["req"].state not in NOTICE_STATES.get(done, set(RequestState)):
            # Reloaded after things moved on ("being carried out" on a completed request).
            data["notice"] = None
        return console.page(request, "request.html", session=session, **data)

    def decide(action: str) -> Handler:
        @signed_in(admin=action in ("cancel", "retry"))
        async def endpoint(request: Request, session: SessionInfo) -> Response:
            request_id = int(request.path_params["request_id"])
            form = await console.form(request, session)
            name = session.agent.name
            text = str(form.get("text", ""))
            calls: dict[str, Callable[[], Any]] = {
                "approve": lambda: console.decisions.approve(request_id, name, text),
                "deny": lambda: console.decisions.deny(request_id, name, text),
                "cancel": lambda: console.decisions.cancel(request_id, name, text or None),
                "complete": lambda: console.decisions.complete(request_id, name, text or None),
                "retry": lambda: console.decisions.retry(request_id, name),
                "claim": lambda: console.requests.claim(request_id, name),
                "release": lambda: console.requests.claim(request_id, name, release=True),
            }
            try:
                outcome = await run_in_threadpool(calls[action])
            except (InvalidState, NotFound) as exc:
                try:
                    data = await run_in_threadpool(load_request, request_id)
                except NotFound:
                    return await error_page(request, session, str(exc), 404)
                return console.page(request, "request.html", 409, session, error=str(exc), **data)
            done = {"claim": "claimed", "release": "released", "retry": "retried"}.get(
                action, f"{action}d" if action.endswith("e") else f"{action}ed"
            )
            if action == "approve" and outcome.request.state == RequestState.PENDING:
                done = "voted"
            if action == "deny":
                done = "denied"
            if action == "cancel":
                done = "cancelled"
            return RedirectResponse(f"/requests/{request_id}?done={done}", status_code=303)

        return endpoint

    # -- admin ---------------------------------------------------------------------------------

    @signed_in(admin=True)
    async def admin_agents(request: Request, session: SessionInfo) -> Response:
        error = None
        status = 200
        if request.method == "POST":
            form = await console.form(request, session)
            action = str(form.get("action", ""))
            name = str(form.get("name", "")).strip().lower()
            try:
                if action == "add":
                    role = AgentRole(str(form.get("role", "agent")))
                    await run_in_threadpool(
                        console.agents.add, name, str(form.get("password", "")), role
                    )
                    return RedirectResponse("/admin/agents?done=agent_added", status_code=303)
                if name == session.agent.name and action in ("disable", "reset-mfa"):
                    raise InvalidState("you cannot do that to yourself; ask another admin")
                change = {
                    "disable": console.agents.disable,
                    "enable": console.agents.enable,
                    "reset-mfa": console.agents.reset_mfa,
                }.get(action)
                if change is None:
                    raise InvalidState("unknown action")
                await run_in_threadpool(change, name)
                return RedirectResponse("/admin/agents?done=agent_changed", status_code=303)
            except (InvalidState, NotFound, AgentError, ValueError) as exc:
                error, status = str(exc), 400
        agents = await run_in_threadpool(console.agents.list)
        return console.page(
            request, "admin_agents.html", status, session, agents=agents, error=error
        )

    @signed_in(admin=True)
    async def admin_failed(request: Request, session: SessionInfo) -> Response:
        rows = await run_in_threadpool(
            lambda: [
                console.requests.get(r.id)
                for r in console.requests.list(RequestState.FAILED, limit=200)
            ]
        )
        return console.page(request, "admin_failed.html", session=session, rows=rows)

    @signed_in(admin=True)
    async def admin_audit(request: Request, session: SessionInfo) -> Response:
        report = await run_in_threadpool(verify_chain, console.db)
        events = await run_in_threadpool(console.requests.events, None, 200)
        return console.page(
            request, "admin_audit.html", session=session, report=report, events=events
        )

    # -- the owner's cancel link -----------------------------------------------------------------

    async def cancel_link(request: Request) -> Response:
        key = await run_in_threadpool(console.link_key)
        link = read_cancel_token(key, request.path_params["token"])
        if link is None:
            return console.page(request, "cancel.html", 404, state="invalid")
        try:
            detail = await run_in_threadpool(console.requests.get, link.request_id)
        except NotFound:
            return console.page(request, "cancel.html", 404, state="invalid")
        req = detail.request
        if req.state not in (RequestState.PENDING, RequestState.APPROVED):
            return console.page(request, "cancel.html", 410, state="closed", req=req)
        if request.method == "GET":
            # A page with a button, never a cancel on GET: mail scanners follow links.
            token = secrets.token_urlsafe(24)
            response = console.page(
                request, "cancel.html", state="confirm", req=req, form_csrf=token
            )
            console.set_cookie(response, LOGIN_COOKIE, token, 1800)
            return response
        form = await request.form(max_files=0, max_fields=5)
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        given = form.get("csrf")
        if (
            not cookie
            or not isinstance(given, str)
            or not hmac.compare_digest(given, cookie)
            or not console.same_origin(request)
        ):
            raise HTTPException(403, "The form expired; open the link again.")
        try:
            await run_in_threadpool(console.decisions.cancel_by_owner, req.id)
        except InvalidState:
            return console.page(request, "cancel.html", 410, state="closed", req=req)
        log.warning("request %d cancelled by its owner through the link", req.id)
        response = console.page(request, "cancel.html", state="done", req=req)
        response.delete_cookie(LOGIN_COOKIE, path="/")
        return response

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if request.url.path.startswith("/api/"):
            return JSONResponse(
                {"error": exc.detail}, status_code=exc.status_code, headers=exc.headers
            )
        html = console.env.get_template("error.html").render(
            session=None,
            agent=None,
            title=f"Error {exc.status_code}",
            message=exc.detail,
            path=request.url.path,
        )
        return HTMLResponse(html, status_code=exc.status_code, headers=exc.headers)

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        Route("/", queue),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/login/code", second_factor, methods=["GET", "POST"]),
        Route("/login/enrol", second_factor, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/requests/bulk-deny", bulk_deny, methods=["POST"]),
        Route("/requests/{request_id:int}", show_request),
        *(
            Route(f"/requests/{{request_id:int}}/{action}", decide(action), methods=["POST"])
            for action in ("approve", "deny", "cancel", "complete", "retry", "claim", "release")
        ),
        Route("/admin/agents", admin_agents, methods=["GET", "POST"]),
        Route("/admin/failed", admin_failed),
        Route("/admin/audit", admin_audit),
        Route("/cancel/{token}", cancel_link, methods=["GET", "POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    from mailproc.web.api import api_routes

    routes.append(Mount("/api/v1", routes=api_routes(settings, database, console.decisions)))
    return Starlette(
        routes=routes,
        middleware=[Middleware(SecurityHeaders, hsts=console.secure)],
        exception_handlers={HTTPException: http_error},
    )
