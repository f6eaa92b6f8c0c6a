"""The ``mailproc`` command line for operators, on the same services as everything else."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
from sqlalchemy.exc import SQLAlchemyError

from mailproc import __version__, db
from mailproc.accounts import DirectorySetupError
from mailproc.auth import Authenticator, Envelope, Verdict
from mailproc.config import CONFIG_ENV, ConfigError, Settings, load_settings
from mailproc.logs import setup_logging
from mailproc.models import (
    ExecutionState,
    Message,
    MessageState,
    OutboxEntry,
    OutboxState,
    RequestState,
    utcnow,
)
from mailproc.rendering import TemplateError
from mailproc.rules import RuleError
from mailproc.services import InvalidState, MessageService, NotFound

EX_CONFIG = 78
T = TypeVar("T")


class ConfigProblem(click.ClickException):
    exit_code = EX_CONFIG


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the errors a person can act on into one line, never a traceback."""
    try:
        yield
    except (ConfigError, TemplateError, RuleError, DirectorySetupError) as exc:
        # A broken template is a configuration problem too: it names its file.
        raise ConfigProblem(str(exc)) from None
    except (NotFound, InvalidState) as exc:
        raise click.ClickException(str(exc)) from None
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise click.ClickException(f"database error: {detail}") from None


class Context:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None
        self._database: db.Database | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            with _user_errors():
                self._settings = load_settings(self.config_path)
        return self._settings

    def database(self) -> db.Database:
        if self._database is None:
            self._database = db.Database(self.settings.database.url)
        return self._database

    def close(self) -> None:
        if self._database is not None:
            self._database.dispose()

    def messages(self) -> MessageService:
        return MessageService.from_settings(self.database(), self.settings)


def _set_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        context = ctx.find_object(Context)
        assert context is not None  # made by the group before any command's options
        context.config_path = value


_CONFIG_HELP = f"TOML configuration file (default: ${CONFIG_ENV}, else built-in defaults)."


