"""The console in a real browser (headless Chromium driven by Playwright): a signed request that
arrived over real SMTP is found in the queue, read and approved by two agents who sign in with a
password and enrol their second factor, and carried out against a real HTTP receiver; four-eyes
refuses a second approval by the same agent, and a denial reaches the owner through the relay.

The browser is Debian's ``chromium`` (``make test`` installs it when it runs as root): these
tests fail, never skip, without it. Screenshots of the pages go to ``build/screenshots/``."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from pathlib import Path

import pyotp
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    expect,
    sync_playwright,
)

from mailproc.agents import AgentService
from mailproc.models import AgentRole, RequestState, ResetRequest
from mailproc.requests import RequestService
from tests import test_pipeline, test_reset_flow
from tests.dkimkeys import DkimKey, publish
from tests.dnsserver import ZoneServer
from tests.support import AppThread, send_raw, stored_id, wait_for
from tests.test_outbox import Relay
from tests.test_pipeline import ALICE, deliver, processed, signed
from tests.test_reset_flow import flow_sections
from tests.webhook import Receiver

# The pipeline tests' fixtures: its accounts database (Alice is account 42, Bob 43), DKIM key
# and relay; and the reset flow's signature-checking HTTP receiver.
accounts_url = test_pipeline.accounts_url
key = test_pipeline.key
relay = test_pipeline.relay
receiver = test_reset_flow.receiver

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "build" / "screenshots"
BOB = "bob@example.net"
PASSWORD = "correct horse battery"
ALICE_TEXT = "I have lost access to my account. Please reset my security question."


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} not found: the console's browser tests need Debian's 'chromium' "
            "package (tests/ensure_chromium.sh installs it when run as root, and `make test` "
            "runs that; or: apt-get install chromium)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


class Console:
    """The console of a running service, seen by agents each in their own browser context
    (their own cookies). Every page is watched for what the CSP refused and for script
    errors: at the end there must have been none."""

    def __init__(self, browser: Browser, app: AppThread) -> None:
        self.browser = browser
        self.base = f"http://127.0.0.1:{app.app.web_port}"
        self.contexts: list[BrowserContext] = []
        self.refused: list[str] = []

    def _watch(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.refused.append(message.text)

    def tab(self, context: BrowserContext, path: str | None = None) -> Page:
        """A new tab in ``context`` (an agent's browser), at ``path``."""
        page = context.new_page()
        page.on("console", self._watch)
        page.on("pageerror", lambda error: self.refused.append(str(error)))
        if path is not None:
            page.goto(path)
        return page

    def sign_in(self, name: str, path: str = "/", screenshots: bool = False) -> Page:
        """``name`` opens ``path``, signs in with their password on the way and enrols their
        second factor (their first sign-in), and lands on ``path``."""
        context = self.browser.new_context(
            base_url=self.base, viewport={"width": 1280, "height": 800}
        )
        context.set_default_timeout(10_000)  # pages answer in milliseconds
        self.contexts.append(context)
        page = self.tab(context, path)
        expect(page).to_have_url(re.compile(r"/login(\?|$)"))
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        page.get_by_label("Name").fill(name)
        page.get_by_label("Password").fill(PASSWORD)
        if screenshots:
            screenshot(page, "sign-in")
        page.get_by_role("button", name="Continue").click()

        expect(page.get_by_role("heading", name="Set up your second factor")).to_be_visible()
        qr = page.get_by_role("img", name=re.compile("QR code"))
        expect(qr).to_be_visible()
        assert qr.evaluate("img => img.complete && img.naturalWidth > 0")  # the CSP allows it
        if screenshots:
            screenshot(page, "enrol")
        key_text = page.locator(".key code").inner_text()
        assert re.fullmatch(r"[A-Z2-7]{4}( [A-Z2-7]{1,4})+", key_text), key_text
        page.get_by_label("Code").fill(pyotp.TOTP(key_text.replace(" ", "")).now())
        page.get_by_role("button", name="Sign in").click()
        expect(page).to_have_url(self.base + path)
        expect(page.locator("header .who")).to_contain_text(name)
        return page

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@contextmanager
def console(browser: Browser, app: AppThread) -> Iterator[Console]:
    opened = Console(browser, app)
    try:
        yield opened
    finally:
        opened.close()
    assert opened.refused == []


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def card(page: Page, title: str) -> Locator:
    """The page's section under the heading that begins with ``title``."""
    heading = page.get_by_role("heading", name=re.compile(rf"^{re.escape(title)}\b"))
    return page.locator("section").filter(has=heading)


def state_badge(page: Page) -> Locator:
    return page.locator("h1 .state")


def request_for(app: AppThread, email: str) -> ResetRequest:
    [found] = RequestService(app.app.database).list(email=email)
    return found


def state_of(app: AppThread, request_id: int) -> RequestState:
    return RequestService(app.app.database).get(request_id).request.state


def body(reply: EmailMessage) -> str:
    part = reply.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def test_two_agents_find_read_and_approve_a_flagged_request_and_it_is_carried_out_once(
    database_url: str,
    accounts_url: str,
    key: DkimKey,
    zone: ZoneServer,
    relay: Relay,
    receiver: Receiver,
    browser: Browser,
) -> None:
    bob_key = dataclasses.replace(key, domain="example.net")
    publish(zone, bob_key)
    flow = flow_sections(accounts_url, relay, receiver)
    with AppThread.running(database_url, **flow) as app:
        message = processed(app, stored_id(send_raw(app.port, signed(key), ALICE)))
        processed(app, stored_id(send_raw(app.port, signed(bob_key, BOB), BOB)))
        request = request_for(app, ALICE)
        other = request_for(app, BOB)
        assert request.risk_flags == ["first_contact"]  # so two agents must approve
        agents = AgentService(app.app.database)
        agents.add("dana", PASSWORD)
        agents.add("erik", PASSWORD, AgentRole.ADMIN)

        with console(browser, app) as agents_see:
            # The queue: both open requests; a search by address finds Alice's alone.
            page = agents_see.sign_in("dana", screenshots=True)
            expect(page.get_by_role("heading", name="Open requests")).to_be_visible()
            rows = page.locator("table.queue tbody tr")
            expect(rows).to_have_count(2)
            screenshot(page, "queue")
            page.get_by_role("searchbox", name="Search").fill(ALICE)
            page.get_by_role("button", name="Search").click()
            expect(rows).to_have_count(1)
            expect(rows).to_contain_text(ALICE)
            expect(rows).to_contain_text("first contact")
            expect(rows).to_contain_text("0 of 2")
            expect(page.get_by_role("link", name=other.reference)).to_have_count(0)

            # The request: the plain-words summary, then the evidence.
            rows.get_by_role("link", name=request.reference).click()
            expect(page).to_have_url(re.compile(rf"/requests/{request.id}$"))
            expect(page.get_by_role("heading", level=1)).to_contain_text(request.reference)
            expect(state_badge(page)).to_have_text("pending")
            summary = card(page, "In plain words")
            expect(summary).to_contain_text("The sender is proven.")
            expect(summary).to_contain_text("first contact")
            authentication = card(page, "Authentication")
            dkim = authentication.locator("table tbody tr")
            expect(dkim).to_have_count(1)
            expect(dkim).to_contain_text("example.org")
            expect(dkim).to_contain_text("pipeline")
            expect(dkim.locator(".result")).to_have_text("pass")
            rules = card(page, "Rules")
            expect(rules.locator("li.hit")).to_contain_text("reset-security-question")
            shown = card(page, "The message")
            expect(shown.locator("pre")).to_contain_text(ALICE_TEXT)
            expect(shown).to_contain_text(f"{message.size} bytes")
            screenshot(page, "request")

            # Dana approves: the first of two.
            page.get_by_label("How you verified the owner").fill(
                "Called back on the phone number on file; she confirmed the request."
            )
            page.get_by_role("button", name="Approve (first of two)").click()
            expect(page.get_by_role("status")).to_have_text(
                "Your approval is recorded. A second, different agent must approve."
            )
            expect(state_badge(page)).to_have_text("pending")
            expect(card(page, "Approvals")).to_contain_text("dana")
            assert state_of(app, request.id) == RequestState.PENDING
            assert receiver.calls == []

            # Erik, in his own browser, follows a link to the request and signs in on the way.
            second = agents_see.sign_in("erik", f"/requests/{request.id}")
            expect(card(second, "Approvals")).to_contain_text("Called back on the phone")
            second.get_by_label("How you verified the owner").fill(
                "Checked the recovery phone and the last sign-in country."
            )
            second.get_by_role("button", name="Approve (second of two)").click()
            expect(second.get_by_role("status")).to_have_text(
                "Approved. The reset is being carried out."
            )

            # The service calls the application; the page shows it done.
            def completed() -> bool:
                second.reload()
                return state_badge(second).text_content() == "completed"

            wait_for(completed, timeout=20, interval=0.2)
            reset = card(second, "Approvals")
            expect(reset).to_contain_text("succeeded webhook, after 1 attempt")
            expect(card(second, "In plain words")).to_contain_text("Done.")
            expect(second.get_by_role("status")).to_have_count(0)  # "being carried out": past
            expect(second.get_by_role("button", name=re.compile("Approve"))).to_have_count(0)
            screenshot(second, "request-completed")

            # Erik is an admin: the agents, and the audit log with its chain intact.
            second.get_by_role("link", name="Agents").click()
            agents_table = second.locator("table tbody tr")
            expect(agents_table).to_have_count(2)
            expect(agents_table.filter(has_text="dana")).to_contain_text("enrolled")
            screenshot(second, "admin-agents")
            second.get_by_role("link", name="Audit log").click()
            expect(second.get_by_role("status")).to_contain_text("The chain is intact")
            expect(second.locator("table tbody")).to_contain_text("approved")
            screenshot(second, "admin-audit")

        [_ack, _other_ack, done] = deliver(app, relay, 3)

    [call] = receiver.calls
    assert call.genuine
    assert call.status == 200
    assert call.payload["request_id"] == request.id
    assert call.payload["approved_by"] == ["dana", "erik"]
    assert receiver.successes == {str(request.id): 1}
    assert str(done["To"]) == ALICE
    assert request.reference in body(done)


def test_four_eyes_refuses_a_second_approval_by_the_same_agent_and_a_denial_tells_the_owner(
    database_url: str,
    accounts_url: str,
    key: DkimKey,
    relay: Relay,
    receiver: Receiver,
    browser: Browser,
) -> None:
    flow = flow_sections(accounts_url, relay, receiver)
    with AppThread.running(database_url, **flow) as app:
        processed(app, stored_id(send_raw(app.port, signed(key), ALICE)))
        request = request_for(app, ALICE)
        AgentService(app.app.database).add("dana", PASSWORD)

        with console(browser, app) as agents_see:
            page = agents_see.sign_in("dana", f"/requests/{request.id}")
            # A second tab on the same request, loaded before her approval.
            stale = agents_see.tab(page.context, f"/requests/{request.id}")
            page.get_by_label("How you verified the owner").fill(
                "Called back on the phone number on file."
            )
            page.get_by_role("button", name="Approve (first of two)").click()
            expect(page.get_by_role("status")).to_contain_text("A second, different agent")
            expect(page.get_by_role("button", name=re.compile("Approve"))).to_have_count(0)
            expect(card(page, "Decide")).to_contain_text("You approved this already.")

            # The same agent approves again from the other tab: refused, with the reason, and
            # nothing changes.
            stale.get_by_label("How you verified the owner").fill("Sure, it is her.")
            stale.get_by_role("button", name="Approve (first of two)").click()
            expect(stale.get_by_role("alert")).to_have_text(
                f"dana approved request {request.id} already; a second, different agent must "
                "approve it"
            )
            expect(stale).to_have_url(re.compile(rf"/requests/{request.id}/approve$"))
            expect(state_badge(stale)).to_have_text("pending")
            expect(card(stale, "Approvals").locator("li")).to_have_count(1)
            expect(card(stale, "In plain words")).to_contain_text("1 of 2 so far (dana)")
            assert state_of(app, request.id) == RequestState.PENDING
            screenshot(stale, "request-four-eyes")

            # Denied, with a reason for the owner.
            reason = "We could not reach you on the phone number registered on your account."
            page.get_by_label("Reason (sent to the owner)").fill(reason)
            page.get_by_role("button", name="Deny").click()
            expect(page.get_by_role("status")).to_have_text("Denied. The owner is told why.")
            expect(state_badge(page)).to_have_text("denied")
            expect(page.get_by_role("button", name="Deny")).to_have_count(0)
            assert state_of(app, request.id) == RequestState.DENIED

        [_ack, denied] = deliver(app, relay, 2)
    assert str(denied["To"]) == ALICE
    assert "nicht genehmigt" in str(denied["Subject"])  # Alice's account is in German
    assert request.reference in str(denied["Subject"])
    assert reason in body(denied)
    assert receiver.calls == []
