"""Rules: one TOML file per rule in a folder, evaluated in file-name order; the first rule whose
conditions all hold decides what happens to a message. Evaluation is pure: ``Facts`` in, a
``Decision`` carrying the reasons of every rule it looked at out.

The file format is documented in ``rules/README.md``. Regular expressions are deliberately not
offered: a rule says what it compares, after one written normalisation, and nothing else."""

from __future__ import annotations

import re
import tomllib
import unicodedata
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from mailproc.addresses import AddressError, normalize_address
from mailproc.auth.verdict import Strength
from mailproc.config import RulesSettings
from mailproc.message import decoded_text
from mailproc.rendering import TEMPLATE_NAMES

SHIPPED_RULES = Path(__file__).resolve().parent.parent / "rules"

ACTIONS: tuple[str, ...] = ("queue_reset", "reply", "notify_owner", "forward", "ignore")
# The actions that send a reply template (to the sender, or to the account's owner).
TEMPLATE_ACTIONS = frozenset({"queue_reset", "reply", "notify_owner"})
STRENGTHS: tuple[Strength, ...] = (Strength.NONE, Strength.WEAK, Strength.STRONG)

# Every run of whitespace or control characters is one space.
_SPACES = re.compile(r"[\s\x00-\x1f\x7f-\x9f]+")
# Reply and forward markers as mail programs write them (English, German, Nordic, Dutch,
# French, Italian, Spanish, Portuguese, Polish, Finnish), optionally counted as in "Re[2]:",
# "Re(2):" or "Re^2:", any number of them. Matched on normalised (casefolded, NFKC) text, so
# "RE:" and a fullwidth colon count too.
_REPLY_PREFIXES = re.compile(
    r"(?:(?:re|fwd?|aw|wg|sv|vs|vl|antw|doorst|tr|rif|rv|res|enc|odp|pd)"
    r" ?(?:\[\d+\]|\(\d+\)|\^\d+)? ?: ?)+"
)
_NUMBER_PREFIX = re.compile(r"\d+[-_.]?")
RULE_KEYS = ("description", "when", "then")
WHEN_KEYS = (
    "subject",
    "reply_prefixes",
    "subject_or_body_contains",
    "min_strength",
    "authenticated",
    "registered",
    "claims_registered",
    "recipient",
)
THEN_KEYS = ("action", "template")