def pass_context(command: Callable[..., Any]) -> Callable[..., Any]:
    """Pass our Context, and accept ``--config`` after the command name too."""
    decorated = click.make_pass_decorator(Context)(command)
    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        expose_value=False,
        callback=_set_config,
        help=_CONFIG_HELP,
    )(decorated)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    envvar=CONFIG_ENV,
    type=click.Path(dir_okay=False),
    help=_CONFIG_HELP,
)
@click.version_option(__version__, prog_name="mailproc")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Support mail in, verified reset requests out."""
    ctx.obj = Context(config_path)
    ctx.call_on_close(ctx.obj.close)


@main.command()
@pass_context
def serve(ctx: Context) -> None:
    """Run the SMTP/LMTP listener and the worker until SIGTERM."""
    from mailproc.app import App, ListenError

    settings = ctx.settings
    setup_logging(settings.logging.level, settings.logging.format)
    for warning in settings.warnings:
        logging.getLogger("mailproc.config").warning("%s", warning)
    with _user_errors():
        try:
            asyncio.run(App(settings).run_until_signalled())
        except ListenError as exc:
            raise click.ClickException(str(exc)) from None


EX_NOT_AUTHENTICATED = 1
EX_TEMPFAIL = 75


def print_verdict(verdict: Verdict) -> None:
    state = "authenticated" if verdict.authenticated else "NOT authenticated"
    click.echo(f"{verdict.from_address or '(no single author)'}: {state} ({verdict.strength})")
    click.echo(
        f"alignment: {verdict.alignment}; organizational domain: "
        f"{verdict.organizational_domain or '-'}"
    )
    for d in verdict.dkim:
        flag = "counts" if d.counts else "does not count"
        click.echo(
            f"dkim: d={d.domain} s={d.selector} a={d.algorithm} bits={d.key_bits} "
            f"{d.result}, {'aligned' if d.aligned else 'not aligned'}: {flag}"
        )
        for reason in d.reasons:
            click.echo(f"  - {reason}")
    if not verdict.dkim:
        click.echo("dkim: no signature")
    if verdict.spf is not None:
        spf = verdict.spf
        click.echo(
            f"spf: {spf.result} for {spf.identity or '<>'} from {spf.client_ip or '-'}"
            f"{', aligned' if spf.aligned else ''} ({spf.explanation})"
        )
    for upstream in verdict.upstream:
        trust = "trusted" if upstream.trusted else "ignored"
        click.echo(
            f"authentication-results {upstream.authserv_id or '?'}: {trust} ({upstream.reason})"
        )
    if verdict.arc is not None and verdict.arc.result != "none":
        click.echo(
            f"arc: {verdict.arc.result} sealers={','.join(verdict.arc.sealers)} "
            f"({verdict.arc.reason})"
        )
    if verdict.dmarc:
        click.echo(
            f"dmarc record ({verdict.dmarc.get('domain')}): {verdict.dmarc.get('record') or 'none'}"
        )
    for reason in verdict.reasons:
        click.echo(f"reason: {reason}")
    for error in verdict.temporary_errors:
        click.echo(f"temporary: {error}")


@main.command()
@click.argument("message_file", type=click.File("rb"))
@click.option("--client-ip", help="The connecting client's IP address, for SPF.")
@click.option("--mail-from", default="", help="The SMTP MAIL FROM address, for SPF.")
@click.option("--helo", help="The client's HELO name.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_context
def check(
    ctx: Context,
    message_file: Any,
    client_ip: str | None,
    mail_from: str,
    helo: str | None,
    as_json: bool,
) -> None:
    """Authenticate MESSAGE_FILE (.eml) and explain the verdict, without storing anything.

    Exit status: 0 authenticated, 1 not authenticated, 75 temporary DNS trouble."""
    settings = ctx.settings
    raw = message_file.read()
    with _user_errors():
        authenticator = Authenticator(settings.auth, settings.dns)
    verdict = authenticator.evaluate(raw, Envelope(client_ip, mail_from, helo), utcnow())
    decision, waiting = (None, None) if verdict.temporary else _decide(settings, raw, verdict)
    if as_json:
        data = verdict.to_dict()
        if decision is not None:
            data["decision"] = decision
        click.echo(json.dumps(data, indent=2))
    else:
        print_verdict(verdict)
        if decision is not None:
            print_decision(decision)
    if waiting is not None:
        click.echo(f"temporary: account directory: {waiting}", err=as_json)
    if verdict.temporary or waiting is not None:
        ctx_exit(EX_TEMPFAIL)
    if not verdict.authenticated:
        ctx_exit(EX_NOT_AUTHENTICATED)


def _decide(
    settings: Settings, raw: bytes, verdict: Verdict
) -> tuple[dict[str, Any] | None, str | None]:
    """What the rules make of a message: the account match, the rule and the action (nothing
    is queued or sent), or why the directory could not say."""
    from mailproc.accounts import DirectoryError
    from mailproc.message import parse_message
    from mailproc.pipeline import Pipeline

    with _user_errors():
        pipeline = Pipeline.from_settings(settings)
    parsed = parse_message(raw)
    try:
        evaluation = pipeline.evaluate(
            verdict, parsed.subject, parsed.text_body, settings.smtp.support_addresses[:1], ()
        )
    except DirectoryError as exc:
        return None, str(exc)
    finally:
        pipeline.directory.close()
    decision = pipeline.record(evaluation)
    decision["template"] = evaluation.decision.template
    return decision, None


def print_decision(decision: dict[str, Any]) -> None:
    for role in ("author", "claimed"):
        lookup = decision.get(role)
        if lookup is not None:
            ids = ", ".join(lookup["account_ids"]) or "-"
            click.echo(f"account ({role}): {lookup['address']} {lookup['status']} (ids: {ids})")
    lookalike = decision.get("lookalike")
    if lookalike:
        resembles = f", imitates {lookalike['resembles']}" if lookalike["resembles"] else ""
        click.echo(f"lookalike: {'; '.join(lookalike['reasons'])}{resembles}")
    for step in decision["trace"]:
        click.echo(f"rule {step['rule']}: {'MATCH' if step['matched'] else 'no match'}")
        for condition in step["conditions"]:
            click.echo(f"  - {condition}")
    template = f" with {decision['template']}" if decision.get("template") else ""
    click.echo(f"action: {decision['action']}{template} (rule {decision['rule']})")


def ctx_exit(code: int) -> None:
    raise click.exceptions.Exit(code)


@main.command()
@pass_context
def worker(ctx: Context) -> None:
    """Run one worker in the foreground (more capacity next to, or apart from, `serve`)."""
    from mailproc.worker import SPAWN, work

    settings = ctx.settings
    setup_logging(settings.logging.level, settings.logging.format)
    wake, stop = SPAWN.Event(), SPAWN.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with _user_errors():
        work(settings, wake, stop)


@main.group("config")
def config_group() -> None:
    """Configuration."""


@config_group.command("check")
@pass_context
def config_check(ctx: Context) -> None:
    """Validate the configuration and what it names (templates, rules, DKIM key, account
    directory); exit 0 if all is well."""
    from mailproc.accounts import DirectoryError, directory_from_settings
    from mailproc.outbox import Signer
    from mailproc.rendering import Templates
    from mailproc.rules import RuleSet

    settings = ctx.settings
    with _user_errors():
        Templates.from_settings(settings.templates).check()
        Signer.from_settings(settings)
        RuleSet.from_settings(settings.rules)
        directory = directory_from_settings(settings.accounts)
        try:
            directory.check()
        except DirectoryError as exc:
            click.echo(f"Warning: account directory not reachable now: {exc}", err=True)
        finally:
            directory.close()
    for warning in settings.warnings:
        click.echo(f"Warning: {warning}", err=True)
    click.echo(f"configuration OK ({settings.source})")


@main.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
@pass_context
def db_upgrade(ctx: Context) -> None:
    """Apply all pending migrations."""
    with _user_errors():
        database = ctx.database()
        db.upgrade(database)
        click.echo(f"database at revision {db.current_revision(database)}")


@db_group.command("current")
@pass_context
def db_current(ctx: Context) -> None:
    """Show the applied and the latest migration."""
    with _user_errors():
        current = db.current_revision(ctx.database())
    head = db.head_revision()
    state = "up to date" if current == head else "needs `mailproc db upgrade`"
    click.echo(f"current {current or 'none'}, latest {head} ({state})")


@main.group("messages")
def messages_group() -> None:
    """Stored messages."""


def message_dict(message: Message, *, full: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": message.id,
        "state": message.state.value,
        "received_at": message.received_at.isoformat(),
        "mail_from": message.mail_from,
        "rcpt_tos": message.rcpt_tos,
        "client_ip": message.client_ip,
        "size": message.size,
        "intake_flags": message.intake_flags,
        "subject": (message.parsed or {}).get("subject"),
        "authenticated": message.authenticated,
        "auth_strength": message.auth_strength,
        "error": message.error,
    }
    if full:
        data.update(
            protocol=message.protocol,
            peer_ip=message.peer_ip,
            peer_port=message.peer_port,
            helo=message.helo,
            client_name=message.client_name,
            client_helo=message.client_helo,
            client_protocol=message.client_protocol,
            xforward=message.xforward,
            tls=message.tls,
            sha256=message.sha256,
            attempts=message.attempts,
            processed_at=message.processed_at.isoformat() if message.processed_at else None,
            parsed=message.parsed,
            deferrals=message.deferrals,
            next_attempt_at=message.next_attempt_at.isoformat()
            if message.next_attempt_at
            else None,
            verdict=message.verdict,
            decision=message.decision,
        )
    return data


def _printable(text: str) -> str:
    """One line of text a terminal shows as it is: control characters made visible."""
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def _run(call: Callable[[], T]) -> T:
    with _user_errors():
        return call()


@messages_group.command("list")
@click.option("--state", type=click.Choice([s.value for s in MessageState]), default=None)
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_context
def messages_list(ctx: Context, state: str | None, limit: int, as_json: bool) -> None:
    """List stored messages, newest first."""
    service = ctx.messages()
    rows = _run(lambda: service.list(MessageState(state) if state else None, limit))
    if as_json:
        click.echo(json.dumps([message_dict(m) for m in rows], indent=2))
        return
    if not rows:
        click.echo("no messages")
        return
    click.echo(f"{'ID':>8}  {'STATE':<10}  {'RECEIVED':<19}  {'AUTH':<6}  {'FROM':<32}  SUBJECT")
    for m in rows:
        subject = _printable((m.parsed or {}).get("subject") or "")
        author = (m.verdict or {}).get("from") or m.mail_from or "<>"
        click.echo(
            f"{m.id:>8}  {m.state.value:<10}  {m.received_at:%Y-%m-%d %H:%M:%S}  "
            f"{m.auth_strength or '-':<6}  {_printable(author)[:32]:<32}  {subject[:60]}"
        )
    counts = _run(service.counts)
    click.echo(
        "\nall messages: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    )


@messages_group.command("show")
@click.argument("message_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--raw", is_flag=True, help="Write the message's exact bytes to stdout.")
@pass_context
def messages_show(ctx: Context, message_id: int, as_json: bool, raw: bool) -> None:
    """Show one stored message with its envelope and parse results."""
    service = ctx.messages()
    message = _run(lambda: service.get(message_id))
    if raw:
        sys.stdout.buffer.write(message.raw)
        return
    data = message_dict(message, full=True)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if key in ("parsed", "verdict", "decision"):
            continue
        click.echo(f"{key + ':':<18}{'' if value is None else value}")
    parsed = message.parsed or {}
    click.echo(f"{'defects:':<18}{', '.join(parsed.get('defects') or []) or 'none'}")
    verdict = message.verdict or {}
    for reason in verdict.get("reasons") or []:
        click.echo(f"{'auth reason:':<18}{reason}")
    decision = message.decision
    if decision is not None:
        outcome = f" ({decision['outcome']})" if decision.get("outcome") else ""
        click.echo(f"{'decision:':<18}rule {decision['rule']}: {decision['action']}{outcome}")
    if parsed.get("text_body"):
        click.echo("\n" + parsed["text_body"])


@messages_group.command("retry")
@click.argument("message_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@pass_context
def messages_retry(ctx: Context, message_id: int, as_json: bool) -> None:
    """Queue a failed message to be processed again."""
    service = ctx.messages()
    message = _run(lambda: service.retry(message_id))
    if as_json:
        click.echo(json.dumps(message_dict(message)))
    else:
        click.echo(f"message {message.id} is {message.state.value} again and will be processed")


@main.group("templates")
def templates_group() -> None:
    """Reply templates."""


class UnknownTemplate(click.ClickException):
    exit_code = 2


@contextmanager
def _template_errors() -> Iterator[None]:
    try:
        yield
    except TemplateError as exc:
        raise click.ClickException(str(exc)) from None


@templates_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_context
def templates_list(ctx: Context, as_json: bool) -> None:
    """List the reply templates with their locales (+html: with an HTML body)."""
    from mailproc.rendering import TEMPLATE_NAMES, Templates

    with _template_errors():
        templates = Templates.from_settings(ctx.settings.templates)
        rows: list[dict[str, Any]] = [
            {
                "name": name,
                "locales": [
                    {"locale": locale, "html": templates.has_html(name, locale)}
                    for locale in templates.locales(name)
                ],
            }
            for name in TEMPLATE_NAMES
        ]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "folder": str(templates.folder),
                    "default_locale": templates.default_locale,
                    "templates": rows,
                },
                indent=2,
            )
        )
        return
    click.echo(f"{'NAME':<24}  LOCALES")
    for row in rows:
        locales = [f"{x['locale']}{'+html' if x['html'] else ''}" for x in row["locales"]]
        click.echo(f"{row['name']:<24}  {', '.join(locales) or 'missing'}")
    click.echo(f"\nfolder: {templates.folder} (default locale {templates.default_locale})")


@templates_group.command("check")
@pass_context
def templates_check(ctx: Context) -> None:
    """Check that every template is there, compiles and renders (0 if so)."""
    from mailproc.rendering import Templates

    with _template_errors():
        templates = Templates.from_settings(ctx.settings.templates)
        templates.check()
    click.echo(f"templates OK ({templates.folder})")


@templates_group.command("preview")
@click.argument("name")
@click.option("--locale", help="The recipient's locale, e.g. de-AT (default: the default locale).")
@click.option("--html", "with_html", is_flag=True, help="Show the HTML body too.")
@pass_context
def templates_preview(ctx: Context, name: str, locale: str | None, with_html: bool) -> None:
    """Render template NAME with sample values: its subject, text body and optionally HTML."""
    from mailproc.rendering import TEMPLATE_NAMES, Templates, normalize_locale

    if name not in TEMPLATE_NAMES:
        raise UnknownTemplate(f"unknown template {name!r}; known: {', '.join(TEMPLATE_NAMES)}")
    with _template_errors():
        templates = Templates.from_settings(ctx.settings.templates)
        rendered = templates.render(name, locale, templates.sample_context(name, locale))
    if locale and rendered.locale != normalize_locale(locale):
        click.echo(f"(no {locale} template for {name}; showing {rendered.locale})", err=True)
    click.echo(f"Subject: {rendered.subject}\n")
    click.echo(rendered.text, nl=not rendered.text.endswith("\n"))
    if with_html:
        click.echo(f"\n{'-' * 30} HTML {'-' * 30}")
        if rendered.html is None:
            click.echo(f"(no HTML body for {name} in {rendered.locale}: replies are text only)")
        else:
            click.echo(rendered.html, nl=not rendered.html.endswith("\n"))


@main.group("outbox")
def outbox_group() -> None:
    """Replies: queued, sent, failed and suppressed."""


def outbox_dict(entry: OutboxEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "state": entry.state.value,
        "template": entry.template,
        "locale": entry.locale,
        "recipient": entry.recipient,
        "subject": entry.subject,
        "message_id": entry.message_id_header,
        "source_message_id": entry.source_message_id,
        "suppressed_reason": entry.suppressed_reason,
        "attempts": entry.attempts,
        "next_attempt_at": entry.next_attempt_at.isoformat() if entry.next_attempt_at else None,
        "last_error": entry.last_error,
        "relay_reply": entry.relay_reply,
        "created_at": entry.created_at.isoformat(),
        "sent_at": entry.sent_at.isoformat() if entry.sent_at else None,
    }


@outbox_group.command("list")
@click.option("--state", type=click.Choice([s.value for s in OutboxState]), default=None)
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_context
def outbox_list(ctx: Context, state: str | None, limit: int, as_json: bool) -> None:
    """List replies, newest first."""
    from mailproc.outbox import OutboxAdmin

    admin = OutboxAdmin(ctx.database())
    rows = _run(lambda: admin.list(OutboxState(state) if state else None, limit))
    if as_json:
        click.echo(json.dumps([outbox_dict(entry) for entry in rows], indent=2))
        return
    if not rows:
        click.echo("no replies")
        return
    click.echo(f"{'ID':>8}  {'STATE':<10}  {'CREATED':<19}  {'TEMPLATE':<24}  {'TO':<32}  NOTE")
    for entry in rows:
        note = entry.suppressed_reason or entry.last_error or entry.relay_reply or ""
        click.echo(
            f"{entry.id:>8}  {entry.state.value:<10}  {entry.created_at:%Y-%m-%d %H:%M:%S}  "
            f"{entry.template + '/' + entry.locale:<24}  {_printable(entry.recipient)[:32]:<32}  "
            f"{_printable(note)[:60]}"
        )
    counts = _run(admin.counts)
    click.echo("\nall replies: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))


@outbox_group.command("show")
@click.argument("outbox_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--raw", is_flag=True, help="Write the reply's exact bytes (unsigned) to stdout.")
@pass_context
def outbox_show(ctx: Context, outbox_id: int, as_json: bool, raw: bool) -> None:
    """Show one reply."""
    from mailproc.outbox import OutboxAdmin

    entry = _run(lambda: OutboxAdmin(ctx.database()).get(outbox_id))
    if raw:
        sys.stdout.buffer.write(entry.content)
        return
    data = outbox_dict(entry)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        click.echo(f"{key + ':':<19}{'' if value is None else _printable(str(value))}")


@outbox_group.command("retry")
@click.argument("outbox_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@pass_context
def outbox_retry(ctx: Context, outbox_id: int, as_json: bool) -> None:
    """Send a failed reply again (at the sender's next run)."""
    from mailproc.outbox import OutboxAdmin

    entry = _run(lambda: OutboxAdmin(ctx.database()).retry(outbox_id))
    if as_json:
        click.echo(json.dumps(outbox_dict(entry)))
    else:
        click.echo(f"reply {entry.id} is {entry.state.value} again and will be sent")


@main.group("rules")
def rules_group() -> None:
    """Rules that decide what happens to each message."""


@rules_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_context
def rules_list(ctx: Context, as_json: bool) -> None:
    """List the rules in the order they are tried (the first that matches decides)."""
    from mailproc.rules import RuleSet

    with _user_errors():
        ruleset = RuleSet.from_settings(ctx.settings.rules)
    rows: list[dict[str, Any]] = [
        {
            "order": order,
            "name": rule.name,
            "file": rule.file.name,
            "action": rule.action,
            "template": rule.template,
            "description": rule.description,
            "when": rule.describe(),
        }
        for order, rule in enumerate(ruleset.rules, start=1)
    ]
    if as_json:
        click.echo(json.dumps({"folder": str(ruleset.folder), "rules": rows}, indent=2))
        return
    click.echo(f"{'#':>3}  {'NAME':<32}  {'ACTION':<12}  {'TEMPLATE':<24}  DESCRIPTION")
    for row in rows:
        click.echo(
            f"{row['order']:>3}  {row['name']:<32}  {row['action']:<12}  "
            f"{row['template'] or '-':<24}  {row['description']}"
        )
    click.echo(f"\nfolder: {ruleset.folder}")


@rules_group.command("check")
@pass_context
def rules_check(ctx: Context) -> None:
    """Load every rule and check it (0 if all is well)."""
    from mailproc.rules import RuleSet

    settings = ctx.settings
    with _user_errors():
        ruleset = RuleSet.from_settings(settings.rules)
    if not settings.rules.helpdesk_address and any(
        rule.action == "forward" for rule in ruleset.rules
    ):
        click.echo(
            "Warning: [rules] helpdesk_address is empty: mail a rule forwards is only recorded",
            err=True,
        )
    count = len(ruleset.rules)
    click.echo(f"rules OK ({count} rule{'' if count == 1 else 's'} in {ruleset.folder})")


@main.group("requests")
def requests_group() -> None:
    """Reset requests waiting for, or decided by, an agent."""


@requests_group.command("list")
@click.option("--state", type=click.Choice([s.value for s in RequestState]), default=None)
@click.option("--email", default=None, help="Only requests for this address.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_context
def requests_list(
    ctx: Context, state: str | None, email: str | None, limit: int, as_json: bool
) -> None:
    """List reset requests, newest first."""
    from mailproc.addresses import AddressError, normalize_address
    from mailproc.requests import RequestService, request_dict

    if email is not None:
        try:
            email = normalize_address(email)
        except AddressError as exc:
            raise click.BadParameter(str(exc), param_hint="--email") from None
    service = RequestService(ctx.database())
    rows = _run(lambda: service.list(RequestState(state) if state else None, limit, email))
    if as_json:
        click.echo(json.dumps([request_dict(r) for r in rows], indent=2))
        return
    if not rows:
        click.echo("no requests")
        return
    click.echo(f"{'ID':>6}  {'REFERENCE':<10}  {'STATE':<9}  {'CREATED':<16}  {'EMAIL':<32}  FLAGS")
    for r in rows:
        click.echo(
            f"{r.id:>6}  {r.reference:<10}  {r.state.value:<9}  {r.created_at:%Y-%m-%d %H:%M}  "
            f"{_printable(r.email)[:32]:<32}  {', '.join(r.risk_flags) or '-'}"
        )
    counts = _run(service.counts)
    click.echo("\nall requests: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))


@requests_group.command("show")
@click.argument("request_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_context
def requests_show(ctx: Context, request_id: int, as_json: bool) -> None:
    """Show one request with its decision, messages and audit trail."""
    from mailproc.requests import RequestService, event_dict, execution_dict, request_dict

    detail = _run(lambda: RequestService(ctx.database()).get(request_id))
    data = request_dict(detail.request) | {
        "message_ids": detail.message_ids,
        "decision": detail.request.decision,
        "votes": [vote.to_dict() for vote in detail.votes],
        "execution": execution_dict(detail.execution) if detail.execution else None,
        "events": [event_dict(event) for event in detail.events],
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key in request_dict(detail.request):
        value = data[key]
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value) or "-"
        click.echo(f"{key + ':':<15}{'' if value is None else _printable(str(value))}")
    click.echo(f"{'messages:':<15}{', '.join(str(i) for i in detail.message_ids)}")
    click.echo(f"{'rule:':<15}{detail.request.decision.get('rule')}")
    for vote in detail.votes:
        click.echo(
            f"{'approval:':<15}{vote.agent} at {vote.at:%Y-%m-%d %H:%M:%S}: {_printable(vote.note)}"
        )
    if detail.execution is not None:
        run = detail.execution
        note = run.last_error or run.response or ""
        if run.state == ExecutionState.MANUAL:
            line = "manual: waiting for an agent to reset by hand and run requests complete"
        else:
            line = f"{run.method}, {run.state.value} after {run.attempts} attempt(s)"
        click.echo(f"{'reset:':<15}{line}" + (f": {_printable(note)}" if note else ""))
    click.echo("\naudit trail:")
    for event in detail.events:
        change = f" {event.from_state or '-'} -> {event.to_state}" if event.to_state else ""
        reason = f": {_printable(event.reason)}" if event.reason else ""
        click.echo(f"  {event.at:%Y-%m-%d %H:%M:%S}  {event.actor}  {event.action}{change}{reason}")


def _decided(ctx: Context, outcome: Any, as_json: bool) -> None:
    from mailproc.requests import request_dict

    request = outcome.request
    if as_json:
        click.echo(json.dumps(request_dict(request) | {"summary": outcome.summary}, indent=2))
    else:
        click.echo(f"request {request.id} ({request.reference}): {request.state.value}")
        click.echo(outcome.summary)


def _decisions(ctx: Context) -> Any:
    from mailproc.decisions import DecisionService

    with _user_errors():
        return DecisionService(ctx.settings, ctx.database())


_AGENT = click.option("--agent", "agent", required=True, help="The agent deciding (by name).")
_JSON = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")


@requests_group.command("approve")
@click.argument("request_id", type=int)
@_AGENT
@click.option("--note", required=True, help="How you verified the owner (kept on record).")
@_JSON
@pass_context
def requests_approve(ctx: Context, request_id: int, agent: str, note: str, as_json: bool) -> None:
    """Approve a pending request. A flagged one needs a second, different agent (four-eyes)."""
    decisions = _decisions(ctx)
    _decided(ctx, _run(lambda: decisions.approve(request_id, agent, note)), as_json)


@requests_group.command("deny")
@click.argument("request_id", type=int)
@_AGENT
@click.option("--reason", required=True, help="Why; it is sent to the owner.")
@_JSON
@pass_context
def requests_deny(ctx: Context, request_id: int, agent: str, reason: str, as_json: bool) -> None:
    """Deny a pending request; the owner gets the reason."""
    decisions = _decisions(ctx)
    _decided(ctx, _run(lambda: decisions.deny(request_id, agent, reason)), as_json)


@requests_group.command("cancel")
@click.argument("request_id", type=int)
@_AGENT
@click.option("--reason", default=None, help="Why (kept on record).")
@_JSON
@pass_context
def requests_cancel(
    ctx: Context, request_id: int, agent: str, reason: str | None, as_json: bool
) -> None:
    """Close a request without a reset (admins only), unless its reset is running."""
    decisions = _decisions(ctx)
    _decided(ctx, _run(lambda: decisions.cancel(request_id, agent, reason)), as_json)


@requests_group.command("complete")
@click.argument("request_id", type=int)
@_AGENT
@click.option("--note", default=None, help="What was done (kept on record).")
@_JSON
@pass_context
def requests_complete(
    ctx: Context, request_id: int, agent: str, note: str | None, as_json: bool
) -> None:
    """Mark an approved request done after resetting by hand ([reset] method = "manual")."""
    decisions = _decisions(ctx)
    _decided(ctx, _run(lambda: decisions.complete(request_id, agent, note)), as_json)


@requests_group.command("retry")
@click.argument("request_id", type=int)
@_AGENT
@_JSON
@pass_context
def requests_retry(ctx: Context, request_id: int, agent: str, as_json: bool) -> None:
    """Carry out a failed reset again, from its first attempt (admins only)."""
    decisions = _decisions(ctx)
    _decided(ctx, _run(lambda: decisions.retry(request_id, agent)), as_json)


@main.group("agents")
def agents_group() -> None:
    """The support agents who decide requests."""


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        raise click.UsageError("no terminal to ask for the password: give --password-stdin")
    from mailproc.agents import AgentError, check_password

    try:
        return check_password(password)
    except AgentError as exc:
        raise click.ClickException(str(exc)) from None


@agents_group.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["agent", "admin"]), default="agent", show_default=True)
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)
@_JSON
@pass_context
def agents_add(ctx: Context, name: str, role: str, password_stdin: bool, as_json: bool) -> None:
    """Add an agent (argon2id-hashed password; asked for twice on a terminal)."""
    from mailproc.agents import AgentError, AgentService, check_name
    from mailproc.models import AgentRole

    try:
        check_name(name)
    except AgentError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    password = _read_password(password_stdin)
    info = _run(lambda: AgentService(ctx.database()).add(name, password, AgentRole(role)))
    if as_json:
        click.echo(json.dumps(info.to_dict()))
    else:
        click.echo(f"agent {info.name} added ({info.role.value})")


@agents_group.command("list")
@_JSON
@pass_context
def agents_list(ctx: Context, as_json: bool) -> None:
    """List agents."""
    from mailproc.agents import AgentService

    agents = _run(AgentService(ctx.database()).list)
    if as_json:
        click.echo(json.dumps([agent.to_dict() for agent in agents], indent=2))
        return
    if not agents:
        click.echo("no agents (mailproc agents add NAME adds one)")
        return
    click.echo(f"{'NAME':<24}  {'ROLE':<6}  {'STATE':<9}  CREATED")
    for agent in agents:
        state = "active" if agent.active else "disabled"
        click.echo(
            f"{agent.name:<24}  {agent.role.value:<6}  {state:<9}  {agent.created_at:%Y-%m-%d}"
        )


@agents_group.command("disable")
@click.argument("name")
@pass_context
def agents_disable(ctx: Context, name: str) -> None:
    """Disable an agent: they decide nothing more (their past decisions stay on record)."""
    from mailproc.agents import AgentService

    info = _run(lambda: AgentService(ctx.database()).disable(name))
    click.echo(f"agent {info.name} disabled")


@agents_group.command("enable")
@click.argument("name")
@pass_context
def agents_enable(ctx: Context, name: str) -> None:
    """Enable a disabled agent again."""
    from mailproc.agents import AgentService

    info = _run(lambda: AgentService(ctx.database()).enable(name))
    click.echo(f"agent {info.name} enabled")


@agents_group.command("reset-mfa")
@click.argument("name")
@pass_context
def agents_reset_mfa(ctx: Context, name: str) -> None:
    """Forget an agent's second factor (a lost phone): they set up a new one at next sign-in;
    their console sessions end and a lockout is lifted."""
    from mailproc.agents import AgentService

    info = _run(lambda: AgentService(ctx.database()).reset_mfa(name))
    click.echo(f"second factor of agent {info.name} reset: they enrol again at next sign-in")


@agents_group.command("password")
@click.argument("name")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)
@pass_context
def agents_password(ctx: Context, name: str, password_stdin: bool) -> None:
    """Set an agent's password."""
    from mailproc.agents import AgentService

    password = _read_password(password_stdin)
    info = _run(lambda: AgentService(ctx.database()).set_password(name, password))
    click.echo(f"password of agent {info.name} set")


