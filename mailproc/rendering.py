"""Reply templates: a folder of ``<locale>/<name>.subject.txt``, ``<name>.txt`` and optional
``<name>.html`` files, rendered in a Jinja2 sandbox to a one-line subject and the bodies."""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    TemplateNotFound,
    TemplateSyntaxError,
    meta,
    select_autoescape,
)
from jinja2 import TemplateError as JinjaError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mailproc.config import TemplatesSettings

TEMPLATE_NAMES: tuple[str, ...] = (
    "request_received",
    "unverified_notice",
    "use_registered_address",
    "password_help",
    "request_completed",
    "request_denied",
    "request_expired",
    "request_cancelled",
    "staff_reminder",
)

# What every template receives, and what each one receives on top.
COMMON_VARIABLES: tuple[str, ...] = (
    "product_name",
    "support_address",
    "recipient",
    "original_subject",
    "received_at",
    "locale",
)
TEMPLATE_VARIABLES: Mapping[str, tuple[str, ...]] = {
    "request_received": ("reference", "expire_days", "cancel_url"),
    "unverified_notice": ("claimed_from",),
    "use_registered_address": ("sender",),
    "password_help": ("forgot_password_url",),
    "request_completed": ("reference",),
    "request_denied": ("reference", "reason"),
    "request_expired": ("reference", "expire_days"),
    "request_cancelled": ("reference", "cancelled_by"),
    "staff_reminder": ("requests", "count", "older_than_hours", "console_url"),
}

SHIPPED_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

SUFFIXES = (".subject.txt", ".txt", ".html")
_LOCALE = re.compile(r"[a-z]{2,3}(-[a-z0-9]{1,8})*")
# Every run of whitespace or control characters in a subject becomes one space, so no value
# can start a header line of its own.
_SUBJECT_BREAKS = re.compile(r"[\s\x00-\x1f\x7f-\x9f]+")


class TemplateError(Exception):
    """A template that is missing, does not compile or does not render; names the file."""


@dataclass(frozen=True)
class Rendered:
    name: str
    locale: str
    subject: str
    text: str
    html: str | None


def normalize_locale(locale: str) -> str:
    """``de_AT``, ``DE-at`` and ``de_AT.UTF-8`` all become ``de-at``."""
    tag = locale.strip().split(".", 1)[0].split("@", 1)[0]
    return tag.replace("_", "-").lower()


def _subject_line(text: str) -> str:
    return _SUBJECT_BREAKS.sub(" ", text).strip()