class RuleError(Exception):
    """A rule set that cannot be used; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class Facts:
    """What a rule sees of one message."""

    subject: str | None  # as stored; may still contain RFC 2047 encoded-words
    text_body: str | None
    strength: Strength
    authenticated: bool
    from_address: str | None  # the single author address (normalised), authenticated or not
    registered: bool  # the authenticated author address is the address of exactly one account
    claims_registered: bool  # the From address, authenticated or not, belongs to an account
    recipients: tuple[str, ...]  # normalised RCPT TO addresses
    wire_flags: tuple[str, ...] = ()


def _normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return _SPACES.sub(" ", text).strip()


def normalize_subject(text: str | None) -> str:
    """The subject as rules compare it: RFC 2047 encoded-words decoded, Unicode NFKC,
    casefolded, every run of whitespace one space, trimmed."""
    if not text:
        return ""
    return _normalize_text(decoded_text(text, "subject", []))


def strip_reply_prefixes(normalized: str) -> str:
    """A normalised subject without its leading "Re:", "Fwd:", "AW:", "Re[2]:" and the like."""
    match = _REPLY_PREFIXES.match(normalized)
    return normalized[match.end() :].strip() if match else normalized


class Observed:
    """The facts as conditions compare them, normalised once per message (and only what a
    condition asks for). A message with wire-level flags counts as not authenticated, whatever
    its verdict says."""

    def __init__(self, facts: Facts) -> None:
        self.facts = facts
        flagged = bool(facts.wire_flags)
        self.strength = Strength.NONE if flagged else Strength(facts.strength)
        self.authenticated = facts.authenticated and not flagged
        self.registered = facts.registered and not flagged
        self.claims_registered = facts.claims_registered

    @cached_property
    def subject(self) -> str:
        return normalize_subject(self.facts.subject)

    @cached_property
    def bare_subject(self) -> str:
        return strip_reply_prefixes(self.subject)

    @cached_property
    def body(self) -> str:
        return _normalize_text(self.facts.text_body or "")

    @cached_property
    def recipients(self) -> tuple[str, ...]:
        return tuple(_comparable_address(address) for address in self.facts.recipients)

    def flagged(self, value: str) -> str:
        """``value``, with why it is not what the verdict said for flagged mail."""
        if not self.facts.wire_flags:
            return value
        return f"{value}: wire flags {', '.join(self.facts.wire_flags)}"


def _comparable_address(address: str) -> str:
    try:
        return normalize_address(address)
    except AddressError:
        return address.lower()


def _one_or_more(values: tuple[str, ...]) -> str:
    shown = ", ".join(repr(value) for value in values)
    return shown if len(values) == 1 else f"one of {shown}"


def _bool_text(value: bool) -> str:
    return "true" if value else "false"


@lru_cache(maxsize=256)
def _whole_words(phrase: str) -> re.Pattern[str]:
    # "password" is in "password?" and "my password is" but not in "passwordless".
    return re.compile(rf"(?<!\w){re.escape(phrase)}(?!\w)")


class Condition(ABC):
    """One ``[when]`` condition: what it says, and whether it holds for a message."""

    @property
    @abstractmethod
    def text(self) -> str: ...

    @abstractmethod
    def check(self, observed: Observed) -> tuple[bool, str]:
        """Whether it holds, and the line that explains it."""

    def _line(self, holds: bool, was: str | None = None) -> tuple[bool, str]:
        if holds:
            return True, self.text
        return False, f"NOT {self.text}" + (f" (was {was})" if was is not None else "")


@dataclass(frozen=True)
class SubjectIs(Condition):
    subjects: tuple[str, ...]
    reply_prefixes: bool

    @property
    def text(self) -> str:
        allowed = " (reply prefixes allowed)" if self.reply_prefixes else ""
        return f"subject matches {_one_or_more(self.subjects)}{allowed}"

    def check(self, observed: Observed) -> tuple[bool, str]:
        holds = observed.subject in self.subjects or (
            self.reply_prefixes and observed.bare_subject in self.subjects
        )
        return self._line(holds, repr(observed.subject))


@dataclass(frozen=True)
class SubjectOrBodyContains(Condition):
    phrases: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"subject or body contains {_one_or_more(self.phrases)}"

    def check(self, observed: Observed) -> tuple[bool, str]:
        for phrase in self.phrases:
            pattern = _whole_words(phrase)
            if pattern.search(observed.subject) or pattern.search(observed.body):
                return True, f"subject or body contains {phrase!r}"
        return self._line(False)


@dataclass(frozen=True)
class MinStrength(Condition):
    strength: Strength

    @property
    def text(self) -> str:
        return f"min_strength {self.strength}"

    def check(self, observed: Observed) -> tuple[bool, str]:
        holds = STRENGTHS.index(observed.strength) >= STRENGTHS.index(self.strength)
        return self._line(holds, observed.flagged(str(observed.strength)))


@dataclass(frozen=True)
class FactIs(Condition):
    """``authenticated``, ``registered`` or ``claims_registered`` is true (or false)."""

    fact: str
    value: bool

    @property
    def text(self) -> str:
        return f"{self.fact} {_bool_text(self.value)}"

    def check(self, observed: Observed) -> tuple[bool, str]:
        seen: bool = getattr(observed, self.fact)
        was = _bool_text(seen)
        if self.fact != "claims_registered":
            was = observed.flagged(was)
        return self._line(seen == self.value, was)


@dataclass(frozen=True)
class RecipientIn(Condition):
    addresses: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"recipient {_one_or_more(self.addresses)}"

    def check(self, observed: Observed) -> tuple[bool, str]:
        holds = any(address in self.addresses for address in observed.recipients)
        return self._line(holds, ", ".join(repr(a) for a in observed.recipients) or "none")


@dataclass(frozen=True)
class Rule:
    name: str
    file: Path
    description: str
    action: str
    template: str | None
    when: tuple[Condition, ...] = ()

    def describe(self) -> list[str]:
        """The conditions as they are written, one line each."""
        return [condition.text for condition in self.when]

    def _evaluate(self, observed: Observed) -> list[tuple[bool, str]]:
        return [condition.check(observed) for condition in self.when]

    def explain(self, facts: Facts) -> list[str]:
        """One line per condition: the condition, or "NOT" it with what was seen instead."""
        return [line for _, line in self._evaluate(Observed(facts))]

    def matches(self, facts: Facts) -> bool:
        return all(holds for holds, _ in self._evaluate(Observed(facts)))


@dataclass(frozen=True)
class Decision:
    rule: Rule
    action: str
    template: str | None
    # Every rule looked at, in order, up to and including the one that matched.
    trace: list[dict[str, Any]]


@dataclass(frozen=True)
class RuleSet:
    folder: Path
    rules: list[Rule]

    @classmethod
    def load(cls, folder: Path) -> RuleSet:
        folder = Path(folder)
        if not folder.is_dir():
            raise RuleError(f"{folder}: rules folder not found")
        try:
            files = sorted(
                (
                    path
                    for path in folder.iterdir()
                    if path.suffix == ".toml"
                    and not path.name.startswith(("_", "."))
                    and path.is_file()
                ),
                key=lambda path: path.name,
            )
        except OSError as exc:
            raise RuleError(f"{folder}: cannot read the rules folder: {exc.strerror}") from None
        if not files:
            raise RuleError(f"{folder}: no rules (one *.toml file per rule)")
        rules: list[Rule] = []
        seen: dict[str, Path] = {}
        for path in files:
            rule = load_rule(path)
            if rule.name in seen:
                raise RuleError(
                    f"{path}: a second rule named {rule.name!r} (the first is "
                    f"{seen[rule.name].name}); rules are named by their file name without "
                    "the number"
                )
            seen[rule.name] = path
            rules.append(rule)
        if rules[-1].when:
            raise RuleError(
                f"{rules[-1].file}: [when]: the last rule must have no conditions, so that "
                "every message gets a decision (add a catch-all such as 90-fallthrough.toml)"
            )
        return cls(folder, rules)

    @classmethod
    def from_settings(cls, settings: RulesSettings) -> RuleSet:
        if settings.path:
            return cls.load(Path(settings.path))
        if not SHIPPED_RULES.is_dir():
            raise RuleError(
                f"the shipped rules are not at {SHIPPED_RULES} (this installation does not "
                "include them): set [rules] path to a copy of the rules/ folder"
            )
        return cls.load(SHIPPED_RULES)

    def decide(self, facts: Facts) -> Decision:
        observed = Observed(facts)
        trace: list[dict[str, Any]] = []
        for rule in self.rules:
            results = rule._evaluate(observed)
            matched = all(holds for holds, _ in results)
            lines = [line for _, line in results]
            trace.append({"rule": rule.name, "matched": matched, "conditions": lines})
            if matched:
                return Decision(rule=rule, action=rule.action, template=rule.template, trace=trace)
        raise RuleError(f"{self.folder}: no rule matched (the last rule must have no conditions)")


# Loading one file.


class _Invalid(ValueError):
    """A value that a rule file may not hold; ``key`` is where, as the message shows it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")


