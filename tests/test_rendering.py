"""Reply templates: the shipped set in every locale, the sandbox, locale fallback, operator
folders, and the `mailproc templates` commands."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailproc.cli import main
from mailproc.config import TemplatesSettings
from mailproc.rendering import (
    SHIPPED_TEMPLATES,
    TEMPLATE_NAMES,
    Rendered,
    TemplateError,
    Templates,
)

SHIPPED_LOCALES = ("en", "de")
# What each reply must show of its own variables (the sample values of sample_context).
SHOWN = {
    "request_received": ("reference", "cancel_url"),
    "unverified_notice": ("claimed_from",),
    "use_registered_address": ("sender",),
    "password_help": ("forgot_password_url",),
    "request_completed": ("reference", "support_address"),
    "request_denied": ("reference", "reason"),
    "request_expired": ("reference",),
    "request_cancelled": ("reference",),
    "staff_reminder": ("count", "console_url"),
}
IN_SUBJECT = {
    "request_received",
    "request_completed",
    "request_denied",
    "request_expired",
    "request_cancelled",
}


@pytest.fixture
def shipped() -> Templates:
    return Templates(SHIPPED_TEMPLATES, product_name="Acme")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An operator's copy of the shipped templates."""
    copy = tmp_path / "templates"
    shutil.copytree(SHIPPED_TEMPLATES, copy)
    return copy


def render_sample(
    templates: Templates, name: str, locale: str | None = "en", **values: object
) -> Rendered:
    return templates.render(name, locale, {**templates.sample_context(name, locale), **values})


@pytest.mark.parametrize("locale", SHIPPED_LOCALES)
@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_every_shipped_template_renders_in_every_shipped_locale(
    shipped: Templates, name: str, locale: str
) -> None:
    sample = shipped.sample_context(name, locale)
    rendered = shipped.render(name, locale, sample)
    assert (rendered.name, rendered.locale) == (name, locale)
    assert rendered.subject
    assert rendered.subject == rendered.subject.strip()
    assert "\n" not in rendered.subject
    assert rendered.subject.startswith("Acme: ")
    assert rendered.text.strip()
    assert rendered.text.endswith("\nAcme Support\n")
    assert rendered.html is not None
    assert "Acme Support" in rendered.html
    assert f'<html lang="{locale}">' in rendered.html
    for variable in SHOWN[name]:
        assert str(sample[variable]) in rendered.text, variable
        assert str(sample[variable]) in rendered.html, variable
    if name in IN_SUBJECT:
        assert sample["reference"] in rendered.subject
    if "expire_days" in sample:
        assert f" {sample['expire_days']} " in rendered.text


def test_the_shipped_folder_passes_check(shipped: Templates) -> None:
    shipped.check()
    assert shipped.names() == list(TEMPLATE_NAMES)
    assert shipped.locales() == ["de", "en"]


def test_shipped_folder_and_defaults_come_from_settings() -> None:
    templates = Templates.from_settings(TemplatesSettings())
    assert templates.folder == SHIPPED_TEMPLATES
    assert templates.default_locale == "en"
    rendered = render_sample(templates, "password_help")
    assert "https://example.com/forgot-password" in rendered.text
    assert rendered.text.endswith("\nExample Support\n")


def test_product_name_and_forgot_password_url_default_into_the_context(folder: Path) -> None:
    templates = Templates(folder, product_name="Acme", forgot_password_url="https://acme.test/fp")
    context = templates.sample_context("password_help")
    del context["product_name"], context["forgot_password_url"]
    rendered = templates.render("password_help", "en", context)
    assert "https://acme.test/fp" in rendered.text
    assert rendered.text.endswith("\nAcme Support\n")


def test_cancel_link_only_when_there_is_one(shipped: Templates) -> None:
    with_link = render_sample(shipped, "request_received")
    assert "cancel it here" in with_link.text
    without = render_sample(shipped, "request_received", cancel_url=None)
    assert "cancel" not in without.text
    assert "support@example.com" in without.text
    assert without.html is not None
    assert "href" in without.html
    assert "cancel" not in without.html


def test_expire_days_singular_and_plural(shipped: Templates) -> None:
    assert "within 7 days," in render_sample(shipped, "request_received").text
    assert "within 1 day," in render_sample(shipped, "request_received", expire_days=1).text
    assert "nach 1 Tag " in render_sample(shipped, "request_expired", "de", expire_days=1).text


def test_cancelled_by_owner_or_staff(shipped: Templates) -> None:
    assert "at your request" in render_sample(shipped, "request_cancelled").text
    staff = render_sample(shipped, "request_cancelled", cancelled_by="staff").text
    assert "by our support team" in staff