@main.group("tokens")
def tokens_group() -> None:
    """Bearer tokens for the JSON API, each acting as one agent."""


@tokens_group.command("create")
@click.argument("name")
@click.option("--agent", "agent", required=True, help="The agent the token acts as (by name).")
@_JSON
@pass_context
def tokens_create(ctx: Context, name: str, agent: str, as_json: bool) -> None:
    """Create a token acting as an agent (shown once).

    The token has the agent's role, checked at every call. Only the token goes to stdout
    (TOKEN=$(mailproc tokens create ...)); the notes go to stderr."""
    from mailproc.tokens import TokenError, TokenService, check_token_name

    try:
        check_token_name(name)
    except TokenError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    info, secret = _run(lambda: TokenService(ctx.database()).create(name, agent))
    if as_json:
        click.echo(json.dumps(info.to_dict() | {"token": secret}))
        return
    click.echo(f"token {info.name} created, acting as agent {info.agent}:", err=True)
    click.echo(secret)
    click.echo("It is shown only this once: store it now (only its hash is kept).", err=True)


@tokens_group.command("list")
@_JSON
@pass_context
def tokens_list(ctx: Context, as_json: bool) -> None:
    """List tokens (never their secrets)."""
    from mailproc.tokens import TokenService

    tokens = _run(TokenService(ctx.database()).list)
    if as_json:
        click.echo(json.dumps([token.to_dict() for token in tokens], indent=2))
        return
    if not tokens:
        click.echo("no tokens (mailproc tokens create NAME --agent AGENT makes one)")
        return
    click.echo(f"{'NAME':<24}  {'AGENT':<24}  {'STATE':<7}  {'CREATED':<10}  LAST USED")
    for token in tokens:
        state = "revoked" if token.revoked_at else "live"
        used = f"{token.last_used_at:%Y-%m-%d %H:%M}" if token.last_used_at else "never"
        click.echo(
            f"{token.name:<24}  {token.agent:<24}  {state:<7}  {token.created_at:%Y-%m-%d}  {used}"
        )