def _kind(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
    if isinstance(value, dict):
        return "table"
    return names.get(type(value), type(value).__name__)


def rule_name(path: Path) -> str:
    """``10-reset-security-question.toml`` is ``reset-security-question``."""
    return _NUMBER_PREFIX.sub("", path.stem, count=1) or path.stem


def load_rule(path: Path) -> Rule:
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise RuleError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise RuleError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"{path}: invalid TOML: {exc}") from None
    try:
        return _rule(path, data)
    except _Invalid as exc:
        raise RuleError(f"{path}: {exc}") from None


def _rule(path: Path, data: dict[str, Any]) -> Rule:
    for key, value in data.items():
        if key not in RULE_KEYS:
            shown = f"[{key}]" if isinstance(value, dict) else key
            raise _Invalid(shown, "unknown key (a rule has description, [when] and [then])")
    description = data.get("description")
    if description is None:
        raise _Invalid("description", "missing (one line saying what the rule is for)")
    if not isinstance(description, str):
        raise _Invalid("description", f"expected a string, got {_kind(description)}")
    if len(description.strip().splitlines()) != 1:
        raise _Invalid("description", "must be one line of text")
    when = _table(data, "when", required=False)
    then = _table(data, "then", required=True)
    action, template = _then(then)
    return Rule(
        name=rule_name(path),
        file=path,
        description=description.strip(),
        action=action,
        template=template,
        when=_when(when),
    )