def test_unverified_notice_does_not_repeat_the_unverified_subject(shipped: Templates) -> None:
    rendered = render_sample(shipped, "unverified_notice", original_subject="Call +1 555 0100 now")
    assert "555" not in rendered.subject + rendered.text + (rendered.html or "")


def test_use_registered_address_reads_the_same_for_any_sender(shipped: Templates) -> None:
    one = render_sample(shipped, "use_registered_address", sender="a@x.example", recipient="x")
    other = render_sample(shipped, "use_registered_address", sender="b@y.example", recipient="y")
    assert one.subject == other.subject
    assert one.text.replace("a@x.example", "S") == other.text.replace("b@y.example", "S")


def test_html_escapes_values_and_text_keeps_them_verbatim(shipped: Templates) -> None:
    reason = '<script>alert("x")</script> & more'
    rendered = render_sample(shipped, "request_denied", reason=reason)
    assert reason in rendered.text
    assert rendered.html is not None
    assert "<script>" not in rendered.html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; more" in rendered.html


def test_subject_injection_collapses_to_one_line(shipped: Templates) -> None:
    rendered = render_sample(shipped, "request_denied", reference="R-1\r\nBcc: x@evil.example")
    assert "\r" not in rendered.subject
    assert "\n" not in rendered.subject
    assert rendered.subject.endswith("(R-1 Bcc: x@evil.example)")


def test_subject_whitespace_and_control_characters_collapse(folder: Path) -> None:
    (folder / "en" / "request_denied.subject.txt").write_text(
        "  Denied:\t{{ reference }}\n\n  again\x0b\x00{{ reason }}  \n"
    )
    rendered = render_sample(Templates(folder), "request_denied", reason="a\u2028b\x85c")
    assert rendered.subject == "Denied: R-1042 again a b c"


def test_an_empty_subject_is_an_error(folder: Path) -> None:
    (folder / "en" / "request_denied.subject.txt").write_text("{{ '' }}\n \r\n")
    with pytest.raises(TemplateError, match=r"en/request_denied\.subject\.txt: empty subject"):
        render_sample(Templates(folder), "request_denied")


def test_undefined_variable_names_the_file_and_line(folder: Path) -> None:
    (folder / "en" / "request_denied.txt").write_text("Hello\n{{ reson }}\n")
    templates = Templates(folder)
    with pytest.raises(TemplateError) as caught:
        render_sample(templates, "request_denied")
    assert str(caught.value) == (f"{folder / 'en' / 'request_denied.txt'}:2: 'reson' is undefined")
    with pytest.raises(TemplateError, match=r"request_denied\.txt: uses reson, which"):
        templates.check()


def test_a_variable_missing_from_the_context_names_the_file(shipped: Templates) -> None:
    context = shipped.sample_context("request_denied")
    del context["reason"]
    with pytest.raises(TemplateError, match=r"en/request_denied\.txt:\d+: 'reason' is undefined"):
        shipped.render("request_denied", "en", context)


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ reason.__class__.__mro__[1].__subclasses__() }}",
        "{% set items = [] %}{{ items.append(1) }}",
        "{{ received_at.__class__.__init__.__globals__ }}",
    ],
)
def test_the_sandbox_refuses_python_internals(folder: Path, source: str) -> None:
    (folder / "en" / "request_denied.txt").write_text(f"Hello\n{source}\n")
    with pytest.raises(
        TemplateError, match=r"request_denied\.txt:2: access to attribute .* unsafe"
    ):
        render_sample(Templates(folder), "request_denied")


def test_a_syntax_error_names_the_file_and_line(folder: Path) -> None:
    (folder / "de" / "request_expired.html").write_text("<p>\n{% if reference %}\n</p>\n")
    templates = Templates(folder)
    with pytest.raises(TemplateError, match=r"request_expired\.html:2: Unexpected end .*endif"):
        render_sample(templates, "request_expired", "de")
    with pytest.raises(TemplateError, match=r"de/request_expired\.html:2: "):
        templates.check()


@pytest.mark.parametrize(
    ("asked", "used"),
    [
        ("de-AT", "de"),
        ("de_AT", "de"),
        ("DE-at", "de"),
        ("de_DE.UTF-8", "de"),
        ("de", "de"),
        ("fr", "en"),
        ("fr-CA", "en"),
        ("", "en"),
        (None, "en"),
        ("../de", "en"),
    ],
)
def test_locale_fallback(shipped: Templates, asked: str | None, used: str) -> None:
    assert shipped.resolve_locale("request_denied", asked) == used
    assert render_sample(shipped, "request_denied", asked).locale == used