class Templates:
    """The reply templates in one folder; files are read when used, so edits apply at once."""

    def __init__(
        self,
        folder: Path,
        default_locale: str = "en",
        product_name: str = "Example",
        forgot_password_url: str = "https://example.com/forgot-password",  # noqa: S107 (a URL)
    ) -> None:
        self.folder = Path(folder)
        self.default_locale = normalize_locale(default_locale)
        self.product_name = product_name
        self.forgot_password_url = forgot_password_url
        if not self.folder.is_dir():
            raise TemplateError(f"{self.folder}: template folder not found")
        self._env = ImmutableSandboxedEnvironment(
            loader=FileSystemLoader(self.folder),
            undefined=StrictUndefined,
            autoescape=select_autoescape(
                enabled_extensions=("html",), default_for_string=False, default=False
            ),
            keep_trailing_newline=True,
        )

    @classmethod
    def from_settings(cls, settings: TemplatesSettings) -> Templates:
        if settings.path:
            folder = Path(settings.path)
            if not folder.is_dir():
                raise TemplateError(f"[templates] path: folder not found: {folder}")
        else:
            folder = SHIPPED_TEMPLATES
            if not folder.is_dir():
                raise TemplateError(
                    f"the shipped reply templates are not at {folder} (this installation does "
                    "not include them): set [templates] path to a copy of the templates/ folder"
                )
        return cls(
            folder,
            default_locale=settings.default_locale,
            product_name=settings.product_name,
            forgot_password_url=settings.forgot_password_url,
        )

    def _locale_dirs(self) -> dict[str, str]:
        """Normalised locale -> the folder's name as written (``de_AT`` is ``de-at``)."""
        found: dict[str, str] = {}
        for entry in sorted(self.folder.iterdir()):
            locale = normalize_locale(entry.name)
            if entry.is_dir() and _LOCALE.fullmatch(locale):
                found.setdefault(locale, entry.name)
        return found

    def _has(self, dirname: str, name: str, suffix: str) -> bool:
        return (self.folder / dirname / f"{name}{suffix}").is_file()

    def names(self) -> list[str]:
        """The known templates this folder has in at least one locale."""
        return [name for name in TEMPLATE_NAMES if self.locales(name)]

    def locales(self, name: str | None = None) -> list[str]:
        """Every locale folder, or only those that have ``name``'s subject."""
        return sorted(
            locale
            for locale, dirname in self._locale_dirs().items()
            if name is None or self._has(dirname, name, ".subject.txt")
        )

    def has_html(self, name: str, locale: str) -> bool:
        dirname = self._locale_dirs().get(normalize_locale(locale))
        return dirname is not None and self._has(dirname, name, ".html")

    def _known(self, name: str) -> None:
        if name not in TEMPLATE_NAMES:
            raise TemplateError(f"unknown template {name!r} (known: {', '.join(TEMPLATE_NAMES)})")

    def resolve_locale(self, name: str, locale: str | None) -> str:
        """The locale whose ``name`` template to use: the exact one, then its language, then
        the default locale (and the default's language)."""
        self._known(name)
        wanted = [] if not locale else [normalize_locale(locale)]
        wanted += [w.split("-", 1)[0] for w in wanted]
        wanted += [self.default_locale, self.default_locale.split("-", 1)[0]]
        dirs = self._locale_dirs()
        for candidate in wanted:
            if candidate in dirs and self._has(dirs[candidate], name, ".subject.txt"):
                return candidate
        raise TemplateError(
            f"{self.folder / self.default_locale / (name + '.subject.txt')}: not found "
            f"(every template needs a subject in the default locale {self.default_locale!r})"
        )

    def render(self, name: str, locale: str | None, context: Mapping[str, Any]) -> Rendered:
        resolved = self.resolve_locale(name, locale)
        dirname = self._locale_dirs()[resolved]
        values = {
            "product_name": self.product_name,
            "forgot_password_url": self.forgot_password_url,
            "locale": resolved,
            **context,
        }
        subject = _subject_line(self._render(f"{dirname}/{name}.subject.txt", values))
        if not subject:
            raise TemplateError(f"{self.folder / dirname / name}.subject.txt: empty subject")
        text = self._render(f"{dirname}/{name}.txt", values)
        html = None
        if self._has(dirname, name, ".html"):
            html = self._render(f"{dirname}/{name}.html", values)
        for body, suffix in ((text, ".txt"), (html, ".html")):
            if body is not None and not body.strip():
                raise TemplateError(f"{self.folder / dirname / name}{suffix}: empty body")
        return Rendered(name=name, locale=resolved, subject=subject, text=text, html=html)

    def _render(self, template_name: str, values: Mapping[str, Any]) -> str:
        with self._errors(template_name):
            return self._env.get_template(template_name).render(values)

    @contextmanager
    def _errors(self, template_name: str) -> Iterator[None]:
        path = self.folder / template_name
        try:
            yield
        except TemplateNotFound as exc:
            missing = self.folder / exc.name if exc.name else path
            raise TemplateError(f"{missing}: not found") from None
        except TemplateSyntaxError as exc:
            where = exc.filename or str(path)
            raise TemplateError(f"{where}:{exc.lineno}: {exc.message}") from None
        except UnicodeDecodeError:
            raise TemplateError(f"{path}: not UTF-8 text") from None
        except Exception as exc:
            # Undefined variables, sandbox refusals and anything a template's expression
            # raises: the template line comes from the traceback Jinja rewrites for us.
            where = _template_line(exc, self.folder) or str(path)
            detail = str(exc) if isinstance(exc, JinjaError) else f"{type(exc).__name__}: {exc}"
            raise TemplateError(f"{where}: {detail}") from None

    def sample_context(self, name: str, locale: str | None = None) -> dict[str, Any]:
        """Realistic values for every variable ``name`` receives, for previews and checks."""
        resolved = self.resolve_locale(name, locale)
        common: dict[str, Any] = {
            "product_name": self.product_name,
            "support_address": "support@example.com",
            "recipient": "alice@example.org",
            "original_subject": "Reset my security question",
            "received_at": datetime(2024, 5, 6, 9, 30, tzinfo=UTC),
            "locale": resolved,
        }
        extra: dict[str, dict[str, Any]] = {
            "request_received": {
                "reference": "R-1042",
                "expire_days": 7,
                "cancel_url": "https://example.com/requests/R-1042/cancel?token=3f9c2a7e",
            },
            "unverified_notice": {"claimed_from": "alice@example.org"},
            "use_registered_address": {
                "sender": "alice.smith@mail.example.net",
                "recipient": "alice.smith@mail.example.net",
            },
            "password_help": {"forgot_password_url": self.forgot_password_url},
            "request_completed": {"reference": "R-1042"},
            "request_denied": {
                "reference": "R-1042",
                "reason": "We could not confirm that the account belongs to you.",
            },
            "request_expired": {"reference": "R-1042", "expire_days": 7},
            "request_cancelled": {"reference": "R-1042", "cancelled_by": "owner"},
            "staff_reminder": {
                "requests": [
                    {
                        "reference": "R-1042",
                        "email": "alice@example.org",
                        "waiting_hours": 30,
                        "risk_flags": ["first_contact"],
                        "votes": 1,
                        "url": "https://support.example.com/requests/1042",
                    }
                ],
                "count": 1,
                "older_than_hours": 24,
                "console_url": "https://support.example.com/",
            },
        }
        return {**common, **extra[name]}

    def _sample_variants(self, name: str, locale: str) -> Iterator[dict[str, Any]]:
        """The sample context, and the variants that take a template's other branches."""
        sample = self.sample_context(name, locale)
        yield sample
        if name == "request_received":
            yield {**sample, "cancel_url": None, "expire_days": 1}
        if name == "request_cancelled":
            yield {**sample, "cancelled_by": "staff"}
        if name == "request_denied":
            yield {**sample, "reason": ""}
        if name == "staff_reminder":
            many = [{**sample["requests"][0], "risk_flags": [], "votes": 0}] * 3
            yield {**sample, "requests": many, "count": 12}
        yield {**sample, "original_subject": ""}

    def check(self) -> None:
        """Raise TemplateError, naming the file, unless every template is there in the
        default locale, every file compiles and uses only what its template receives, and
        every template renders in every locale."""
        dirs = self._locale_dirs()
        default_dir = dirs.get(self.default_locale)
        if default_dir is None:
            raise TemplateError(
                f"{self.folder / self.default_locale}: folder for the default locale not found"
            )
        for name in TEMPLATE_NAMES:
            for suffix in (".subject.txt", ".txt"):
                if not self._has(default_dir, name, suffix):
                    raise TemplateError(
                        f"{self.folder / default_dir / name}{suffix}: not found (every template "
                        f"needs a subject and a text body in the default locale "
                        f"{self.default_locale!r})"
                    )
        seen: dict[str, str] = {}
        for entry in sorted(self.folder.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            if entry.name.startswith("_"):
                for path in sorted(entry.rglob("*")):
                    if path.is_file() and not path.name.startswith("."):
                        self._compile(path, allowed=None)
                continue
            locale = normalize_locale(entry.name)
            if not _LOCALE.fullmatch(locale):
                raise TemplateError(
                    f"{entry}: not a locale folder (name it like en or de-at; folders of "
                    "shared templates start with '_')"
                )
            if locale in seen:
                raise TemplateError(f"{entry}: a second folder for locale {locale!r}")
            seen[locale] = entry.name
            self._check_locale(entry)
        for locale in sorted(seen):
            for name in TEMPLATE_NAMES:
                if not self._has(seen[locale], name, ".subject.txt"):
                    continue
                for variant in self._sample_variants(name, locale):
                    self.render(name, locale, variant)

    def _check_locale(self, folder: Path) -> None:
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            if path.name.startswith("_"):
                if path.is_file():
                    self._compile(path, allowed=None)
                continue
            name = _split(path.name)[0]
            if name not in TEMPLATE_NAMES or not path.is_file():
                raise TemplateError(
                    f"{path}: not a template file (expected <name>.subject.txt, <name>.txt or "
                    f"<name>.html with a name among {', '.join(TEMPLATE_NAMES)}; shared "
                    "templates start with '_')"
                )
            for needed in (".subject.txt", ".txt"):
                if not (folder / f"{name}{needed}").is_file():
                    raise TemplateError(
                        f"{folder / name}{needed}: not found ({path.name} needs it beside it)"
                    )
            allowed = {*COMMON_VARIABLES, *TEMPLATE_VARIABLES[name], "forgot_password_url"}
            self._compile(path, allowed=allowed)

    def _compile(self, path: Path, allowed: set[str] | None) -> None:
        template_name = path.relative_to(self.folder).as_posix()
        with self._errors(template_name):
            source = path.read_text(encoding="utf-8")
            parsed = self._env.parse(source, template_name, str(path))
            self._env.compile(parsed, template_name, str(path))
        if allowed is None:
            return
        unknown = meta.find_undeclared_variables(parsed) - allowed - set(self._env.globals)
        if unknown:
            name = _split(path.name)[0]
            raise TemplateError(
                f"{path}: uses {', '.join(sorted(unknown))}, which {name} does not receive "
                f"(it receives {', '.join(COMMON_VARIABLES + TEMPLATE_VARIABLES[name])})"
            )


def _split(filename: str) -> tuple[str, str]:
    """``request_denied.subject.txt`` -> (``request_denied``, ``.subject.txt``)."""
    for suffix in SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)], suffix
    return filename, ""


def _template_line(exc: BaseException, folder: Path) -> str | None:
    """``path:line`` of the innermost template frame in the traceback, if any."""
    root = os.path.normpath(folder) + os.sep
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.startswith(root):
            found = f"{frame.filename}:{frame.lineno}"
    return found
