"""Rules: the shipped set's decisions, subject normalisation, traces, every way a rule file can
be wrong, operator folders, and the `mailproc rules` commands."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from email.header import Header
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailproc.auth.verdict import Strength
from mailproc.cli import main
from mailproc.config import RulesSettings
from mailproc.rules import (
    ACTIONS,
    SHIPPED_RULES,
    Facts,
    RuleError,
    RuleSet,
    normalize_subject,
)

RESET = "Reset my security question"
CATCH_ALL = 'description = "everything else"\n[then]\naction = "ignore"\n'


def facts(
    subject: str | None = RESET,
    *,
    strength: Strength = Strength.STRONG,
    registered: bool = True,
    claims_registered: bool | None = None,
    body: str | None = "Please reset it.\n",
    recipients: tuple[str, ...] = ("support@example.com",),
    wire_flags: tuple[str, ...] = (),
) -> Facts:
    authenticated = strength != Strength.NONE
    return Facts(
        subject=subject,
        text_body=body,
        strength=strength,
        authenticated=authenticated,
        from_address="alice@example.org",
        registered=registered and authenticated,
        claims_registered=registered if claims_registered is None else claims_registered,
        recipients=recipients,
        wire_flags=wire_flags,
    )


@pytest.fixture(scope="module")
def shipped() -> RuleSet:
    return RuleSet.load(SHIPPED_RULES)


def decided(ruleset: RuleSet, fact: Facts) -> tuple[str, str, str | None]:
    decision = ruleset.decide(fact)
    return decision.rule.name, decision.action, decision.template


# The shipped rules.


def test_shipped_rules_load_in_file_name_order(shipped: RuleSet) -> None:
    assert shipped.folder == SHIPPED_RULES
    assert [(r.name, r.action, r.template) for r in shipped.rules] == [
        ("reset-security-question", "queue_reset", "request_received"),
        ("unverified-reset-owner", "notify_owner", "unverified_notice"),
        ("unverified-reset-wrong-address", "reply", "use_registered_address"),
        ("unverified-reset-other", "ignore", None),
        ("password-question", "reply", "password_help"),
        ("fallthrough", "forward", None),
    ]
    assert all(rule.description and "\n" not in rule.description for rule in shipped.rules)
    assert shipped.rules[0].file == SHIPPED_RULES / "10-reset-security-question.toml"
    assert RuleSet.from_settings(RulesSettings()).rules == shipped.rules


@pytest.mark.parametrize(
    "subject",
    [
        RESET,
        "reset my security question",
        "  RESET   my\tsecurity question  ",
        "Re: RE: reset my SECURITY  question",
        "AW: WG: Reset my security question",
        "Re[2]: Fwd: SV: VS: Reset my security question",
        "RE^3: Re(2):Reset my security question",
        "=?utf-8?q?Reset_my_security_question?=",
        "=?utf-8?b?UmU6IFJlc2V0IG15IHNlY3VyaXR5IHF1ZXN0aW9u?=",
        str(Header("Re: Reset my security question", "iso-8859-1").encode()),
        "".join(chr(ord(c) + 0xFEE0) if c != " " else c for c in RESET),  # fullwidth
        "Re\uff1a Reset my security question",  # fullwidth colon
        "Reset\u00a0my security\u3000question",  # no-break and ideographic spaces
    ],
)
def test_strongly_authenticated_registered_reset_is_queued(shipped: RuleSet, subject: str) -> None:
    assert decided(shipped, facts(subject)) == (
        "reset-security-question",
        "queue_reset",
        "request_received",
    )


@pytest.mark.parametrize(
    "subject",
    [
        "Please do not reset my security question",
        "Reset my security question please",
        "Reset my security questions",
        "Reset my question",
        "Fwd reset my security question",
        "",
        None,
    ],
)
def test_a_subject_that_only_resembles_the_reset_subject_is_not_a_reset(
    shipped: RuleSet, subject: str | None
) -> None:
    name, action, _ = decided(shipped, facts(subject, body="hello"))
    assert (name, action) == ("fallthrough", "forward")


def test_weakly_authenticated_registered_reset_notifies_the_owner(shipped: RuleSet) -> None:
    assert decided(shipped, facts(strength=Strength.WEAK)) == (
        "unverified-reset-owner",
        "notify_owner",
        "unverified_notice",
    )


def test_unauthenticated_reset_claiming_a_registered_address_notifies_the_owner(
    shipped: RuleSet,
) -> None:
    fact = facts(strength=Strength.NONE, claims_registered=True)
    assert not fact.authenticated
    assert not fact.registered
    assert decided(shipped, fact)[:2] == ("unverified-reset-owner", "notify_owner")


def test_reset_from_an_authenticated_unregistered_address_is_told_to_use_the_registered_one(
    shipped: RuleSet,
) -> None:
    assert decided(shipped, facts("Re: " + RESET, registered=False)) == (
        "unverified-reset-wrong-address",
        "reply",
        "use_registered_address",
    )


def test_unauthenticated_reset_from_an_unknown_address_is_ignored(shipped: RuleSet) -> None:
    fact = facts(strength=Strength.NONE, registered=False)
    assert decided(shipped, fact) == ("unverified-reset-other", "ignore", None)


def test_flagged_mail_counts_as_unauthenticated(shipped: RuleSet) -> None:
    decision = shipped.decide(facts(wire_flags=("bare_lf",)))
    assert decision.rule.name == "unverified-reset-owner"
    conditions = decision.trace[0]["conditions"]
    assert "NOT min_strength strong (was none: wire flags bare_lf)" in conditions


@pytest.mark.parametrize(
    ("subject", "body"),
    [
        ("I forgot my password", "Can you help?"),
        ("Question", "Ich habe mein Passwort vergessen."),
        ("Hilfe", "Mein KENNWORT geht nicht"),
        ("Login", "Where do I change my password?"),
        ("=?utf-8?q?Passw=C3=B6rter?=", None),
    ],
)
def test_password_question_from_an_authenticated_sender_gets_help(
    shipped: RuleSet, subject: str, body: str | None
) -> None:
    fact = facts(subject, registered=False, strength=Strength.WEAK, body=body)
    assert decided(shipped, fact) == ("password-question", "reply", "password_help")


def test_password_question_from_an_unauthenticated_sender_is_forwarded(shipped: RuleSet) -> None:
    fact = facts("I forgot my password", strength=Strength.NONE, registered=False)
    assert decided(shipped, fact) == ("fallthrough", "forward", None)


def test_password_is_matched_as_a_whole_word(shipped: RuleSet) -> None:
    fact = facts("Passwordless login", body="Do you offer passwordless sign-in?")
    assert decided(shipped, fact)[:2] == ("fallthrough", "forward")


def test_other_mail_is_forwarded(shipped: RuleSet) -> None:
    fact = facts("Invoice 2024-05", body="Please find the invoice attached.")
    assert decided(shipped, fact) == ("fallthrough", "forward", None)


def test_trace_lists_every_rule_tried_with_its_conditions(shipped: RuleSet) -> None:
    decision = shipped.decide(facts("Re: Reset my security question", strength=Strength.NONE))
    assert decision.trace == [
        {
            "rule": "reset-security-question",
            "matched": False,
            "conditions": [
                "subject matches 'reset my security question' (reply prefixes allowed)",
                "NOT min_strength strong (was none)",
                "NOT registered true (was false)",
            ],
        },
        {
            "rule": "unverified-reset-owner",
            "matched": True,
            "conditions": [
                "subject matches 'reset my security question' (reply prefixes allowed)",
                "claims_registered true",
            ],
        },
    ]
    assert json.loads(json.dumps(decision.trace)) == decision.trace


def test_trace_ends_with_the_catch_all_and_shows_what_was_seen(shipped: RuleSet) -> None:
    decision = shipped.decide(facts("Hello", strength=Strength.NONE, registered=False))
    assert [entry["rule"] for entry in decision.trace] == [r.name for r in shipped.rules]
    assert [entry["matched"] for entry in decision.trace] == [False] * 5 + [True]
    assert decision.trace[0]["conditions"][0] == (
        "NOT subject matches 'reset my security question' (reply prefixes allowed) (was 'hello')"
    )
    assert decision.trace[4]["conditions"] == [
        "NOT authenticated true (was false)",
        "NOT subject or body contains one of 'password', 'passwords', 'passwort', 'passworts', "
        "'passwörter', 'kennwort', 'kennworts', 'kennwörter'",
    ]
    assert decision.trace[-1] == {"rule": "fallthrough", "matched": True, "conditions": []}


def test_explain_and_matches_agree(shipped: RuleSet) -> None:
    rule = shipped.rules[4]
    fact = facts("Help", body="my Passwort", registered=False)
    assert rule.explain(fact) == ["authenticated true", "subject or body contains 'passwort'"]
    assert rule.matches(fact)
    assert not rule.matches(replace(fact, authenticated=False))


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        (None, ""),
        ("", ""),
        ("  Reset\r\n  my\tSECURITY question ", "reset my security question"),
        ("=?utf-8?q?Stra=C3=9Fe?=", "strasse"),
        ("ﬁle Ⅳ", "file iv"),
        ("=?bogus-charset?q?x?=", "=?bogus-charset?q?x?="),
    ],
)
def test_normalize_subject(raw: str | None, normalized: str) -> None:
    assert normalize_subject(raw) == normalized


# Operator folders and the file format.


def write_rules(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_custom_folder_with_every_condition(tmp_path: Path) -> None:
    folder = write_rules(
        tmp_path / "rules",
        {
            "05-billing.toml": """