@tokens_group.command("revoke")
@click.argument("name")
@pass_context
def tokens_revoke(ctx: Context, name: str) -> None:
    """Revoke a token: refused from now on, listed as revoked."""
    from mailproc.tokens import TokenService

    info = _run(lambda: TokenService(ctx.database()).revoke(name))
    click.echo(f"token {info.name} revoked")


@main.command()
@click.option("--dry-run", is_flag=True, help="Only say what would be replaced.")
@_JSON
@pass_context
def purge(ctx: Context, dry_run: bool, as_json: bool) -> None:
    """Replace the raw bytes of messages older than [retention] raw_message_days by their
    headers (serve does this by itself every [retention] check_interval_seconds)."""
    from mailproc.retention import Retention

    days = ctx.settings.retention.raw_message_days
    report = _run(lambda: Retention(ctx.database(), days).purge(dry_run=dry_run))
    if as_json:
        click.echo(json.dumps(report.to_dict() | {"dry_run": dry_run, "days": days}))
        return
    if days == 0:
        click.echo("[retention] raw_message_days = 0: raw messages are kept for ever")
        return
    oldest = f", the oldest received {report.oldest:%Y-%m-%d}" if report.oldest else ""
    if dry_run:
        click.echo(
            f"would replace the raw bytes of {report.messages} messages received before "
            f"{report.cutoff:%Y-%m-%d %H:%M} UTC ({report.bytes_before} bytes{oldest}) by "
            "their headers"
        )
    else:
        click.echo(
            f"replaced the raw bytes of {report.messages} messages received before "
            f"{report.cutoff:%Y-%m-%d %H:%M} UTC by their headers ({report.bytes_before} -> "
            f"{report.bytes_after} bytes{oldest})"
        )