def _table(data: dict[str, Any], section: str, *, required: bool) -> dict[str, Any]:
    if section not in data:
        if required:
            raise _Invalid(f"[{section}]", "missing")
        return {}
    table = data[section]
    if not isinstance(table, dict):
        raise _Invalid(f"[{section}]", f"expected a table, got {_kind(table)}")
    known = WHEN_KEYS if section == "when" else THEN_KEYS
    for key in table:
        if key not in known:
            raise _Invalid(f"[{section}] {key}", f"unknown key (known: {', '.join(known)})")
    return table


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise _Invalid(key, f"expected a string, got {_kind(value)}")
    if value not in choices:
        raise _Invalid(key, f"expected one of {', '.join(choices)}, got {value!r}")
    return value


def _then(then: dict[str, Any]) -> tuple[str, str | None]:
    if "action" not in then:
        raise _Invalid("[then] action", f"missing (one of {', '.join(ACTIONS)})")
    action = _choice("[then] action", then["action"], ACTIONS)
    template = then.get("template")
    if action in TEMPLATE_ACTIONS:
        if template is None:
            raise _Invalid(
                "[then] template",
                f"missing (action {action!r} sends a reply: one of {', '.join(TEMPLATE_NAMES)})",
            )
        return action, _choice("[then] template", template, TEMPLATE_NAMES)
    if template is not None:
        raise _Invalid("[then] template", f"not allowed with action {action!r} (it sends no reply)")
    return action, None


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(key, f"expected true or false, got {_kind(value)}")
    return value


def _strings(key: str, value: Any, item: Any) -> tuple[str, ...]:
    """A string or a non-empty array of strings, each passed through ``item``."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list):
        raise _Invalid(key, f"expected a string or an array of strings, got {_kind(value)}")
    if not values:
        raise _Invalid(key, "must not be empty")
    parsed: list[str] = []
    for index, element in enumerate(values, start=1):
        where = key if isinstance(value, str) else f"{key} item {index}"
        if not isinstance(element, str):
            raise _Invalid(where, f"expected a string, got {_kind(element)}")
        try:
            text = item(element)
        except ValueError as exc:
            raise _Invalid(where, str(exc)) from None
        if text not in parsed:
            parsed.append(text)
    return tuple(parsed)


def _phrase(text: str) -> str:
    normalized = _normalize_text(text)
    if not normalized:
        raise ValueError(f"{text!r} is empty after normalisation")
    return normalized


def _address(text: str) -> str:
    try:
        return normalize_address(text)
    except AddressError as exc:
        raise ValueError(str(exc)) from None


def _when(when: dict[str, Any]) -> tuple[Condition, ...]:
    conditions: list[Condition] = []
    if "reply_prefixes" in when:
        _bool("[when] reply_prefixes", when["reply_prefixes"])
        if "subject" not in when:
            raise _Invalid("[when] reply_prefixes", "only allowed together with subject")
    # In the order the file gives them, so a trace reads like the rule.
    for key, value in when.items():
        where = f"[when] {key}"
        if key == "subject":
            subjects = _strings(where, value, _phrase)
            conditions.append(SubjectIs(subjects, bool(when.get("reply_prefixes", False))))
        elif key == "subject_or_body_contains":
            conditions.append(SubjectOrBodyContains(_strings(where, value, _phrase)))
        elif key == "min_strength":
            strength = _choice(where, value, tuple(str(s) for s in STRENGTHS))
            conditions.append(MinStrength(Strength(strength)))
        elif key in ("authenticated", "registered", "claims_registered"):
            conditions.append(FactIs(key, _bool(where, value)))
        elif key == "recipient":
            conditions.append(RecipientIn(_strings(where, value, _address)))
    return tuple(conditions)