def test_german_text_for_an_austrian_recipient(shipped: Templates) -> None:
    rendered = render_sample(shipped, "request_completed", "de-AT")
    assert rendered.text.startswith("Guten Tag,")
    assert "Ihre Sicherheitsfrage wurde zurückgesetzt" in rendered.subject


def test_a_locale_folder_may_hold_only_some_templates(folder: Path) -> None:
    (folder / "de_AT").mkdir()
    (folder / "de_AT" / "request_denied.subject.txt").write_text("Servus {{ reference }}\n")
    (folder / "de_AT" / "request_denied.txt").write_text("Grüß Gott, {{ reason }}\n")
    templates = Templates(folder)
    templates.check()
    assert templates.locales() == ["de", "de-at", "en"]
    assert templates.locales("request_denied") == ["de", "de-at", "en"]
    assert templates.locales("request_expired") == ["de", "en"]
    denied = render_sample(templates, "request_denied", "de-AT")
    assert (denied.locale, denied.subject, denied.html) == ("de-at", "Servus R-1042", None)
    assert render_sample(templates, "request_expired", "de-AT").locale == "de"


def test_an_operator_folder_overrides_the_shipped_wording(folder: Path) -> None:
    body = folder / "en" / "password_help.txt"
    body.write_text(
        body.read_text().replace("Forgot Password link", "Reset link on the login page")
    )
    (folder / "en" / "password_help.html").unlink()
    templates = Templates.from_settings(TemplatesSettings(path=str(folder), product_name="Acme"))
    templates.check()
    rendered = render_sample(templates, "password_help")
    assert "Reset link on the login page" in rendered.text
    assert rendered.html is None
    assert not templates.has_html("password_help", "en")
    assert templates.has_html("password_help", "de")


def test_edits_apply_without_a_new_templates_object(folder: Path) -> None:
    templates = Templates(folder)
    assert render_sample(templates, "request_expired").subject.startswith("Example: ")
    subject = folder / "en" / "request_expired.subject.txt"
    subject.write_text("Expired: {{ reference }}\n")
    os.utime(subject, (1, 1))  # an mtime that differs from the cached one for sure
    assert render_sample(templates, "request_expired").subject == "Expired: R-1042"


@pytest.mark.parametrize("suffix", [".subject.txt", ".txt"])
def test_check_names_a_template_missing_from_the_default_locale(folder: Path, suffix: str) -> None:
    missing = folder / "en" / f"request_expired{suffix}"
    missing.unlink()
    with pytest.raises(TemplateError) as caught:
        Templates(folder).check()
    assert str(caught.value).startswith(f"{missing}: not found")
    assert "default locale 'en'" in str(caught.value)


def test_check_names_a_text_body_missing_beside_its_subject(folder: Path) -> None:
    (folder / "de" / "request_denied.txt").unlink()
    with pytest.raises(TemplateError, match=r"de/request_denied\.txt: not found"):
        Templates(folder).check()
    with pytest.raises(TemplateError, match=r"de/request_denied\.txt: not found"):
        render_sample(Templates(folder), "request_denied", "de")


def test_check_refuses_a_misspelt_template_file(folder: Path) -> None:
    (folder / "de" / "request_recieved.txt").write_text("Hallo\n")
    with pytest.raises(TemplateError, match=r"de/request_recieved\.txt: not a template file"):
        Templates(folder).check()


def test_shared_files_starting_with_underscore_are_compiled_and_can_be_included(
    folder: Path,
) -> None:
    (folder / "_shared").mkdir(exist_ok=True)  # the shipped set has one already
    (folder / "_shared" / "footer.txt").write_text("-- \n{{ product_name }} Support\n")
    (folder / "en" / "request_expired.txt").write_text(
        "Expired: {{ reference }}\n{% include '_shared/footer.txt' %}"
    )
    templates = Templates(folder, product_name="Acme")
    templates.check()
    assert (
        render_sample(templates, "request_expired").text == "Expired: R-1042\n-- \nAcme Support\n"
    )
    (folder / "_shared" / "footer.txt").write_text("{% if %}\n")
    with pytest.raises(TemplateError, match=r"_shared/footer\.txt:1: "):
        templates.check()