description = "Billing mail to the billing address"
[when]
recipient = ["Billing@EXAMPLE.com"]
subject_or_body_contains = "invoice"
min_strength = "weak"
authenticated = true
registered = false
claims_registered = false
[then]
action = "forward"
""",
            "10-hello.toml": """
description = "Greetings"
[when]
subject = ["Hello", "Hi there"]
[then]
action = "reply"
template = "password_help"
""",
            "99_last.toml": CATCH_ALL,
            "README.md": "not a rule",
            "_draft.toml": "this is not TOML",
            ".hidden.toml": "neither is this",
            "notes.txt": "ignored",
        },
    )
    (folder / "sub.toml").mkdir()
    ruleset = RuleSet.from_settings(RulesSettings(path=str(folder)))
    assert ruleset.folder == folder
    assert [r.name for r in ruleset.rules] == ["billing", "hello", "last"]
    assert ruleset.rules[0].describe() == [
        "recipient 'billing@example.com'",
        "subject or body contains 'invoice'",
        "min_strength weak",
        "authenticated true",
        "registered false",
        "claims_registered false",
    ]

    billing = facts(
        "Your invoice",
        strength=Strength.WEAK,
        registered=False,
        recipients=("support@example.com", "billing@example.com"),
    )
    assert decided(ruleset, billing) == ("billing", "forward", None)
    elsewhere = replace(billing, recipients=("support@example.com",))
    assert ruleset.decide(elsewhere).trace[0]["conditions"][0] == (
        "NOT recipient 'billing@example.com' (was 'support@example.com')"
    )
    assert decided(ruleset, facts("HI  THERE")) == ("hello", "reply", "password_help")
    # Without reply_prefixes, a prefix makes it another subject.
    assert decided(ruleset, facts("Re: Hello"))[0] == "last"


def test_the_last_rule_must_be_a_catch_all(tmp_path: Path) -> None:
    folder = write_rules(
        tmp_path / "rules",
        {
            "10-a.toml": CATCH_ALL,
            "20-b.toml": 'description = "x"\n[when]\nauthenticated = true\n'
            '[then]\naction = "ignore"\n',
        },
    )
    with pytest.raises(RuleError) as caught:
        RuleSet.load(folder)
    assert str(caught.value).startswith(f"{folder / '20-b.toml'}: [when]: the last rule must")


def test_decide_without_a_match_is_an_error(shipped: RuleSet) -> None:
    partial = RuleSet(shipped.folder, shipped.rules[:1])
    with pytest.raises(RuleError, match="no rule matched"):
        partial.decide(facts("Hello"))


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "{folder}: no rules"),
        ({"README.md": "x", "_off.toml": CATCH_ALL}, "{folder}: no rules"),
        (
            {"10-a.toml": CATCH_ALL, "20-a.toml": CATCH_ALL},
            "{folder}/20-a.toml: a second rule named 'a'",
        ),
    ],
)
def test_folder_problems(tmp_path: Path, files: dict[str, str], message: str) -> None:
    folder = write_rules(tmp_path / "rules", files)
    with pytest.raises(RuleError) as caught:
        RuleSet.load(folder)
    assert str(caught.value).startswith(message.format(folder=folder))


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match=r"rules folder not found"):
        RuleSet.load(tmp_path / "nowhere")


GOOD_WHEN = '[when]\nsubject = "Hello"\n'


def rule_text(when: str = GOOD_WHEN, then: str = '[then]\naction = "ignore"\n') -> str:
    return f'description = "A rule"\n{when}{then}'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            rule_text('[when]\nmin_strength = "strongest"\n'),
            "[when] min_strength: expected one of none, weak, strong, got 'strongest'",
        ),
        (
            rule_text("[when]\nmin_strength = 2\n"),
            "[when] min_strength: expected a string, got integer",
        ),
        (rule_text("[when]\nsubjects = 'x'\n"), "[when] subjects: unknown key (known: subject,"),
        (rule_text(then='[then]\naction = "ignore"\nreply = 1\n'), "[then] reply: unknown key"),
        ('description = "x"\nmode = 1\n[then]\naction = "ignore"\n', "mode: unknown key"),
        ('description = "x"\n[if]\n[then]\naction = "ignore"\n', "[if]: unknown key"),
        ('[then]\naction = "ignore"\n', "description: missing"),
        ('description = 3\n[then]\naction = "ignore"\n', "description: expected a string"),
        ('description = """two\nlines"""\n[then]\naction = "ignore"\n', "description: must be"),
        ('description = "  "\n[then]\naction = "ignore"\n', "description: must be one line"),
        (rule_text(then=""), "[then]: missing"),
        ('description = "x"\nthen = "ignore"\n', "[then]: expected a table, got string"),
        ('description = "x"\nwhen = [1]\n[then]\naction="ignore"\n', "[when]: expected a table"),
        (rule_text(then="[then]\n"), "[then] action: missing (one of queue_reset, reply,"),
        (
            rule_text(then='[then]\naction = "delete"\n'),
            "[then] action: expected one of queue_reset, reply, notify_owner, forward, ignore, "
            "got 'delete'",
        ),
        (
            rule_text(then='[then]\naction = "reply"\n'),
            "[then] template: missing (action 'reply' sends a reply",
        ),
        (
            rule_text(then='[then]\naction = "queue_reset"\n'),
            "[then] template: missing (action 'queue_reset'",
        ),
        (
            rule_text(then='[then]\naction = "notify_owner"\ntemplate = "nope"\n'),
            "[then] template: expected one of request_received, unverified_notice,",
        ),
        (
            rule_text(then='[then]\naction = "forward"\ntemplate = "password_help"\n'),
            "[then] template: not allowed with action 'forward'",
        ),
        (
            rule_text(then='[then]\naction = "ignore"\ntemplate = "password_help"\n'),
            "[then] template: not allowed with action 'ignore'",
        ),
        (rule_text("[when]\nsubject = []\n"), "[when] subject: must not be empty"),
        (rule_text("[when]\nsubject = 7\n"), "[when] subject: expected a string or an array"),
        (rule_text("[when]\nsubject = ['a', 2]\n"), "[when] subject item 2: expected a string"),
        (rule_text("[when]\nsubject = ' '\n"), "[when] subject: ' ' is empty after"),
        (
            rule_text("[when]\nsubject_or_body_contains = []\n"),
            "[when] subject_or_body_contains: must not be empty",
        ),
        (
            rule_text("[when]\nrecipient = ['support@example.com', 'not an address']\n"),
            "[when] recipient item 2: invalid address 'not an address'",
        ),
        (rule_text("[when]\nrecipient = 'support'\n"), "[when] recipient: invalid address"),
        (rule_text("[when]\nauthenticated = 'yes'\n"), "[when] authenticated: expected true or"),
        (rule_text("[when]\nregistered = 1\n"), "[when] registered: expected true or false"),
        (rule_text("[when]\nclaims_registered = 'no'\n"), "[when] claims_registered: expected"),
        (
            rule_text("[when]\nsubject = 'x'\nreply_prefixes = 'yes'\n"),
            "[when] reply_prefixes: expected true or false, got string",
        ),
        (
            rule_text("[when]\nreply_prefixes = true\n"),
            "[when] reply_prefixes: only allowed together with subject",
        ),
        ("description = \n", "invalid TOML: "),
        ('description = "x"\n[when]\n[when]\n', "invalid TOML: "),
    ],
)
def test_invalid_rule_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    folder = write_rules(tmp_path / "rules", {"10-broken.toml": text, "90-last.toml": CATCH_ALL})
    with pytest.raises(RuleError) as caught:
        RuleSet.load(folder)
    error = str(caught.value)
    assert error.startswith(f"{folder / '10-broken.toml'}: {message}"), error
    assert "\n" not in error


def test_rule_file_that_is_not_utf8(tmp_path: Path) -> None:
    folder = write_rules(tmp_path / "rules", {"90-last.toml": CATCH_ALL})
    (folder / "10-latin1.toml").write_bytes(b'description = "caf\xe9"\n')
    with pytest.raises(RuleError, match=r"10-latin1\.toml: not UTF-8 text$"):
        RuleSet.load(folder)


def test_every_action_is_accepted(tmp_path: Path) -> None:
    files = {}
    for number, action in enumerate(ACTIONS, start=10):
        template = "" if action in ("forward", "ignore") else 'template = "request_received"'
        then = f'[then]\naction = "{action}"\n{template}\n'
        files[f"{number}-{action}.toml"] = rule_text(then=then)
    files["90-last.toml"] = CATCH_ALL
    ruleset = RuleSet.load(write_rules(tmp_path / "rules", files))
    assert [rule.action for rule in ruleset.rules[:-1]] == list(ACTIONS)


# The command line.


def run(tmp_path: Path, *args: str, rules: dict[str, str] | None = None) -> tuple[int, str]:
    config = tmp_path / "mailproc.toml"
    lines = ["[rules]", *(f'{key} = "{value}"' for key, value in (rules or {}).items())]
    config.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["--config", str(config), *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_cli_list(tmp_path: Path, shipped: RuleSet) -> None:
    code, output = run(tmp_path, "rules", "list", "--json")
    assert code == 0, output
    listed = json.loads(output)
    assert listed["folder"] == str(SHIPPED_RULES)
    assert [(r["order"], r["name"], r["action"], r["template"]) for r in listed["rules"]] == [
        (n, r.name, r.action, r.template) for n, r in enumerate(shipped.rules, start=1)
    ]
    assert listed["rules"][0]["file"] == "10-reset-security-question.toml"
    assert listed["rules"][0]["description"] == shipped.rules[0].description
    assert listed["rules"][-1]["when"] == []

    code, output = run(tmp_path, "rules", "list")
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].split() == ["#", "NAME", "ACTION", "TEMPLATE", "DESCRIPTION"]
    first = ["1", "reset-security-question", "queue_reset", "request_received"]
    assert lines[1].split()[:4] == first
    assert lines[6].split()[:4] == ["6", "fallthrough", "forward", "-"]
    assert lines[-1] == f"folder: {SHIPPED_RULES}"


def test_cli_check(tmp_path: Path) -> None:
    code, output = run(tmp_path, "rules", "check", rules={"helpdesk_address": "desk@example.com"})
    assert code == 0, output
    assert output == f"rules OK (6 rules in {SHIPPED_RULES})\n"

    code, output = run(tmp_path, "rules", "check")
    assert code == 0, output
    assert "Warning: [rules] helpdesk_address is empty" in output

    folder = write_rules(tmp_path / "custom", {"10-only.toml": CATCH_ALL})
    code, output = run(tmp_path, "rules", "check", rules={"path": str(folder)})
    assert (code, output.splitlines()[-1]) == (0, f"rules OK (1 rule in {folder})")


@pytest.mark.parametrize("command", ["check", "list"])
def test_cli_broken_rule_is_a_configuration_error(tmp_path: Path, command: str) -> None:
    folder = write_rules(tmp_path / "custom", {"90-last.toml": CATCH_ALL})
    shutil.copy(SHIPPED_RULES / "10-reset-security-question.toml", folder)
    (folder / "20-bad.toml").write_text(rule_text('[when]\nmin_strength = "strongest"\n'))
    code, output = run(tmp_path, "rules", command, rules={"path": str(folder)})
    assert code == 78
    assert output == (
        f"Error: {folder / '20-bad.toml'}: [when] min_strength: expected one of none, weak, "
        "strong, got 'strongest'\n"
    )