@main.group("audit")
def audit_group() -> None:
    """The chained audit log."""


@audit_group.command("verify")
@pass_context
def audit_verify(ctx: Context) -> None:
    """Check every link of the audit log; exit 1 at the first broken one."""
    from mailproc.requests import verify_chain

    report = _run(lambda: verify_chain(ctx.database()))
    if report.broken_at is not None:
        raise click.ClickException(
            f"audit log broken at event {report.broken_at}: {report.problem} "
            f"({report.events} events before it are intact)"
        )
    click.echo(f"audit log intact ({report.events} events)")


@audit_group.command("show")
@click.option("--request", "request_id", type=int, default=None, help="Only this request.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_context
def audit_show(ctx: Context, request_id: int | None, limit: int, as_json: bool) -> None:
    """Print the audit log, newest last."""
    from mailproc.requests import RequestService, event_dict

    events = _run(lambda: RequestService(ctx.database()).events(request_id, limit))
    if as_json:
        click.echo(json.dumps([event_dict(event) for event in events], indent=2))
        return
    for event in events:
        change = f" {event.from_state or '-'} -> {event.to_state}" if event.to_state else ""
        target = f"request {event.request_id}" if event.request_id else "-"
        message = f" message {event.message_id}" if event.message_id else ""
        reason = f": {_printable(event.reason)}" if event.reason else ""
        click.echo(
            f"{event.id:>6}  {event.at:%Y-%m-%d %H:%M:%S}  {event.actor:<10}  {target:<12}"
            f"{event.action}{change}{message}{reason}"
        )