def test_check_renders_the_branches_sample_values_do_not_take(folder: Path) -> None:
    (folder / "de" / "request_received.txt").write_text(
        "{% if cancel_url %}{{ cancel_url }}{% else %}{{ 1 / 0 }}{% endif %}\n"
    )
    with pytest.raises(TemplateError, match=r"de/request_received\.txt:1: ZeroDivisionError"):
        Templates(folder).check()


def test_unknown_template_name(shipped: Templates) -> None:
    with pytest.raises(TemplateError, match=r"unknown template 'nope' \(known: request_received, "):
        shipped.render("nope", "en", {})
    with pytest.raises(TemplateError, match="unknown template"):
        shipped.resolve_locale("../en/request_denied", "en")


def test_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="template folder not found"):
        Templates(tmp_path / "nowhere")
    (tmp_path / "gone").mkdir()
    settings = TemplatesSettings(path=str(tmp_path / "gone"))
    (tmp_path / "gone").rmdir()
    with pytest.raises(TemplateError, match=r"\[templates\] path: folder not found"):
        Templates.from_settings(settings)
    with pytest.raises(TemplateError, match=r"folder for the default locale not found"):
        Templates(SHIPPED_TEMPLATES, default_locale="fr").check()


# The command line.


def run(tmp_path: Path, *args: str, templates: dict[str, str] | None = None) -> tuple[int, str]:
    config = tmp_path / "mailproc.toml"
    lines = ["[templates]", *(f'{key} = "{value}"' for key, value in (templates or {}).items())]
    config.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["--config", str(config), *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_cli_list(tmp_path: Path, folder: Path) -> None:
    (folder / "de" / "request_denied.html").unlink()
    code, output = run(tmp_path, "templates", "list", "--json", templates={"path": str(folder)})
    assert code == 0, output
    listed = json.loads(output)
    assert listed["folder"] == str(folder)
    assert listed["default_locale"] == "en"
    assert [t["name"] for t in listed["templates"]] == list(TEMPLATE_NAMES)
    denied = next(t for t in listed["templates"] if t["name"] == "request_denied")
    assert denied["locales"] == [
        {"locale": "de", "html": False},
        {"locale": "en", "html": True},
    ]

    code, output = run(tmp_path, "templates", "list", templates={"path": str(folder)})
    assert code == 0
    assert "request_denied            de, en+html\n" in output
    assert "request_expired           de+html, en+html\n" in output
    assert output.endswith(f"folder: {folder} (default locale en)\n")


def test_cli_preview(tmp_path: Path) -> None:
    code, output = run(
        tmp_path, "templates", "preview", "request_denied", templates={"product_name": "Acme"}
    )
    assert code == 0, output
    subject, blank, *body = output.splitlines()
    assert (
        subject == "Subject: Acme: your security question reset request was not approved (R-1042)"
    )
    assert blank == ""
    assert body[0] == "Hello,"
    assert body[-1] == "Acme Support"
    assert "<p>" not in output

    code, output = run(
        tmp_path, "templates", "preview", "request_completed", "--locale", "de-AT", "--html"
    )
    assert code == 0, output
    assert "Subject: Example: Ihre Sicherheitsfrage wurde zurückgesetzt (R-1042)\n\n" in output
    assert " HTML " in output
    assert '<html lang="de">' in output


def test_cli_preview_without_an_html_body_says_so(tmp_path: Path, folder: Path) -> None:
    (folder / "en" / "request_expired.html").unlink()
    code, output = run(
        tmp_path,
        "templates",
        "preview",
        "request_expired",
        "--html",
        templates={"path": str(folder)},
    )
    assert code == 0, output
    assert "(no HTML body for request_expired in en: replies are text only)" in output


def test_cli_preview_of_an_unknown_template_is_one_line_with_the_known_names(
    tmp_path: Path,
) -> None:
    code, output = run(tmp_path, "templates", "preview", "request_recieved")
    assert code == 2
    assert output == (
        "Error: unknown template 'request_recieved'; known: " + ", ".join(TEMPLATE_NAMES) + "\n"
    )


def test_cli_broken_template_is_one_line_naming_the_file(tmp_path: Path, folder: Path) -> None:
    (folder / "en" / "request_denied.txt").write_text("{{ reson }}\n")
    for command in (["check"], ["preview", "request_denied"]):
        code, output = run(tmp_path, "templates", *command, templates={"path": str(folder)})
        assert code == 1
        assert output.startswith(f"Error: {folder / 'en' / 'request_denied.txt'}")
        assert output.count("\n") == 1


def test_cli_check(tmp_path: Path) -> None:
    code, output = run(tmp_path, "templates", "check")
    assert (code, output) == (0, f"templates OK ({SHIPPED_TEMPLATES})\n")
